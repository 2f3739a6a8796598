"""Results that can never be wrong: the store's identity, silent no-ops, one line for every failure.

One regression test (or a few) per case of the issue "Results that can never be wrong"; the
fuzz of the configuration space is ``test_random_points_are_ok_skipped_or_failed_in_one_line``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvq import models
from kvq.errors import KVQError, MalformedConfig
from kvq.results import ResultStore, read_result, write_result
from kvq.run import run

from .conftest import CONF_DIR, REPO_ROOT, TINY, train_eval_cli


def _strict_json(path: Path) -> dict:
    """``path`` parsed as strict JSON (a bare NaN/Infinity fails the test)."""

    def bad(c: str) -> None:
        pytest.fail(f"{path} is not strict JSON: it holds {c}")

    return json.loads(Path(path).read_text(), parse_constant=bad)


def _store() -> ResultStore:
    return ResultStore(Path(os.environ["KVQ_RESULTS_DIR"]))


@pytest.fixture
def no_model_load(monkeypatch):
    """The tiny model must not load (the run must stop before any compute)."""

    def boom(*a, **k):
        raise AssertionError("the model must not load")

    models.clear_model_cache()
    monkeypatch.setattr(models.TinyRandomLlama, "load", boom)
    yield
    models.clear_model_cache()


# ============================================================================ 1. the store key
@pytest.mark.parametrize(
    "invalid, valid",
    [
        (["method=adaptive", "bits=attn", "bits.n_min=4", "bits.n_max=4"], ["method=adaptive", "bits=b4"]),
        (
            [
                "method=uniform",
                "bits=attn",
                "bits.n_min=4",
                "bits.n_max=4",
                "kv.key_axis=channel",
                "kv.key_group=16",
            ],
            ["bits=b4", "kv.key_axis=channel", "kv.key_group=16"],
        ),
        (["method=none", "granularity=token"], ["method=none"]),
    ],
    ids=["adaptive-attn-n4", "channel-keys-attn-n4", "baseline-token"],
)
def test_a_verdict_never_answers_for_a_result_and_back(compose, tmp_path: Path, invalid, valid) -> None:
    base = [*TINY, "data.max_windows=1"]
    # an invalid point first: skipped; its valid twin then computes (is not "reused ... (skipped)")
    assert math.isnan(run(compose([*base, *invalid]), out_dir=tmp_path / "a"))
    assert read_result(tmp_path / "a")["status"] == "skipped"
    run(compose([*base, *valid]), out_dir=tmp_path / "b")
    b = read_result(tmp_path / "b")
    assert b["status"] == "ok" and "reused_from" not in b and math.isfinite(b["metrics"]["test/ppl"])
    # the reverse: with the valid result stored, the invalid point is still skipped
    run(compose([*base, *invalid]), out_dir=tmp_path / "c")
    c = read_result(tmp_path / "c")
    assert c["status"] == "skipped" and "reused_from" not in c and c["metrics"] == {}


def test_skipped_verdicts_are_kept_apart_and_never_reused(compose, tmp_path: Path) -> None:
    run(compose([*TINY, "method=adaptive", "bits=attn"]), out_dir=tmp_path / "a")
    store = _store()
    (verdict,) = list((store.root / "verdicts").glob("*.json"))
    rec = _strict_json(verdict)
    assert rec["status"] == "skipped" and rec["reason"].startswith("attn-adaptive:")
    assert store.records() == [] and not list(store.root.glob("*.json"))  # a verdict is no result
    assert store.put("k", rec) is None and store.get(verdict.stem) is None


def test_the_key_holds_dtype_device_fingerprints_and_versions(compose, tmp_path: Path) -> None:
    from hydra.utils import instantiate

    from kvq.experiment import NUMERIC_PACKAGES, experiment_config, identity, make_point
    from kvq.validate import experiment_key

    cfg = compose([*TINY, "model.dtype=auto"])
    src = instantiate(cfg.model, _convert_="all")
    cpu, gpu = identity(cfg, src, torch.device("cpu")), identity(cfg, src, torch.device("cuda"))
    assert (cpu["device"], cpu["dtype"]) == ("cpu", "float32")  # auto: fp32 on CPU, bf16 on GPU
    assert (gpu["device"], gpu["dtype"]) == ("cuda", "bfloat16")
    assert cpu["model"] == src.fingerprint() and cpu["data"].startswith("pydoc:python-")
    assert set(cpu["versions"]) == set(NUMERIC_PACKAGES) == {"kvq", "torch", "transformers"}
    # a CPU result is never found under the key of the same config run on a GPU
    run(cfg, out_dir=tmp_path / "cpu")
    rec = read_result(tmp_path / "cpu")
    meta = src.meta()
    point = make_point(cfg, meta)
    ecfg = experiment_config(cfg)
    assert experiment_key(ecfg, meta, point, identity=cpu) == rec["key"]
    gpu_key = experiment_key(ecfg, meta, point, identity=gpu)
    assert gpu_key != rec["key"] and _store().get(gpu_key) is None
    for k, v in (("dtype", "float16"), ("model", "other"), ("data", "other"), ("versions", {"torch": "0"})):
        assert experiment_key(ecfg, meta, point, identity={**cpu, k: v}) != rec["key"]


def test_editing_the_local_data_file_recomputes(compose, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    cfg = [*TINY, "method=none", "data=local", f"data.path={text}"]
    run(compose(cfg), out_dir=tmp_path / "a")
    run(compose(cfg), out_dir=tmp_path / "b")
    assert read_result(tmp_path / "b")["reused_from"]  # unchanged: reused
    text.write_text("Pack my box with five dozen liquor jugs, said the sphinx. " * 40)
    run(compose(cfg), out_dir=tmp_path / "c")
    c = read_result(tmp_path / "c")
    assert "reused_from" not in c and c["key"] != read_result(tmp_path / "a")["key"]
    assert c["metrics"]["test/ppl"] != read_result(tmp_path / "a")["metrics"]["test/ppl"]


def test_editing_local_weights_recomputes(compose, tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    loaded = models.TinyRandomLlama().load()
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    cfg = ["model=hf", f"model.name_or_path={folder}", "model.dtype=float32", *TINY[1:], "method=none"]
    models.clear_model_cache()
    try:
        run(compose(cfg), out_dir=tmp_path / "a")
        run(compose(cfg), out_dir=tmp_path / "b")
        assert read_result(tmp_path / "b")["reused_from"]
        with torch.no_grad():
            loaded.model.lm_head.weight.mul_(3.0)
        loaded.model.save_pretrained(folder)  # the same path, other weights
        models.clear_model_cache()
        run(compose(cfg), out_dir=tmp_path / "c")
    finally:
        models.clear_model_cache()
    a, c = read_result(tmp_path / "a"), read_result(tmp_path / "c")
    assert "reused_from" not in c and c["key"] != a["key"]
    assert c["metrics"]["test/ppl"] != pytest.approx(a["metrics"]["test/ppl"])


# ============================================================================ 2. reuse=false
def test_reuse_false_recomputes_the_baseline_too(compose, tmp_path: Path) -> None:
    run(compose([*TINY, "bits=b2"]), out_dir=tmp_path / "a")
    a = read_result(tmp_path / "a")["metrics"]
    store = _store()
    (base_path,) = [p for p in store.root.glob("*.json") if p.stem != read_result(tmp_path / "a")["key"]]
    base = json.loads(base_path.read_text())
    base["metrics"]["test/ppl"] = 12345.0  # a stale baseline
    write_result(store.root, base, name=base_path.name)
    run(compose([*TINY, "bits=b2", "reuse=false"]), out_dir=tmp_path / "b")
    b = read_result(tmp_path / "b")["metrics"]
    assert b["test/baseline_ppl"] == pytest.approx(a["test/baseline_ppl"]) != 12345.0
    assert json.loads(base_path.read_text())["metrics"]["test/ppl"] == pytest.approx(a["test/baseline_ppl"])


# ============================================================================ 3. silent no-ops
def test_channel_keys_with_a_key_group_beyond_the_window_are_skipped(compose, tmp_path: Path) -> None:
    cfg = [*TINY, "data.seq_len=64", "data.max_windows=1", "kv.key_axis=channel", "kv.key_group=100"]
    assert math.isnan(run(compose(cfg), out_dir=tmp_path))
    rec = read_result(tmp_path)
    assert rec["status"] == "skipped" and rec["reason"].startswith("nothing-quantized:")
    assert "kv.key_group=100" in rec["reason"] and "\n" not in rec["reason"]


def test_a_run_that_measures_nothing_quantized_is_skipped(compose, tmp_path: Path, monkeypatch) -> None:
    """Without the rule, the run itself sees that its cache held no quantized unit."""
    import kvq.validate

    monkeypatch.setattr(
        kvq.validate, "RULES", [r for r in kvq.validate.RULES if r.name != "nothing-quantized"]
    )
    assert math.isnan(run(compose([*TINY, "kv.residual=40"]), out_dir=tmp_path / "a"))
    rec = read_result(tmp_path / "a")
    assert rec["status"] == "skipped" and rec["reason"].startswith("nothing-quantized: the cache stored no")
    assert rec["metrics"] == {} and _store().get(rec["key"]) is None  # not stored as a result
    # the baseline quantizes nothing by definition: it is ok
    run(compose([*TINY, "method=none"]), out_dir=tmp_path / "b")
    assert read_result(tmp_path / "b")["status"] == "ok"


@pytest.mark.parametrize("dtype", ["int8", "bool", "int7", "complex64"])
def test_only_floating_fp_dtypes_are_valid(compose, tmp_path: Path, dtype: str) -> None:
    run(compose([*TINY, f"kv.fp_dtype={dtype}"]), out_dir=tmp_path)
    rec = read_result(tmp_path)
    assert rec["status"] == "skipped" and "\n" not in rec["reason"]
    assert rec["reason"].startswith("values: kv.fp_dtype must name a floating torch dtype")
    # the fix points at where the kv knobs live (there is no conf/kv/)
    assert "the kv: node of conf/config.yaml" in rec["reason"] and "conf/kv/" not in rec["reason"]


def test_the_values_fix_names_an_existing_place(compose) -> None:
    from kvq.validate import validate

    for ov, node in (
        ("kv.residual=-1", "kv"),
        ("bits.key_bits=0", "bits"),
        ("method.lloyd_iters=-1", "method"),
    ):
        rep = validate(compose([*TINY, "method=adaptive", ov]))
        (v,) = [v for v in rep.violations if v.rule == "values"]
        where = re.search(r"(conf/[\w/.]+)", v.fix).group(1)
        assert (REPO_ROOT / where.rstrip("/")).exists(), v.fix
        assert node in v.fix


# ============================================================================ 4. NaN metrics
def test_nan_weights_fail_in_one_line_and_are_never_stored(compose, tmp_path: Path, monkeypatch) -> None:
    """A model whose lm_head is NaN: exit 1 with one line naming the weights, nothing stored."""
    orig = models.TinyRandomLlama.load

    def nan_head(self, *a, **k):
        loaded = orig(self, *a, **k)
        with torch.no_grad():
            loaded.model.lm_head.weight.fill_(float("nan"))
        return loaded

    models.clear_model_cache()
    monkeypatch.setattr(models.TinyRandomLlama, "load", nan_head)
    try:
        for out in ("a", "b"):  # never stored, so never reused: the second run fails again
            with pytest.raises(KVQError, match=r"weights of .* are not finite \(NaN or Inf in lm_head") as e:
                run(compose([*TINY, "bits=b2"]), out_dir=tmp_path / out)
            assert "\n" not in str(e.value)
            rec = _strict_json(tmp_path / out / "result.json")
            assert rec["status"] == "failed" and rec["reason"] == str(e.value)
        assert not list(_store().root.glob("*.json"))
    finally:
        models.clear_model_cache()


def test_nan_metrics_fail_in_one_line_naming_their_source(compose, tmp_path: Path, monkeypatch) -> None:
    from kvq.module import EvalModule

    orig = EvalModule.on_test_epoch_end

    def nan_ppl(self) -> None:
        orig(self)
        self.results = {**self.results, "test/ppl": math.nan, "test/nll": math.nan}

    monkeypatch.setattr(EvalModule, "on_test_epoch_end", nan_ppl)
    with pytest.raises(KVQError, match=r"non-finite metrics from the .*test/ppl=nan") as e:
        run(compose([*TINY, "method=none"]), out_dir=tmp_path)
    assert "\n" not in str(e.value) and "the model's loss on the scored tokens" in str(e.value)
    rec = _strict_json(tmp_path / "result.json")
    assert rec["status"] == "failed" and _store().records() == []


def test_result_json_is_strict_json(tmp_path: Path) -> None:
    write_result(tmp_path, {"status": "failed", "metrics": {"test/ppl": math.nan, "x": [math.inf, 1.0]}})
    rec = _strict_json(tmp_path / "result.json")
    assert rec["metrics"] == {"test/ppl": None, "x": [None, 1.0]}


def test_check_finite_names_the_source() -> None:
    from kvq.outcome import NonFiniteMetrics, check_finite

    check_finite({"test/ppl": 3.0, "kv/bytes": 10}, "x")
    with pytest.raises(NonFiniteMetrics, match=r"from the baseline: kv/compression=inf; from the KV-cache"):
        check_finite({"test/ppl": 3.0, "kv/compression": math.inf}, "the baseline")


# ============================================================================ 5. one line
def test_empty_and_binary_data_files_fail_in_one_line(compose, tmp_path: Path) -> None:
    empty, binary = tmp_path / "empty.txt", tmp_path / "data.bin"
    empty.write_text("")
    binary.write_bytes(bytes(range(256)) * 40)
    for path, needle in ((empty, "data file is empty"), (binary, "data file is binary, not text")):
        with pytest.raises(KVQError, match=needle) as e:
            run(
                compose([*TINY, "method=none", "data=local", f"data.path={path}"]),
                out_dir=tmp_path / path.stem,
            )
        assert "\n" not in str(e.value) and str(path) in str(e.value)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(KVQError, match="not UTF-8 text"):
        run(compose([*TINY, "method=none", "data=local", f"data.path={latin1}"]), out_dir=tmp_path / "l")


def test_an_unwritable_store_fails_before_any_compute(compose, tmp_path: Path, no_model_load) -> None:
    blocker = tmp_path / "a-file"  # root writes anywhere: a path under a file is unwritable for all
    blocker.write_text("")
    with pytest.raises(KVQError, match=r"results_dir .* is not writable") as e:
        run(compose([*TINY, f"results_dir={blocker}/store"]), out_dir=tmp_path / "a")
    assert "\n" not in str(e.value)
    assert read_result(tmp_path / "a")["status"] == "failed"


def test_online_wandb_without_credentials_fails_fast(
    compose, tmp_path: Path, monkeypatch, no_model_load
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    with pytest.raises(KVQError, match="logger.mode=online needs W&B credentials") as e:
        run(compose([*TINY, "logger=wandb", "logger.mode=online"]), out_dir=tmp_path / "a")
    assert "\n" not in str(e.value)


def test_wandb_credentials_without_network(
    compose, tmp_path: Path, monkeypatch, caplog, no_model_load
) -> None:
    """Online fails fast in one line; auto falls back to offline with one warning line."""
    from kvq import tracking

    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(tracking, "_PROBED", {})
    with pytest.raises(KVQError, match=r"W&B host http://127.0.0.1:9 is unreachable") as e:
        run(compose([*TINY, "logger=wandb", "logger.mode=online"]), out_dir=tmp_path / "a")
    assert "\n" not in str(e.value) and "logger.mode=offline" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="kvq.tracking"):
        assert tracking.WandbTracker(mode="auto").online_or_offline() == "offline"
    (line,) = [r.getMessage() for r in caplog.records if r.name == "kvq.tracking"]
    assert "unreachable" in line and "logging offline" in line and "\n" not in line


def test_unknown_key_of_a_target_node_is_malformed(compose, tmp_path: Path, no_model_load) -> None:
    with pytest.raises(
        MalformedConfig, match=r"unknown key kv.foo: kvq.cache.spec.KVSettings has the fields"
    ):
        run(compose([*TINY, "+kv.foo=1"]), out_dir=tmp_path)


@pytest.mark.slow
def test_sweep_check_reports_an_unknown_key_as_malformed(tmp_path: Path) -> None:
    from kvq.sweep import check

    sweep = {
        "program": str(REPO_ROOT / "train_eval.py"),
        "method": "grid",
        "parameters": {"model": {"value": "tiny_random"}, "+kv.foo": {"values": [1]}},
        "command": ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"],
    }
    (r,) = check(sweep, model_aware=False).runs
    assert r.status == "malformed" and "unknown key kv.foo" in r.reason


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, code, needle",
    [
        ("empty-data", 1, "kvq: error: data file is empty"),
        ("int7", 0, "values: kv.fp_dtype must name a floating torch dtype"),
        ("store-under-a-file", 1, "is not writable"),
        ("online-no-key", 1, "kvq: error: logger.mode=online needs W&B credentials"),
        ("unknown-kv-key", 2, "kvq: error: unknown key kv.foo"),
        ("unknown-kv-key-in-a-grid", 2, "unknown key kv.foo"),
    ],
)
def test_cli_failures_are_one_line(tmp_path: Path, case: str, code: int, needle: str) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "a-file").write_text("")
    args = {
        "empty-data": ["data=local", f"data.path={tmp_path}/empty.txt"],
        "int7": ["kv.fp_dtype=int7"],
        "store-under-a-file": [f"results_dir={tmp_path}/a-file/store"],
        "online-no-key": ["logger=wandb", "logger.mode=online"],
        "unknown-kv-key": ["+kv.foo=1"],
        "unknown-kv-key-in-a-grid": [
            "+kv.foo=1",
            "method=uniform,normal",
            f"hydra.sweep.dir={tmp_path}/m",
        ],
    }[case]
    env = {"HOME": str(tmp_path)}  # no ~/.netrc: no W&B credentials
    grid = ["-m"] if case.endswith("-in-a-grid") else []
    out = train_eval_cli(
        [*grid, *TINY, "data.max_windows=1", *args, f"hydra.run.dir={tmp_path}/run"], tmp_path, env
    )
    assert out.returncode == code, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    assert needle in out.stdout + out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    if code == 1:
        (line,) = [x for x in out.stderr.splitlines() if x.startswith("kvq: error:")]
        assert read_result(tmp_path / "run")["reason"] == line.removeprefix("kvq: error: ")


# ============================================================================ 6. grids that fail
def test_a_crashing_job_fails_the_grid_which_finishes_and_reports(
    hydra_sweep_runner, hydra_restore_singletons, tmp_path: Path
) -> None:
    from hydra.core.global_hydra import GlobalHydra

    from kvq import cli

    def task(cfg) -> float:
        if cfg.method._target_.endswith("NormalQuantizer"):
            raise RuntimeError("boom in the task")
        return 1.0

    before = cli.failed_jobs()
    GlobalHydra.instance().clear()
    with hydra_sweep_runner(
        calling_file=str(REPO_ROOT / "train_eval.py"),
        calling_module=None,
        task_function=task,
        config_path="conf",
        config_name="config",
        overrides=[*TINY, "method=uniform,normal,adaptive"],
        temp_dir=tmp_path / "sweep",
    ) as sweep:
        assert [len(b) for b in sweep.returns] == [3]  # every job ran: the crash did not end the grid
        rec = _strict_json(tmp_path / "sweep" / "1" / "result.json")
        assert rec["status"] == "failed" and rec["reason"] == "RuntimeError: boom in the task"
        assert "Traceback" in (tmp_path / "sweep" / "1" / "traceback.txt").read_text()
        report = (tmp_path / "sweep" / "report" / "report.md").read_text()
        assert "boom in the task" in report and "1 failed" in report
    GlobalHydra.instance().clear()
    assert cli.failed_jobs() == before + 1  # hydra_main turns it into exit code 1


@pytest.mark.slow
def test_a_grid_whose_jobs_all_fail_exits_non_zero_with_a_report(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    out = train_eval_cli(
        [
            "-m",
            *TINY,
            "data.max_windows=1",
            "accelerator=gpu",
            "method=uniform,normal",
            f"hydra.sweep.dir={tmp_path}/m",
        ],
        tmp_path,
    )
    assert out.returncode == 1, (out.stdout[-2000:], out.stderr[-2000:])
    assert "Traceback" not in out.stderr and "2 of 2 jobs failed" in out.stdout
    report = (tmp_path / "m" / "report" / "report.md").read_text()
    assert report.count("accelerator=gpu was requested but no CUDA device is available") == 2


# ============================================================================ 7. offline = no network
_GUARD = """
import os, socket
_LOG = os.environ.get("KVQ_NET_GUARD_LOG")
if _LOG:
    def _deny(what):
        with open(_LOG, "a") as f:
            f.write(what + "\\n")
        raise OSError("network access denied by the test guard: " + what)
    def _getaddrinfo(host, port, *a, **k):
        _deny(f"getaddrinfo {host}:{port}")
    socket.getaddrinfo = _getaddrinfo
    for name in ("connect", "connect_ex"):
        orig = getattr(socket.socket, name)
        def guarded(self, addr, _orig=orig, _name=name):
            if self.family in (socket.AF_INET, socket.AF_INET6):
                _deny(f"{_name} {addr}")
            return _orig(self, addr)
        setattr(socket.socket, name, guarded)
