"""The quantization methods: each one only says how a group's statistics become levels."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from kvq.quant.base import _FP16_TINY, QTensor, Quantizer, fp16_round_down, fp16_round_up

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
    empty = ~valid.any(dim=-1, keepdim=True)
    return mn.masked_fill(empty, 0.0), mx.masked_fill(empty, 0.0)


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
        return torch.round((x - self._offset(meta, bits)) / meta["scale"].float()).long()

    def _reconstruct(self, codes: torch.Tensor, meta: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        return self._offset(meta, bits) + codes.float() * meta["scale"].float()


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
        cnt = w.sum(dim=-1, keepdim=True).clamp_min(1.0)
        mean = (x * w).sum(dim=-1, keepdim=True) / cnt
        var = (((x - mean) * w) ** 2).sum(dim=-1, keepdim=True) / cnt
        return {"mean": mean.half(), "std": var.sqrt().half().clamp_min(_FP16_TINY)}

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

    Values are encoded to the nearest codebook level, the optimal encoder for a given codebook.
    Empty bins repeat the level below them, so the codebook stays ascending.

    Args:
        lloyd_iters: refinement steps after initialisation (0 = the better initial codebook).
    """

    lloyd_iters: int = 2

    name: ClassVar[str] = "adaptive"
    meta_fields: ClassVar[tuple[str, ...]] = ("codebook",)

    def meta_per_group(self, bits: int) -> int:
        return 1 << bits

    def _fit(self, x: torch.Tensor, valid: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
        # Everything below works on the sorted values of each group: a codebook's bins are then
        # contiguous runs whose sums, counts and squared errors come from prefix sums.
        L = 1 << bits
        srt = x.masked_fill(~valid, math.inf).sort(dim=-1).values  # [n, G, g], invalid last
        n_valid = valid.sum(dim=-1, keepdim=True)  # [n, G, 1]
        finite = torch.where(torch.isfinite(srt), srt, torch.zeros_like(srt))
        zero = finite.new_zeros(*finite.shape[:-1], 1)
        p1 = torch.cat([zero, finite.cumsum(-1)], dim=-1)  # [n, G, g + 1]
        p2 = torch.cat([zero, (finite * finite).cumsum(-1)], dim=-1)

        def bins(edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """Sums, sums of squares and counts of the runs ``[edges[k], edges[k + 1])``."""
            s1, s2 = torch.gather(p1, -1, edges), torch.gather(p2, -1, edges)
            return s1.diff(dim=-1), s2.diff(dim=-1), edges.diff(dim=-1).to(s1.dtype)

        def edges_of(levels: torch.Tensor) -> torch.Tensor:
            """Run boundaries of nearest-level coding: ``[n, G, L + 1]`` positions."""
            mid = (levels[..., 1:] + levels[..., :-1]) * 0.5
            pos = torch.searchsorted(srt, mid.to(srt.dtype).contiguous(), right=True)
            pos = torch.minimum(pos, n_valid)
            return torch.cat([torch.zeros_like(n_valid), pos, n_valid], dim=-1)

        def sq_error(levels: torch.Tensor) -> torch.Tensor:
            s1, s2, c = bins(edges_of(levels))
            lv = levels
            return (s2 - 2 * lv * s1 + c * lv * lv).sum(-1, keepdim=True)

        def centroids(edges: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
            s1, _, c = bins(edges)
            lv = torch.where(c > 0, s1 / c.clamp_min(1.0), old)
            return self._fill_empty(lv, c)

        # rank i goes to bin floor(i * L / n): bin k holds ranks [ceil(k n / L), ceil((k + 1) n / L))
        rank_edges = -torch.div(-torch.arange(L + 1, device=x.device) * n_valid, L, rounding_mode="floor")
        quantile = centroids(rank_edges, torch.zeros(*n_valid.shape[:-1], L, device=x.device))
        mn, mx = _masked_min_max(x, valid)
        grid = mn + (mx - mn) * torch.linspace(0.0, 1.0, L, device=x.device)
        levels = torch.where(sq_error(quantile) <= sq_error(grid), quantile, grid)
        for _ in range(self.lloyd_iters):
            levels = centroids(edges_of(levels), levels)
        return {"codebook": levels.half()}

    @staticmethod
    def _fill_empty(levels: torch.Tensor, cnts: torch.Tensor) -> torch.Tensor:
        """Forward-fill empty bins so the codebook stays ascending: ``[n, G, L]``."""
        L = levels.shape[-1]
        idx = torch.where(cnts > 0, torch.arange(L, device=levels.device).expand_as(levels), 0)
        return torch.gather(levels, 2, idx.cummax(dim=-1).values)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lloyd_iters < 0:
            raise ValueError(f"lloyd_iters must be >= 0, got {self.lloyd_iters}")

    def _levels(self, meta: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        return meta["codebook"].float()


@dataclass
class FullPrecision(Quantizer):
    """The ``none`` method: values stored unquantized, in the dtype they arrive in.

    The cache hands it K/V already cast to its ``fp_dtype`` (fp16 by default, the usual KV-cache
    dtype; ``None`` keeps the model's dtype and makes the cache lossless). ``bits`` is ignored.
    """

    name: ClassVar[str] = "none"

    def encode(self, x: torch.Tensor, bits: int | torch.Tensor = 16) -> QTensor:
        return QTensor(n_units=x.shape[0], unit_size=x.shape[1], raw=x.detach().clone())

    def nbytes_formula(
        self, n_units: int, unit_size: int, bits: int | dict[int, int], fp_elem_size: int = 2
    ) -> int:
        return n_units * unit_size * fp_elem_size
