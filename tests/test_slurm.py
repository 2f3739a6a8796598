"""A Hydra multirun through SLURM (hydra-submitit-launcher) on a real one-node cluster: the
invalid combination is dropped by the kvq sweeper and never reaches SLURM."""

from __future__ import annotations

import json
import os
import re
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


def _slurm_grid(tmp_path: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO_ROOT / "train_eval.py"),
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=2",
        "hydra.launcher.timeout_min=10",
        *TINY,
        "data.max_windows=1",
        *extra,
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
    ]


@pytest.mark.slurm
@pytest.mark.timeout(300)
def test_the_default_gpu_request_on_a_cpu_cluster_fails_in_one_line(slurm_cluster, tmp_path: Path) -> None:
    """``gpus_per_node: 1`` (the default) on a cluster without GPUs: one line before anything is
    submitted (not sbatch's "Invalid generic resource (gres)" stack trace), exit 1, a report."""
    out = subprocess.run(
        _slurm_grid(tmp_path, "method=uniform,normal"),
        cwd=tmp_path,
        env={**os.environ, "WANDB_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 1, (out.stdout[-3000:], out.stderr[-3000:])
    assert "Traceback" not in out.stderr and "Invalid generic resource" not in out.stderr
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("kvq sweeper: could not launch")]
    assert "hydra.launcher.gpus_per_node=0" in line and "has a GPU" in line
    assert not list((tmp_path / "multirun" / ".submitit").glob("*/*_submission.sh"))  # nothing submitted
    recs = [read_result(tmp_path / "multirun" / n) for n in ("0", "1")]
    assert all(r["status"] == "failed" and "gpus_per_node=0" in r["reason"] for r in recs)
    assert "Failed runs" in (tmp_path / "multirun" / "report" / "report.md").read_text()


def _squeue(name: str) -> list[tuple[str, str]]:
    out = subprocess.run(
        ["squeue", "-h", "-r", "-n", name, "-o", "%i %T"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return [tuple(line.split()) for line in out.stdout.splitlines() if len(line.split()) == 2]  # type: ignore[misc]


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.timeout(600)  # the driver must finish on its own: this only stops a regression hanging CI
def test_a_cancelled_job_fails_in_one_line_and_the_grid_finishes(slurm_cluster, tmp_path: Path) -> None:
    """No accounting on this cluster: submitit alone would wait on ``sacct`` forever for a job
    cancelled before it wrote its result (its state stays UNKNOWN)."""
    import time
    import uuid

    name = f"kvq-lost-{uuid.uuid4().hex[:8]}"
    cmd = _slurm_grid(
        tmp_path,
        "hydra.launcher.gpus_per_node=0",
        "hydra.launcher.array_parallelism=1",  # task 1 waits while task 0 runs: cancel it then
        "hydra.launcher.lost_job_timeout_s=5",
        f"hydra.launcher.name={name}",
        "method=uniform,normal",
    )
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env={**os.environ, "WANDB_MODE": "disabled"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline, cancelled = time.time() + 240, None
        while cancelled is None and time.time() < deadline and proc.poll() is None:
            for job, state in _squeue(name):
                if job.endswith("_1") and state == "PENDING":
                    subprocess.run(["scancel", job], check=True, timeout=30)
                    cancelled = job
            time.sleep(0.5)
        assert cancelled, "array task 1 was never seen pending"
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", "-n", name], check=False, timeout=30)
    assert proc.returncode == 1, (stdout[-3000:], stderr[-3000:])
    assert "Traceback" not in stderr
    sweep = tmp_path / "multirun"
    ok, lost = read_result(sweep / "0"), read_result(sweep / "1")
    assert ok["status"] == "ok"
    assert lost["status"] == "failed" and "\n" not in lost["reason"]
    assert re.match(
        rf"SLURM job {cancelled} (left the queue|ended \(CANCELLED\)) without a result", lost["reason"]
    )
    assert f"kvq sweeper: job #1 failed: SLURM job {cancelled}" in stdout
    assert "1 of 2 jobs failed" in stdout
    assert cancelled in (sweep / "report" / "report.md").read_text()
