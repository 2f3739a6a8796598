"""The shared quantize/dequantize path.

A *unit* is one row of features that shares a bit width (one token of one KV head, one token
of one layer, or one token of the whole model; see :mod:`kvq.cache`). A unit's ``D`` features
are split into groups of ``group_size`` (the last group may be smaller; ``None`` or a size
``>= D`` means one group per unit), each group gets its own statistics, and every method only
says how it turns a group's statistics into decision boundaries and reconstruction levels:

=========  =======================================  ==========================
method     stored per group (fp16)                  codes -> value
=========  =======================================  ==========================
uniform    zero-point + scale (asymmetric) or        ``zero + c * scale``
           scale (symmetric)
normal     mean + std                               ``mean + std * L[c]``, L the
                                                    N(0,1) equal-mass bin means
adaptive   codebook of ``2**bits`` levels            ``C[c]``
=========  =======================================  ==========================

Optional outliers (the top and bottom ``outlier_ratio / 2`` of each unit) are excluded from the
statistics and stored sparsely in fp16 with their index. Codes are bit-packed
(:mod:`kvq.quant.packing`). Units may carry different bit widths (attention-aware allocation):
units are then partitioned by width, and the per-unit widths are stored as one uint8 each.

:meth:`Quantizer.encode` / :meth:`Quantizer.decode` run fused kernels where a method provides
them (:meth:`Quantizer.fused_spec`, :mod:`kvq.quant.fused`); :meth:`Quantizer.encode_reference`
/ :meth:`Quantizer.decode_reference` are the eager op chain they are tested against, bit for bit.
Sums over a group are taken in one fixed order (:func:`tree_sum`) so that both agree exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from kvq.quant import fused
from kvq.quant.fused import FusedSpec
from kvq.quant.packing import pack_codes, packed_nbytes, unpack_codes

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "Grouping",
    "QPart",
    "QTensor",
    "Quantizer",
    "check_bits",
    "fp16_round_down",
    "fp16_round_up",
    "index_dtype",
    "tree_sum",
]

MIN_BITS, MAX_BITS = 1, 8
_FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal)


def check_bits(bits: int, name: str = "bits") -> None:
    """Raise a one-line ValueError unless ``bits`` is an integer in 1..8."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name} must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")


def fp16_round_down(x: torch.Tensor) -> torch.Tensor:
    """Largest fp16 value ``<= x`` (elementwise), returned as fp16."""
    h = x.half()
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, -math.inf)), h)


