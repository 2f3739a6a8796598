"""The ``granularity`` axis: what one quantization unit is, and how K/V tensors become units.

A *unit* is one row of features that shares statistics groups and one bit width
(:mod:`kvq.quant`). Keys and values reach the cache per layer as ``[B, H_kv, t, d]``:

========  ==============================================  ==========================
unit      one unit is                                     units of a layer chunk
========  ==============================================  ==========================
``head``  one token of one KV head (``d`` features)       ``[B*H*t, d]``
``layer`` one token of one layer (``H*d`` features)       ``[B*t, H*d]``
``token`` one token across all layers (``L*H*d``)         built by the cache across layers
========  ==============================================  ==========================

``token`` units exist only when the whole cache is quantized at once (the ``prefill``
protocol), since the other layers' K/V do not exist yet while one layer runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["GRANULARITIES", "Granularity", "KVShape"]

GRANULARITIES: tuple[str, ...] = ("head", "layer", "token")


class KVShape(Protocol):
    """Anything that names a model's KV shape (:class:`kvq.models.ModelMeta`, :class:`kvq.memory.CacheShape`)."""

    n_layers: int
    n_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Granularity:
    """The quantization unit: ``head``, ``layer`` or ``token`` (see the module docstring)."""

    unit: str = "layer"

    def __post_init__(self) -> None:
        if self.unit not in GRANULARITIES:
            raise ValueError(f"granularity.unit must be one of {', '.join(GRANULARITIES)}, got {self.unit!r}")

    @classmethod
    def of(cls, value: Granularity | str) -> Granularity:
        """``value`` as a :class:`Granularity` (a plain name is accepted)."""
        if isinstance(value, Granularity):
            return value
        if value not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {value!r}")
        return cls(value)

    def __str__(self) -> str:
        return self.unit

    @property
    def per_head(self) -> bool:
        """One unit per KV head (``head``); otherwise a unit spans all heads of a token."""
        return self.unit == "head"

    @property
    def spans_layers(self) -> bool:
        """One unit spans every layer (``token``): needs the whole cache quantized at once."""
        return self.unit == "token"

    def unit_size(self, shape: KVShape) -> int:
        """Features in one unit on a model of this KV shape."""
        per_layer = shape.n_kv_heads * shape.head_dim
        if self.per_head:
            return shape.head_dim
        return per_layer * shape.n_layers if self.spans_layers else per_layer

    def units_per_token(self, batch: int, n_kv_heads: int) -> int:
        """Units one token of one layer (or, for ``token``, of the whole model) makes."""
        return batch * (n_kv_heads if self.per_head else 1)

    def to_units(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, t, d]`` -> ``[N, D]`` units of one layer (``head`` or ``layer``; ``token``
        units of one layer are its ``layer`` units, concatenated across layers by the cache)."""
        B, H, t, d = x.shape
        if self.per_head:
            return x.reshape(B * H * t, d)
        return x.permute(0, 2, 1, 3).reshape(B * t, H * d)

    def from_units(self, u: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """Inverse of :meth:`to_units` for a ``[B, H, t, d]`` ``shape``."""
        B, H, t, d = shape
        if self.per_head:
            return u.reshape(B, H, t, d)
        return u.reshape(B, t, H, d).permute(0, 2, 1, 3)
