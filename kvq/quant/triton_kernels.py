"""The ``@triton.jit`` code of :mod:`kvq.quant.fused_triton` (which launches it and says what it
computes and how it was verified).

Tensor layout: a kernel's program handles ``BR`` of a part's ``S = n * G`` groups as the rows of a
``[BR, P]`` tile (group ``s`` = group ``s % G`` of unit ``s // G``, ``P`` the group size padded to
a power of two). Only Triton builtins and this module's jit functions are called: those of
``triton.language.standard`` (``tl.max``, ``tl.sum``, ...) are compiled in a normal process and an
interpreted copy of this module (:func:`kvq.quant.fused_triton.interpreted`) could not call them;
``tl.reduce`` with the standard combine functions runs in NumPy there. Constexpr shapes inside
unrolled loops are written inline (a constexpr cannot be reassigned there).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["adaptive_kernel", "decode_kernel", "encode_kernel", "pack_kernel"]

_BIG = tl.constexpr(1e30)
_TINY = tl.constexpr(2.0**-24)  # smallest positive fp16 (subnormal)


# ------------------------------------------------------------------ device helpers
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
        a, b = tl.split(tl.permute(tl.reshape(t, [BR, 2, P >> (s + 1)]), [0, 2, 1]))
        t = a + b
    return tl.reshape(t, [BR])


@triton.jit
def _pack8(c, BITS: tl.constexpr, AXIS: tl.constexpr):
    """Codes ``[..., 8]`` -> their 8-code bit strings, int64 ``[...]`` (code j at bit j * BITS;
    ``AXIS`` the last axis). The shifted codes share no bit: their sum is their OR, in any order."""
    j = tl.arange(0, 8)
    return _isum(c.to(tl.int64) << (j * BITS).to(tl.int64), AXIS)


# fmt: off
@triton.jit
def _store_codes(
    codes, out_ptr, start, off, m, rmask, gs,
    BR: tl.constexpr, P: tl.constexpr, BITS: tl.constexpr, PACK: tl.constexpr,
):
    # fmt: on
    """Codes ``[BR, P]`` of groups starting at stream position ``start`` ``[BR]``: packed bytes
    (``PACK``: every group starts at a whole block of 8 codes and holds whole blocks) or one
    byte per code at ``off``."""
    if PACK:
        Q: tl.constexpr = P // 8
        v = _pack8(tl.reshape(codes, [BR, Q, 8]), BITS, 2)  # [BR, Q]
        blk = start[:, None] // 8 + tl.arange(0, Q)[None, :]
        k = tl.arange(0, 8)
        byte = (v[:, :, None] >> (8 * k).to(tl.int64)[None, None, :]) & 0xFF
        bm = (rmask[:, None] & (tl.arange(0, Q)[None, :] * 8 < gs[:, None]))[:, :, None]
        bm = bm & (k < BITS)[None, None, :]
        tl.store(out_ptr + blk[:, :, None] * BITS + k[None, None, :], byte.to(tl.uint8), mask=bm)
    else:
        tl.store(out_ptr + off, codes.to(tl.uint8), mask=m)


@triton.jit
def _flip(k):
    """A float's int32 bits <-> a key in the float's order (-0 before +0; ``_sort_groups``' map,
    its own inverse)."""
    return k ^ ((k >> 31) & 0x7FFFFFFF)


@triton.jit
def _sort_rows(x, BR: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr):
    """Each row of ``x`` ``[BR, P]`` in ascending order (a bitonic network: compare-exchange of
    ``i`` and ``i ^ j``, ascending where bit ``k`` of ``i`` is clear)."""
    for kk in tl.static_range(1, LOG_P + 1):
        for jj in tl.static_range(kk):
            # partners at distance j = 2**(kk - 1 - jj), in A = P / 2j blocks of 2j (constexpr
            # shapes are written inline: a constexpr cannot be reassigned in an unrolled loop)
            a, b = tl.split(tl.permute(tl.reshape(x, [BR, P >> (kk - jj), 2, 1 << (kk - 1 - jj)]), [0, 1, 3, 2]))
            up = ((tl.arange(0, P >> (kk - jj)) << (kk - jj)) & (1 << kk)) == 0
            lo, hi = tl.minimum(a, b), tl.maximum(a, b)
            first = tl.where(up[None, :, None], lo, hi)
            second = tl.where(up[None, :, None], hi, lo)
            x = tl.reshape(tl.permute(tl.join(first, second), [0, 1, 3, 2]), [BR, P])
    return x


@triton.jit
def _take(src, idx, BR: tl.constexpr, NS: tl.constexpr, NI: tl.constexpr):
    """``src[r, idx[r, i]]`` for ``src`` ``[BR, NS]``, ``idx`` ``[BR, NI]``: a gather whose source
    and index axes are made the same length (Triton 3.7's GPU lowering of ``tl.gather`` fails an
    assertion when one is 32 times the other)."""
    if NI > NS:
        s3 = tl.broadcast_to(tl.reshape(src, [BR, 1, NS]), [BR, NI // NS, NS])
        out = tl.reshape(tl.gather(s3, tl.reshape(idx, [BR, NI // NS, NS]), 2), [BR, NI])
    elif NI < NS:  # NS / NI copies of the picks, reduced (they are equal)
        i2 = tl.reshape(tl.broadcast_to(tl.reshape(idx, [BR, 1, NI]), [BR, NS // NI, NI]), [BR, NS])
        out = _max(tl.reshape(tl.gather(src, i2, 1), [BR, NS // NI, NI]), 1)
    else:
        out = tl.gather(src, idx, 1)
    return out


@triton.jit
def _count_le(srt, mid, BR: tl.constexpr, L: tl.constexpr, LOG_P: tl.constexpr):
    """Per row, the number of ``srt`` ``[BR, P]`` (ascending) ``<= mid`` ``[BR, L]`` (searchsorted, right)."""
    pos = tl.full([BR, L], 0, tl.int32)
    for i in tl.static_range(LOG_P):
        t = _take(srt, pos + ((1 << (LOG_P - 1 - i)) - 1), BR, 1 << LOG_P, L)
        pos = tl.where(t <= mid, pos + (1 << (LOG_P - 1 - i)), pos)
    return tl.where(_take(srt, pos, BR, 1 << LOG_P, L) <= mid, pos + 1, pos)


@triton.jit
def _shift(v, kk, by: tl.constexpr, L: tl.constexpr):
    """``v[:, k - by]`` (clamped to ``[0, L)``) for every column ``k`` of ``v`` ``[BR, L]``."""
    return tl.gather(v, tl.broadcast_to(tl.minimum(tl.maximum(kk - by, 0), L - 1), v.shape), 1)


@triton.jit
def _bins(p1, e_lo, e_hi, BR: tl.constexpr, P: tl.constexpr, L: tl.constexpr):
    """Sums (``p1[e_hi] - p1[e_lo]`` of the prefix sums ``p1[:, e - 1]``, 0 at ``e = 0``) and
    counts of the runs ``[e_lo, e_hi)``."""
    s_hi = tl.where(e_hi > 0, _take(p1, tl.maximum(e_hi - 1, 0), BR, P, L), 0.0)
    s_lo = tl.where(e_lo > 0, _take(p1, tl.maximum(e_lo - 1, 0), BR, P, L), 0.0)
    return s_hi - s_lo, (e_hi - e_lo).to(tl.float32)


@triton.jit
def _runs(srt, lv, nv, kk, BR: tl.constexpr, L: tl.constexpr, LOG_P: tl.constexpr):
    """Run edges ``(e_lo, e_hi)`` ``[BR, L]`` of nearest-level coding with levels ``lv``: the
    count of values ``<=`` each midpoint ``(lv[k + 1] + lv[k]) * 0.5``, ``0`` and ``nv`` around."""
    mid = (_shift(lv, kk, -1, L) + lv) * 0.5
    e_hi = tl.where(kk == L - 1, nv[:, None], _count_le(srt, mid, BR, L, LOG_P))
    e_lo = tl.where(kk == 0, 0, _shift(e_hi, kk, 1, L))
    return e_lo, e_hi


@triton.jit
def _fill_empty(lv, c, kk, BITS: tl.constexpr, L: tl.constexpr):
    """Each empty bin takes the level of the last non-empty bin at or below it (a cummax of
    indices by doubling steps)."""
    idx = tl.where(c > 0, kk, 0)
    for i in tl.static_range(BITS):
        idx = tl.maximum(idx, _shift(idx, kk, 1 << i, L))
    return tl.gather(lv, idx, 1)


@triton.jit
def _load_groups(x_ptr, keep_ptr, S, D, g, G, XDT: tl.constexpr, HAS_KEEP: tl.constexpr, P: tl.constexpr,
                 BR: tl.constexpr):  # fmt: skip
    """The program's ``BR`` of the ``S = n * G`` groups (group ``s``: group ``s % G`` of unit
    ``s // G``) as tile rows ``[BR, P]``: ``(seg, size, row mask, mask, first code in the stream,
    offsets, float32 values, validity, flag of a value not finite or beyond 1e30)``."""
    seg = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o = (seg % G) * g
    gs = tl.minimum(D - o, g)
    rmask = seg < S
    m = rmask[:, None] & (tl.arange(0, P)[None, :] < gs[:, None])
    start = (seg // G) * D + o
    off = start[:, None] + tl.arange(0, P)[None, :]
    x = _load_f32(x_ptr, off, m, XDT)
    if HAS_KEEP:  # noqa: SIM108 (a constexpr branch, as Triton kernels write them)
        valid = m & (tl.load(keep_ptr + off, mask=m, other=0) != 0)
    else:
        valid = m
    return seg, gs, rmask, m, start, off, x, valid, _max(tl.where(m & ~(tl.abs(x) <= _BIG), 1, 0), 1)


# ------------------------------------------------------------------ kernels
# fmt: off
@triton.jit
def encode_kernel(
    x_ptr, keep_ptr, tab_ptr, m0_ptr, m1_ptr, out_ptr, bad_ptr, S, D, g, G,
    XDT: tl.constexpr, METHOD: tl.constexpr, SYM: tl.constexpr, HAS_KEEP: tl.constexpr, BITS: tl.constexpr,
    P: tl.constexpr, LOG_P: tl.constexpr, BR: tl.constexpr, PACK: tl.constexpr,
):
    # fmt: on
    """Uniform or normal: metadata, codes and a flag for ``BR`` groups (:func:`_load_groups`).

    ``x`` ``[n, D]``; ``keep`` uint8 ``[n, D]`` (``HAS_KEEP``); ``tab`` the normal boundaries
    ``[2**BITS - 1]``; ``m0``/``m1`` int16 ``[n, G]`` fp16 bits; ``out`` the packed bytes
    (``PACK``) or one byte per code ``[n * D]``; ``bad`` uint8 ``[n, G]`` (1: run the reference).
    """
    seg, gs, rmask, m, start, off, x, valid, bad = _load_groups(x_ptr, keep_ptr, S, D, g, G, XDT, HAS_KEEP, P, BR)
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
            t = tl.load(tab_ptr + codes + ((1 << (BITS - 1 - i)) - 1))
            codes = tl.where(t < z, codes + (1 << (BITS - 1 - i)), codes)
    bad = bad | (_overflows(h0) | _overflows(h1)).to(tl.int32)
    tl.store(bad_ptr + seg, bad.to(tl.uint8), mask=rmask)
    tl.store(m0_ptr + seg, h0.to(tl.int16), mask=rmask)
    if METHOD != 0 or not SYM:
        tl.store(m1_ptr + seg, h1.to(tl.int16), mask=rmask)
    _store_codes(codes, out_ptr, start, off, m, rmask, gs, BR, P, BITS, PACK)


# fmt: off
@triton.jit
def adaptive_kernel(
    x_ptr, keep_ptr, lin_ptr, cb_ptr, out_ptr, bad_ptr, S, D, g, G,
    XDT: tl.constexpr, HAS_KEEP: tl.constexpr, BITS: tl.constexpr, ITERS: tl.constexpr,
    P: tl.constexpr, LOG_P: tl.constexpr, BR: tl.constexpr, PACK: tl.constexpr,
):
    # fmt: on
    """``AdaptiveQuantizer._fit_assign`` for ``BR`` groups (:func:`_load_groups`).

    The group's values sorted by their integer keys (as ``_sort_groups``), prefix sums taken left
    to right in float64 (as torch's CPU ``cumsum``), the quantile and min-max codebooks, the
    better one, ``ITERS`` Lloyd steps, fp16 codebook ``cb`` int16 ``[n, G, 2**BITS]`` and codes
    (the number of its midpoints below a value; outliers ``2**BITS - 1``). ``lin`` is
    ``linspace(0, 1, 2**BITS)``.
    """
    L: tl.constexpr = 1 << BITS
    seg, gs, rmask, m, start, off, x, valid, bad = _load_groups(x_ptr, keep_ptr, S, D, g, G, XDT, HAS_KEEP, P, BR)
    cols = tl.arange(0, P)
    kk = tl.arange(0, L)[None, :]
    nv = _isum(valid.to(tl.int32), 1)  # [BR]
    keys = _sort_rows(tl.where(valid, _flip(x.to(tl.int32, bitcast=True)), 0x7F800000), BR, P, LOG_P)
    srt = _flip(keys).to(tl.float32, bitcast=True)  # ascending, invalid entries (+inf) last
    # p1[:, j] = float32(sum of srt[:, :j + 1]), accumulated left to right in float64
    p1 = tl.full([BR, P], 0.0, tl.float32)
    acc = tl.full([BR, 1], 0.0, tl.float64)
    for j in range(P):
        acc = acc + tl.gather(srt, tl.full([BR, 1], 0, tl.int32) + j, 1).to(tl.float64)
        p1 = tl.where(cols[None, :] == j, acc.to(tl.float32), p1)
    # 1. the quantile codebook: rank i goes to bin floor(i L / nv)
    e_hi = ((kk + 1) * nv[:, None] + (L - 1)) >> BITS
    e_lo = (kk * nv[:, None] + (L - 1)) >> BITS
    s1, c = _bins(p1, e_lo, e_hi, BR, P, L)
    quant = _fill_empty(tl.where(c > 0, tl.math.div_rn(s1, tl.maximum(c, 1.0)), 0.0), c, kk, BITS, L)
    # the min-max grid
    has = nv > 0
    mn = tl.where(has, tl.reshape(tl.gather(srt, tl.full([BR, 1], 0, tl.int32), 1), [BR]), 0.0)
    last = tl.reshape(tl.gather(srt, tl.maximum(nv - 1, 0)[:, None], 1), [BR])
    mx = tl.where(has, last, 0.0)
    grid = mn[:, None] + (mx - mn)[:, None] * tl.load(lin_ptr + kk)
    # the candidate with the lower squared error (up to the group's constant)
    lo_q, hi_q = _runs(srt, quant, nv, kk, BR, L, LOG_P)
    sq, cq = _bins(p1, lo_q, hi_q, BR, P, L)
    lo_g, hi_g = _runs(srt, grid, nv, kk, BR, L, LOG_P)
    sg, cg = _bins(p1, lo_g, hi_g, BR, P, L)
    ex_q = _tree_sum(quant * (cq * quant - 2.0 * sq), BR, L, BITS)
    ex_g = _tree_sum(grid * (cg * grid - 2.0 * sg), BR, L, BITS)
    pick = (ex_q <= ex_g)[:, None]
    lv = tl.where(pick, quant, grid)
    s1 = tl.where(pick, sq, sg)
    c = tl.where(pick, cq, cg)
    # 2. Lloyd steps (the chosen candidate's runs are the first step's partition)
    for step in tl.static_range(ITERS):
        if step > 0:
            e_lo, e_hi = _runs(srt, lv, nv, kk, BR, L, LOG_P)
            s1, c = _bins(p1, e_lo, e_hi, BR, P, L)
        lv = _fill_empty(tl.where(c > 0, tl.math.div_rn(s1, tl.maximum(c, 1.0)), lv), c, kk, BITS, L)
    cb = _f2h(lv)
    bad = bad | _max(_overflows(cb).to(tl.int32), 1)
    tl.store(bad_ptr + seg, bad.to(tl.uint8), mask=rmask)
    tl.store(cb_ptr + seg[:, None] * L + kk, cb.to(tl.int16), mask=rmask[:, None])
    # nearest level with the fp16 codebook: the number of its midpoints below the value
    cf = _h2f(cb)
    mid = tl.where(kk == L - 1, float("inf"), (_shift(cf, kk, -1, L) + cf) * 0.5)
    codes = tl.full([BR, P], 0, tl.int32)
    for i in tl.static_range(BITS):
        step = tl.full([BR, P], 1 << (BITS - 1 - i), tl.int32)
        codes = tl.where(_take(mid, codes + (step - 1), BR, L, P) < x, codes + step, codes)
    codes = tl.where(valid, codes, L - 1)
    _store_codes(codes, out_ptr, start, off, m, rmask, gs, BR, P, BITS, PACK)


@triton.jit
def pack_kernel(codes_ptr, packed_ptr, total, BITS: tl.constexpr, BLK: tl.constexpr):
    """Bytes of ``BLK`` blocks of 8 codes (``codes`` uint8 ``[total]``, zero past the end)."""
    b = tl.program_id(0).to(tl.int64) * BLK + tl.arange(0, BLK)
    k = tl.arange(0, 8)
    flat = b[:, None] * 8 + k[None, :]
    v = _pack8(tl.load(codes_ptr + flat, mask=flat < total, other=0), BITS, 1)  # [BLK]
    byte = (v[:, None] >> (8 * k).to(tl.int64)[None, :]) & 0xFF
    mask = (b * 8 < total)[:, None] & (k < BITS)[None, :]
    tl.store(packed_ptr + b[:, None] * BITS + k[None, :], byte.to(tl.uint8), mask=mask)


# fmt: off
@triton.jit
def decode_kernel(
    packed_ptr, m0_ptr, m1_ptr, lv_ptr, out_ptr, rows_ptr, S, D, g, G,
    METHOD: tl.constexpr, SYM: tl.constexpr, BITS: tl.constexpr, ODT: tl.constexpr, HAS_ROWS: tl.constexpr,
    P: tl.constexpr, BR: tl.constexpr,
):
    # fmt: on
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
