"""Bit allocation: how many bits each quantization unit gets (fixed, attention-aware, budget)."""

from kvq.alloc.base import BitAllocator, BitPlan, FixedBits
from kvq.alloc.budget import BudgetBits, solve_budget
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
    "BudgetBits",
    "FixedBits",
    "qaq_bits",
    "qaq_key_error",
    "qaq_value_error",
    "solve_budget",
]
