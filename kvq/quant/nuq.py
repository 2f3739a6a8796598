"""``method=nuq``: calibrated non-uniform codebooks (KVQuant's nuq datatype).

Levels are not fitted per group at run time (``adaptive`` stores ``2**bits`` fp16 levels per
group, which costs more bits than its better levels save): they are fitted **offline**, once per
model, on calibration windows (:mod:`kvq.calib`); every group stores only its normaliser.

* **codebooks** -- per layer, kind and width. Keys: one codebook per channel -- per feature of a
  per-token key unit (per (head, channel) with ``granularity=layer``, per channel of the head with
  ``granularity=head``; before RoPE with ``kv.pre_rope``), per channel of the head with
  ``kv.key_axis=channel`` (a unit is one channel over a group of tokens, its heads share the
  channel's codebook). Values: one codebook per layer.
* **normalisers** (stored per group in fp16): ``absmax`` (``x / max|x|``, codes in ``[-1, 1]``),
  ``rms``, ``minmax`` (``(x - min) / (max - min)`` in ``[0, 1]``: two values, the offset of a
  channel kept) or ``none`` (no metadata at all). ``key_scale`` for keys, ``scale`` for values.
* **fitting** -- 1-D k-means (Lloyd from weighted quantiles, on prefix sums) of the calibration
  K/V in the basis the cache quantizes in (after the rotation, if any), normalised as at run
  time. ``fisher`` weighting (KVQuant's sensitivity-weighted k-means) weights each value by its
  Fisher information ``(d loss / d x)**2`` times the squared normaliser (its error in the original
  units); ``uniform`` weights all alike (the default for both kinds). Measured on SmolLM2 (README,
  *Quality presets*: 8 windows of WikiText-2 and of pydoc, fakequant and prefill): plain k-means
  key codebooks give 32-53% lower KL than Fisher-weighted ones, fixed 3-bit and under a budget
  alike (the squared gradients of a few calibration windows are heavy-tailed, so weighted levels
  follow a few tokens); at 2.5 bits (``kvq2``) the weighting is level on KL (within 3%) and
  better on perplexity, so that preset pins it for keys and values.
* optional sparse outliers (``kv.outlier_ratio``: the shared dense-and-sparse path).

Memory: the codebooks are stored once per model (``kv/codebook_bytes`` = 2 bytes per level of
every codebook the run used), not in any window's cache; a run amortises them over the tokens it
evaluates (:func:`kvq.memory.amortised`). Without calibration (a quantizer used directly, the
``granularity=token`` cross-layer path) a normaliser's default codebook is used: the uniform
grid of its range for ``absmax`` (``[-1, 1]``) and ``minmax`` (``[0, 1]``), the N(0, 1)
equal-mass levels for ``rms`` and ``none``.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kvq.quant.base import _FP16_TINY, QTensor, Quantizer, check_bits, fp16_round_down, fp16_round_up
from kvq.quant.methods import gaussian_codebook

__all__ = ["SCALES", "WEIGHTINGS", "NUQQuantizer", "NUQState", "weighted_kmeans"]

#: the per-group normalisers (fp16 values stored per group: 1, 1, 2, 0)
SCALES: dict[str, tuple[str, ...]] = {
    "absmax": ("scale",),
    "rms": ("scale",),
    "minmax": ("zero", "span"),
    "none": (),
}
WEIGHTINGS: tuple[str, ...] = ("fisher", "uniform")
#: codebook layouts: one per unit feature, one per unit row (channel of the head), one shared
LAYOUTS: tuple[str, ...] = ("feature", "row", "shared")


def weighted_kmeans(
    z: torch.Tensor, w: torch.Tensor, n_levels: int, iters: int, pin: tuple[float, float] | None = None
) -> torch.Tensor:
    """1-D weighted k-means of each row: ``z``, ``w`` ``[F, S]`` -> ascending levels ``[F, n_levels]``.

    Initialised at the weighted quantiles ``(k + 1/2) / n_levels``; Lloyd steps (boundaries at the
    midpoints, levels at the weighted means of their bins; an empty bin keeps its level), computed
    on the sorted values with prefix sums (a step searches the ``n_levels - 1`` boundaries, not
    every value). Rows with no weight are fitted unweighted. ``pin=(lo, hi)`` fixes the outer
    two levels there (the ends of a normalised range: the extreme values of every group, where the
    loss is most sensitive, are then reconstructed exactly, as on a min-max grid). Deterministic.
    """
    z = z.double()
    w = w.double().clamp_min(0.0)
    dead = w.sum(dim=1, keepdim=True) <= 0
    w = torch.where(dead, torch.ones_like(w), w)
    srt, order = z.sort(dim=1)
    sw = torch.gather(w, 1, order)
    F, S = srt.shape
    zero = torch.zeros(F, 1, dtype=srt.dtype)
    p0 = torch.cat([zero, sw.cumsum(dim=1)], dim=1)  # [F, S + 1]
    p1 = torch.cat([zero, (sw * srt).cumsum(dim=1)], dim=1)
    q = (torch.arange(n_levels, dtype=torch.float64) + 0.5) / n_levels * p0[:, -1:]
    pos = torch.searchsorted(p0[:, 1:].contiguous(), q.contiguous()).clamp_max(S - 1)
    levels = torch.gather(srt, 1, pos)

    def pinned(lv: torch.Tensor) -> torch.Tensor:
        if pin is None or n_levels < 2:
            return lv
        lv = lv.clamp(pin[0], pin[1])
        lv[:, 0], lv[:, -1] = pin[0], pin[1]
        return lv

    levels = pinned(levels.sort(dim=1).values)
    full = torch.full((F, 1), S, dtype=torch.long)
    for _ in range(iters):
        mids = ((levels[:, 1:] + levels[:, :-1]) * 0.5).contiguous()
        ends = torch.searchsorted(srt, mids, right=True)  # values <= a midpoint take the lower level
        edges = torch.cat([torch.zeros_like(full), ends, full], dim=1)
        c = p0.gather(1, edges[:, 1:]) - p0.gather(1, edges[:, :-1])
        s = p1.gather(1, edges[:, 1:]) - p1.gather(1, edges[:, :-1])
        new = pinned(torch.where(c > 0, s / c.clamp_min(1e-300), levels).sort(dim=1).values)
        if torch.equal(new, levels):
            break
        levels = new
    return levels.float()


@dataclass
class NUQState:
    """What a :class:`NUQQuantizer` learned, shared by its per-layer views.

    Attributes:
        samples: ``(layer, kind) -> (z [F, S], w [F, S])`` normalised calibration values, weights.
        layout: ``(layer, kind) -> (layout, period)``: ``feature`` (row ``f`` of the codebook for
            feature ``f`` of a unit), ``row`` (row ``r % period`` for unit ``r``) or ``shared``.
        books: ``(layer, kind, bits) -> float32 [F, 2**bits]`` fitted codebooks (fp16-exact).
        used: codebooks an encode used (what ``kv/codebook_bytes`` counts).
    """

    samples: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    layout: dict[tuple[int, str], tuple[str, int]] = field(default_factory=dict)
    books: dict[tuple[int, str, int], torch.Tensor] = field(default_factory=dict)
    used: set[tuple[int, str, int]] = field(default_factory=set)


@dataclass
class NUQQuantizer(Quantizer):
    """Calibrated non-uniform quantization: per-layer codebooks (keys: per channel), fitted
    offline; each group stores only its normaliser (see the module docstring).

    Args:
        scale: normaliser of value groups: ``absmax`` (default), ``rms``, ``minmax``, ``none``.
        key_scale: normaliser of key groups (default ``minmax``).
        per_channel_keys: one key codebook per channel (else one per layer).
        key_weighting: ``uniform`` (plain k-means, default) or ``fisher`` (sensitivity-weighted).
        value_weighting: the same for values (default ``uniform``).
        pin_ends: with the ``minmax`` normaliser, keep 0 and 1 as levels, so every group's
            extreme values stay exact as on a min-max grid (where keys are most sensitive).
        kmeans_iters: Lloyd steps of the fit.
        samples: calibration values per codebook row (per channel for keys), drawn with the seed.
        seed: seeds the sample draw (together with the calibration seed).
    """

    scale: str = "absmax"
    key_scale: str = "minmax"
    per_channel_keys: bool = True
    key_weighting: str = "uniform"
    value_weighting: str = "uniform"
    pin_ends: bool = True
    kmeans_iters: int = 25
    samples: int = 4096
    seed: int = 0

    name: ClassVar[str] = "nuq"
    #: its levels follow the calibration data, not range / 2**bits (bits=attn needs the bridge)
    error_follows_range: ClassVar[bool] = False
    #: codebooks are fitted on calibration windows before evaluation (kvq.calib)
    needs_calibration: ClassVar[bool] = True
    #: per-layer codebooks: a unit that spans layers (granularity=token) has none
    per_layer: ClassVar[bool] = True

    state: NUQState = field(default_factory=NUQState, init=False, repr=False, compare=False)
    layer: int | None = field(default=None, init=False, repr=False, compare=False)
    kind: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("scale", "key_scale"):
            if getattr(self, name) not in SCALES:
                raise ValueError(
                    f"method.{name} must be one of {', '.join(SCALES)}, got {getattr(self, name)!r}"
                )
        for name in ("key_weighting", "value_weighting"):
            if getattr(self, name) not in WEIGHTINGS:
                raise ValueError(
                    f"method.{name} must be one of {', '.join(WEIGHTINGS)}, got {getattr(self, name)!r}"
                )
        if self.kmeans_iters < 0:
            raise ValueError(f"method.kmeans_iters must be >= 0, got {self.kmeans_iters}")
        if self.samples < 16:
            raise ValueError(f"method.samples must be >= 16, got {self.samples}")

    # -- views and the cache ---------------------------------------------------------------
    def scale_of(self, kind: str | None) -> str:
        """The normaliser of ``kind`` (an unbound quantizer uses the value normaliser)."""
        return self.key_scale if kind == "key" else self.scale

    @property
    def meta_fields(self) -> tuple[str, ...]:  # type: ignore[override]
        return SCALES[self.scale_of(self.kind)]

    def for_layer(self, layer: int | None, kind: str) -> NUQQuantizer:
        """A view of this quantizer bound to one layer (``None``: none) and kind, sharing the fitted state."""
        view = copy.copy(self)
        view.layer, view.kind = layer, kind
        return view

    def build_cache(self, setup: Any, plan: Any = None, deferred: bool = False) -> Any:
        """kvq's ``QuantizedCache`` whose every layer quantizes with its own codebooks."""
        from kvq.cache import KVQuantSpec  # the cache builds on kvq.quant: imported when used

        spec = KVQuantSpec(
            self.for_layer(None, "key"),
            self.for_layer(None, "value"),
            granularity=setup.granularity,
            rotation=getattr(setup, "rotation", None),
            **setup.knobs,
        )
        cache = setup.cache_of_spec(spec, plan, deferred)
        if not spec.unit.spans_layers:
            for i, layer in enumerate(cache.layers):
                layer.spec = dataclasses.replace(
                    spec, key_quantizer=self.for_layer(i, "key"), value_quantizer=self.for_layer(i, "value")
                )
        return cache

    # -- calibration ------------------------------------------------------------------------
    def _layout(self, kind: str, knobs: dict[str, Any]) -> str:
        if kind != "key" or not self.per_channel_keys:
            return "shared"
        return "row" if knobs.get("key_axis", "token") == "channel" else "feature"

    def calibrate(self, stats: Any, setup: Any) -> None:
        """Draw normalised, weighted calibration samples per layer and kind (:mod:`kvq.calib`) and
        fit the codebooks of the widths the setup's allocator can give."""
        st = self.state
        st.samples.clear(), st.books.clear(), st.used.clear(), st.layout.clear()
        knobs = getattr(setup, "knobs", {}) or {}
        for layer in range(stats.n_layers):
            for kind in ("key", "value"):
                view = self.for_layer(layer, kind)
                units, fisher = stats.units(layer, kind, setup, view)
                z, w = view._normalised(units, fisher)  # [N, D]; w = -1 on padding / outliers
                gen = torch.Generator().manual_seed(
                    (self.seed * 1_000_003 + stats.seed * 7919 + layer * 2 + (kind == "value")) % (2**62)
                )
                layout = self._layout(kind, knobs)
                period = stats.keys[layer].shape[-1]
                if layout == "feature":
                    zs, ws = z.t(), w.t()  # [D, N]
                elif layout == "row":  # unit r is channel r % head_dim of its head
                    N, D = z.shape
                    zs = z.reshape(N // period, period, D).transpose(0, 1).reshape(period, -1)
                    ws = w.reshape(N // period, period, D).transpose(0, 1).reshape(period, -1)
                else:
                    keep = w.flatten() >= 0
                    zs, ws = z.flatten()[keep].view(1, -1), w.flatten()[keep].view(1, -1)
                cap = self.samples * (1 if layout != "shared" else min(z.shape[1], 64))
                if zs.shape[1] > cap:
                    pick = torch.randperm(zs.shape[1], generator=gen)[:cap]
                    zs, ws = zs[:, pick], ws[:, pick]
                st.samples[(layer, kind)] = (zs.contiguous(), ws.clamp_min(0.0).contiguous())
                st.layout[(layer, kind)] = (layout, period)
        for kind in ("key", "value"):
            for bits in _widths(getattr(setup, "allocator", None), kind):
                for layer in range(stats.n_layers):
                    self._book_for(layer, kind, bits)

    def _normalised(self, units: torch.Tensor, fisher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Units normalised as at run time ``[N, D]``, and each entry's weight (``-1``: outlier)."""
        N, D = units.shape
        x = units.float()
        keep = self._split_outliers(x)[2]
        xg, valid = self._grouped(x, keep)
        fg, _ = self._grouped(fisher.float(), keep)
        meta = self._fit(xg, valid, 0)
        z, a = self._normalise(xg, meta)
        weighting = self.key_weighting if self.kind == "key" else self.value_weighting
        w = fg * a**2 if weighting == "fisher" else torch.ones_like(fg)
        w = torch.where(valid.expand_as(w), w, torch.full_like(w, -1.0))
        return z.reshape(N, -1)[:, :D], w.reshape(N, -1)[:, :D]

    def calib_state(self) -> dict[str, Any]:
        """The fitted codebooks and their layouts (what :mod:`kvq.calib` caches)."""
        return {
            "books": {k: v.clone() for k, v in self.state.books.items()},
            "layout": dict(self.state.layout),
        }

    def load_calib_state(self, state: dict[str, Any]) -> None:
        """Use codebooks fitted before (see :meth:`calib_state`)."""
        st = self.state
        st.books = {tuple(k): v.clone() for k, v in state["books"].items()}  # type: ignore[misc]
        st.layout = {tuple(k): tuple(v) for k, v in state["layout"].items()}  # type: ignore[misc]
        st.samples.clear(), st.used.clear()

    @property
    def calibrated(self) -> bool:
        """Whether codebooks were fitted (else the default codebooks are used)."""
        return bool(self.state.books or self.state.samples)

    def reset_usage(self) -> None:
        """Forget which codebooks encodes used so far (:func:`kvq.calib.calibrate` calls it after
        fitting, so ``kv/codebook_bytes`` counts what the evaluation uses)."""
        self.state.used.clear()

    def codebook_bytes_for(self, bits: int) -> int:
        """Bytes of this view's codebook at ``bits`` (fp16 levels; 0 without one): what a width
        costs once per model (:class:`kvq.alloc.BudgetBits` amortises it over a run)."""
        if self.layer is None or self.kind is None:
            return 0
        book = self._book_for(self.layer, self.kind, bits)
        return 0 if book is None else book.numel() * 2

    def codebook_bytes(self) -> int:
        """Bytes of every codebook an encode used (fp16 levels), stored once per model."""
        return sum(self.state.books[k].numel() * 2 for k in self.state.used if k in self.state.books)

    # -- codebooks ---------------------------------------------------------------------------
    def _default_book(self, bits: int) -> torch.Tensor:
        sc = self.scale_of(self.kind)
        if sc == "minmax":
            lv = torch.linspace(0.0, 1.0, 1 << bits)
        elif sc == "absmax":  # codes in [-1, 1] with both ends exact: the symmetric uniform grid
            lv = torch.linspace(-1.0, 1.0, 1 << bits)
        else:  # rms / none: values in units of their spread
            lv = gaussian_codebook(bits)[1]
        return lv.half().float().view(1, -1)

    def _book_for(self, layer: int, kind: str, bits: int) -> torch.Tensor | None:
        key = (layer, kind, bits)
        book = self.state.books.get(key)
        if book is None:
            data = self.state.samples.get((layer, kind))
            if data is None:
                return None
            sc = self.scale_of(kind)
            pin = (0.0, 1.0) if self.pin_ends and sc == "minmax" else None
            lv = weighted_kmeans(data[0], data[1], 1 << bits, self.kmeans_iters, pin=pin)
            book = self.state.books[key] = lv.half().float()
        return book

    def book(self, bits: int) -> tuple[torch.Tensor, str, int]:
        """``(codebook [F, 2**bits], layout, period)`` this view encodes ``bits`` with."""
        check_bits(bits)
        if self.layer is not None and self.kind is not None:
            b = self._book_for(self.layer, self.kind, bits)
            if b is not None:
                self.state.used.add((self.layer, self.kind, bits))
                layout, period = self.state.layout.get((self.layer, self.kind), ("shared", 1))
                return b, layout, period
        return self._default_book(bits), "shared", 1

    # -- the method hooks ---------------------------------------------------------------------
    def _fit(self, x: torch.Tensor, valid: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
        """fp16 normaliser ``[n, G, 1]`` of each group (nothing with ``none``)."""
        sc = self.scale_of(self.kind)
        v = valid.expand_as(x)
        if sc == "none":
            return {}
        if sc == "absmax":
            a = x.abs().masked_fill(~v, 0.0).amax(dim=-1, keepdim=True)
            return {"scale": fp16_round_up(a).clamp_min(_FP16_TINY)}
        if sc == "rms":
            n = v.sum(dim=-1, keepdim=True).clamp_min(1)
            r = (x.masked_fill(~v, 0.0) ** 2).sum(dim=-1, keepdim=True).div(n).sqrt()
            return {"scale": r.half().clamp_min(_FP16_TINY)}
        mn = x.masked_fill(~v, float("inf")).amin(dim=-1, keepdim=True)
        mx = x.masked_fill(~v, -float("inf")).amax(dim=-1, keepdim=True)
        empty = mn > mx
        mn, mx = mn.masked_fill(empty, 0.0), mx.masked_fill(empty, 0.0)
        zero = fp16_round_down(mn)
        return {"zero": zero, "span": fp16_round_up(mx - zero.float()).clamp_min(_FP16_TINY)}

    @staticmethod
    def _normalise(
        x: torch.Tensor, meta: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | float]:
        """``(z, a)``: normalised values and the factor an error in ``z`` is multiplied by."""
        if "span" in meta:
            a = meta["span"].float()
            return (x - meta["zero"].float()) / a, a
        if "scale" in meta:
            a = meta["scale"].float()
            return x / a, a
        return x, 1.0

    @staticmethod
    def _denormalise(z: torch.Tensor, meta: dict[str, torch.Tensor]) -> torch.Tensor:
        if "span" in meta:
            return meta["zero"].float() + z * meta["span"].float()
        if "scale" in meta:
            return z * meta["scale"].float()
        return z

    @staticmethod
    def _rows(book: torch.Tensor, layout: str, period: int, n: int, width: int) -> torch.Tensor:
        """The codebook row of every unit (``row``: ``[n, L]``) or unit feature (``feature``: ``[width, L]``)."""
        if layout == "row":
            return book[torch.arange(n) % period]
        if width > book.shape[0]:
            raise ValueError(f"nuq: a {width}-feature unit met a codebook fitted on {book.shape[0]} features")
        return book[torch.arange(width).clamp_max(book.shape[0] - 1)]

    def encode(self, x: torch.Tensor, bits: int | torch.Tensor) -> QTensor:
        """As :meth:`Quantizer.encode`; per-row codebooks (per-channel keys in token groups) need
        one width per chunk (they index units by position)."""
        if isinstance(bits, torch.Tensor) and self.layer is not None and self.kind is not None:
            layout = self.state.layout.get((self.layer, self.kind), ("shared", 1))[0]
            if layout == "row" and torch.unique(bits).numel() > 1:
                raise ValueError(
                    "nuq with per-channel key groups needs one key width per chunk (bits.fixed_key_bits)"
                )
        return super().encode(x, bits)

    def _assign(self, x: torch.Tensor, meta: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        n, G, g = x.shape
        z, _ = self._normalise(x, meta)
        book, layout, period = self.book(bits)
        mids = ((book[:, 1:] + book[:, :-1]) * 0.5).to(x.device)
        if layout == "shared":
            return torch.bucketize(z, mids[0]).to(torch.uint8)
        if layout == "row":
            rows = self._rows(mids, layout, period, n, G * g).contiguous()  # [n, L-1]
            return torch.searchsorted(rows, z.reshape(n, G * g).contiguous()).view(n, G, g).to(torch.uint8)
        rows = self._rows(mids, layout, period, n, G * g).contiguous()  # [G*g, L-1]
        zt = z.reshape(n, G * g).t().contiguous()
        return torch.searchsorted(rows, zt).t().reshape(n, G, g).to(torch.uint8)

    def _reconstruct(self, codes: torch.Tensor, meta: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        n, G, g = codes.shape
        book, layout, period = self.book(bits)
        book = book.to(codes.device)
        if layout == "shared":
            vals = book[0][codes]
        elif layout == "row":
            rows = self._rows(book, layout, period, n, G * g)  # [n, L]
            vals = torch.gather(rows, 1, codes.reshape(n, G * g)).view(n, G, g)
        else:
            rows = self._rows(book, layout, period, n, G * g)  # [G*g, L]
            vals = torch.gather(rows.unsqueeze(0).expand(n, -1, -1), 2, codes.reshape(n, G * g, 1)).view(
                n, G, g
            )
        return self._denormalise(vals, meta)

    def _levels(self, meta: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
        raise NotImplementedError("nuq assigns codes per feature (_assign / _reconstruct)")


def _widths(allocator: Any, kind: str) -> list[int]:
    """The code widths an allocator can give ``kind`` (what nuq fits codebooks for)."""
    if allocator is None:
        return [4]
    if hasattr(allocator, "widths"):
        return list(allocator.widths(kind))
    if hasattr(allocator, "bits_for"):
        return [int(allocator.bits_for(kind))]
    fixed = getattr(allocator, "fixed_key_bits", None)
    if kind == "key" and fixed is not None:
        return [int(fixed)]
    lo, hi = int(getattr(allocator, "n_min", 1)), int(getattr(allocator, "n_max", 8))
    return list(range(lo, hi + 1))
