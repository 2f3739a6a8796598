"""Triton kernels of the fused path: the GPU counterpart of ``fused_kernels.c``.

:mod:`kvq.quant.fused` routes CUDA tensors here (CPU tensors go to the C kernels); this module
launches the ``@triton.jit`` code of :mod:`kvq.quant.triton_kernels`. For ``uniform``
(asymmetric and symmetric), ``normal`` and ``adaptive``, encode and decode, the kernels repeat the
eager reference's float operations (:mod:`kvq.quant.base`, :mod:`kvq.quant.methods`) in its
order, each correctly rounded, so packed codes, fp16 metadata and decoded values are identical bit
for bit:

* IEEE division and square root (``div_rn`` / ``sqrt_rn``); no FMA contraction
  (``enable_fp_fusion=False`` at every launch); sums in :func:`~kvq.quant.base.tree_sum`'s order;
* round half to even from ``floor`` (exact on the clamped codes); fp16 round-down/up as fp16 bit
  steps; bf16 read, and rounded to nearest even, by its bits as torch does;
* adaptive: each group sorted by its integer keys (``_sort_groups``' order, -0 before +0), prefix
  sums accumulated left to right in float64 as torch's CPU ``cumsum`` does (a parallel scan would
  round differently), run ends by binary search, codes = the fp16 midpoints below a value.

Where a kernel does not apply, :func:`encode` returns ``None`` / :func:`decode` ``False`` and the
eager reference runs: a value not finite or beyond ``1e30`` (the C kernels' rule), fp16 metadata
that overflows (the reference's codes are then casts of NaN), a group wider than
:data:`MAX_GROUP`, another dtype, a configuration whose kernel failed to compile or run here
(:data:`FAILED`, logged once). Codes are packed as :mod:`kvq.quant.packing` packs them: in the
kernel where every group starts at a multiple of 8 codes, else by a second kernel.

Verified (``tests/quant/test_fused_triton.py``): in Triton's interpreter on CPU tensors, bit for
bit against the eager reference (through :func:`interpreted`: the method matrix, widths 1..8,
groupings, outliers, per-unit widths, fp32/fp16/bf16, odd shapes); and compiled by Triton's GPU
pipeline down to sm_90 code without a GPU (layouts that stress the compiler; no FMA in the PTX).
Not yet run on a GPU: its ``gpu`` test (CUDA against the CPU reference) waits for a lent GPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import sys
import types
import warnings
from collections.abc import Callable
from unittest import mock

import numpy as np
import torch
import triton

from kvq.quant import triton_kernels as K

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
#: raise a kernel's error instead of running the reference (the tests set it)
STRICT = False
#: configurations whose kernel failed to compile or run here -> the error (they run the reference)
FAILED: dict[tuple, str] = {}
log = logging.getLogger(__name__)


def _launch(key: tuple, run: Callable[[], object]) -> bool:
    """``run()`` the launches of one configuration; ``False`` where it failed (then and for the
    rest of the process: the eager reference runs; logged once as a warning). Triton compiles a
    configuration on its first launch, and its GPU compiler rejects some it does not lower."""
    if key in FAILED:
        return False
    try:
        with contextlib.ExitStack() as quiet:
            if INTERPRETED:  # NumPy computes, and warns on overflow and NaN (the GPU's inf and NaN)
                quiet.enter_context(np.errstate(over="ignore", invalid="ignore"))
                quiet.enter_context(warnings.catch_warnings())
                warnings.simplefilter("ignore", RuntimeWarning)
            run()
        return True
    except Exception as e:
        if STRICT:
            raise
        FAILED[key] = f"{type(e).__name__}: {e}"[:500]
        log.warning("kvq: Triton kernel %s failed (%s); the eager reference runs", key, FAILED[key])
        return False


# ------------------------------------------------------------------ host side
@functools.lru_cache(maxsize=64)
def _on(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A method's constant table (cached by ``gaussian_codebook`` / ``_unit_grid``) on ``device``,
    copied there once."""
    return table.to(device).contiguous()


