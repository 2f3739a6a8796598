"""Run every benchmark (``make bench``); results land in benchmarks/results/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

for script in (
    "bench_quant.py",
    "bench_eval.py",
    "bench_lloyd.py",
    "bench_grid.py",
    "bench_shared.py",
    "bench_quality.py",
):
    print(f"== {script}", flush=True)
    subprocess.run([sys.executable, str(HERE / script)], check=True, cwd=HERE.parent)
