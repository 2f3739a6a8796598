"""Adaptive quantization: squared error and encode time vs the number of Lloyd steps.

    python benchmarks/bench_lloyd.py [--windows 2] [--out benchmarks/results/lloyd.json]

The real K/V of the embedded model (SmolLM2-135M) on WikiText-2 raw test windows from
``../shared/data`` (or the embedded pydoc text when absent), 512 tokens, layer units (the
60 key/value blocks of a window, 512 x 192 each), g128. For each width and ``lloyd_iters``:
the total squared error relative to ``lloyd_iters=2`` (the default) and to uniform, and the
encode time per block relative to uniform (ratios measured in the same run).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import eval_windows, write_json
from transformers import DynamicCache

from kvq.granularity import Granularity
from kvq.models import SmolLM2Embedded
from kvq.quant import AdaptiveQuantizer, Quantizer, UniformQuantizer

LAYER = Granularity("layer")


def kv_blocks(windows: int) -> list[torch.Tensor]:
    """``[512, 192]`` fp16 layer units of every layer's keys and values, per window."""
    lm = SmolLM2Embedded().load(device="cpu")
    blocks = []
    with torch.inference_mode():
        for w in eval_windows(lm.tokenizer, windows):
            cache = DynamicCache()
            lm.model(w.unsqueeze(0), cache=cache, use_cache=True)
            for layer in cache.layers:
                blocks += [LAYER.to_units(layer.keys).half(), LAYER.to_units(layer.values).half()]
    return blocks


def measure(q: Quantizer, blocks: list[torch.Tensor], bits: int) -> tuple[float, float]:
    """(total squared error, median encode seconds per block)."""
    err, times = 0.0, []
    for b in blocks:
        x = b.float()
        t = time.perf_counter()
        qt = q.encode(b, bits)
        times.append(time.perf_counter() - t)
        err += float((q.decode(qt) - x).double().pow(2).sum())
    times.sort()
    return err, times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/lloyd.json")
    args = ap.parse_args()
    blocks = kv_blocks(args.windows)
    rows = []
    for bits in (2, 3, 4):
        u_err, u_t = measure(UniformQuantizer(group_size=128), blocks, bits)
        res = {
            i: measure(AdaptiveQuantizer(group_size=128, lloyd_iters=i), blocks, bits)
            for i in (0, 1, 2, 3, 5)
        }
        for i, (err, t) in res.items():
            row = {
                "bits": bits,
                "lloyd_iters": i,
                "sq_error_vs_default": err / res[2][0],
                "sq_error_vs_uniform": err / u_err,
                "encode_time_vs_uniform": t / u_t,
            }
            rows.append(row)
            print(
                f"b{bits} lloyd_iters={i}: error {row['sq_error_vs_default']:.3f}x default, "
                f"{row['sq_error_vs_uniform']:.3f}x uniform; encode {row['encode_time_vs_uniform']:.2f}x uniform"
            )
    out = {
        "benchmark": "adaptive error and encode time vs lloyd_iters, SmolLM2-135M K/V, layer units, g128",
        "blocks": len(blocks),
        "rows": rows,
    }
    write_json(args.out, out)


if __name__ == "__main__":
    main()