"""


@pytest.mark.slow
def test_an_offline_wandb_run_makes_no_network_traffic(tmp_path: Path) -> None:
    """A socket guard in every Python process (``sitecustomize``); as root also a network namespace
    without network (``unshare -n``) and, where strace exists, every process's connects and sends
    (wandb-core included)."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(_GUARD)
    log = tmp_path / "net.log"
    env = {"PYTHONPATH": str(guard), "KVQ_NET_GUARD_LOG": str(log)}
    env.pop("WANDB_MODE", None)
    prefix: list[str] = []
    if os.geteuid() == 0 and shutil.which("unshare") and _unshare_works():
        prefix += ["unshare", "-n"]
    trace = tmp_path / "strace.txt"
    if shutil.which("strace"):
        prefix += ["strace", "-f", "-qq", "-e", "trace=connect,sendto,sendmsg,sendmmsg", "-o", str(trace)]
    args = [
        *TINY[:1],
        "logger=wandb",
        "data.seq_len=32",
        "data.max_windows=1",
        f"hydra.run.dir={tmp_path}/run",
    ]
    full_env = {**os.environ, "WANDB_SILENT": "true", **env}
    full_env.pop("WANDB_API_KEY", None)
    full_env.pop("WANDB_MODE", None)  # auto: no credentials -> offline
    out = subprocess.run(
        [*prefix, sys.executable, str(REPO_ROOT / "train_eval.py"), *args],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert not log.exists(), f"network access from Python: {log.read_text()}"
    if trace.exists():
        inet = [line for line in trace.read_text().splitlines() if "AF_INET" in line]
        assert not inet, "network traffic (strace):\n" + "\n".join(inet[:10])


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


# ============================================================================ 9. hints and records
def test_the_offline_hint_names_real_options() -> None:
    from kvq.models import OFFLINE_HINT

    named = re.findall(r"model=(\w+)", OFFLINE_HINT)
    assert named and all((CONF_DIR / "model" / f"{n}.yaml").is_file() for n in named), named


def test_a_broken_local_model_folder_is_not_an_hf_cache_miss(compose, tmp_path: Path) -> None:
    folder = tmp_path / "tiny"
    loaded = models.TinyRandomLlama().load()
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    (weights,) = list(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    models.clear_model_cache()
    with pytest.raises(KVQError) as e:
        run(compose(["model=hf", f"model.name_or_path={folder}", *TINY[1:]]), out_dir=tmp_path / "a")
    msg = str(e.value)
    assert "\n" not in msg and "HF cache" not in msg and "not available offline" not in msg
    assert "cannot load model folder" in msg and "save_pretrained" in msg


def test_a_garbage_record_is_corrupt_and_recomputed(compose, tmp_path: Path, caplog) -> None:
    run(compose([*TINY, "method=none"]), out_dir=tmp_path / "a")
    key = read_result(tmp_path / "a")["key"]
    store = _store()
    for garbage in ("abc", None, True, [1.0]):
        rec = json.loads(store.path(key).read_text())
        rec["metrics"]["test/ppl"] = garbage
        store.path(key).write_text(json.dumps(rec))
        with caplog.at_level(logging.WARNING):
            assert store.get(key) is None
        assert "corrupt result record" in caplog.text and "test/ppl is" in caplog.text
    run(compose([*TINY, "method=none"]), out_dir=tmp_path / "b")
    b = read_result(tmp_path / "b")
    assert "reused_from" not in b and isinstance(store.get(key)["metrics"]["test/ppl"], float)


def test_store_files_are_readable_by_the_team(compose, tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        run(compose([*TINY, "bits=b2"]), out_dir=tmp_path / "a")
        run(compose([*TINY, "method=adaptive", "bits=attn"]), out_dir=tmp_path / "b")
    finally:
        os.umask(old)
    store = _store()
    files = [*store.root.glob("*.json"), *store.root.glob("verdicts/*.json"), tmp_path / "a" / "result.json"]
    assert len(files) == 4  # the run, its baseline, the verdict, a result.json
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {oct(0o644)}


# ============================================================================ the fuzz
POINT = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["none", "uniform", "normal", "adaptive"]),
        "grouping": st.sampled_from(["none", "g32", "g64", "g128"]),
        "bits": st.sampled_from(["b2", "b3", "b4", "b8", "attn"]),
        "granularity": st.sampled_from(["head", "layer", "token"]),
        "eval": st.sampled_from(["fakequant", "prefill", "decode"]),
        "data.seq_len": st.integers(2, 48),
        "data.max_windows": st.integers(1, 2),
    }
)
KNOBS = {
    "kv.residual": st.integers(0, 50),
    "kv.sinks": st.integers(0, 8),
    "kv.key_axis": st.sampled_from(["token", "channel"]),
    "kv.key_group": st.integers(1, 64),
    "kv.outlier_ratio": st.sampled_from([0.0, 0.05, 0.2, 0.49, 0.6]),
    "kv.fp_dtype": st.sampled_from(["float16", "bfloat16", "float32", "null", "int8", "bool", "int7"]),
    "kv.pre_rope": st.booleans(),
    "bits.n_min": st.integers(0, 9),
    "bits.n_max": st.integers(0, 9),
    "bits.bridge": st.booleans(),
    "bits.key_bits": st.integers(0, 9),
    "eval.prefix_len": st.one_of(st.none(), st.integers(0, 50)),
}


