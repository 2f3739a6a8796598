"""The quantization methods: each one only says how a group's statistics become levels."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from kvq.method import KNOBS
from kvq.quant.base import _FP16_TINY, QTensor, Quantizer, fp16_round_down, fp16_round_up, tree_sum
from kvq.quant.fused import FusedSpec

__all__ = [
    "AdaptiveQuantizer",
    "FullPrecision",
    "NormalQuantizer",
    "UniformQuantizer",
    "gaussian_codebook",
]


def _masked_min_max(x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max over valid entries (0 for groups with none): ``[n, G, 1]`` each."""
    mn = x.masked_fill(~valid, math.inf).amin(dim=-1, keepdim=True)
    mx = x.masked_fill(~valid, -math.inf).amax(dim=-1, keepdim=True)
    empty = mn > mx  # only an empty group has min = +inf > max = -inf
    return mn.masked_fill(empty, 0.0), mx.masked_fill(empty, 0.0)


def _sort_groups(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.sort(dim=-1)`` for finite float32 (and +inf): ``(sorted values, order)``.

    Sorts the float's bits as integer keys (a monotone map: a negative float's magnitude bits
    are flipped, so larger magnitudes order lower; the map is its own inverse). On the CPU the
    key carries the position in its low bits and NumPy sorts the packed int64 keys, values only
    (its vectorised sort is several times faster than ``torch.sort``, which also fills an index
    tensor); equal values then keep their order, which changes nothing downstream.
    """
    if x.dtype != torch.float32:
        return x.sort(dim=-1)
    k = x.view(torch.int32)
    k = k ^ ((k >> 31) & 0x7FFFFFFF)
    if x.device.type != "cpu":
        order = k.sort(dim=-1).indices
        return torch.gather(x, -1, order), order
    shift = max(int(x.shape[-1] - 1).bit_length(), 1)
    packed = (k.long() << shift) | torch.arange(x.shape[-1], dtype=torch.int64)
    packed = torch.from_numpy(np.sort(packed.numpy(), axis=-1))
    order = packed & ((1 << shift) - 1)
    v = (packed >> shift).to(torch.int32)
    return (v ^ ((v >> 31) & 0x7FFFFFFF)).view(torch.float32), order


@functools.cache
def _unit_grid(L: int) -> torch.Tensor:
    """``linspace(0, 1, L)`` (float32 ``[L]``), computed once: the min-max grid's fractions."""
    return torch.linspace(0.0, 1.0, L)


