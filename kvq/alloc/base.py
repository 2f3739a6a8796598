"""Bit allocation interfaces and fixed bits.

An allocator turns (quantizer, unit values, optional attention statistics) into a bit width per
quantization unit. The cache asks its :class:`BitPlan` for the widths of every chunk it stores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from kvq.quant.base import Quantizer, check_bits

__all__ = ["BitAllocator", "BitPlan", "FixedBits", "Kind"]

Kind = Literal["key", "value"]


class BitPlan(Protocol):
    """What a :class:`~kvq.cache.QuantizedCache` asks while it stores a chunk."""

    def unit_bits(
        self, layer_idx: int, kind: Kind, units: torch.Tensor, start: int, quantizer: Quantizer
    ) -> int | torch.Tensor:
        """Bit widths for a chunk of units.

        Args:
            layer_idx: model layer (``-1`` for cross-layer ``token`` units).
            kind: ``"key"`` or ``"value"``.
            units: ``[N, D]`` the chunk's units, in the cache's unit order
                (``[B, (H,) t]`` flattened, see :mod:`kvq.cache`).
            start: absolute position of the chunk's first token.
            quantizer: the quantizer that will encode them.

        Returns:
            An int for all units or an int tensor ``[N]``.
        """
        ...


class BitAllocator(Protocol):
    """A ``bits`` config node: fixed or attention-aware."""

    needs_attention: bool
    #: gives each token (and head) its own key width: keys need a per-token unit
    #: (``kv.key_axis=token``; ``auto`` resolves to it)
    per_token_keys: bool

    def max_bits(self) -> int: ...


@dataclass
class FixedBits:
    """The same width for every unit; keys and values may differ.

    Args:
        key_bits: bits per key element.
        value_bits: bits per value element (``None`` = ``key_bits``).
    """

    key_bits: int = 4
    value_bits: int | None = None

    needs_attention = False
    per_token_keys = False

    def __post_init__(self) -> None:
        check_bits(self.key_bits, "bits.key_bits")
        if self.value_bits is not None:
            check_bits(self.value_bits, "bits.value_bits")
            if self.value_bits == self.key_bits:  # the same as "values like keys"
                self.value_bits = None

    def bits_for(self, kind: Kind) -> int:
        return self.key_bits if kind == "key" or self.value_bits is None else self.value_bits

    def max_bits(self) -> int:
        return max(self.key_bits, self.bits_for("value"))

    def unit_bits(
        self, layer_idx: int, kind: Kind, units: torch.Tensor, start: int, quantizer: Quantizer
    ) -> int:
        return self.bits_for(kind)
