"""Fused quantize/dequantize kernels behind :meth:`Quantizer.encode` / :meth:`Quantizer.decode`.

The eager op chain of :mod:`kvq.quant.base` (statistics, rounding, packing as separate PyTorch
ops) is the reference. For the built-in methods (``uniform``, ``normal``, ``adaptive``) the same
computation runs as one kernel per block of rows, on two backends:

* CPU tensors: C kernels (``fused_kernels.c`` beside this module) for all three methods;
* CUDA tensors: Triton kernels (:mod:`kvq.quant.fused_triton`) for the same three methods,
  encode and decode. Used where ``triton`` imports (the ``gpu`` extra); elsewhere the eager path
  runs, and the reason is logged once at debug level. A configuration whose kernel fails to
  compile or run (a GPU Triton does not target) runs the eager path from then on (a warning, once:
  :data:`kvq.quant.fused_triton.FAILED`); any other error of the Triton host side turns the Triton
  path off for the process (a warning).

On both, every float operation is the one the reference performs, in the same order, so the codes
and fp16 metadata are identical byte for byte and decoded values are identical too: the C kernels
are checked by ``tests/quant/test_fused.py`` over the method matrix, all widths, groupings,
outliers and per-unit widths; the Triton kernels by ``tests/quant/test_fused_triton.py`` over the
same matrix in Triton's interpreter on CPU tensors, bit for bit (the real-GPU check, marked
``gpu``, has not run yet: no GPU was lent). Large CPU blocks are split over
``torch.get_num_threads()`` threads.

The C kernels are compiled once per machine with the system C compiler (``cc -O3 -march=native``;
1.3-5 s on the project's 2-core machine, depending on its load), cached on disk
(``$KVQ_KERNEL_CACHE``, default ``~/.cache/kvq/kernels``, keyed by the source, the flags and the
CPU) and loaded with :mod:`ctypes` (a few ms in every later process). They take any number of
units, so growing caches never recompile. ``$KVQ_KERNEL_CFLAGS`` replaces ``-march=native``
(another target, or ``""`` for the portable code). Triton compiles each kernel once per
(method, width, dtype, group layout) and caches it on disk as Triton does. Where a kernel does not
apply (another device or dtype, a method that overrides a hook, a non-finite value, no C compiler,
no ``triton``) the eager reference runs.

The switch, for both backends: ``KVQ_FUSED=0`` (or ``off``) runs the eager reference everywhere;
the default (``auto``) uses the kernels where they apply. In code: :func:`set_enabled` /
:func:`enabled` / :func:`using` / :func:`reference`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "ENV",
    "HOOKS",
    "FusedSpec",
    "backend",
    "build_info",
    "decode_part",
    "enabled",
    "encode_part",
    "hooks_unchanged",
    "library",
    "reference",
    "set_enabled",
    "supports",
    "triton_backend",
    "using",
]

log = logging.getLogger(__name__)

#: the environment switch: ``0``/``off``/``false``/``eager`` = the eager reference everywhere
ENV = "KVQ_FUSED"
SOURCE = Path(__file__).with_name("fused_kernels.c")
_FLAGS = [
    "-O3",
    "-std=c11",
    "-fPIC",
    "-shared",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fopenmp-simd",
]
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_METHODS = {"uniform": 0, "normal": 1, "adaptive": 2}
#: work (elements x the method's relative cost) per extra thread: smaller blocks run in the
#: calling thread (a hand-off costs ~20-50 us, more on a loaded machine)
_MIN_PARALLEL = 1 << 19
_COST = {"uniform": 1, "normal": 2, "adaptive": 4}
_ROW_ALIGN = 16  # a chunk of rows starts at a multiple of 16 (whole bytes of codes, whole lane batches)

_override: bool | None = None
_env: bool | None = None  # $KVQ_FUSED, read once
_local = threading.local()  # .eager: this thread runs the reference (encode_reference / decode_reference)
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_tried = False
_info: dict[str, object] = {}
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
#: which backend reads the tensors of a device type ("c": the C kernels, "triton": fused_triton)
_BACKENDS = {"cpu": "c", "cuda": "triton"}
_triton_mod: types.ModuleType | None = None
_triton_tried = False


@dataclass(frozen=True)
class FusedSpec:
    """What a method hands the fused kernels (:meth:`Quantizer.fused_spec`).

    Attributes:
        method: ``uniform``, ``normal`` or ``adaptive``.
        meta: names of the stored fp16 fields, in the kernel's order.
        symmetric: the symmetric uniform grid.
        lloyd_iters: adaptive's Lloyd steps.
        table: float32 ``[k]`` constants of encoding (normal: the N(0, 1) boundaries ``[2**b - 1]``;
            adaptive: ``linspace(0, 1, 2**b)``).
        levels: float32 ``[2**b]`` constants of decoding (normal: the N(0, 1) bin means).
    """

    method: str
    meta: tuple[str, ...]
    symmetric: bool = False
    lloyd_iters: int = 0
    table: torch.Tensor | None = None
    levels: torch.Tensor | None = None


# ------------------------------------------------------------------ the switch
def _env_enabled() -> bool:
    global _env
    if _env is None:
        _env = os.environ.get(ENV, "auto").strip().lower() not in ("0", "off", "false", "no", "eager")
    return _env


def enabled() -> bool:
    """Whether ``encode``/``decode`` use the fused kernels where they apply (``$KVQ_FUSED``, read
    once per process, unless :func:`set_enabled` / :func:`using` say otherwise)."""
    if getattr(_local, "eager", False):
        return False
    return _env_enabled() if _override is None else _override


@contextlib.contextmanager
def reference() -> Iterator[None]:
    """Run the block's ``encode``/``decode`` calls of this thread by the eager reference."""
    prev, _local.eager = getattr(_local, "eager", False), True
    try:
        yield
    finally:
        _local.eager = prev