def fp16_round_up(x: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 value ``>= x`` (elementwise), returned as fp16."""
    h = x.half()
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, math.inf)), h)


def tree_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis in a fixed pairwise order: zero-padded to a power of two, then halves
    added (``t[i] + t[i + h]``) until one value is left -- the same float operations on every
    backend (``torch.sum``'s order depends on the kernel and the CPU's vector width), which the
    fused kernels reproduce.

    Args:
        x: ``[..., g]``.

    Returns:
        ``[..., 1]``, in ``x``'s dtype.
    """
    g = x.shape[-1]
    padded = 1 << max(g - 1, 0).bit_length()
    if padded != g:
        x = F.pad(x, (0, padded - g))
    while x.shape[-1] > 1:
        h = x.shape[-1] // 2
        x = x[..., :h] + x[..., h:]
    return x


def index_dtype(unit_size: int) -> torch.dtype:
    """Smallest integer dtype that can index a unit of ``unit_size`` features."""
    if unit_size <= 256:
        return torch.uint8
    if unit_size <= 32768:
        return torch.int16
    return torch.int32


@dataclass
class Grouping:
    """The ``grouping`` axis: features per group within a unit (``None`` = one group per unit).

    A size that does not divide the unit leaves a smaller last group; a size at least the
    unit's is the same as ``None``.
    """

    size: int | None = None

    def __post_init__(self) -> None:
        if self.size is not None and (
            isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1
        ):
            raise ValueError(f"grouping.size must be a positive integer or null, got {self.size!r}")


@dataclass
class QPart:
    """The units of one bit width.

    Attributes:
        bits: code width of these units.
        n_units: number of units in this part.
        codes: packed codes, uint8 ``[packed_nbytes(n_units * D, bits)]``.
        meta: per-group statistics, each fp16 ``[n_units, n_groups, k]``.
    """

    bits: int
    n_units: int
    codes: torch.Tensor
    meta: dict[str, torch.Tensor]

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + sum(
            t.numel() * t.element_size() for t in self.meta.values()
        )


@dataclass
class QTensor:
    """A quantized ``[N, D]`` block of units.

    Attributes:
        n_units: ``N``.
        unit_size: ``D``.
        parts: one :class:`QPart` per distinct bit width, in increasing width.
        unit_bits: uint8 ``[N]`` bit width of each unit when widths vary, else ``None``.
        outlier_values: fp16 ``[N, 2k]`` outliers kept in full precision (or ``None``).
        outlier_index: ``[N, 2k]`` their feature index in the unit (uint8/int16/int32).
        raw: full-precision storage for the ``none`` method (``[N, D]``), else ``None``.
    """

    n_units: int
    unit_size: int
    parts: list[QPart] = field(default_factory=list)
    unit_bits: torch.Tensor | None = None
    outlier_values: torch.Tensor | None = None
    outlier_index: torch.Tensor | None = None
    raw: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this block holds (what :meth:`nbytes` counts)."""
        out = [p.codes for p in self.parts] + [t for p in self.parts for t in p.meta.values()]
        for t in (self.unit_bits, self.outlier_values, self.outlier_index, self.raw):
            if t is not None:
                out.append(t)
        return out

    def nbytes(self) -> int:
        """Bytes actually held by this block's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def mean_bits(self) -> float:
        """Mean code width over units (0 for full-precision storage)."""
        if not self.parts:
            return 0.0
        return sum(p.bits * p.n_units for p in self.parts) / max(self.n_units, 1)

    def take(self, rows: torch.Tensor) -> QTensor:
        """The units ``rows`` (``[M]`` indices into ``[0, N)``, any order, repeats allowed), as a
        new block -- exact: codes are unpacked and repacked, nothing is re-quantized.

        What the cache needs to evict tokens, crop, and select or reorder batch rows (beam
        search) on quantized storage.
        """
        rows = rows.to(torch.long)
        M, D = int(rows.numel()), self.unit_size
        out = QTensor(n_units=M, unit_size=D)
        if self.raw is not None:
            out.raw = self.raw.index_select(0, rows.to(self.raw.device))
            return out
        dev = self.parts[0].codes.device if self.parts else rows.device
        rows = rows.to(dev)
        if self.outlier_values is not None:
            out.outlier_values = self.outlier_values.index_select(0, rows)
            out.outlier_index = self.outlier_index.index_select(0, rows)
        if self.unit_bits is None:
            widths = (
                torch.full((M,), self.parts[0].bits, dtype=torch.uint8, device=dev) if self.parts else None
            )
            local = rows
        else:
            widths = self.unit_bits.index_select(0, rows)
            # each unit's index inside its width's part: its rank among the units of that width
            local_all = torch.zeros(self.n_units, dtype=torch.long, device=dev)
            for part in self.parts:
                mine = (self.unit_bits == part.bits).nonzero().squeeze(1)
                local_all[mine] = torch.arange(mine.numel(), device=dev)
            local = local_all.index_select(0, rows)
        parts = []
        for part in self.parts:
            pick = (widths == part.bits).nonzero().squeeze(1) if self.unit_bits is not None else None
            idx = local if pick is None else local.index_select(0, pick)
            n = int(idx.numel())
            if n == 0:
                continue
            codes = unpack_codes(part.codes, part.bits, part.n_units * D).view(part.n_units, D)
            meta = {k: v.index_select(0, idx) for k, v in part.meta.items()}
            parts.append(QPart(part.bits, n, pack_codes(codes.index_select(0, idx), part.bits), meta))
        out.parts = parts
        if self.unit_bits is not None and len(parts) > 1:
            out.unit_bits = widths
        return out


@dataclass
class Quantizer:
    """Base class: grouping, outliers, bit packing and per-width partitioning, written once.

    Subclasses implement :meth:`_fit` (statistics -> stored fp16 metadata) and
    :meth:`_levels` (metadata -> reconstruction levels); they may override :meth:`_boundaries`,
    :meth:`_assign`, :meth:`_fit_assign` and :meth:`_reconstruct` (e.g. closed forms for uniform
    grids, codes from an order the fit computed anyway) and must set
    :attr:`meta_fields` (for the memory formula).

    Args:
        group_size: features per group within a unit; ``None`` = the whole unit.
        outlier_ratio: fraction of each unit kept in full precision (top and bottom half each),
            in ``[0, 0.5)``.
    """

    group_size: int | None = None
    outlier_ratio: float = 0.0

    #: the option name (``conf/method/<name>.yaml``), shown in messages; "" = the class name
    name: ClassVar[str] = ""
    #: fp16 values stored per group, as a function of bits (see :meth:`meta_per_group`).
    meta_fields: ClassVar[tuple[str, ...]] = ()

    # -- the method interface (kvq.method.Method): what this method does --------------
    #: False only for the full-precision baseline
    quantizes: ClassVar[bool] = True
    #: a one-pass forward attends to the quantized K/V (kvq's cache always does)
    one_pass_quantized: ClassVar[bool] = True
    #: keys and values always one fixed width (kvq's quantizers take per-unit widths)
    one_width: ClassVar[bool] = False
    #: the error at b bits follows QAQ's uniform model (range / 2**b): False for methods whose
    #: levels follow the data (their error must come from the method itself, bits.bridge=true)
    error_follows_range: ClassVar[bool] = True
    #: axes and kv.* knobs that do not change this method (kvq.method.KNOBS)
    ignores: ClassVar[tuple[str, ...]] = ()
    #: axes that reach the method only through its fields (group_size: ${grouping.size})
    resolved_axes: ClassVar[tuple[str, ...]] = ("grouping",)

    def __post_init__(self) -> None:
        if self.group_size is not None and (
            isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1
        ):
            raise ValueError(
                f"group_size must be a positive integer or None (one group per unit), got {self.group_size!r}"
            )
        if not 0.0 <= float(self.outlier_ratio) < 0.5:
            raise ValueError(f"outlier_ratio must be in [0, 0.5), got {self.outlier_ratio}")

    def build_cache(self, setup: Any, plan: Any = None, deferred: bool = False) -> Any:
        """kvq's ``QuantizedCache`` quantizing keys and values with this quantizer
        (:meth:`kvq.method.Method.build_cache`; ``setup`` is a :class:`kvq.method.CacheSetup`)."""
        return setup.quantized_cache(self, plan, deferred)

    # ------------------------------------------------------------------ layout helpers
    def effective_group_size(self, unit_size: int) -> int:
        """Group size actually used for a unit of ``unit_size`` features."""
        g = self.group_size
        return unit_size if g is None or g >= unit_size else g

    def n_groups(self, unit_size: int) -> int:
        return -(-unit_size // self.effective_group_size(unit_size))

    def n_outliers(self, unit_size: int) -> int:
        """Outliers kept per unit on *each* side (top and bottom)."""
        return int(math.floor(self.outlier_ratio / 2 * unit_size))

    def meta_per_group(self, bits: int) -> int:
        """fp16 values stored per group at ``bits`` bits."""
        return len(self.meta_fields)

    def symmetric_range(self) -> bool:
        """Whether the unit's range is ``2 max|x|`` (symmetric) rather than ``max - min``."""
        return False

    def unit_range(self, x: torch.Tensor) -> torch.Tensor:
        """Value range of each unit with its outliers excluded (QAQ's ``range``).

        Args:
            x: ``[N, D]`` units.

        Returns:
            float32 ``[N]``.
        """
        x = x.float()
        k = self.n_outliers(x.shape[1])
        if k:
            x = x.sort(dim=1).values[:, k : x.shape[1] - k]
        lo, hi = x.amin(dim=1), x.amax(dim=1)
        if self.symmetric_range():
            return 2 * torch.maximum(lo.abs(), hi.abs())
        return hi - lo

    def unit_rms_error(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        """Root-mean-square error of each unit quantized at ``bits`` (the allocation bridge).

        The default measures it (encode + decode); methods with a closed form override it.

        Args:
            x: ``[N, D]`` units.
            bits: code width.

        Returns:
            float32 ``[N]``.
        """
        x = x.float()
        return (self.fake_quant(x, bits) - x).pow(2).mean(dim=1).sqrt()

    # ------------------------------------------------------------------ method hooks
    def _fit(self, x: torch.Tensor, valid: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
        """Group statistics -> stored metadata.

        Args:
            x: float32 ``[n, G, g]`` (padding and outliers present but marked invalid).
            valid: bool, broadcastable to ``[n, G, g]`` (``[1, G, g]`` without outliers), the
                entries that define the statistics.
            bits: code width.

        Returns:
            fp16 tensors ``[n, G, k]`` keyed by name; the encoder sees these rounded values.
        """
        raise NotImplementedError

    def _levels(self, meta: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        """Reconstruction levels, float32 ``[n, G, 2**bits]`` (or broadcastable), ascending."""
        raise NotImplementedError

    def _boundaries(self, meta: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        """Decision boundaries ``[n, G, 2**bits - 1]``; default: midpoints (nearest level)."""
        lv = self._levels(meta, bits)
        return (lv[..., 1:] + lv[..., :-1]) * 0.5

    def _assign(self, x: torch.Tensor, meta: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        """Integer codes ``[n, G, g]`` (any integer dtype; clamped to ``[0, 2**bits)`` after)."""
        bnd = self._boundaries(meta, bits)
        n, G, g = x.shape
        bnd = bnd.expand(n, G, bnd.shape[-1]).reshape(n * G, -1).contiguous()
        return torch.searchsorted(bnd, x.reshape(n * G, g).contiguous()).view(n, G, g)

    def _fit_assign(
        self, x: torch.Tensor, valid: torch.Tensor, bits: int
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`_fit` then :meth:`_assign`: ``(meta, codes [n, G, g])``.

        A method whose fit already orders the values (``adaptive`` sorts each group) overrides
        this to derive the codes from that order; the codes must equal :meth:`_assign`'s on every
        valid entry (those of padding and outliers are never decoded).
        """
        meta = self._fit(x, valid, bits)
        return meta, self._assign(x, meta, bits)

    def _reconstruct(self, codes: torch.Tensor, meta: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        """Values float32 ``[n, G, g]`` for codes ``[n, G, g]``."""
        lv = self._levels(meta, bits)
        n, G, _ = codes.shape
        return torch.gather(lv.expand(n, G, lv.shape[-1]), 2, codes)

    def fused_spec(self, bits: int) -> FusedSpec | None:
        """The fused kernel of this method (:mod:`kvq.quant.fused`), or ``None`` (the default: the
        eager hooks run). A spec promises that the kernel computes exactly what the hooks do; a
        subclass that overrides a hook runs the eager path (:meth:`_fused_applies`).

        Args:
            bits: code width.

        Returns:
            The kernel's method name and constants, or ``None``.
        """
        return None

    def _fused_applies(self) -> bool:
        """Whether this object's hooks are those of the class that declared :meth:`fused_spec`."""
        return fused.hooks_unchanged(type(self), Quantizer)

    # ------------------------------------------------------------------ shared path
    def _grouped(self, x: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n, D]`` -> zero-padded ``[n, G, g]`` values and their validity mask.

        The mask is ``[n, G, g]`` with outliers (``keep`` given), else ``[1, G, g]`` (only the
        padding is invalid, the same for every unit): methods broadcast it.
        """
        n, D = x.shape
        g = self.effective_group_size(D)
        G = -(-D // g)
        pad = G * g - D
        if keep is None:
            valid = (torch.arange(G * g, device=x.device) < D).view(1, G, g)
        else:
            valid = (
                torch.cat([keep, keep.new_zeros(n, pad)], dim=1).view(n, G, g) if pad else keep.view(n, G, g)
            )
        if pad:
            x = torch.cat([x, x.new_zeros(n, pad)], dim=1)
        return x.view(n, G, g), valid

    def _split_outliers(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        k = self.n_outliers(x.shape[1])
        if k == 0:
            return None, None, None
        top = x.topk(k, dim=1).indices
        bottom = (-x).topk(k, dim=1).indices
        idx = torch.cat([top, bottom], dim=1)
        keep = torch.ones_like(x, dtype=torch.bool).scatter_(1, idx, False)
        return torch.gather(x, 1, idx).half(), idx.to(index_dtype(x.shape[1])), keep

    def encode(self, x: torch.Tensor, bits: int | torch.Tensor) -> QTensor:
        """Quantize a block of units (the fused kernels where they apply, else the eager path;
        the result is the same bit for bit).

        Args:
            x: ``[N, D]`` floating tensor, one unit per row.
            bits: an int (all units) or an integer tensor ``[N]`` of per-unit widths.

        Returns:
            The packed :class:`QTensor`.
        """
        return self._encode(x, bits, self._use_fused(x))

    def encode_reference(self, x: torch.Tensor, bits: int | torch.Tensor) -> QTensor:
        """:meth:`encode` (``x`` ``[N, D]``, widths as there) by the eager op chain: the reference
        the fused kernels are tested against."""
        with fused.reference():
            return self.encode(x, bits)

    def _use_fused(self, x: torch.Tensor) -> bool:
        return (
            fused.enabled()
            and x.dim() == 2
            and x.shape[0] > 0
            and self.fused_spec(MIN_BITS) is not None
            and self._fused_applies()
            and fused.supports(x)
        )

    def _encode(self, x: torch.Tensor, bits: int | torch.Tensor, use_fused: bool) -> QTensor:
        if x.dim() != 2:
            raise ValueError(f"encode expects [N, D] units, got shape {tuple(x.shape)}")
        N, D = x.shape
        # the kernels read fp16/bf16/fp32 directly; outlier selection runs on float32 as the reference
        x32 = x.float() if not use_fused or self.n_outliers(D) else None
        ov, oi, keep = self._split_outliers(x32) if N and x32 is not None else (None, None, None)
        src = x32 if x32 is not None else x
        qt = QTensor(n_units=N, unit_size=D, outlier_values=ov, outlier_index=oi)
        if isinstance(bits, torch.Tensor):
            if bits.shape != (N,):
                raise ValueError(f"per-unit bits must have shape [{N}], got {tuple(bits.shape)}")
            widths = [int(b) for b in torch.unique(bits).tolist()]
            for b in widths:
                check_bits(b)
            if len(widths) == 1:
                groups = [(widths[0], None)]
            else:
                qt.unit_bits = bits.to(torch.uint8)
                groups = [(b, (bits == b).nonzero().squeeze(1)) for b in widths]
        else:
            check_bits(bits)
            groups = [(bits, None)]
        for b, rows in groups:
            xs = src if rows is None else src.index_select(0, rows)
            ks = keep if keep is None or rows is None else keep.index_select(0, rows)
            spec = self.fused_spec(b) if use_fused else None
            done = fused.encode_part(spec, xs, ks, b, self.effective_group_size(D)) if spec else None
            if done is not None:
                qt.parts.append(QPart(bits=b, n_units=xs.shape[0], codes=done[1], meta=done[0]))
                continue
            xs = xs.float()
            xg, valid = self._grouped(xs, ks)
            meta, codes = self._fit_assign(xg, valid, b)
            codes = codes.clamp_(0, (1 << b) - 1)
            codes = codes.reshape(xs.shape[0], -1)[:, :D]
            qt.parts.append(QPart(bits=b, n_units=xs.shape[0], codes=pack_codes(codes, b), meta=meta))
        return qt

    def decode(self, qt: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize a block: ``[N, D]`` in ``dtype`` (the fused kernels where they apply)."""
        if qt.raw is None and qt.parts and fused.enabled() and self.fused_spec(MIN_BITS) is not None:
            out = self._decode_fused(qt, dtype)
            if out is not None:
                return out
        return self._decode_eager(qt, dtype)

    def _decode_fused(self, qt: QTensor, dtype: torch.dtype) -> torch.Tensor | None:
        dev = qt.parts[0].codes.device
        if not self._fused_applies() or fused.backend(dev) is None:
            return None
        N, D = qt.n_units, qt.unit_size
        g = self.effective_group_size(D)
        out = torch.empty(N, D, dtype=dtype, device=dev)
        for part in qt.parts:
            spec = self.fused_spec(part.bits)
            rows = None if qt.unit_bits is None else (qt.unit_bits == part.bits).nonzero().squeeze(1)
            if spec is None or not fused.decode_part(
                spec, part.codes, part.meta, part.n_units, D, g, part.bits, out, rows
            ):
                return None
        if qt.outlier_values is not None:
            out.scatter_(1, qt.outlier_index.long(), qt.outlier_values.to(dtype))
        return out

    def decode_reference(self, qt: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """:meth:`decode` by the eager op chain: ``[N, D]`` in ``dtype``."""
        with fused.reference():
            return self.decode(qt, dtype)

    def _decode_eager(self, qt: QTensor, dtype: torch.dtype) -> torch.Tensor:
        N, D = qt.n_units, qt.unit_size
        if qt.raw is not None:
            return qt.raw.to(dtype)
        g = self.effective_group_size(D)
        G = -(-D // g)
        out: torch.Tensor | None = None
        for part in qt.parts:
            n = part.n_units
            codes = unpack_codes(part.codes, part.bits, n * D).view(n, D)  # uint8
            if G * g != D:
                codes = torch.cat([codes, codes.new_zeros(n, G * g - D)], dim=1)
            codes = codes.view(n, G, g).long()
            vals = self._reconstruct(codes, part.meta, part.bits).reshape(n, G * g)[:, :D]
            if qt.unit_bits is None:
                out = vals
            else:
                if out is None:
                    out = vals.new_empty(N, D)
                rows = (qt.unit_bits == part.bits).nonzero().squeeze(1)
                out.index_copy_(0, rows, vals)
        if out is None:
            out = torch.empty(N, D)
        if qt.outlier_values is not None:
            out = out.scatter(1, qt.outlier_index.long(), qt.outlier_values.float())
        return out.to(dtype)

    def fake_quant(self, x: torch.Tensor, bits: int | torch.Tensor) -> torch.Tensor:
        """``decode(encode(x, bits))`` in ``x``'s dtype."""
        return self.decode(self.encode(x, bits), x.dtype)

    def nbytes_formula(
        self, n_units: int, unit_size: int, bits: int | dict[int, int], fp_elem_size: int = 2
    ) -> int:
        """Bytes :meth:`encode` stores, from the shapes alone (see :mod:`kvq.memory`).

        Args:
            n_units: ``N``.
            unit_size: ``D``.
            bits: one width for all units, or ``{width: number of units}``.
            fp_elem_size: bytes per element of full-precision storage (``none`` method only).
        """
        counts = {bits: n_units} if isinstance(bits, int) else {b: c for b, c in bits.items() if c}
        G = self.n_groups(unit_size)
        total = 0
        for b, n in counts.items():
            total += packed_nbytes(n * unit_size, b) + n * G * self.meta_per_group(b) * 2
        if len(counts) > 1:
            total += n_units  # uint8 width per unit
        k = self.n_outliers(unit_size)
        if k:
            total += n_units * 2 * k * (2 + torch.tensor([], dtype=index_dtype(unit_size)).element_size())
        return total