@st.composite
def points(draw) -> list[str]:
    chosen = draw(POINT)
    if chosen["eval"] == "decode":  # token by token: keep it short
        chosen["data.seq_len"] = min(chosen["data.seq_len"], 12)
        chosen["data.max_windows"] = 1
    ov = [f"{k}={v}" for k, v in chosen.items()]
    allowed = [
        k
        for k in sorted(KNOBS)
        if not (k.startswith("bits.n_") or k == "bits.bridge") or chosen["bits"] == "attn"
        if k != "bits.key_bits" or chosen["bits"] != "attn"
        if k != "eval.prefix_len" or chosen["eval"] == "prefill"
    ]
    for k in draw(st.lists(st.sampled_from(allowed), unique=True, max_size=4)):
        v = draw(KNOBS[k])
        ov.append(f"{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}")
    return ov


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=points())
def test_random_points_are_ok_skipped_or_failed_in_one_line(compose, overrides: list[str]) -> None:
    """Every point of the space on the tiny model: ok, skipped with one line or failed with one
    line -- never another exception (a stack trace at the CLI); every ok point quantized
    something (or is the baseline) and has finite metrics; result.json is strict JSON."""
    cfg = compose(["model=tiny_random", "logger=none", *overrides])
    with tempfile.TemporaryDirectory() as d:
        try:
            run(cfg, out_dir=Path(d))
        except KVQError as e:
            assert "\n" not in str(e), overrides
        rec = _strict_json(Path(d) / "result.json")
    assert rec["status"] in ("ok", "skipped", "failed"), overrides
    event(rec["status"])
    if rec["status"] != "ok":
        assert rec["reason"] and "\n" not in rec["reason"], overrides
        return
    m = rec["metrics"]
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in m.values()), (overrides, m)
    if cfg.method._target_ != "kvq.quant.FullPrecision":
        assert m.get("bits/key/mean", 0) > 0 or m.get("bits/value/mean", 0) > 0, (overrides, m)
        assert math.isfinite(m["test/delta_ppl"])