def set_enabled(flag: bool | None) -> None:
    """Force the fused kernels on (``True``) or off (``False``); ``None`` = follow ``$KVQ_FUSED``."""
    global _override
    _override = flag


@contextlib.contextmanager
def using(flag: bool) -> Iterator[None]:
    """Run the block with the fused kernels on or off (e.g. ``with using(False):`` = the reference)."""
    global _override
    prev, _override = _override, flag
    try:
        yield
    finally:
        _override = prev


# ------------------------------------------------------------------ which quantizers
#: the hooks a kernel reproduces: a subclass that overrides one runs the eager path
HOOKS = (
    "_fit",
    "_levels",
    "_boundaries",
    "_assign",
    "_fit_assign",
    "_reconstruct",
    "_grouped",
    "_split_outliers",
    "effective_group_size",
    "n_outliers",
    "fused_spec",
)


@functools.cache
def hooks_unchanged(cls: type, base: type) -> bool:
    """Whether ``cls`` (a :class:`~kvq.quant.Quantizer` subclass) has exactly the :data:`HOOKS` of the
    class that declared its ``fused_spec`` (``base``, the class without kernels, does not count)."""
    owner = next((c for c in cls.__mro__ if "fused_spec" in c.__dict__), base)
    return owner is not base and all(getattr(cls, h) is getattr(owner, h) for h in HOOKS)


# ------------------------------------------------------------------ building the library
def _cache_dir() -> Path:
    root = os.environ.get("KVQ_KERNEL_CACHE")
    if root:
        return Path(root)
    # not $KVQ_CACHE_DIR: test sessions point that at a temporary folder, and would rebuild
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvq" / "kernels"


