"""Per-window evaluation time with kvq's QuantizedCache vs transformers' DynamicCache.

    python benchmarks/bench_eval.py [--windows 6] [--repeats 5] [--seq-len 512] [--out benchmarks/results/eval.json]
        [--caches dynamic,uniform,adaptive,streaming] [--profile] [--threads N]
    python benchmarks/bench_eval.py --table benchmarks/results/eval.json   # the README table

The embedded model (SmolLM2-135M, fp32 on CPU / bf16 on GPU), WikiText-2 raw test windows from
``../shared/data`` (or the embedded pydoc text when absent), fakequant protocol (one forward
per window, every key/value quantized), 4 bits, layer units, g128. ``streaming`` is the
streaming-exact path: per-channel keys (KIVI: each key channel over 32 tokens is one unit), a
128-token full-precision residual window, and the ``kvq`` attention mixing quantized and
full-precision K/V per query (``kvq.attention.blockwise_attention``); the other caches run the
model's SDPA attention. All caches are timed in the same run, interleaved window by window; the
ratio is the median over (window, repeat) of each forward's time over the DynamicCache forward of
the same window and repeat (paired, so that load from elsewhere on the machine cancels out), with
its interquartile range. ``--profile`` adds one profiled forward per kvq cache: where its time goes
over the DynamicCache forward (cProfile, by function), written to the JSON.
Targets (issue): uniform <= 1.10x, adaptive and streaming <= 1.25x, at 512 and 4096 tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from bench_quant import machine_facts
from common import eval_windows, write_json
from transformers import DynamicCache

from kvq.alloc import FixedBits
from kvq.attention import register
from kvq.cache import KVQuantSpec, QuantizedCache
from kvq.models import SmolLM2Embedded
from kvq.quant import AdaptiveQuantizer, FullPrecision, NormalQuantizer, UniformQuantizer, fused

TARGETS = {"uniform": 1.10, "adaptive": 1.25, "streaming": 1.25}
#: functions whose cumulative time the profile reports (module path fragment, function name)
WATCH = [
    ("kvq/attention.py", "blockwise_attention"),
    ("kvq/attention.py", "kvq_attention"),
    ("sdpa_attention.py", "sdpa_attention_forward"),
    ("kvq/cache/layers.py", "update"),
    ("kvq/cache/layers.py", "flush"),
    ("kvq/cache/layers.py", "materialize"),
    ("kvq/cache/layers.py", "query_mix_mask"),
    ("kvq/quant/base.py", "encode"),
    ("kvq/quant/base.py", "decode"),
    ("kvq/cache/spec.py", "units"),
    ("kvq/cache/spec.py", "from_units"),
]


def make_caches(n_layers: int) -> dict[str, Callable[[], object]]:
    def spec(q: object, **knobs: object) -> KVQuantSpec:
        # layer units (n_kv_heads x head_dim = 192 features for SmolLM2), the run's default
        return KVQuantSpec(q, granularity="layer", **knobs)

    def streaming() -> QuantizedCache:
        s = spec(UniformQuantizer(group_size=128), key_axis="channel", key_group=32, residual=128)
        cache = QuantizedCache(s, n_layers, FixedBits(4))
        cache.enable_mixing()
        return cache

    return {
        "dynamic": lambda: DynamicCache(),
        "none": lambda: QuantizedCache(spec(FullPrecision()), n_layers),
        "uniform": lambda: QuantizedCache(spec(UniformQuantizer(group_size=128)), n_layers, FixedBits(4)),
        "normal": lambda: QuantizedCache(spec(NormalQuantizer(group_size=128)), n_layers, FixedBits(4)),
        "adaptive": lambda: QuantizedCache(spec(AdaptiveQuantizer(group_size=128)), n_layers, FixedBits(4)),
        "streaming": streaming,
    }


@contextlib.contextmanager
def attention_for(model: torch.nn.Module, name: str) -> Iterator[None]:
    """The streaming cache needs the ``kvq`` attention (mixing); every other cache runs SDPA."""
    if name != "streaming":
        yield
        return
    model.set_attn_implementation("kvq")
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")


def profile_forward(model: torch.nn.Module, w: torch.Tensor, make: Callable[[], object]) -> dict[str, float]:
    """Seconds spent (cumulative) in the watched functions during one forward, and in total."""
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    model(w.unsqueeze(0), cache=make(), use_cache=True)
    prof.disable()
    total = time.perf_counter() - t
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    out = {"total": total}
    for (path, _, func), (_, _, _, cum, _) in stats.items():
        for frag, name in WATCH:
            if func == name and frag in path:
                out[f"{frag.rsplit('/', 1)[-1]}:{name}"] = (
                    out.get(f"{frag.rsplit('/', 1)[-1]}:{name}", 0.0) + cum
                )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--caches", default="dynamic,none,uniform,normal,adaptive,streaming")
    ap.add_argument("--profile", action="store_true", help="also profile one forward per kvq cache")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="benchmarks/results/eval.json")
    ap.add_argument("--table", metavar="JSON", help="print the README table of a result file and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    register()
    lm = SmolLM2Embedded().load(device=device, attn_implementation="sdpa")
    windows = eval_windows(lm.tokenizer, args.windows, args.seq_len).to(device)
    wanted = ["dynamic", *(c for c in args.caches.split(",") if c and c != "dynamic")]
    caches = {k: v for k, v in make_caches(lm.meta.n_layers).items() if k in wanted}
    t0 = time.perf_counter()
    kernels = fused.build_info()
    build_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {k: [] for k in caches}
    profile: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for name, make in caches.items():  # warm-up: every path once, full length (allocator)
            with attention_for(lm.model, name):
                lm.model(windows[:1], cache=make(), use_cache=True)
        for _ in range(args.repeats):
            for w in windows:
                for name, make in caches.items():
                    with attention_for(lm.model, name):
                        if device == "cuda":
                            torch.cuda.synchronize()
                        t = time.perf_counter()
                        lm.model(w.unsqueeze(0), cache=make(), use_cache=True)
                        if device == "cuda":
                            torch.cuda.synchronize()
                        times[name].append(time.perf_counter() - t)
        if args.profile:
            for name, make in caches.items():
                with attention_for(lm.model, name):
                    profile[name] = profile_forward(lm.model, windows[0], make)
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
                "target": TARGETS.get(name),
                "samples": len(paired),
            }
        )
        tgt = f"  target <= {TARGETS[name]:.2f}" if name in TARGETS else ""
        print(
            f"{name:9s} {med * 1e3:9.1f} ms/window  {ratio:6.3f}x DynamicCache (IQR {q1:.3f}-{q3:.3f}){tgt}"
        )
    for name, p in profile.items():
        parts = ", ".join(f"{k} {v:.3f}s" for k, v in sorted(p.items(), key=lambda kv: -kv[1]) if v > 0.001)
        print(f"profile {name}: {parts}")
    out = {
        "benchmark": "per-window fakequant forward, SmolLM2-135M, 4 bits, layer units, g128",
        "device": device,
        "dtype": str(next(lm.model.parameters()).dtype),
        "seq_len": args.seq_len,
        "windows": args.windows,
        "repeats": args.repeats,
        "streaming": "uniform g128 4 bits, key_axis=channel key_group=32, residual=128, kvq attention (mixing)",
        "kernels": {**kernels, "build_or_load_seconds_here": build_s},
        **machine_facts(),
        "rows": rows,
        "profile": profile,
    }
    write_json(args.out, out)


LABELS = {
    "dynamic": "DynamicCache",
    "none": "kvq, method=none",
    "uniform": "kvq, uniform",
    "normal": "kvq, normal",
    "adaptive": "kvq, adaptive",
    "streaming": "kvq, streaming-exact (per-channel keys + residual 128)",
}


def table(res: dict) -> str:
    """The README rows of a result file."""
    lines = ["| cache | ms per window | × DynamicCache | IQR | target |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        q1, q3 = r["ratio_iqr"]
        t = r.get("target")
        ok = "" if t is None else f"≤ {t:.2f} {'✔' if r['ratio_to_dynamic'] <= t else '✘'}"
        ratio = f"**{r['ratio_to_dynamic']:.3f}**" if t is not None else f"{r['ratio_to_dynamic']:.3f}"
        iqr = "" if r["cache"] == "dynamic" else f"{q1:.2f}–{q3:.2f}"
        lines.append(
            f"| {LABELS.get(r['cache'], r['cache'])} | {r['seconds_per_window'] * 1e3:.0f} | {ratio} | {iqr} | {ok} |"
        )
    lines.append(
        f"\n({res['seq_len']} tokens, {res['windows']} windows x {res['repeats']} repeats; {res.get('cpu')}, "
        f"{res.get('torch_threads')} thread(s), load average "
        f"{', '.join(f'{v:.1f}' for v in res.get('load_average') or [])})"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
