"""Bit allocation: how many bits each quantization unit gets."""

from kvq.alloc.base import BitAllocator, BitPlan, FixedBits
from kvq.alloc.qaq import (
    AttentionAwareBits,
    AttentionStats,
    AttentionStatsCollector,
    qaq_bits,
    qaq_key_error,
    qaq_value_error,
)

__all__ = [
    "AttentionAwareBits",
    "AttentionStats",
    "AttentionStatsCollector",
    "BitAllocator",
    "BitPlan",
    "FixedBits",
    "qaq_bits",
    "qaq_key_error",
    "qaq_value_error",
]
