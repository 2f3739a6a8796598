"""Triton kernels of the fused path: the GPU counterpart of ``fused_kernels.c``.

:mod:`kvq.quant.fused` routes CUDA tensors here (CPU tensors go to the C kernels). The kernels
compute, for ``uniform`` (asymmetric and symmetric) and ``normal``, exactly what the eager
reference of :mod:`kvq.quant.base` / :mod:`kvq.quant.methods` computes -- the same float
operations in the same order, each correctly rounded -- so the packed codes and the fp16 metadata
are identical byte for byte and decoded values identical too:

* IEEE division and square root (``tl.math.div_rn`` / ``sqrt_rn``), no FMA contraction (every
  launch passes ``enable_fp_fusion=False``);
* group sums in the reference's pairwise order (:func:`kvq.quant.base.tree_sum`: halves added);
* round half to even from ``floor`` (exact for the clamped codes, ``0 <= v <= 255``), the fp16
  round-down / round-up of :func:`~kvq.quant.base.fp16_round_down` as fp16 bit steps;
* bf16 read and written by bits, rounded to nearest even as torch rounds (Triton's interpreter
  does not round fp32 -> bf16 to even).

Decoding covers ``adaptive`` too (a codebook lookup); adaptive *encoding* stays on the eager path
on a GPU: its fit sorts every group and sums the sorted values sequentially in float64 as torch's
CPU ``cumsum`` does (a parallel scan rounds differently), then searches ``2**bits`` levels per
Lloyd step -- a kernel of its own that this module does not have yet.

Where a kernel does not apply, :func:`encode` returns ``None`` / :func:`decode` ``False`` and the
eager reference runs: a value that is not finite or beyond ``1e30`` (the C kernels' rule), a
group whose fp16 metadata overflows (zero/scale/mean/std beyond fp16: the reference's codes are
then casts of NaN), a group wider than :data:`MAX_GROUP` features, another dtype.

Codes layout (:mod:`kvq.quant.packing`): the codes of a part form one flat stream of ``n * D``
codes; every 8 codes are a little-endian bit string of ``8 * bits`` bits (code ``j`` at bit
``j * bits``) stored as ``bits`` bytes. Where every group starts at a multiple of 8 codes
(``D % 8 == 0`` and ``group % 8 == 0``) the encoder packs in the kernel; otherwise it writes one
byte per code and a second kernel packs them.

Verified bit for bit against the eager reference in Triton's interpreter on CPU tensors
(``tests/quant/test_fused_triton.py``, through :func:`interpreted`): every method of the shared
matrix, widths 1..8, groupings none / dividing / leaving a smaller last group, outliers, per-unit
widths, fp32/fp16/bf16 inputs and outputs, odd row counts. The test that a CUDA encode equals
the CPU one bit for bit is marked ``gpu`` and waits for a machine with one.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import types
from collections.abc import Iterator

import numpy as np
import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "MAX_GROUP", "decode", "encode", "interpreted", "supports"]

#: this copy of the module runs its kernels in Triton's interpreter (CPU tensors), see :func:`interpreted`
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)
#: widest group (padded to a power of two) one program holds; wider groups run the eager path
MAX_GROUP = 16384
_XDT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_METHOD = {"uniform": 0, "normal": 1, "adaptive": 2}
#: elements per program (groups x padded group size); the interpreter's cost is per program, not
#: per element, so its copy takes larger tiles
TILE = 1 << 15 if INTERPRETED else 2048
_PACK_BLOCKS = 512  # 8-code blocks per program of the packing kernel

_BIG = tl.constexpr(1e30)
_TINY = tl.constexpr(2.0**-24)  # smallest positive fp16 (subnormal)


# ------------------------------------------------------------------ device helpers
# The kernels call only Triton builtins and this module's own jit functions -- no jit function of
# ``triton.language.standard`` (``tl.max``, ``tl.sum``, ...): those were decorated when Triton was
# imported, compiled in a normal process, and the interpreted copy (:func:`interpreted`) could not
# call them. Reductions go through ``tl.reduce`` with the standard combine functions, which the
# interpreter recognises and runs in NumPy.
@triton.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _min(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_min)


@triton.jit
def _isum(x, axis: tl.constexpr):
    """Sum of integers (exact in any order)."""
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _f2h(v):
    """fp32 -> fp16 bits (round to nearest even), as int32 in ``[0, 65535]``."""
    return v.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF


@triton.jit
def _h2f(h):
    """fp16 bits (int32) -> fp32, exact."""
    return h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _round_down(v):
    """Bits of the largest fp16 ``<= v`` (``fp16_round_down``: nearest, then a step towards -inf)."""
    h = _f2h(v)
    step = tl.where((h & 0x7FFF) == 0, 0x8001, tl.where((h & 0x8000) != 0, h + 1, h - 1))
    return tl.where(_h2f(h) > v, step, h)


@triton.jit
def _round_up(v):
    """Bits of the smallest fp16 ``>= v`` (``fp16_round_up``)."""
    h = _f2h(v)
    step = tl.where((h & 0x7FFF) == 0, 0x0001, tl.where((h & 0x8000) != 0, h - 1, h + 1))
    return tl.where(_h2f(h) < v, step, h)


@triton.jit
def _clamp_tiny(h):
    """``clamp_min(2**-24)`` on fp16 bits of a value ``>= 0``."""
    return tl.where(_h2f(h) < _TINY, 1, h)


@triton.jit
def _overflows(h):
    """Whether fp16 bits are an infinity or NaN."""
    return (h & 0x7C00) == 0x7C00


@triton.jit
def _round_code(v, top):
    """``clamp(round_half_even(v), 0, top)`` as int32, for ``top <= 255``: clamping first changes
    nothing (the bounds are integers), and on ``[0, 255]`` ``v - floor(v)`` is exact."""
    c = tl.minimum(tl.maximum(v, 0.0), top)
    f = tl.floor(c)
    r = c - f
    fi = f.to(tl.int32)
    up = (r > 0.5) | ((r == 0.5) & ((fi & 1) == 1))
    return fi + up.to(tl.int32)


@triton.jit
def _load_f32(ptr, off, mask, XDT: tl.constexpr):
    """Values at ``off`` as float32 (bf16 read as its bits: ``ptr`` points at int16)."""
    if XDT == 2:
        u = tl.load(ptr + off, mask=mask, other=0).to(tl.int32) & 0xFFFF
        return (u << 16).to(tl.float32, bitcast=True)
    else:
        return tl.load(ptr + off, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _tree_sum(t, BR: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr):
    """:func:`kvq.quant.base.tree_sum` of each row of ``t`` ``[BR, P]``: halves added, ``[BR]``."""
    for s in tl.static_range(LOG_P):
        h: tl.constexpr = P >> (s + 1)
        a, b = tl.split(tl.permute(tl.reshape(t, [BR, 2, h]), [0, 2, 1]))
        t = a + b
    return tl.reshape(t, [BR])


@triton.jit
def _pack8(c, BITS: tl.constexpr, AXIS: tl.constexpr):
    """Codes ``[..., 8]`` -> their 8-code bit strings, int64 ``[...]`` (code j at bit j * BITS;
    ``AXIS`` the last axis). The shifted codes share no bit: their sum is their OR, in any order."""
    j = tl.arange(0, 8)
    return _isum(c.to(tl.int64) << (j * BITS).to(tl.int64), AXIS)


# ------------------------------------------------------------------ kernels
@triton.jit
def _encode_kernel(
    x_ptr,
    keep_ptr,
    tab_ptr,
    m0_ptr,
    m1_ptr,
    out_ptr,
    bad_ptr,
    S,
    D,
    g,
    G,
    XDT: tl.constexpr,
    METHOD: tl.constexpr,
    SYM: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    BITS: tl.constexpr,
    P: tl.constexpr,
    LOG_P: tl.constexpr,
    BR: tl.constexpr,
    PACK: tl.constexpr,
):
    """``BR`` of the ``S = n * G`` groups (tile rows: group ``s`` is group ``s % G`` of unit
    ``s // G``): metadata, codes and a flag for each.

    ``x`` ``[n, D]``; ``keep`` uint8 ``[n, D]`` (``HAS_KEEP``); ``tab`` the normal boundaries
    ``[2**BITS - 1]``; ``m0``/``m1`` int16 ``[n, G]`` fp16 bits; ``out`` the packed bytes
    (``PACK``) or one byte per code ``[n * D]``; ``bad`` uint8 ``[n, G]`` (1: run the reference).
    """
    seg = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, P)
    o = (seg % G) * g
    gs = tl.minimum(D - o, g)  # [BR]
    rmask = seg < S
    m = rmask[:, None] & (cols[None, :] < gs[:, None])
    start = (seg // G) * D + o  # the group's first code in the part's stream
    off = start[:, None] + cols[None, :]
    x = _load_f32(x_ptr, off, m, XDT)
    if HAS_KEEP:  # noqa: SIM108 (a constexpr branch, as Triton kernels write them)
        valid = m & (tl.load(keep_ptr + off, mask=m, other=0) != 0)
    else:
        valid = m
    bad = _max(tl.where(m & ~(tl.abs(x) <= _BIG), 1, 0), 1)  # also NaN
    if METHOD == 0:
        top: tl.constexpr = ((1 << BITS) - 1) * 1.0
        mn = _min(tl.where(valid, x, float("inf")), 1)
        mx = _max(tl.where(valid, x, -float("inf")), 1)
        empty = mn > mx  # no valid entry
        mn = tl.where(empty, 0.0, mn)
        mx = tl.where(empty, 0.0, mx)
        if SYM:
            a = tl.maximum(tl.abs(mx), tl.abs(mn))
            h1 = _clamp_tiny(_round_up(tl.math.div_rn(2.0 * a, top)))
            s = _h2f(h1)
            shift = (-top / 2.0) * s
            h0 = h1
        else:
            h0 = _round_down(mn)
            shift = _h2f(h0)
            h1 = _clamp_tiny(_round_up(tl.math.div_rn(mx - shift, top)))
            s = _h2f(h1)
        codes = _round_code(tl.math.div_rn(x - shift[:, None], s[:, None]), top)
    else:
        w = tl.where(valid, 1.0, 0.0)
        cnt = tl.maximum(_isum(valid.to(tl.int32), 1).to(tl.float32), 1.0)
        mean = tl.math.div_rn(_tree_sum(x * w, BR, P, LOG_P), cnt)
        d = (x - mean[:, None]) * w
        var = tl.math.div_rn(_tree_sum(d * d, BR, P, LOG_P), cnt)
        h0 = _f2h(mean)
        h1 = _clamp_tiny(_f2h(tl.math.sqrt_rn(var)))
        z = tl.math.div_rn(x - _h2f(h0)[:, None], _h2f(h1)[:, None])
        # codes = the number of boundaries below z (torch.bucketize), by binary search
        codes = tl.full([BR, P], 0, tl.int32)
        for i in tl.static_range(BITS):
            step: tl.constexpr = (1 << BITS) >> (i + 1)
            t = tl.load(tab_ptr + codes + (step - 1))
            codes = tl.where(t < z, codes + step, codes)
    bad = bad | (_overflows(h0) | _overflows(h1)).to(tl.int32)
    at = seg
    tl.store(bad_ptr + at, bad.to(tl.uint8), mask=rmask)
    tl.store(m0_ptr + at, h0.to(tl.int16), mask=rmask)
    if METHOD != 0 or not SYM:
        tl.store(m1_ptr + at, h1.to(tl.int16), mask=rmask)
    if PACK:  # the group starts at a whole block of 8 codes and holds whole blocks
        Q: tl.constexpr = P // 8
        v = _pack8(tl.reshape(codes, [BR, Q, 8]), BITS, 2)  # [BR, Q]
        blk = start[:, None] // 8 + tl.arange(0, Q)[None, :]
        k = tl.arange(0, 8)
        byte = (v[:, :, None] >> (8 * k).to(tl.int64)[None, None, :]) & 0xFF
        bm = (rmask[:, None] & (tl.arange(0, Q)[None, :] * 8 < gs[:, None]))[:, :, None] & (k < BITS)[
            None, None, :
        ]
        tl.store(out_ptr + blk[:, :, None] * BITS + k[None, None, :], byte.to(tl.uint8), mask=bm)
    else:
        tl.store(out_ptr + off, codes.to(tl.uint8), mask=m)


@triton.jit
def _pack_kernel(codes_ptr, packed_ptr, total, BITS: tl.constexpr, BLK: tl.constexpr):
    """Bytes of ``BLK`` blocks of 8 codes (``codes`` uint8 ``[total]``, zero past the end)."""
    b = tl.program_id(0).to(tl.int64) * BLK + tl.arange(0, BLK)
    k = tl.arange(0, 8)
    flat = b[:, None] * 8 + k[None, :]
    v = _pack8(tl.load(codes_ptr + flat, mask=flat < total, other=0), BITS, 1)  # [BLK]
    byte = (v[:, None] >> (8 * k).to(tl.int64)[None, :]) & 0xFF
    mask = (b * 8 < total)[:, None] & (k < BITS)[None, :]
    tl.store(packed_ptr + b[:, None] * BITS + k[None, :], byte.to(tl.uint8), mask=mask)


@triton.jit
def _decode_kernel(
    packed_ptr,
    m0_ptr,
    m1_ptr,
    lv_ptr,
    out_ptr,
    rows_ptr,
    S,
    D,
    g,
    G,
    METHOD: tl.constexpr,
    SYM: tl.constexpr,
    BITS: tl.constexpr,
    ODT: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    P: tl.constexpr,
    BR: tl.constexpr,
):
    """``BR`` groups of a part (tile rows, as in the encoder) into ``out`` ``[N, D]``, unit ``r``
    at row ``rows[r]`` (or ``r``).

    ``m0``/``m1`` fp16 metadata ``[n, G, k]`` (adaptive: ``m0`` the codebook ``[n, G, 2**BITS]``);
    ``lv`` the normal levels ``[2**BITS]``; ``out`` float32 / float16 / int16 (bf16 bits) by ``ODT``.
    """
    seg = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, P)
    unit = seg // G
    o = (seg % G) * g
    gs = tl.minimum(D - o, g)
    rmask = seg < S
    m = rmask[:, None] & (cols[None, :] < gs[:, None])
    flat = (unit * D + o)[:, None] + cols[None, :]
    bit = (flat % 8) * BITS
    byte = (flat // 8) * BITS + bit // 8
    sh = bit % 8
    b0 = tl.load(packed_ptr + byte, mask=m, other=0).to(tl.int32)
    b1 = tl.load(packed_ptr + byte + 1, mask=m & (sh + BITS > 8), other=0).to(tl.int32)
    code = ((b0 | (b1 << 8)) >> sh.to(tl.int32)) & ((1 << BITS) - 1)
    at = seg
    if METHOD == 0:
        top: tl.constexpr = ((1 << BITS) - 1) * 1.0
        if SYM:
            s = tl.load(m0_ptr + at, mask=rmask, other=0.0).to(tl.float32)
            shift = (-top / 2.0) * s
        else:
            shift = tl.load(m0_ptr + at, mask=rmask, other=0.0).to(tl.float32)
            s = tl.load(m1_ptr + at, mask=rmask, other=0.0).to(tl.float32)
        y = shift[:, None] + code.to(tl.float32) * s[:, None]
    elif METHOD == 1:
        mean = tl.load(m0_ptr + at, mask=rmask, other=0.0).to(tl.float32)
        std = tl.load(m1_ptr + at, mask=rmask, other=0.0).to(tl.float32)
        y = mean[:, None] + std[:, None] * tl.load(lv_ptr + code, mask=m, other=0.0)
    else:
        book = at[:, None] * (1 << BITS) + code
        y = tl.load(m0_ptr + book, mask=m, other=0.0).to(tl.float32)
    if HAS_ROWS:  # noqa: SIM108
        dst = tl.load(rows_ptr + unit, mask=rmask, other=0)
    else:
        dst = unit
    at_out = (dst * D + o)[:, None] + cols[None, :]
    if ODT == 0:
        tl.store(out_ptr + at_out, y, mask=m)
    elif ODT == 1:
        tl.store(out_ptr + at_out, y.to(tl.float16), mask=m)
    else:  # bf16, rounded to nearest even as torch does (NaN -> 0x7FC0)
        u = y.to(tl.uint32, bitcast=True)
        h = (u + ((u >> 16) & 1) + 0x7FFF) >> 16
        h = tl.where(y != y, 0x7FC0, h)
        tl.store(out_ptr + at_out, h.to(tl.uint16).to(tl.int16, bitcast=True), mask=m)


# ------------------------------------------------------------------ host side
def _layout(D: int, group: int) -> tuple[int, int, int] | None:
    """``(P, log2 P, rows per program)`` for groups of ``group`` features, or ``None`` (too wide)."""
    P = 1 << max(group - 1, 0).bit_length()
    if P > MAX_GROUP:
        return None
    return P, P.bit_length() - 1, max(1, TILE // P)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The interpreter runs the kernels in NumPy, which warns on fp16 overflow (inf, as on a GPU)."""
    if INTERPRETED:
        with np.errstate(over="ignore", invalid="ignore"):
            yield
    else:
        yield


def supports(x: torch.Tensor) -> bool:
    """Whether the kernels read ``x``: float32/float16/bfloat16 on a CUDA device (any device in
    the interpreted copy)."""
    return x.dtype in _XDT and (INTERPRETED or x.device.type == "cuda")


def encode(
    spec, x: torch.Tensor, keep: torch.Tensor | None, bits: int, group: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
    """Encode ``x`` ``[n, D]`` at width ``bits`` in groups of ``group``: ``(meta, packed codes)``
    exactly as the eager path stores them, or ``None`` where the reference must run instead.

    Args:
        spec: the method's :class:`~kvq.quant.fused.FusedSpec` (``uniform`` or ``normal``).
        x: ``[n, D]`` float32/float16/bfloat16 units on the kernels' device.
        keep: bool ``[n, D]`` entries that define the statistics (outliers excluded), or ``None``.
        bits: code width, 1..8.
        group: effective group size (``<= D``).

    Returns:
        fp16 metadata ``{name: [n, G, 1]}`` and uint8 packed codes ``[ceil(n * D / 8) * bits]``.
    """
    if spec.method not in ("uniform", "normal") or not supports(x) or x.dim() != 2:
        return None
    lay = _layout(x.shape[1], group)
    if lay is None:
        return None
    P, log_p, br = lay
    x = x.contiguous()
    n, D = x.shape
    G = -(-D // group)
    dev = x.device
    meta = {name: torch.empty(n, G, 1, dtype=torch.float16, device=dev) for name in spec.meta}
    m = [meta[name].view(torch.int16) for name in spec.meta]
    m1 = m[1] if len(m) > 1 else m[0]
    packed = torch.empty(-(-n * D // 8) * bits, dtype=torch.uint8, device=dev)
    pack = D % 8 == 0 and group % 8 == 0
    out = packed if pack else torch.empty(n * D, dtype=torch.uint8, device=dev)
    bad = torch.empty(n, G, dtype=torch.uint8, device=dev)
    kp = x if keep is None else keep.contiguous().view(torch.uint8)
    tab = spec.table.to(dev).contiguous() if spec.method == "normal" else x
    xs = x.view(torch.int16) if x.dtype == torch.bfloat16 else x
    with _quiet():
        _encode_kernel[(-(-n * G // br),)](
            xs,
            kp,
            tab,
            m[0],
            m1,
            out,
            bad,
            n * G,
            D,
            group,
            G,
            XDT=_XDT[x.dtype],
            METHOD=_METHOD[spec.method],
            SYM=bool(spec.symmetric),
            HAS_KEEP=keep is not None,
            BITS=bits,
            P=P,
            LOG_P=log_p,
            BR=br,
            PACK=pack,
            enable_fp_fusion=False,
        )
        if bool(bad.any()):
            return None
        if not pack:
            blocks = packed.numel() // bits
            _pack_kernel[(-(-blocks // _PACK_BLOCKS),)](
                out, packed, n * D, BITS=bits, BLK=_PACK_BLOCKS, enable_fp_fusion=False
            )
    return meta, packed


def decode(
    spec,
    packed: torch.Tensor,
    meta: dict[str, torch.Tensor],
    n: int,
    D: int,
    group: int,
    bits: int,
    out: torch.Tensor,
    rows: torch.Tensor | None,
) -> bool:
    """Decode one part into ``out`` exactly as the eager path does (``True``), or leave it to the
    reference (``False``).

    Args:
        spec: the method's :class:`~kvq.quant.fused.FusedSpec`.
        packed: uint8 packed codes of the part, on ``out``'s device.
        meta: its fp16 metadata, each ``[n, G, k]``.
        n: units in the part.
        D: features per unit.
        group: effective group size.
        bits: the part's code width.
        out: ``[N, D]`` float32/float16/bfloat16, contiguous, written at ``rows``.
        rows: ``[n]`` rows of ``out`` (``None`` = ``0 .. n - 1``).
    """
    if not supports(out) or not out.is_contiguous() or packed.device != out.device:
        return False
    lay = _layout(D, group)
    ms = [meta[name].contiguous() for name in spec.meta]
    if lay is None or any(t.dtype != torch.float16 or t.device != out.device for t in ms):
        return False
    P, _, br = lay
    G = -(-D // group)
    lv = spec.levels.to(out.device).contiguous() if spec.method == "normal" else ms[0]
    idx = None if rows is None else rows.to(device=out.device, dtype=torch.int64).contiguous()
    odt = _XDT[out.dtype]
    with _quiet():
        _decode_kernel[(-(-n * G // br),)](
            packed.contiguous(),
            ms[0],
            ms[1] if len(ms) > 1 else ms[0],
            lv,
            out.view(torch.int16) if odt == 2 else out,
            packed if idx is None else idx,
            n * G,
            D,
            group,
            G,
            METHOD=_METHOD[spec.method],
            SYM=bool(spec.symmetric),
            BITS=bits,
            ODT=odt,
            HAS_ROWS=idx is not None,
            P=P,
            BR=br,
            enable_fp_fusion=False,
        )
    return True


@functools.cache
def interpreted() -> types.ModuleType:
    """A second copy of this module whose kernels run in Triton's interpreter, on CPU tensors
    (what the tests use on a machine without a GPU).

    ``TRITON_INTERPRET`` is read when ``@triton.jit`` decorates a kernel, so the copy is executed
    with it set; this module, and every other Triton kernel of the process, stays compiled.
    """
    name = __name__ + "_interpreted"
    spec = importlib.util.spec_from_file_location(name, __file__)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec.loader.exec_module(mod)
    finally:
        if prev is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = prev
    if not mod.INTERPRETED:
        raise RuntimeError("triton.knobs.runtime.interpret is forced off: cannot interpret the kernels")
    sys.modules[name] = mod
    return mod
