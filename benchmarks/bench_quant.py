"""Quantize+dequantize throughput of each method vs a plain copy of the same tensor.

    python benchmarks/bench_quant.py [--out benchmarks/results/quant.json] [--rounds 15] [--threads 1]
    python benchmarks/bench_quant.py --device cuda   # on a GPU: benchmarks/results/quant_cuda.json
    python benchmarks/bench_quant.py --table benchmarks/results/quant.json   # the README table

Tensor: [1, 8, 4096, 128] fp16 (8 KV heads x 4096 tokens x head_dim 128), per-head units,
4 bits, g128. Every round times ``x.clone()`` (median of 10) and one round trip of each method
moments apart; a method's ratio to the copy is the median over rounds of its time over that
round's copy time (ratios, not absolute times, are what transfers between machines and survives
a shared, drifting CPU), reported with the spread over rounds. Rows: the fused kernels (the
default path, ``kvq.quant.fused``) and the eager reference they are checked against
(``method (eager)``); each row records which backend encoded and decoded (``encode_path`` /
``decode_path``: ``c``, ``triton`` or ``eager``). The JSON keeps the machine, threads, load and
the kernels' build time (on a GPU: the device, the Triton version; Triton's compile time falls in
the warm-up round, outside the timings).

``--device``: ``auto`` (the default: ``cuda`` where a GPU is visible, else ``cpu``), ``cpu`` or
``cuda`` (the Triton kernels of ``kvq.quant.fused_triton``; CUDA events are not needed: every
timed call ends with ``torch.cuda.synchronize()``). The default output follows the device:
``quant.json`` on the CPU, ``quant_cuda.json`` on a GPU.

Every timing is taken on two clocks at once: the wall clock (``ratio_to_copy``) and the CPU time
of the process (``ratio_to_copy_cpu``). One thread by default: on a machine whose cores are
shared with other jobs (load average above the core count, as on this project's 2-core box) a
multi-threaded op's wall time mostly measures waiting for the second core (a 2-thread
``x.clone()`` of 8 MB then takes ~12 ms instead of ~0.13), and a single thread's CPU time does
not count the time it was preempted. ``--threads 2`` on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import write_json

from kvq.quant import AdaptiveQuantizer, FullPrecision, NormalQuantizer, Quantizer, UniformQuantizer, fused


def machine_facts() -> dict[str, object]:
    """What makes a timing comparable: CPU model, cores, threads, load, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    facts: dict[str, object] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    return facts


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def paths(q: Quantizer, on: bool, units: torch.Tensor) -> tuple[str, str]:
    """``(encode, decode)`` backends of one round trip: ``c``, ``triton`` or ``eager`` (any part of
    the block that ran the eager chain makes it ``eager``)."""
    ran = {"encode": [], "decode": []}
    enc, dec = fused.encode_part, fused.decode_part
    kind = fused.backend(units.device) or "eager"

    def encode_part(*a, **k):
        out = enc(*a, **k)
        ran["encode"].append(out is not None)
        return out

    def decode_part(*a, **k):
        out = dec(*a, **k)
        ran["decode"].append(bool(out))
        return out

    fused.encode_part, fused.decode_part = encode_part, decode_part
    try:
        with fused.using(on):
            q.decode(q.encode(units, 4), torch.float16)
    finally:
        fused.encode_part, fused.decode_part = enc, dec
    return tuple(kind if r and all(r) else "eager" for r in (ran["encode"], ran["decode"]))


def _once(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the process) of one call."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    _sync()
    return time.perf_counter() - t, time.process_time() - c