def _layout(D: int, group: int, levels: int = 1) -> tuple[int, int, int] | None:
    """``(P, log2 P, groups per program)`` for groups of ``group`` features (``P`` the padded size;
    the tile also holds ``levels`` per group), or ``None`` (too wide)."""
    P = 1 << max(group - 1, 0).bit_length()
    if P > MAX_GROUP:
        return None
    return P, P.bit_length() - 1, max(1, TILE // max(P, levels))


def supports(x: torch.Tensor) -> bool:
    """Whether the kernels read ``x``: float32/float16/bfloat16 on a CUDA device (any device in
    the interpreted copy)."""
    return x.dtype in _XDT and (INTERPRETED or x.device.type == "cuda")


def encode(
    spec, x: torch.Tensor, keep: torch.Tensor | None, bits: int, group: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
    """Encode ``x`` ``[n, D]`` at width ``bits`` in groups of ``group`` (as
    :func:`kvq.quant.fused.encode_part`): fp16 metadata ``{name: [n, G, k]}`` and uint8 packed
    codes ``[ceil(n * D / 8) * bits]`` exactly as the eager path stores them, or ``None`` (the
    reference must run). ``x``: float32/float16/bfloat16 on a CUDA device; ``keep``: bool
    ``[n, D]``, the entries that define the statistics (outliers excluded), or ``None``.
    """
    if spec.method not in _METHOD or not supports(x) or x.dim() != 2:
        return None
    L = 1 << bits
    adaptive = spec.method == "adaptive"
    lay = _layout(x.shape[1], group, L if adaptive else 1)
    if lay is None:
        return None
    P, log_p, br = lay
    x = x.contiguous()
    n, D = x.shape
    G = -(-D // group)
    dev = x.device
    per = L if adaptive else 1
    meta = {name: torch.empty(n, G, per, dtype=torch.float16, device=dev) for name in spec.meta}
    m = [meta[name].view(torch.int16) for name in spec.meta]
    packed = torch.empty(-(-n * D // 8) * bits, dtype=torch.uint8, device=dev)
    pack = D % 8 == 0 and group % 8 == 0
    out = packed if pack else torch.empty(n * D, dtype=torch.uint8, device=dev)
    bad = torch.empty(n, G, dtype=torch.uint8, device=dev)
    kp = x if keep is None else keep.contiguous().view(torch.uint8)
    xs = x.view(torch.int16) if x.dtype == torch.bfloat16 else x
    common = dict(XDT=_XDT[x.dtype], HAS_KEEP=keep is not None, BITS=bits, P=P, LOG_P=log_p, BR=br, PACK=pack)
    common["enable_fp_fusion"] = False  # no FMA contraction: every product rounded as the reference's
    sizes = (bad, n * G, D, group, G)
    grid = (-(-n * G // br),)

    def run() -> None:
        if adaptive:
            lin = _on(spec.table, dev)
            K.adaptive_kernel[grid](xs, kp, lin, m[0], out, *sizes, ITERS=spec.lloyd_iters, **common)
        else:
            tab = _on(spec.table, dev) if spec.method == "normal" else x
            sym = bool(spec.symmetric)
            K.encode_kernel[grid](
                xs, kp, tab, m[0], m[-1], out, *sizes, METHOD=_METHOD[spec.method], SYM=sym, **common
            )
        if not pack:
            blocks = packed.numel() // bits
            K.pack_kernel[(-(-blocks // _PACK_BLOCKS),)](
                out, packed, n * D, BITS=bits, BLK=_PACK_BLOCKS, enable_fp_fusion=False
            )

    key = (
        "encode",
        spec.method,
        bool(spec.symmetric),
        spec.lloyd_iters,
        x.dtype,
        keep is not None,
        bits,
        P,
        pack,
    )
    if not _launch(key, run) or bool(bad.any()):  # bad: a value the kernels leave to the reference
        return None
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
    """Decode one part (``n`` units of ``D`` features, uint8 ``packed`` codes, fp16 ``meta``
    ``[n, G, k]``) into ``out`` ``[N, D]`` (contiguous, float32/float16/bfloat16, the part's
    device) at rows ``rows`` ``[n]`` (``None``: ``0 .. n - 1``), exactly as the eager path does, as
    :func:`kvq.quant.fused.decode_part`. Returns ``False`` where the reference must run."""
    if not supports(out) or not out.is_contiguous() or packed.device != out.device:
        return False
    lay = _layout(D, group)
    ms = [meta[name].contiguous() for name in spec.meta]
    if lay is None or any(t.dtype != torch.float16 or t.device != out.device for t in ms):
        return False
    P, _, br = lay
    G = -(-D // group)
    lv = _on(spec.levels, out.device) if spec.method == "normal" else ms[0]
    idx = None if rows is None else rows.to(device=out.device, dtype=torch.int64).contiguous()
    odt = _XDT[out.dtype]
    ptrs = (packed.contiguous(), ms[0], ms[-1], lv, out.view(torch.int16) if odt == 2 else out)
    flags = dict(METHOD=_METHOD[spec.method], SYM=bool(spec.symmetric), BITS=bits, ODT=odt, P=P, BR=br)

    def run() -> None:
        K.decode_kernel[(-(-n * G // br),)](
            *ptrs, packed if idx is None else idx, n * G, D, group, G, **flags,
            HAS_ROWS=idx is not None, enable_fp_fusion=False,
        )  # fmt: skip

    return _launch(("decode", spec.method, bool(spec.symmetric), odt, idx is not None, bits, P), run)


@functools.cache
def interpreted() -> types.ModuleType:
    """A copy of this module whose kernels (a copy of :mod:`kvq.quant.triton_kernels`) run in
    Triton's interpreter, on CPU tensors: what the tests use without a GPU. ``TRITON_INTERPRET``
    is read when ``@triton.jit`` decorates, so the copies are executed with it set; this module and
    every other kernel of the process stay compiled."""
    with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}):
        kernels, mod = _copy(K), _copy(sys.modules[__name__])
    if not (
        mod.INTERPRETED and isinstance(kernels.encode_kernel, triton.runtime.interpreter.InterpretedFunction)
    ):
        raise RuntimeError("triton.knobs.runtime.interpret is forced off: cannot interpret the kernels")
    mod.K = kernels
    return mod


def _copy(module: types.ModuleType) -> types.ModuleType:
    name = module.__name__ + "_interpreted"
    spec = importlib.util.spec_from_file_location(name, module.__file__)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
