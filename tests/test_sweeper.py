"""The ``kvq`` Hydra sweeper: drops invalid and duplicate combinations before any job launches."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

import kvq.config  # noqa: F401 -- registers the schemas the sweeper composes against
from kvq.results import read_result

from .conftest import REPO_ROOT, TINY, train_eval_cli


@pytest.fixture
def multirun(hydra_sweep_runner, hydra_restore_singletons, tmp_path: Path):
    """``multirun(overrides) -> (sweep, launched job configs, dropped.json, job dirs)``: in-process,
    basic launcher, a task that records its config (no model run)."""

    def _run(overrides: list[str]):
        seen: list[DictConfig] = []

        def task(cfg: DictConfig) -> float:
            seen.append(cfg)
            return 1.0

        GlobalHydra.instance().clear()
        with hydra_sweep_runner(
            calling_file=str(REPO_ROOT / "train_eval.py"),
            calling_module=None,
            task_function=task,
            config_path="conf",
            config_name="config",
            overrides=overrides,
            temp_dir=tmp_path / "sweep",
        ) as sweep:
            dropped = json.loads((tmp_path / "sweep" / "dropped.json").read_text())
            dirs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())
        GlobalHydra.instance().clear()  # (the runner deletes its sweep directory on exit)
        return sweep, seen, dropped, dirs

    return _run


def _choices(cfg: DictConfig) -> tuple[str, ...]:
    return (
        cfg.method._target_.rsplit(".", 1)[-1],
        cfg.bits._target_.rsplit(".", 1)[-1],
        str(cfg.grouping.size),
    )


def test_plugin_is_discovered_and_the_default_sweeper(compose) -> None:
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    names = [c.__name__ for c in Plugins.instance().discover(Sweeper)]
    assert "KVQSweeper" in names
    assert "kvq.yaml" in ConfigStore.instance().list("hydra/sweeper")
    cfg = compose(return_hydra_config=True)
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.kvq_sweeper.kvq_sweeper.KVQSweeper"
    assert (
        cfg.hydra.sweeper.model_aware and cfg.hydra.sweeper.drop_invalid and cfg.hydra.sweeper.drop_duplicates
    )


def test_invalid_combination_is_dropped_before_launch(multirun, tmp_path: Path, capsys) -> None:
    sweep, seen, dropped, dirs = multirun([*TINY, "method=uniform,adaptive", "bits=b4,attn"])
    launched = sorted(_choices(c) for c in seen)
    assert len(launched) == 3 and ("AdaptiveQuantizer", "AttentionAwareBits", "None") not in launched
    assert len(sweep.returns[0]) == 3
    (d,) = dropped
    assert d["index"] == 3 and d["status"] == "invalid" and "method=adaptive" in d["overrides"]
    assert d["reason"].startswith("attn-adaptive: ") and "\n" not in d["reason"]
    out = capsys.readouterr().out
    assert "dropped before launch" in out and "method=adaptive bits=attn" in out
    assert "4 combinations -> 3 jobs to launch, 1 dropped (1 invalid, 0 duplicate)" in out
    # the kept jobs are numbered 0..2 in their own run directories
    assert dirs == ["0", "1", "2"]


def test_duplicates_are_dropped_keeping_the_canonical_one(multirun, tmp_path: Path, capsys) -> None:
    # tiny_random: 32-feature layer units, so g32 and g64 are grouping=none; method=none ignores
    # them (its canonical form has the default grouping, g64)
    _, seen, dropped, _ = multirun([*TINY, "grouping=g64,none,g32", "method=none,uniform"])
    assert sorted(_choices(c) for c in seen) == [
        ("FullPrecision", "FixedBits", "64"),
        ("UniformQuantizer", "FixedBits", "None"),
    ]
    assert [(d["index"], d["status"]) for d in dropped] == [
        (1, "duplicate"),
        (2, "duplicate"),
        (4, "duplicate"),
        (5, "duplicate"),
    ]
    assert dropped[0]["reason"].startswith("same experiment as #3 -- group-covers-unit: grouping size 64")
    assert dropped[1]["reason"].startswith("same experiment as #0 -- baseline-variant: ")
    assert "6 combinations -> 2 jobs to launch, 4 dropped (0 invalid, 4 duplicate)" in capsys.readouterr().out


def test_exact_repeats_and_logging_only_differences_are_duplicates(multirun, tmp_path: Path) -> None:
    _, seen, dropped, _ = multirun([*TINY, "logger=none,wandb", "seed=0,1"])
    assert sorted((c.logger._target_.rsplit(".", 1)[-1], c.seed) for c in seen) == [
        ("NoTracker", 0),
        ("NoTracker", 1),
    ]
    assert [d["reason"] for d in dropped] == ["same experiment as #0", "same experiment as #1"]


def test_batches_and_switches(multirun, tmp_path: Path) -> None:
    sweep, seen, dropped, dirs = multirun(
        [*TINY, "method=uniform,adaptive", "bits=b4,attn", "hydra.sweeper.max_batch_size=1"]
    )
    assert len(seen) == 3 and [len(b) for b in sweep.returns] == [1, 1, 1]
    _, seen, dropped, _ = multirun(
        [*TINY, "method=uniform,adaptive", "bits=b4,attn", "hydra.sweeper.drop_invalid=false"]
    )
    assert len(seen) == 4  # the invalid job launches and records itself as skipped
    _, seen, dropped, _ = multirun([*TINY, "grouping=none,g32", "hydra.sweeper.drop_duplicates=false"])
    assert len(seen) == 2
    _, seen, dropped, _ = multirun([*TINY, "grouping=none,g32", "hydra.sweeper.model_aware=false"])
    assert len(seen) == 2  # without the model's shape g32 is not known to cover the unit


def test_everything_dropped_launches_nothing(multirun, tmp_path: Path, capsys) -> None:
    sweep, seen, dropped, dirs = multirun([*TINY, "method=adaptive", "bits=attn,attn"])
    assert seen == [] and sweep.returns == []
    assert "2 combinations -> 0 jobs to launch, 2 dropped (2 invalid, 0 duplicate)" in capsys.readouterr().out


def test_zero_gpus_are_not_sent_to_submitit(compose, hydra_restore_singletons) -> None:
    from hydra.core.plugins import Plugins
    from hydra.types import HydraContext

    for gpus, sent in ((0, None), (2, 2)):
        cfg = compose(
            ["hydra/launcher=slurm", f"hydra.launcher.gpus_per_node={gpus}", "hydra.launcher.partition=p"],
            return_hydra_config=True,
        )
        assert cfg.hydra.launcher.cpus_per_task == 8 and cfg.hydra.launcher.array_parallelism == 32
        sweeper = Plugins.instance().instantiate_sweeper(
            hydra_context=HydraContext(config_loader=None, callbacks=None),  # type: ignore[arg-type]
            task_function=lambda c: None,
            config=cfg,
        )
        params = sweeper.launcher.params
        assert params["gpus_per_node"] == sent and params["partition"] == "p"


# --------------------------------------------------------------------------- the real CLI
@pytest.mark.slow
def test_train_eval_multirun_launches_3_of_4(tmp_path: Path) -> None:
    out = train_eval_cli(
        [
            "-m",
            *TINY,
            "data.max_windows=1",
            "method=uniform,adaptive",
            "bits=b4,attn",
            f"hydra.sweep.dir={tmp_path}/m",
        ],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "dropped before launch" in out.stdout and "attn-adaptive" in out.stdout
    jobs = sorted(
        p for p in (tmp_path / "m").iterdir() if p.is_dir() and p.name.isdigit()
    )  # job dirs (not report/)
    assert [p.name for p in jobs] == ["0", "1", "2"]
    recs = [read_result(p) for p in jobs]
    assert all(r["status"] == "ok" for r in recs)
    assert {(r["choices"]["method"], r["choices"]["bits"]) for r in recs} == {
        ("uniform", "b4"),
        ("uniform", "attn"),
        ("adaptive", "b4"),
    }


def test_installed_package_provides_the_plugin_outside_the_repo(tmp_path: Path) -> None:
    """From another directory (``kvq run -m``, a SLURM job): found through the installed package."""
    code = (
        "from hydra.core.plugins import Plugins; from hydra.plugins.sweeper import Sweeper; "
        "import hydra_plugins.kvq_sweeper as m; print(m.__file__); "
        "print([c.__name__ for c in Plugins.instance().discover(Sweeper)])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "KVQSweeper" in out.stdout, (
        "the kvq sweeper is not discovered outside the repository: reinstall the package (pip install -e .)"
    )
