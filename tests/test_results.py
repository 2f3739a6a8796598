"""Results that are never lost: the store, reuse, resume after SIGTERM/SIGKILL, baselines."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvq import models
from kvq.module import EvalModule
from kvq.results import ResultStore, read_result, write_result
from kvq.run import Terminated, run

from .conftest import REPO_ROOT, TINY


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    write_result(tmp_path, {"status": "ok", "metrics": {"test/ppl": 3.0}})
    write_result(tmp_path, {"status": "ok", "metrics": {"test/ppl": 4.0}})
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
    assert read_result(tmp_path)["metrics"]["test/ppl"] == 4.0


def test_store_reuses_and_detects_corrupt_records(tmp_path: Path, caplog) -> None:
    store = ResultStore(tmp_path)
    rec = {"status": "ok", "reason": None, "metrics": {"test/ppl": 7.0}}
    store.put("abc", rec)
    assert store.get("abc")["metrics"]["test/ppl"] == 7.0
    assert store.put("bad", {"status": "failed"}) is None and store.get("bad") is None
    store.path("abc").write_text('{"status": "ok", "metr')  # truncated
    with caplog.at_level(logging.WARNING):
        assert store.get("abc") is None
    assert "corrupt result record" in caplog.text


def test_reuse_baseline_and_one_model_load(compose, tmp_path: Path, monkeypatch) -> None:
    loads = []
    orig = models.TinyRandomLlama.load

    def counting(self, *a, **k):
        loads.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(models.TinyRandomLlama, "load", counting)
    models.clear_model_cache()
    run(compose([*TINY, "bits=b2"]), out_dir=tmp_path / "a")
    a = read_result(tmp_path / "a")
    m = a["metrics"]
    # the baseline was computed once, in-process, with the same loaded model
    assert m["test/delta_ppl"] == pytest.approx(m["test/ppl"] - m["test/baseline_ppl"])
    assert m["test/delta_ppl_pct"] == pytest.approx(100 * m["test/delta_ppl"] / m["test/baseline_ppl"])
    run(compose([*TINY, "bits=b3", "method=adaptive"]), out_dir=tmp_path / "b")
    base = run(compose([*TINY, "method=none"]), out_dir=tmp_path / "c")
    assert len(loads) == 1  # one model load for the three runs and the baseline
    assert read_result(tmp_path / "c")["reused_from"]  # the baseline was in the store already
    assert base == pytest.approx(m["test/baseline_ppl"])
    assert read_result(tmp_path / "b")["metrics"]["test/baseline_ppl"] == pytest.approx(base)
    # the same experiment again: reused, not recomputed
    again = run(compose([*TINY, "bits=b2", "logger=none"]), out_dir=tmp_path / "d")
    d = read_result(tmp_path / "d")
    assert d["reused_from"] and again == pytest.approx(m["test/ppl"]) and len(loads) == 1
    # reuse=false recomputes
    run(compose([*TINY, "bits=b2", "reuse=false"]), out_dir=tmp_path / "e")
    assert "reused_from" not in read_result(tmp_path / "e")


def test_corrupt_store_record_is_recomputed(compose, tmp_path: Path, caplog) -> None:
    run(compose([*TINY, "method=none"]), out_dir=tmp_path / "a")
    key = read_result(tmp_path / "a")["key"]
    store = ResultStore(Path(os.environ["KVQ_RESULTS_DIR"]))
    store.path(key).write_text("{not json")
    with caplog.at_level(logging.WARNING):
        run(compose([*TINY, "method=none"]), out_dir=tmp_path / "b")
    assert "corrupt result record" in caplog.text
    assert "reused_from" not in read_result(tmp_path / "b")
    assert store.get(key)["metrics"]["test/ppl"] == pytest.approx(
        read_result(tmp_path / "a")["metrics"]["test/ppl"]
    )


# ------------------------------------------------------------------ resume after a kill
@pytest.mark.parametrize("windows", [1, 3], ids=["last-batch", "mid-epoch"])
def test_sigterm_during_evaluation_stops_the_run(compose, tmp_path: Path, monkeypatch, windows: int) -> None:
    # Lightning alone only notes a SIGTERM that arrives in the last batch and runs on
    seen = []
    orig = EvalModule.test_step

    def step(self, batch, batch_idx):
        seen.append(batch_idx)
        if batch_idx == windows - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return orig(self, batch, batch_idx)

    monkeypatch.setattr(EvalModule, "test_step", step)
    cfg = compose([*TINY, "bits=b2", f"data.max_windows={windows}"])
    with pytest.raises(Terminated) as err:
        run(cfg, out_dir=tmp_path / "a")
    assert err.value.code == 143 and seen == list(range(windows))
    rec = read_result(tmp_path / "a")
    assert rec["status"] == "failed" and "SIGTERM" in rec["reason"] and not rec["metrics"]
    assert not list(Path(os.environ["KVQ_RESULTS_DIR"]).glob("*.json"))  # nothing half-done stored
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is the run's only
    monkeypatch.setattr(EvalModule, "test_step", orig)
    assert run(cfg, out_dir=tmp_path / "b") > 0  # a re-run computes it


GRID = [
    "model=tiny_random",
    "logger=none",
    "eval=decode",
    "data.seq_len=160",
    "data.max_windows=1",
    "method=uniform,normal,adaptive",
    "bits=b2,b4",
]


def _launch(sweep_dir: Path, store: Path) -> subprocess.Popen:
    env = {**os.environ, "KVQ_RESULTS_DIR": str(store)}
    return subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "train_eval.py"), "-m", *GRID, f"hydra.sweep.dir={sweep_dir}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def _stored(store: Path) -> dict[str, float]:
    out = {}
    for p in store.glob("*.json"):
        rec = json.loads(p.read_text())
        if rec.get("config", {}).get("method", {}).get("_target_") != "kvq.quant.FullPrecision":
            out[p.stem] = rec["finished"]
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_resume_after_kill(tmp_path: Path, sig: signal.Signals) -> None:
    store = tmp_path / "store"
    proc = _launch(tmp_path / "first", store)
    deadline = time.time() + 300
    while len(_stored(store)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, sig)
    proc.wait(timeout=60)
    before = _stored(store)
    assert 2 <= len(before) < 6, f"the kill did not land mid-grid ({len(before)} of 6 done)"
    assert not list(store.glob(".*.tmp")) or sig == signal.SIGKILL  # SIGKILL may leave a temp file
    for p in store.glob("*.json"):
        json.loads(p.read_text())  # no truncated record
    # re-run the same grid
    second = _launch(tmp_path / "second", store)
    assert second.wait(timeout=500) == 0, second.stderr.read().decode()[-2000:]
    after = _stored(store)
    assert len(after) == 6  # every configuration: exactly one complete record
    for key, finished in before.items():
        assert after[key] == finished  # finished before the kill -> not recomputed
    results = [
        read_result(d) for d in sorted((tmp_path / "second").glob("[0-9]*")) if (d / "result.json").exists()
    ]
    assert len(results) == 6 and all(r["status"] == "ok" for r in results)
    assert sum("reused_from" in r for r in results) == len(before)
