"""Quantize+dequantize throughput of each method vs a plain copy of the same tensor.

    python benchmarks/bench_quant.py [--out benchmarks/results/quant.json] [--repeats 5]

Tensor: [1, 8, 4096, 128] fp16 (8 KV heads x 4096 tokens x head_dim 128), per-head units,
4 bits, g128. Reports the median wall time per round trip and its ratio to ``x.clone()`` timed
in the same run (ratios, not absolute times, are what transfers between machines).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import write_json

from kvq.quant import AdaptiveQuantizer, FullPrecision, NormalQuantizer, UniformQuantizer


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/quant.json")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(1, 8, 4096, 128, dtype=torch.float16, device=args.device)
    units = x.reshape(-1, 128)
    copy_s = timed(lambda: x.clone(), args.repeats * 4)
    rows = []
    for name, q in [
        ("none", FullPrecision()),
        ("uniform", UniformQuantizer(group_size=128)),
        ("normal", NormalQuantizer(group_size=128)),
        ("adaptive", AdaptiveQuantizer(group_size=128)),
    ]:
        s = timed(lambda q=q: q.decode(q.encode(units, 4), torch.float16), args.repeats)
        rows.append(
            {
                "method": name,
                "seconds": s,
                "gb_per_s": x.numel() * 2 / s / 1e9,
                "ratio_to_copy": s / copy_s,
            }
        )
        print(f"{name:9s} {s * 1e3:9.2f} ms  {rows[-1]['gb_per_s']:7.3f} GB/s  {s / copy_s:8.1f}x copy")
    out = {
        "benchmark": "quantize+dequantize round trip, 4 bits, g128, per-head units",
        "shape": list(x.shape),
        "device": args.device,
        "copy_seconds": copy_s,
        "rows": rows,
    }
    write_json(args.out, out)


if __name__ == "__main__":
    main()
