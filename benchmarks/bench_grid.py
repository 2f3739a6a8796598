"""One model load per grid: a 12-configuration Hydra multirun vs 12 separate single runs.

    python benchmarks/bench_grid.py [--windows 16] [--out benchmarks/results/grid.json]

The same 12 configurations (method uniform/normal/adaptive x bits b2/b3/b4/b8) on the embedded
model and data, each side with a fresh results store (so both compute the fp baseline once):

* grid:    ``python train_eval.py -m method=... bits=...`` -- one process, the model is loaded
           once and shared by every job (``kvq.models.load_cached``);
* singles: 12 x ``python train_eval.py method=M bits=B`` -- one process and one load each.

Reports both wall times and their ratio, and keeps the grid's report (``report.md``,
``pareto.png``) next to the results file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_json

REPO = Path(__file__).resolve().parents[1]
METHODS = ("uniform", "normal", "adaptive")
BITS = ("b2", "b3", "b4", "b8")


def _run(args: list[str], store: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "KVQ_RESULTS_DIR": str(store)}
    subprocess.run(
        [sys.executable, str(REPO / "train_eval.py"), *args],
        check=True,
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/grid.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the layout of the first run (per-token layer units, no grouping), pinned: the defaults moved
    common = ["logger=none", f"data.max_windows={args.windows}", "grouping=none", "kv.key_axis=token"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        _run(
            [
                "-m",
                f"method={','.join(METHODS)}",
                f"bits={','.join(BITS)}",
                *common,
                f"hydra.sweep.dir={tmp / 'grid'}",
            ],
            tmp / "s1",
        )
        grid_s = time.perf_counter() - t
        t = time.perf_counter()
        for m in METHODS:
            for b in BITS:
                _run(
                    [f"method={m}", f"bits={b}", *common, f"hydra.run.dir={tmp / 'single' / f'{m}-{b}'}"],
                    tmp / "s2",
                )
        singles_s = time.perf_counter() - t
        report = out.parent / "grid_report"
        shutil.rmtree(report, ignore_errors=True)
        shutil.copytree(tmp / "grid" / "report", report)
    res = {
        "benchmark": "12-config grid (one process, one model load) vs 12 single runs",
        "configs": [f"method={m} bits={b}" for m in METHODS for b in BITS],
        "windows": args.windows,
        "grid_seconds": grid_s,
        "singles_seconds": singles_s,
        "speedup": singles_s / grid_s,
    }
    write_json(out, res)
    print(f"grid {grid_s:.0f}s, 12 singles {singles_s:.0f}s: {singles_s / grid_s:.2f}x; report in {report}")


if __name__ == "__main__":
    main()