@dataclass
class UniformQuantizer(Quantizer):
    """Min-max uniform quantization with ``2**bits`` evenly spaced levels.

    Asymmetric (default): zero-point at the group minimum (rounded *down* to fp16) and step
    ``(max - zero) / (2**bits - 1)`` (rounded *up*), so every in-range value is within half a
    step of its level. Symmetric: levels ``(c - (2**bits - 1) / 2) * step`` with
    ``step = 2 max|x| / (2**bits - 1)``, one stored value per group. Unlike QAQ's published
    quantizer, nothing is centred on the mean and nothing is clipped.

    Args:
        symmetric: use the symmetric variant.
    """

    symmetric: bool = False

    name: ClassVar[str] = "uniform"

    def symmetric_range(self) -> bool:
        return self.symmetric

    @property
    def meta_fields(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("scale",) if self.symmetric else ("zero", "scale")

    def _fit(self, x: torch.Tensor, valid: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
        L = (1 << bits) - 1
        mn, mx = _masked_min_max(x, valid)
        if self.symmetric:
            a = torch.maximum(mx.abs(), mn.abs())
            scale = fp16_round_up(2 * a / L).clamp_min(_FP16_TINY)
            return {"scale": scale}
        zero = fp16_round_down(mn)
        scale = fp16_round_up((mx - zero.float()) / L).clamp_min(_FP16_TINY)
        return {"zero": zero, "scale": scale}

    def unit_rms_error(self, x: torch.Tensor, bits: int) -> torch.Tensor:
        """Analytic RMS error: a uniform error of ``step / 2`` per group, ``step**2 / 12`` MSE,
        averaged over the unit's groups by size (outliers are exact and excluded)."""
        x = x.float()
        xg, valid = self._grouped(x, self._split_outliers(x)[2])
        step = self._fit(xg, valid, bits)["scale"].float().squeeze(-1)  # [N, G]
        n = valid.sum(dim=-1).float()
        return ((step**2 / 12 * n).sum(dim=1) / x.shape[1]).sqrt()

    def _offset(self, meta: dict[str, torch.Tensor], bits: int) -> torch.Tensor | float:
        if self.symmetric:
            return -((1 << bits) - 1) / 2 * meta["scale"].float()
        return meta["zero"].float()

    def _levels(self, meta: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        c = torch.arange(1 << bits, dtype=torch.float32, device=meta["scale"].device)
        return self._offset(meta, bits) + c * meta["scale"].float()

    def _assign(self, x: torch.Tensor, meta: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        # clamped in float (padding may fall outside the grid), then stored in one byte per code
        c = torch.round((x - self._offset(meta, bits)) / meta["scale"].float())
        return c.clamp_(0, (1 << bits) - 1).to(torch.uint8)

    def _reconstruct(self, codes: torch.Tensor, meta: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        return self._offset(meta, bits) + codes.float() * meta["scale"].float()

    def fused_spec(self, bits: int) -> FusedSpec:
        return FusedSpec("uniform", self.meta_fields, symmetric=self.symmetric)


@functools.cache
def gaussian_codebook(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Equal-mass bins of N(0, 1): boundaries ``Phi^-1(k / 2**bits)`` and bin conditional means.

    Computed in float64: ``E[Z | a < Z < b] = (phi(a) - phi(b)) / (Phi(b) - Phi(a))``.

    Returns:
        ``(boundaries [2**bits - 1], levels [2**bits])`` as float32.
    """
    L = 1 << bits
    p = torch.arange(1, L, dtype=torch.float64) / L
    b = torch.special.ndtri(p)
    edges = torch.cat(
        [torch.tensor([-math.inf], dtype=torch.float64), b, torch.tensor([math.inf], dtype=torch.float64)]
    )
    phi = torch.exp(-0.5 * edges.clamp(-40, 40) ** 2) / math.sqrt(2 * math.pi)
    phi = torch.where(torch.isinf(edges), torch.zeros_like(phi), phi)
    levels = (phi[:-1] - phi[1:]) * L  # bin mass is 1 / L
    return b.float(), levels.float()


@dataclass
class NormalQuantizer(Quantizer):
    """Gaussian quantization: standardise by the group's mean and std, then ``2**bits``
    equal-probability bins of N(0, 1), each reconstructed at its conditional mean."""

    name: ClassVar[str] = "normal"
    meta_fields: ClassVar[tuple[str, ...]] = ("mean", "std")

    def _fit(self, x: torch.Tensor, valid: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
        w = valid.float()
        cnt = w.sum(dim=-1, keepdim=True).clamp_min(1.0)  # a count: exact in any order
        mean = tree_sum(x * w) / cnt
        var = tree_sum(((x - mean) * w) ** 2) / cnt
        # the correctly rounded float32 sqrt (through float64: exact for sqrt), as IEEE sqrt gives it
        # in the fused kernels and on a GPU; torch's CPU float32 sqrt is off by one ulp on rare
        # inputs, which flips the fp16 std where its value sits on an fp16 rounding tie
        std = var.double().sqrt().float()
        return {"mean": mean.half(), "std": std.half().clamp_min(_FP16_TINY)}

    def _levels(self, meta: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        _, lv = gaussian_codebook(bits)
        return meta["mean"].float() + meta["std"].float() * lv.to(meta["mean"].device)

    def _assign(self, x: torch.Tensor, meta: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        bnd, _ = gaussian_codebook(bits)
        z = (x - meta["mean"].float()) / meta["std"].float()
        return torch.bucketize(z, bnd.to(x.device))

    def _reconstruct(self, codes: torch.Tensor, meta: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        _, lv = gaussian_codebook(bits)
        return meta["mean"].float() + meta["std"].float() * lv.to(codes.device)[codes]

    def fused_spec(self, bits: int) -> FusedSpec:
        bnd, lv = gaussian_codebook(bits)
        return FusedSpec("normal", self.meta_fields, table=bnd, levels=lv)


@dataclass
class AdaptiveQuantizer(Quantizer):
    """Quantization on the group's own empirical distribution.

    Each group gets a codebook of ``2**bits`` fp16 levels built from its own values:

    1. two initial codebooks: the means of the group's empirical quantile bins (equal counts by
       rank), and the evenly spaced min-max grid; per group, the one with the lower squared
       error is kept (equal-mass bins starve the tails of heavy-tailed data, while a few values
       per level make an empirical codebook noisy at high bit widths);
    2. ``lloyd_iters`` Lloyd (1-D k-means) steps: boundaries at the midpoints between levels,
       levels at the means of their bins. Each step can only lower the group's error, so the
       result is never worse than the min-max grid of the same width (up to fp16 rounding).

    Values are encoded to the nearest codebook level, the optimal encoder for a given codebook;
    the codes come from the sort the fit made (a run-length code in sorted order, scattered
    back), not from a second search over every value. An empty bin (a quantile bin of a group
    with fewer than ``2**bits`` values, or a bin a Lloyd step leaves empty) repeats the level
    below it, so the codebook stays ascending and a stranded level is reused.

    Args:
        lloyd_iters: refinement steps after initialisation (0 = the better initial codebook).
    """

    lloyd_iters: int = 2

    name: ClassVar[str] = "adaptive"
    meta_fields: ClassVar[tuple[str, ...]] = ("codebook",)
    #: its levels are the group's own quantiles: QAQ's range / 2**bits model does not apply
    error_follows_range: ClassVar[bool] = False

    def meta_per_group(self, bits: int) -> int:
        return 1 << bits

    def _fit(self, x: torch.Tensor, valid: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
        return self._fit_assign(x, valid, bits)[0]

    def _fit_assign(
        self, x: torch.Tensor, valid: torch.Tensor, bits: int
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        # Everything below works on the sorted values of each group: a codebook's bins are then
        # contiguous runs whose sums and counts come from prefix sums, and nearest-level coding
        # of the sorted values is a run-length code that the sort order scatters back.
        L = 1 << bits
        n, G, _ = x.shape
        srt, order = _sort_groups(x.masked_fill(~valid, math.inf))  # [n, G, g], invalid last
        counts = valid.sum(dim=-1, keepdim=True, dtype=torch.int32).long()  # [1 or n, G, 1]
        n_valid = counts.expand(n, G, 1)
        # prefix sums; entries past n_valid are inf but never read: every run ends at <= n_valid
        p1 = F.pad(srt, (1, 0)).cumsum(-1)  # [n, G, g + 1]

        def runs(levels: torch.Tensor) -> torch.Tensor:
            """Run ends of nearest-level coding of codebooks ``[n, G, C, L]``: ``[n, G, C, L - 1]``
            positions ``<= n_valid`` (a value on a boundary takes the lower level, as in
            :meth:`Quantizer._assign`). The C candidate codebooks share one search."""
            mid = (levels[..., 1:] + levels[..., :-1]) * 0.5
            return torch.searchsorted(srt, mid.reshape(n, G, -1), right=True).view(mid.shape)

        def bins(inner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """Sums and counts ``[n, G, C, L]`` of the runs cut at ``inner`` ``[n, G, C, L - 1]``."""
            nv = n_valid.unsqueeze(-1).expand(*inner.shape[:-1], 1)
            edges = torch.cat([torch.zeros_like(nv), inner, nv], dim=-1)
            sums = torch.gather(p1, -1, edges.reshape(n, G, -1)).view(edges.shape)
            return sums.diff(dim=-1), edges.diff(dim=-1).to(p1.dtype)

        # rank i goes to bin floor(i * L / n): bin k holds ranks [ceil(k n / L), ceil((k + 1) n / L))
        ranks = torch.arange(1, L, device=x.device)
        rank_runs = -torch.div(-ranks * counts, L, rounding_mode="floor")  # once per group layout
        s1, c = bins(rank_runs.expand(n, G, L - 1).unsqueeze(-2))
        # runs are empty only where a group has fewer than L values
        quantile = self._fill_empty(torch.where(c > 0, s1 / c.clamp_min(1.0), 0.0), c)
        has = n_valid > 0
        mn = torch.where(has, srt[..., :1], 0.0)
        mx = torch.where(has, torch.gather(srt, -1, (n_valid - 1).clamp_min(0)), 0.0)
        grid = (mn + (mx - mn) * _unit_grid(L).to(x.device)).unsqueeze(-2)
        # keep the candidate with the lower squared error; the group's sum of squares, common
        # to both, drops out of sum_k (s2_k - 2 l_k s1_k + c_k l_k^2)
        cand = torch.cat([quantile, grid], dim=-2)  # [n, G, 2, L]
        s1, c = bins(runs(cand))
        excess = tree_sum(cand * (c * cand - 2 * s1))  # [n, G, 2, 1]
        pick = excess[..., :1, :] <= excess[..., 1:, :]  # [n, G, 1, 1]: the quantile codebook
        levels = torch.where(pick, quantile, grid)
        # the chosen codebook's runs are the first Lloyd step's partition: not searched again
        s1 = torch.where(pick, s1[..., :1, :], s1[..., 1:, :])
        c = torch.where(pick, c[..., :1, :], c[..., 1:, :])
        # An empty bin takes the level below it: the pair then splits that level's bin on the
        # next step, so a level stranded in an empty stretch (the tails of a min-max grid) moves
        # to where the values are. The codebook stays ascending.
        for step in range(self.lloyd_iters):
            if step:
                s1, c = bins(runs(levels))
            levels = self._fill_empty(torch.where(c > 0, s1 / c.clamp_min(1.0), levels), c)
        levels = levels.squeeze(-2)
        codebook = levels.half()
        # code of sorted position j = number of run ends <= j (with the encoder's fp16 boundaries);
        # uint8 holds every code (bits <= 8), and its cumsum and scatter are the cheap ones
        ends = runs(codebook.float().unsqueeze(-2)).squeeze(-2)
        marks = torch.zeros(*srt.shape[:-1], srt.shape[-1] + 1, dtype=torch.uint8, device=x.device)
        marks.scatter_add_(-1, ends, torch.ones(1, dtype=torch.uint8, device=x.device).expand_as(ends))
        codes = marks[..., :-1].cumsum(-1, dtype=torch.uint8)
        codes = torch.empty_like(codes).scatter_(-1, order, codes)
        return {"codebook": codebook}, codes

    @staticmethod
    def _fill_empty(levels: torch.Tensor, cnts: torch.Tensor) -> torch.Tensor:
        """Forward-fill empty bins (along the last axis) so the codebook stays ascending."""
        L = levels.shape[-1]
        idx = torch.where(cnts > 0, torch.arange(L, device=levels.device).expand_as(levels), 0)
        return torch.gather(levels, -1, idx.cummax(dim=-1).values)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lloyd_iters < 0:
            raise ValueError(f"lloyd_iters must be >= 0, got {self.lloyd_iters}")

    def _levels(self, meta: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        return meta["codebook"].float()

    def fused_spec(self, bits: int) -> FusedSpec:
        return FusedSpec(
            "adaptive", self.meta_fields, lloyd_iters=self.lloyd_iters, table=_unit_grid(1 << bits)
        )


@dataclass
class FullPrecision(Quantizer):
    """The ``none`` method: values stored unquantized, in the dtype they arrive in.

    The cache hands it K/V already cast to its ``fp_dtype`` (fp16 by default, the usual KV-cache
    dtype; ``None`` keeps the model's dtype and makes the cache lossless). ``bits`` is ignored.
    """

    name: ClassVar[str] = "none"
    quantizes: ClassVar[bool] = False
    #: stored unquantized: no axis or quantization knob changes it (kv.fp_dtype does)
    ignores: ClassVar[tuple[str, ...]] = KNOBS

    def encode(self, x: torch.Tensor, bits: int | torch.Tensor = 16) -> QTensor:
        return QTensor(n_units=x.shape[0], unit_size=x.shape[1], raw=x.detach().clone())

    def nbytes_formula(
        self, n_units: int, unit_size: int, bits: int | dict[int, int], fp_elem_size: int = 2
    ) -> int:
        return n_units * unit_size * fp_elem_size
