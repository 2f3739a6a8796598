"""A grid pays for shared work once: a 24-configuration multirun vs its quantized forwards alone.

    python benchmarks/bench_shared.py [--windows 16] [--out benchmarks/results/shared.json]

One ``python train_eval.py -m method=uniform,normal bits=b2,b3,b4,b8,attn,budget
grouping=none,g32 kv.key_axis=token`` on the embedded model and data, in a fresh results store
(per-token keys throughout, the layout first measured; ``bits=attn`` needs them). What the grid
shares, per (model, data, protocol), is computed once: the model load and tokenisation, the
full-precision baseline and its reference (for ``test/kl``), the attention statistics of
``bits=attn`` (:mod:`kvq.alloc.stats_store`) and the calibration statistics of ``bits=budget``
(:mod:`kvq.calib`). What cannot be shared is each configuration's quantized forward
(``time/forward_s`` of its ``result.json``: the model through the quantized cache, quantization
included). The figure is the grid's wall time over the sum of those forwards (target <= 1.3).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_json

REPO = Path(__file__).resolve().parents[1]
AXES = {
    "method": ("uniform", "normal"),
    "bits": ("b2", "b3", "b4", "b8", "attn", "budget"),
    "grouping": ("none", "g32"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out", default="benchmarks/results/shared.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        store, sweep = tmp / "store", tmp / "grid"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "KVQ_RESULTS_DIR": str(store)}
        cmd = [
            sys.executable,
            str(REPO / "train_eval.py"),
            "-m",
            *(f"{k}={','.join(v)}" for k, v in AXES.items()),
            "kv.key_axis=token",  # per-token keys throughout (bits=attn needs them), as first measured
            "logger=none",
            f"data.max_windows={args.windows}",
            f"hydra.sweep.dir={sweep}",
        ]
        t = time.perf_counter()
        subprocess.run(
            cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        wall = time.perf_counter() - t
        rows = []
        for f in sorted(sweep.glob("*/result.json")):
            rec = json.loads(f.read_text())
            m = rec.get("metrics", {})
            rows.append(
                {
                    "config": " ".join(f"{a}={rec['choices'].get(a)}" for a in AXES),
                    "status": rec["status"],
                    "forward_s": m.get("time/forward_s"),
                    "eval_s": m.get("time/eval_s"),
                    "ppl": m.get("test/ppl"),
                    "bits_per_element": m.get("kv/bits_per_element"),
                }
            )
        shared = {
            "attention_windows_stored": len(list((store / "attention").rglob("*.pt"))),
            "references_stored": len(list((store / "reference").glob("*/index.json"))),
        }
    done = [r for r in rows if r["status"] == "ok" and r["forward_s"]]
    if len(done) != len(rows) or len(rows) != 24:
        raise SystemExit(f"benchmark: expected 24 finished configurations, got {len(done)} of {len(rows)}")
    forwards = sum(r["forward_s"] for r in done)
    res = {
        "benchmark": "24-config grid wall time vs the sum of its quantized forwards",
        "command": " ".join(["python", "train_eval.py", *cmd[2:-1]]),
        "windows": args.windows,
        "grid_seconds": wall,
        "sum_forward_seconds": forwards,
        "ratio": wall / forwards,
        "target_ratio": 1.3,
        "shared": shared,
        "rows": rows,
    }
    write_json(args.out, res)
    print(f"grid {wall:.0f}s, quantized forwards {forwards:.0f}s: {wall / forwards:.2f}x (target <= 1.3)")


if __name__ == "__main__":
    main()
