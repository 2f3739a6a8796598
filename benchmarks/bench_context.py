"""Peak memory and time of one fakequant window vs context length: kvq streaming-exact vs DynamicCache.

    python benchmarks/bench_context.py [--lengths 1024,2048,4096,8192,16384] [--out FILE]

A wide tiny random Llama (2 layers, hidden 1024, 16 query heads, 8 KV heads, head_dim 64) scores
one window of T tokens in one forward, (a) with transformers' ``DynamicCache`` (SDPA) and (b)
with kvq's ``QuantizedCache`` in its streaming-exact configuration (4-bit uniform, keys per
channel in groups of 32 tokens, values per token, residual window 32): the ``kvq`` attention
mixes quantized and full-precision K/V per query, block by block. Each (T, cache) runs in a
fresh process, so its peak resident memory (``ru_maxrss``, minus the process's peak before the
forward) belongs to that forward alone; on a GPU the peak is ``torch.cuda.max_memory_allocated``.
Ratios are kvq / DynamicCache at the same T, measured in one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import write_json

WIDE = dict(
    n_layers=2, hidden_size=1024, n_heads=16, n_kv_heads=8, intermediate_size=2048, max_position=32768
)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def one(T: int, which: str, device: str) -> dict[str, float]:
    """Score one window of ``T`` tokens with ``which`` (``dynamic`` or ``kvq``) in this process."""
    from transformers import DynamicCache

    from kvq.alloc import FixedBits
    from kvq.attention import register
    from kvq.models import TinyRandomLlama
    from kvq.protocols import KVSetup
    from kvq.quant import UniformQuantizer

    model = TinyRandomLlama(**WIDE).load(device=device, attn_implementation=register()).model
    ids = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(0)).to(device)
    knobs = dict(key_axis="channel", key_group=32, residual=32)
    kv = KVSetup(
        UniformQuantizer(), FixedBits(4), 2, model_config=model.config, granularity="head", knobs=knobs
    )
    cache = DynamicCache(config=model.config) if which == "dynamic" else kv.cache()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated()
    else:
        base = _peak_rss()
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = model(ids, cache=cache, use_cache=True).logits
        nll = float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:]))
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_rss() - base
    return {"T": T, "cache": which, "seconds": time.perf_counter() - t0, "peak_bytes": peak, "nll": nll}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/context.json")
    ap.add_argument("--one", nargs=2, metavar=("T", "CACHE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(int(args.one[0]), args.one[1], args.device)))
        return
    rows = []
    for T in [int(t) for t in args.lengths.split(",")]:
        pair = {}
        for which in ("dynamic", "kvq"):
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(T), which, "--device", args.device],
                capture_output=True,
                text=True,
                check=True,
            )
            pair[which] = json.loads(out.stdout.strip().splitlines()[-1])
        row = {
            "T": T,
            "dynamic_s": pair["dynamic"]["seconds"],
            "kvq_s": pair["kvq"]["seconds"],
            "time_ratio": pair["kvq"]["seconds"] / pair["dynamic"]["seconds"],
            "dynamic_peak_mib": pair["dynamic"]["peak_bytes"] / 2**20,
            "kvq_peak_mib": pair["kvq"]["peak_bytes"] / 2**20,
            "peak_ratio": pair["kvq"]["peak_bytes"] / max(pair["dynamic"]["peak_bytes"], 1),
            "dynamic_nll": pair["dynamic"]["nll"],
            "kvq_nll": pair["kvq"]["nll"],
        }
        rows.append(row)
        print(
            f"T={T:6d}  DynamicCache {row['dynamic_s']:7.2f} s {row['dynamic_peak_mib']:8.1f} MiB   "
            f"kvq {row['kvq_s']:7.2f} s {row['kvq_peak_mib']:8.1f} MiB   "
            f"x{row['time_ratio']:.2f} time, x{row['peak_ratio']:.2f} peak",
            flush=True,
        )
    write_json(Path(args.out), {"model": WIDE, "device": args.device, "rows": rows})


if __name__ == "__main__":
    main()