def _cpu_tag() -> str:
    """What the machine's code depends on (``-march=native``): the CPU model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))][:2]
        return platform.machine() + "|".join(lines)
    except OSError:
        return platform.machine() + platform.processor()


def _target_flags() -> list[str]:
    """``-march=native``, or ``$KVQ_KERNEL_CFLAGS`` (e.g. ``-mavx2 -mfma -mf16c``; empty = generic
    code), to build for another CPU or to test the portable paths."""
    flags = os.environ.get("KVQ_KERNEL_CFLAGS")
    return ["-march=native"] if flags is None else flags.split()


def _compile(cc: str, src: Path, out: Path, native: bool) -> None:
    cmd = [cc, *_FLAGS, *(_target_flags() if native else []), str(src), "-o", str(out), "-lm"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)


def _build() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None or not SOURCE.exists():
        _info.update(available=False, reason="no C compiler" if cc is None else f"{SOURCE.name} missing")
        return None
    src = SOURCE.read_bytes()
    tag = " ".join([cc, *_FLAGS, *_target_flags(), _cpu_tag()])
    key = hashlib.sha256(src + tag.encode()).hexdigest()[:16]
    path = _cache_dir() / f"kvq_kernels_{key}.so"
    t0 = time.perf_counter()
    built = False
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            tmp_out = Path(tmp) / path.name
            try:
                _compile(cc, SOURCE, tmp_out, native=True)
            except (subprocess.SubprocessError, OSError):
                _compile(cc, SOURCE, tmp_out, native=False)  # e.g. a compiler without -march=native
            os.replace(tmp_out, path)  # atomic: concurrent processes never load a partial file
        built = True
    lib = ctypes.CDLL(str(path))
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.kvq_encode.argtypes = [i32, ptr, i32, ptr, i64, i64, i64, i64, i32, i32, i32, ptr, ptr, ptr, ptr]
    lib.kvq_encode.restype = i32
    lib.kvq_decode.argtypes = [i32, ptr, i64, i64, i64, i64, i32, i32, ptr, ptr, ptr, ptr, i32, ptr]
    lib.kvq_decode.restype = i32
    _info.update(available=True, path=str(path), built=built, seconds=time.perf_counter() - t0, compiler=cc)
    return lib


def library() -> ctypes.CDLL | None:
    """The kernels, built on first use (``None`` where they cannot be built: no C compiler)."""
    global _lib, _lib_tried
    if _lib_tried:
        return _lib
    with _lock:
        if not _lib_tried:
            try:
                _lib = _build()
            except (subprocess.SubprocessError, OSError) as e:
                _info.update(available=False, reason=f"build failed: {e}")
                log.warning("kvq: fused kernels unavailable (%s); using the eager reference", e)
                _lib = None
            _lib_tried = True
    return _lib


def build_info() -> dict[str, object]:
    """Where the kernels come from: ``available``, ``path``, ``built`` (compiled by this process),
    ``seconds`` (compile + load time in this process), ``compiler`` (or ``reason``)."""
    library()
    return dict(_info)


# ------------------------------------------------------------------ running the kernels
def _threads() -> int:
    return max(1, torch.get_num_threads())


def _run_rows(fn, n_rows: int, work: int) -> list[int]:
    """``fn(r0, r1)`` over ``[0, n_rows)`` in chunks on up to ``torch.get_num_threads()`` threads;
    returns the chunks' status codes."""
    global _pool, _pool_size
    t = _threads()
    n_chunks = min(t, max(1, work // _MIN_PARALLEL), -(-n_rows // _ROW_ALIGN))
    if n_chunks <= 1:
        return [fn(0, n_rows)]
    step = -(-n_rows // n_chunks)
    step += (-step) % _ROW_ALIGN
    bounds = [(r, min(r + step, n_rows)) for r in range(0, n_rows, step)]
    if _pool is None or _pool_size < len(bounds) - 1:
        with _lock:
            if _pool is None or _pool_size < len(bounds) - 1:
                _pool_size = max(len(bounds) - 1, t)
                _pool = ThreadPoolExecutor(max_workers=_pool_size, thread_name_prefix="kvq-fused")
    futures = [_pool.submit(fn, a, b) for a, b in bounds[1:]]
    first = fn(*bounds[0])
    return [first, *(f.result() for f in futures)]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def triton_backend() -> types.ModuleType | None:
    """:mod:`kvq.quant.fused_triton`, imported on first use; ``None`` where ``triton`` does not
    import (or failed to run a kernel): CUDA tensors then take the eager path (logged once, at
    debug level)."""
    global _triton_mod, _triton_tried
    if not _triton_tried:
        with _lock:
            if not _triton_tried:
                try:
                    from kvq.quant import fused_triton

                    _triton_mod = fused_triton
                except Exception as e:  # ImportError, or a triton that fails on import
                    log.debug(
                        "kvq: no Triton kernels (%s: %s); CUDA tensors use the eager path",
                        type(e).__name__,
                        e,
                    )
                    _triton_mod = None
                _triton_tried = True
    return _triton_mod


def _triton_failed(e: Exception) -> None:
    """The Triton host side raised (kernel failures are handled per configuration in
    :mod:`kvq.quant.fused_triton`): the eager path from now on."""
    global _triton_mod
    log.warning("kvq: Triton kernels disabled (%s: %s); CUDA tensors use the eager path", type(e).__name__, e)
    _triton_mod = None


def backend(device: torch.device) -> str | None:
    """The backend that reads tensors on ``device`` (``"c"``, ``"triton"``), or ``None``."""
    kind = _BACKENDS.get(device.type)
    if kind == "c":
        return kind if library() is not None else None
    if kind == "triton" and triton_backend() is not None:
        return kind
    return None


def supports(x: torch.Tensor) -> bool:
    """Whether a backend can read ``x`` (float32/float16/bfloat16; CPU: the C kernels are
    available; CUDA: ``triton`` imports)."""
    return x.dtype in _DTYPES and backend(x.device) is not None


def encode_part(
    spec: FusedSpec, x: torch.Tensor, keep: torch.Tensor | None, bits: int, group: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
    """Encode ``x`` ``[n, D]`` (all at width ``bits``, groups of ``group``): ``(meta, packed codes)``
    exactly as the eager path stores them, or ``None`` when the reference must run instead (a
    value that is not finite or beyond 1e30).

    Args:
        spec: the method's constants.
        x: ``[n, D]`` float32/float16/bfloat16 units (CPU: the C kernels; CUDA: Triton).
        keep: bool ``[n, D]`` entries that define the statistics (outliers excluded), or ``None``.
        bits: code width.
        group: effective group size (``<= D``).
    """
    kind = backend(x.device)
    if kind == "triton":
        try:
            return _triton_mod.encode(spec, x, keep, bits, group)
        except Exception as e:  # never an error: the reference runs
            _triton_failed(e)
            return None
    if kind != "c":
        return None
    lib = library()
    if lib is None:
        return None
    x = x.contiguous()
    n, D = x.shape
    G = -(-D // group)
    L = 1 << bits
    per = L if spec.method == "adaptive" else 1
    meta = {name: torch.empty(n, G, per, dtype=torch.float16) for name in spec.meta}
    m = [meta[name] for name in spec.meta] + [None] * (2 - len(spec.meta))
    packed = torch.empty(-(-n * D // 8) * bits, dtype=torch.uint8)
    kp = None if keep is None else keep.contiguous().view(torch.uint8)
    table = spec.table.contiguous() if spec.table is not None else None
    args = (
        _METHODS[spec.method],
        x.data_ptr(),
        _DTYPES[x.dtype],
        _ptr(kp),
    )
    tail = (D, group, bits, int(spec.symmetric), spec.lloyd_iters, _ptr(table), _ptr(m[0]), _ptr(m[1]))

    def run(r0: int, r1: int) -> int:
        return lib.kvq_encode(*args, r0, r1, *tail, packed.data_ptr())

    if any(_run_rows(run, n, n * D * _COST[spec.method])):
        return None
    return meta, packed


def decode_part(
    spec: FusedSpec,
    packed: torch.Tensor,
    meta: dict[str, torch.Tensor],
    n: int,
    D: int,
    group: int,
    bits: int,
    out: torch.Tensor,
    rows: torch.Tensor | None,
) -> bool:
    """Decode one part of a block into ``out``, exactly as the eager path does.

    Args:
        spec: the method's constants.
        packed: uint8 packed codes of the part (its device picks the backend).
        meta: its fp16 metadata, each ``[n, G, k]``.
        n: units in the part.
        D: features per unit.
        group: effective group size.
        bits: the part's code width.
        out: ``[N, D]`` float32/float16/bfloat16, contiguous, on ``packed``'s device, written at ``rows``.
        rows: ``[n]`` rows of ``out`` (``None`` = ``0 .. n - 1``).

    Returns:
        Whether it ran (``False``: the reference must).
    """
    kind = backend(packed.device)
    if kind == "triton":
        try:
            return _triton_mod.decode(spec, packed, meta, n, D, group, bits, out, rows)
        except Exception as e:
            _triton_failed(e)
            return False
    lib = library()
    if (
        kind != "c"
        or lib is None
        or out.dtype not in _DTYPES
        or not out.is_contiguous()
        or out.device.type != "cpu"
    ):
        return False
    m = [meta[name].contiguous() for name in spec.meta] + [None] * (2 - len(spec.meta))
    if any(t is not None and t.dtype != torch.float16 for t in m):
        return False
    levels = spec.levels.contiguous() if spec.levels is not None else None
    idx = None if rows is None else rows.to(torch.int64).contiguous()
    packed = packed.contiguous()

    def run(r0: int, r1: int) -> int:
        return lib.kvq_decode(
            _METHODS[spec.method],
            packed.data_ptr(),
            r0,
            r1,
            D,
            group,
            bits,
            int(spec.symmetric),
            _ptr(m[0]),
            _ptr(m[1]),
            _ptr(levels),
            out.data_ptr(),
            _DTYPES[out.dtype],
            _ptr(idx),
        )

    return not any(_run_rows(run, n, n * D))
