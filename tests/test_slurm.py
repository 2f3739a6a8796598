"""A Hydra multirun through SLURM (hydra-submitit-launcher) on a real one-node cluster: the
invalid combination is dropped by the kvq sweeper and never reaches SLURM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvq.results import read_result

from .conftest import REPO_ROOT, TINY


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(600)  # without accounting, a job killed before its result leaves submitit waiting
def test_multirun_through_sbatch(slurm_cluster, tmp_path: Path) -> None:
    sweep_dir = tmp_path / "multirun"
    cmd = [
        sys.executable,
        str(REPO_ROOT / "train_eval.py"),
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.gpus_per_node=0",  # a node without GPUs: no --gpus-per-node flag at all
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=2",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.array_parallelism=2",
        *TINY,
        "data.max_windows=1",
        "method=uniform,adaptive",
        "bits=b4,attn",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    out = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=540, stdin=subprocess.DEVNULL
    )
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    assert "dropped before launch" in out.stdout

    # the kvq sweeper dropped the invalid combination before anything was submitted
    (dropped,) = json.loads((sweep_dir / "dropped.json").read_text())
    assert dropped["status"] == "invalid" and {"method=adaptive", "bits=attn"} <= set(dropped["overrides"])

    # one sbatch job array of exactly the 3 valid jobs, without a GPU flag
    (script,) = list((sweep_dir / ".submitit").glob("*/*_submission.sh"))
    text = script.read_text()
    assert (
        "#SBATCH --array=0-2%2" in text
        and "#SBATCH --cpus-per-task=1" in text
        and "#SBATCH --mem=2GB" in text
    )
    assert "gpus" not in text and "#SBATCH --time=10" in text
    task_logs = sorted((sweep_dir / ".submitit").glob("*_*/*_0_log.out"))
    assert len(task_logs) == 3  # three array tasks ran on the cluster

    # every job wrote its result
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())  # job dirs (not report/)
    assert [p.name for p in jobs] == ["0", "1", "2"]
    recs = [read_result(p) for p in jobs]
    assert all(r["status"] == "ok" and r["metrics"]["test/ppl"] > 1 for r in recs), [
        r["reason"] for r in recs
    ]
    assert {(r["choices"]["method"], r["choices"]["bits"]) for r in recs} == {
        ("uniform", "b4"),
        ("uniform", "attn"),
        ("adaptive", "b4"),
    }
