"""How a cache quantizes: the cache knobs (the ``kv`` config node) and :class:`KVQuantSpec`.

The knobs are declared and checked once (:class:`CacheKnobs`), shared by the config node
(:class:`KVSettings`, which also carries the outlier ratio fed to the method) and the spec the
cache is built from (:class:`KVQuantSpec`: the quantizers, the unit, the knobs).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from kvq.alloc.base import Kind
from kvq.granularity import Granularity
from kvq.quant.base import Quantizer

__all__ = [
    "KEY_AXES",
    "KEY_AXIS_OPTIONS",
    "KINDS",
    "CacheKnobs",
    "KVQuantSpec",
    "KVSettings",
    "NonFiniteKVError",
    "storage_dtype",
]

KEY_AXES: tuple[str, ...] = ("token", "channel")
#: the ``kv.key_axis`` values a config may give: a key axis, or ``auto`` (resolved per point by
#: :func:`kvq.experiment.resolve_key_axis`: per-channel key groups wherever the point can use them)
KEY_AXIS_OPTIONS: tuple[str, ...] = (*KEY_AXES, "auto")
KINDS: tuple[Kind, Kind] = ("key", "value")


class NonFiniteKVError(ValueError):
    """NaN or Inf reached the KV cache."""


def storage_dtype(name: str | None) -> torch.dtype | None:
    """The floating dtype named ``name`` (``None`` = the model's own dtype); one-line error otherwise.

    Only floating dtypes can hold full-precision K/V: an integer or bool dtype would silently
    truncate them (and fake a saving in the memory figures).
    """
    if name is None:
        return None
    dt = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point or dt.is_complex:
        raise ValueError(
            f"kv.fp_dtype must name a floating torch dtype (float16, bfloat16, float32, float64) or be null "
            f"(= the model's dtype), got {name!r}"
        )
    return dt


@dataclass(kw_only=True)
class CacheKnobs:
    """The cache knobs of both the ``kv`` config node (:class:`KVSettings`) and the cache itself
    (:class:`KVQuantSpec`), declared and checked once.

    Args:
        residual: newest tokens kept in full precision (a window, ``>= 0``).
        sinks: first tokens kept in full precision (``>= 0``).
        fp_dtype: storage dtype of the full-precision parts (sinks, residual); ``null``/``None``
            = the model's dtype.
        key_axis: ``token`` (keys quantized like values, per ``granularity``) or ``channel``
            (KIVI/KVQuant: each key channel of a head over ``key_group`` tokens is one unit;
            values stay per token; only whole groups are quantized, the newest incomplete group
            stays in full precision).
        key_group: tokens per key group with ``key_axis=channel``.
        pre_rope: quantize keys before the rotary embedding (KVQuant); RoPE is re-applied after
            dequantization (the cache needs :attr:`QuantizedCache.rope`).
    """

    residual: int = 0
    sinks: int = 0
    fp_dtype: str | None = "float16"
    key_axis: str = "token"
    key_group: int = 32
    pre_rope: bool = False

    def knobs(self) -> dict[str, Any]:
        """These knobs by name (to build a :class:`KVQuantSpec` from a :class:`KVSettings`)."""
        return {f.name: getattr(self, f.name) for f in fields(CacheKnobs)}

    def _check_knobs(self, prefix: str, axes: tuple[str, ...] = KEY_AXES) -> None:
        """One-line ValueErrors, the option named with ``prefix`` (``kv.`` for the config node);
        ``axes``: the key axes allowed."""
        for name in ("residual", "sinks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{prefix}{name} must be a non-negative integer, got {v!r}")
        if self.key_axis not in axes:
            raise ValueError(f"{prefix}key_axis must be one of {', '.join(axes)}, got {self.key_axis!r}")
        if isinstance(self.key_group, bool) or not isinstance(self.key_group, int) or self.key_group < 1:
            raise ValueError(
                f"{prefix}key_group must be a positive integer (tokens per key group), got {self.key_group!r}"
            )
        storage_dtype(self.fp_dtype)

    def quantized_tokens(self, n_tokens: int) -> int:
        """Tokens stored quantized once a layer holds ``n_tokens``: all but the sinks and the
        residual window, in whole blocks (key groups with ``key_axis=channel``)."""
        block = self.key_group if self.key_axis == "channel" else 1
        n = max(n_tokens - self.sinks - self.residual, 0)
        return n - n % block


@dataclass
class KVSettings(CacheKnobs):
    """Cache knobs shared by every method (the ``kv`` config node): :class:`CacheKnobs` plus

    Args:
        outlier_ratio: fraction of each unit kept in full precision as outliers, in ``[0, 0.5)``
            (applied to the method's quantizer).
        key_axis: as in :class:`CacheKnobs`, or ``auto`` (the default): ``channel`` wherever
            the point can quantize keys per channel, ``token`` otherwise
            (:func:`kvq.experiment.resolve_key_axis`; the run records the resolved axis).
        key_group: tokens per key group with ``key_axis=channel`` (default 64).
    """

    key_axis: str = "auto"
    key_group: int = 64
    outlier_ratio: float = 0.0

    def __post_init__(self) -> None:
        self._check_knobs("kv.", KEY_AXIS_OPTIONS)
        if not 0.0 <= float(self.outlier_ratio) < 0.5:
            raise ValueError(f"kv.outlier_ratio must be in [0, 0.5), got {self.outlier_ratio}")


@dataclass
class KVQuantSpec(CacheKnobs):
    """How a cache quantizes keys and values: the quantizers, the unit, and the
    :class:`CacheKnobs` (keyword-only).

    Args:
        key_quantizer: quantizer for keys.
        value_quantizer: quantizer for values (``None`` = the key quantizer).
        granularity: the unit (a :class:`~kvq.granularity.Granularity` or its name ``head``,
            ``layer`` or ``token``).
    """

    key_quantizer: Quantizer
    value_quantizer: Quantizer | None = None
    granularity: Granularity | str = "head"
    #: an orthogonal transform of each head's features applied before quantization and undone
    #: after dequantization (``rotate(x, layer_idx, kind)`` / ``unrotate(x, layer_idx, kind)`` on
    #: ``[B, H, t, d]``; keys are rotated after RoPE, or before it with ``pre_rope``); ``None`` = none
    rotation: Any = None

    #: a ready spec used as a run's method (:class:`kvq.protocols.KVSetup`): kvq's cache
    one_pass_quantized: ClassVar[bool] = True

    def build_cache(self, setup: Any, plan: Any = None, deferred: bool = False) -> Any:
        """kvq's ``QuantizedCache`` of this spec (``setup``: a :class:`kvq.protocols.KVSetup`)."""
        return setup.cache_of_spec(self, plan, deferred)

    def __post_init__(self) -> None:
        self.granularity = Granularity.of(self.granularity)
        self._check_knobs("")
        if self.key_axis == "channel" and self.granularity.spans_layers:
            raise ValueError(
                "key_axis=channel quantizes keys per layer: use granularity=head or layer for values"
            )
        if self.value_quantizer is None:
            self.value_quantizer = self.key_quantizer

    @property
    def unit(self) -> Granularity:
        """The granularity as an object (``granularity`` after ``__post_init__``)."""
        assert isinstance(self.granularity, Granularity)
        return self.granularity

    @property
    def token_block(self) -> int:
        """Tokens are quantized in whole blocks of this size (key groups, or single tokens)."""
        return self.key_group if self.key_axis == "channel" else 1

    @property
    def streaming_exact_needs_mixing(self) -> bool:
        """Whether a one-pass forward must mix quantized and full-precision K/V per query
        (a residual window or incomplete key groups make what a query sees depend on its position)."""
        return self.residual > 0 or self.key_axis == "channel"

    def units(self, kind: Kind, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, t, d]`` -> the ``[N, D]`` units of ``kind``."""
        if kind == "key" and self.key_axis == "channel":
            B, H, t, d = x.shape
            G = self.key_group
            return x.reshape(B, H, t // G, G, d).transpose(-1, -2).reshape(-1, G)
        return self.unit.to_units(x)

    def from_units(self, kind: Kind, u: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of :meth:`units`."""
        if kind == "key" and self.key_axis == "channel":
            B, H, t, d = shape
            G = self.key_group
            return u.reshape(B, H, t // G, d, G).transpose(-1, -2).reshape(B, H, t, d)
        return self.unit.from_units(u, shape)

    def unit_shape(self, kind: Kind, n_kv_heads: int, head_dim: int) -> tuple[int, int]:
        """``(D, units per token of one layer and batch row)`` of ``kind`` (per key group of
        ``key_group`` tokens for per-channel keys: ``D = key_group``, ``n_kv_heads * head_dim``
        units per group)."""
        if kind == "key" and self.key_axis == "channel":
            return self.key_group, n_kv_heads * head_dim
        per_layer = n_kv_heads * head_dim
        if self.unit.per_head:
            return head_dim, n_kv_heads
        return per_layer, 1

    def quantizer(self, kind: Kind) -> Quantizer:
        return self.key_quantizer if kind == "key" else self.value_quantizer  # type: ignore[return-value]
