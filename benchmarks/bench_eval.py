"""Per-window evaluation time with kvq's QuantizedCache vs transformers' DynamicCache.

    python benchmarks/bench_eval.py [--windows 6] [--repeats 5] [--seq-len 512] [--out benchmarks/results/eval.json]

The embedded model (SmolLM2-135M, fp32 on CPU / bf16 on GPU), WikiText-2 raw test windows from
``../shared/data`` (or the embedded pydoc text when absent), fakequant protocol (one forward
per window, every key/value quantized), 4 bits, layer units, g128. All caches are timed in the
same run, interleaved window by window; the ratio is the median over (window, repeat) of each
forward's time over the DynamicCache forward of the same window and repeat (paired, so that load
from elsewhere on the machine cancels out), with its interquartile range.
Targets (issue): uniform <= 1.10x, adaptive <= 1.3x.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import eval_windows, write_json
from transformers import DynamicCache

from kvq.alloc import FixedBits
from kvq.cache import KVQuantSpec, QuantizedCache
from kvq.models import SmolLM2Embedded
from kvq.quant import AdaptiveQuantizer, FullPrecision, NormalQuantizer, UniformQuantizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/eval.json")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm = SmolLM2Embedded().load(device=device)
    windows = eval_windows(lm.tokenizer, args.windows, args.seq_len).to(device)
    n_layers = lm.meta.n_layers

    def spec(q: object) -> KVQuantSpec:
        # layer units (n_kv_heads x head_dim = 192 features for SmolLM2), the run's default
        return KVQuantSpec(q, granularity="layer")

    caches = {
        "dynamic": lambda: DynamicCache(),
        "none": lambda: QuantizedCache(spec(FullPrecision()), n_layers),
        "uniform": lambda: QuantizedCache(spec(UniformQuantizer(group_size=128)), n_layers, FixedBits(4)),
        "normal": lambda: QuantizedCache(spec(NormalQuantizer(group_size=128)), n_layers, FixedBits(4)),
        "adaptive": lambda: QuantizedCache(spec(AdaptiveQuantizer(group_size=128)), n_layers, FixedBits(4)),
    }
    times: dict[str, list[float]] = {k: [] for k in caches}
    with torch.inference_mode():
        lm.model(windows[:1], cache=DynamicCache())  # warm-up
        for _ in range(args.repeats):
            for w in windows:
                for name, make in caches.items():
                    if device == "cuda":
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    lm.model(w.unsqueeze(0), cache=make(), use_cache=True)
                    if device == "cuda":
                        torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - t)
    # paired ratios: each forward against the DynamicCache forward of the same window and repeat,
    # timed moments apart, so that load from elsewhere on the machine cancels out
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        paired = [t / d for t, d in zip(ts, times["dynamic"])]
        ratio = statistics.median(paired)
        q1, _, q3 = statistics.quantiles(paired, n=4) if len(paired) > 1 else (ratio, ratio, ratio)
        rows.append(
            {
                "cache": name,
                "seconds_per_window": med,
                "ratio_to_dynamic": ratio,
                "ratio_iqr": [q1, q3],
            }
        )
        print(f"{name:9s} {med * 1e3:9.1f} ms/window  {ratio:6.3f}x DynamicCache (IQR {q1:.3f}-{q3:.3f})")
    out = {
        "benchmark": "per-window fakequant forward, SmolLM2-135M, 4 bits, layer units, g128",
        "device": device,
        "dtype": str(next(lm.model.parameters()).dtype),
        "seq_len": args.seq_len,
        "windows": args.windows,
        "repeats": args.repeats,
        "rows": rows,
    }
    write_json(args.out, out)


if __name__ == "__main__":
    main()