def quantiles(xs: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile)."""
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q1, med, q3 = statistics.quantiles(xs, n=4)
    return q1, statistics.median(xs), q3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="default: benchmarks/results/quant.json (cpu), quant_cuda.json (cuda)")
    ap.add_argument("--rounds", type=int, default=15, help="rounds of the fused path (eager: a third)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if visible")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    ap.add_argument("--table", metavar="JSON", help="print the README table of a result file and exit")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device visible")
    if args.out is None:
        args.out = "benchmarks/results/" + ("quant.json" if args.device == "cpu" else "quant_cuda.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(1, 8, 4096, 128, dtype=torch.float16, device=args.device)
    units = x.reshape(-1, 128)
    t0 = time.perf_counter()
    info = fused.build_info()  # build (or load) the kernels outside the timings
    build_s = time.perf_counter() - t0
    if args.device == "cuda":
        ft = fused.triton_backend()
        info = {"triton": None if ft is None else ft.triton.__version__, "c_kernels": info}
    methods: list[tuple[str, Quantizer, bool]] = [("none", FullPrecision(), True)]
    for name, q in [
        ("uniform", UniformQuantizer(group_size=128)),
        ("normal", NormalQuantizer(group_size=128)),
        ("adaptive", AdaptiveQuantizer(group_size=128)),
    ]:
        methods += [(name, q, True), (f"{name} (eager)", q, False)]

    def round_trip(q: Quantizer, on: bool) -> Callable[[], object]:
        def run() -> object:
            with fused.using(on):
                return q.decode(q.encode(units, 4), torch.float16)

        return run

    for _, q, on in methods:  # warm-up (allocator, first calls, Triton's compilation)
        round_trip(q, on)()
    backends = {name: paths(q, on, units) for name, q, on in methods}
    clocks = ("wall", "cpu")
    times = {c: {name: [] for name, _, _ in methods} for c in clocks}
    ratios = {c: {name: [] for name, _, _ in methods} for c in clocks}
    copies: dict[str, list[float]] = {c: [] for c in clocks}
    for r in range(args.rounds):
        copy = [_once(lambda: x.clone()) for _ in range(10)]
        for i, c in enumerate(clocks):
            copies[c].append(statistics.median(t[i] for t in copy))
        for name, q, on in methods:
            if not on and r % 3:
                continue  # the eager chain is slow: a third of the rounds
            for c, s in zip(clocks, _once(round_trip(q, on))):
                times[c][name].append(s)
                ratios[c][name].append(s / copies[c][-1])
    rows = []
    for name, q, on in methods:
        q1, med, q3 = quantiles(ratios["wall"][name])
        c1, cmed, c3 = quantiles(ratios["cpu"][name])
        s = statistics.median(times["wall"][name])
        enc = statistics.median(_once(lambda q=q, on=on: _enc(q, on, units))[0] for _ in range(3))
        rows.append(
            {
                "method": name,
                "fused": on and name != "none" and q._fused_applies(),
                "encode_path": backends[name][0] if name != "none" else "copy",
                "decode_path": backends[name][1] if name != "none" else "copy",
                "seconds": s,
                "encode_seconds": enc,
                "gb_per_s": x.numel() * x.element_size() / s / 1e9,
                "ratio_to_copy": med,
                "ratio_iqr": [q1, q3],
                "ratio_to_copy_cpu": cmed,
                "ratio_cpu_iqr": [c1, c3],
                "cpu_seconds": statistics.median(times["cpu"][name]),
                "rounds": len(ratios["wall"][name]),
            }
        )
        print(
            f"{name:18s} {s * 1e3:9.2f} ms  {rows[-1]['gb_per_s']:8.3f} GB/s  {med:8.1f}x copy "
            f"(IQR {q1:.1f}-{q3:.1f}; CPU clock {cmed:.1f}x, IQR {c1:.1f}-{c3:.1f}; {len(ratios['wall'][name])} rounds)"
        )
    out = {
        "benchmark": "quantize+dequantize round trip, 4 bits, g128, per-head units",
        "shape": list(x.shape),
        "dtype": "float16",
        "device": args.device,
        "copy_seconds": statistics.median(copies["wall"]),
        "copy_cpu_seconds": statistics.median(copies["cpu"]),
        "kernels": {**info, "build_or_load_seconds_here": build_s},
        **machine_facts(),
        "rows": rows,
    }
    write_json(args.out, out)


def _enc(q: Quantizer, on: bool, units: torch.Tensor) -> object:
    with fused.using(on):
        return q.encode(units, 4)


def table(res: dict) -> str:
    """The README rows of a result file."""
    lines = [
        "| method | encode / decode | ms per round trip | GB/s | × copy (wall) | IQR | × copy (CPU clock) | IQR |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        (q1, q3), (c1, c3) = r["ratio_iqr"], r["ratio_cpu_iqr"]
        path = f"{r['encode_path']} / {r['decode_path']}" if "encode_path" in r else ""
        lines.append(
            f"| {r['method']} | {path} | {r['seconds'] * 1e3:.2f} | {r['gb_per_s']:.3g} | "
            f"**{r['ratio_to_copy']:.1f}** | {q1:.1f}–{q3:.1f} | {r['ratio_to_copy_cpu']:.1f} | {c1:.1f}–{c3:.1f} |"
        )
    lines.append(
        f"\n(copy {res['copy_seconds'] * 1e3:.3f} ms; {res.get('gpu') or res.get('cpu')}, "
        f"{res.get('torch_threads')} thread(s), "
        f"load average {', '.join(f'{v:.1f}' for v in res.get('load_average') or [])})"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
