"""``hydra/launcher=local_gpus``: persistent per-device workers on one machine, and a results store
that stays consistent under concurrent writers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter, deque
from pathlib import Path

import pytest

from kvq.results import ResultStore, read_result

from .conftest import REPO_ROOT, TINY, train_eval_cli

LG = pytest.importorskip("hydra_plugins.kvq_sweeper.kvq_local_gpus")


def _jobs(sweep: Path) -> list[Path]:
    return sorted((p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


# --------------------------------------------------------------------------- configuration
def test_launcher_config_composes(compose) -> None:
    cfg = compose(["hydra/launcher=local_gpus"], return_hydra_config=True)
    lc = cfg.hydra.launcher
    assert lc._target_ == "hydra_plugins.kvq_sweeper.kvq_local_gpus.LocalGPUsLauncher"
    assert lc.n_workers is None and lc.devices is None and lc.threads_per_worker is None
    assert cfg.hydra.sweeper._target_.endswith("KVQSweeper")  # validation and dedup still apply
    cfg = compose(["hydra/launcher=local_gpus", "hydra.launcher.devices=[0,1]"], return_hydra_config=True)
    assert list(cfg.hydra.launcher.devices) == ["0", "1"]


def test_visible_devices_read_like_cuda(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3,-1,4")
    assert LG.visible_devices() == ["2", "3"]  # CUDA stops at the first invalid entry
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert LG.visible_devices() == []


def test_workers_are_dealt_devices_and_threads(monkeypatch) -> None:
    monkeypatch.setattr(LG, "_gpu_count", lambda: 0)  # this CPU box (also on a GPU machine)
    for v in ("CUDA_VISIBLE_DEVICES", *LG.THREAD_VARS):
        monkeypatch.delenv(v, raising=False)
    cpus = len(os.sched_getaffinity(0))
    # no GPU visible: 2 workers, the environment left alone, the CPUs split between them
    specs = LG.plan_workers(None, None, None)
    assert [(s.wid, s.cuda_visible_devices) for s in specs] == [(0, None), (1, None)]
    assert {s.threads for s in specs} == {max(1, cpus // 2)}
    assert "CUDA_VISIBLE_DEVICES" not in specs[0].env() and specs[0].env()["OMP_NUM_THREADS"]
    # one worker per visible GPU, each pinned to its own
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert [s.env()["CUDA_VISIBLE_DEVICES"] for s in LG.plan_workers(None, None, 1)] == ["4", "6"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    # explicit devices, dealt round-robin; multi-GPU workers; devices=[] hides every GPU
    assert [s.cuda_visible_devices for s in LG.plan_workers(3, [0, 1], 1)] == ["0", "1", "0"]
    assert [s.cuda_visible_devices for s in LG.plan_workers(None, ["0,1", "2,3"], 1)] == ["0,1", "2,3"]
    assert [s.cuda_visible_devices for s in LG.plan_workers(None, [], 1)] == ["", ""]
    # a user's OMP_NUM_THREADS wins over the default split
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert LG.plan_workers(2, None, None)[0].threads is None
    with pytest.raises(LG.LaunchError, match="n_workers must be at least 1"):
        LG.plan_workers(0, None, None)
    # on a machine with GPUs, a device it does not have is refused (the worker would run on CPU)
    monkeypatch.setattr(LG, "_gpu_count", lambda: 2)
    with pytest.raises(LG.LaunchError, match="has 2 GPU"):
        LG.plan_workers(None, [0, 2], 1)


def test_jobs_go_to_the_worker_holding_their_model() -> None:
    a, b = LG.model_key(["method=x", "model=tiny_random"]), LG.model_key(["model=smollm2_135m", "bits=b2"])
    assert a == ("model=tiny_random",) and LG.model_key(["accelerator=cpu", "model.dtype=bf16"]) == (
        "accelerator=cpu",
        "model.dtype=bf16",
    )
    pending = {a: deque([0, 1]), b: deque([2, 3, 4])}
    assert LG.pick(a, pending, Counter()) == a  # keeps its model while it has jobs
    assert LG.pick(None, pending, Counter()) == b  # a fresh worker: the largest group
    assert LG.pick(None, pending, Counter({b: 1})) == a  # ... unless it is taken: spread out
    assert LG.pick(a, {}, Counter()) is None


def test_temp_files_are_named_after_their_writer(tmp_path: Path, monkeypatch) -> None:
    import kvq.results as results

    seen = []
    real = os.replace
    monkeypatch.setattr(results.os, "replace", lambda src, dst: (seen.append(Path(src).name), real(src, dst)))
    ResultStore(tmp_path).put("k", {"status": "ok", "metrics": {"test/ppl": 2.0}})
    (name,) = seen
    assert name.startswith(".k.json.") and f"-{os.getpid()}." in name and name.endswith(".tmp")
    assert [p.name for p in tmp_path.iterdir()] == ["k.json"]


# --------------------------------------------------------------------------- concurrent writers
_WRITER = textwrap.dedent(
    """
    import sys
    from kvq.results import ResultStore
    store, who, n = ResultStore(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    for i in range(n):
        # large enough that a non-atomic write would be seen half-done
        store.put("same", {"status": "ok", "metrics": {"test/ppl": float(i + 1)}, "who": who, "i": i,
                           "pad": [who] * 20000})
    """
)


@pytest.mark.slow
def test_two_processes_writing_one_key_leave_one_complete_record(tmp_path: Path) -> None:
    """Two workers finishing the same experiment at once, many times over: every read sees a
    complete record, and one complete record (no temp file) remains."""
    store, n = ResultStore(tmp_path / "store"), 150
    store.root.mkdir()
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(store.root), who, str(n)],
            cwd=REPO_ROOT,
            stderr=subprocess.PIPE,
        )
        for who in ("a", "b")
    ]
    reads, seen = 0, set()
    while any(w.poll() is None for w in writers):
        if store.path("same").exists():
            rec = json.loads(store.path("same").read_text())  # never a partial file
            assert rec["key"] == "same" and len(rec["pad"]) == 20000 and set(rec["pad"]) == {rec["who"]}
            seen.add(rec["who"])
            reads += 1
    for w in writers:
        assert w.wait(60) == 0, w.stderr.read().decode()[-2000:]
    assert reads > 0 and seen <= {"a", "b"}
    assert [p.name for p in store.root.iterdir()] == ["same.json"]  # one record, no temp files left
    rec = store.get("same")
    assert rec is not None and rec["i"] == n - 1 and rec["metrics"]["test/ppl"] == float(n)


# --------------------------------------------------------------------------- the real CLI
_GRID = [*TINY, "data.max_windows=1", "method=uniform,normal", "bits=b2,b4"]


def _grid(tmp_path: Path, name: str, *launcher: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.perf_counter()
    out = train_eval_cli(
        ["-m", *_GRID, *launcher, f"hydra.sweep.dir={tmp_path / name}"], tmp_path, timeout=600
    )
    return out, time.perf_counter() - t0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_grid_on_two_pinned_workers(tmp_path: Path, _results_store: Path) -> None:
    out, secs = _grid(
        tmp_path,
        "m",
        "hydra/launcher=local_gpus",
        "hydra.launcher.n_workers=2",
        "hydra.launcher.devices=[0,1]",  # no GPU here: the variable is set all the same, runs use the CPU
    )
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    assert "4 combinations -> 4 jobs to launch" in out.stdout  # the kvq sweeper planned the grid
    jobs = _jobs(tmp_path / "m")
    recs = [read_result(p) for p in jobs]
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    assert all(r["status"] == "ok" for r in recs), [r["reason"] for r in recs]
    assert {(r["choices"]["method"], r["choices"]["bits"]) for r in recs} == {
        (m, b) for m in ("uniform", "normal") for b in ("b2", "b4")
    }
    procs = [r["process"] for r in recs]
    pids = Counter(p["pid"] for p in procs)
    assert len(pids) == 2, procs  # exactly two worker processes did the work ...
    device = {p["pid"]: p["cuda_visible_devices"] for p in procs}
    assert sorted(device.values()) == ["0", "1"]  # ... each pinned to its own device ...
    assert all(p["cuda_visible_devices"] == device[p["pid"]] for p in procs)
    assert all(p["model_loads"] == 1 for p in procs)  # ... each loading the model once
    assert max(pids.values()) >= 2  # (so at least one ran several jobs on it)
    assert (tmp_path / "m" / "report" / "report.md").is_file()  # the grid-end report (a callback)
    # both workers computed the shared baseline at once: one record per experiment, no temp files
    stored = sorted(p.name for p in _results_store.iterdir() if p.is_file())
    assert len(stored) == 5 and all(n.endswith(".json") and not n.startswith(".") for n in stored)
    print(f"4-job grid, 2 workers: {secs:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_failed_and_crashed_jobs_fail_the_grid_not_the_others(tmp_path: Path) -> None:
    """A task that raises and a worker that dies: each job fails with one line (its result.json
    and the report), the worker is replaced, the remaining job runs, the grid exits 1."""
    app = tmp_path / "app.py"
    app.write_text(
        textwrap.dedent(
            f"""
            import os, sys
            import hydra
            import kvq.config  # noqa: F401
            from kvq import cli

            @hydra.main(version_base="1.3", config_path={str(REPO_ROOT / "conf")!r}, config_name="config")
            def main(cfg):
                if cfg.seed == 7:
                    os._exit(3)  # the worker dies mid-job
                if cfg.seed == 5:
                    raise RuntimeError("boom in the task")
                return cli.entry_point(cfg)

            if __name__ == "__main__":
                sys.exit(cli.hydra_main(main))
            """
        )
    )
    env = {**os.environ, "WANDB_MODE": "disabled"}
    sweep = tmp_path / "m"
    args = ["-m", *TINY, "data.max_windows=1", "seed=7,5,0", "hydra/launcher=local_gpus"]
    out = subprocess.run(
        [sys.executable, str(app), *args, "hydra.launcher.n_workers=1", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 1, (out.stdout[-3000:], out.stderr[-3000:])
    assert "kvq sweeper: job #0 failed: worker 0 (pid " in out.stdout
    assert "exited with code 3 while running the job" in out.stdout
    assert "kvq sweeper: job #1 failed: RuntimeError: boom in the task" in out.stdout
    assert "2 of 3 jobs failed (#0, #1)" in out.stdout
    recs = [read_result(p) for p in _jobs(sweep)]
    assert [r["status"] for r in recs] == ["failed", "failed", "ok"]
    assert "exited with code 3" in recs[0]["reason"] and recs[1]["reason"] == "RuntimeError: boom in the task"
    assert "boom in the task" in (sweep / "1" / "traceback.txt").read_text()  # written in the worker
    assert "replaced by a new worker" in out.stdout + out.stderr
    assert (sweep / "report" / "report.md").is_file()
