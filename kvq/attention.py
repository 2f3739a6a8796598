"""The ``kvq`` attention implementation, registered with transformers' ``AttentionInterface``.

It is SDPA, plus two things kvq needs that no stock implementation does:

* attention statistics for QAQ's allocation (:class:`kvq.alloc.qaq.AttentionStatsCollector`),
  reduced layer by layer while a full-precision pass runs (only the last ``last_n`` query rows
  are ever formed);
* streaming-exact one-pass evaluation: when a :class:`~kvq.cache.QuantizedLayer` keeps a
  residual window or quantizes keys per channel in token groups, what query ``t`` sees depends
  on ``t`` (keys of groups not yet complete at ``t`` are still in full precision). The layer
  leaves the full-precision K/V and a ``[Tq, Tk]`` mask; scores and values are then mixed per
  query: ``where(mask, q·Kq, q·K)`` and ``(P·mask) Vq + (P·~mask) V``. No query ever sees a key
  quantized with statistics of tokens after it.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = [
    "ATTN_IMPL",
    "MixedKV",
    "StatsCollector",
    "active_collector",
    "clear_mixed",
    "collecting",
    "kvq_attention",
    "leave_mixed",
    "register",
    "take_mixed",
]

ATTN_IMPL = "kvq"


class StatsCollector(Protocol):
    """What the attention function feeds while statistics are collected (QAQ's allocation)."""

    def add(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """Reduce one layer's attention: ``query [B, H, Tq, d]``, ``key [B, H_kv, Tk, d]``."""
        ...


@dataclass
class MixedKV:
    """What a one-pass forward needs to reproduce streaming: the full-precision K/V and, per
    query, which keys are seen quantized (the rest are seen in full precision).

    Attributes:
        keys: ``[B, H, Tk, d]`` full-precision keys (as the cache would hold them unquantized).
        values: ``[B, H, Tk, d]`` full-precision values.
        quantized: bool ``[Tq, Tk]``.
    """

    keys: torch.Tensor
    values: torch.Tensor
    quantized: torch.Tensor


class _ForwardState(threading.local):
    """The per-forward state the ``kvq`` attention owns (one per thread)."""

    def __init__(self) -> None:
        self.collector: StatsCollector | None = None
        self.mixed: dict[int, MixedKV] = {}


_STATE = _ForwardState()


@contextlib.contextmanager
def collecting(collector: StatsCollector) -> Iterator[StatsCollector]:
    """Feed ``collector`` every attention call of the ``kvq`` implementation inside the block."""
    prev, _STATE.collector = _STATE.collector, collector
    try:
        yield collector
    finally:
        _STATE.collector = prev


def active_collector() -> StatsCollector | None:
    """The collector of the enclosing :func:`collecting` block, or ``None``."""
    return _STATE.collector


def leave_mixed(layer_idx: int, mixed: MixedKV) -> None:
    """A cache layer leaves its mixing info for the attention call that follows its update."""
    _STATE.mixed[layer_idx] = mixed


def take_mixed(layer_idx: int) -> MixedKV | None:
    """Take the mixing info a layer left for its attention call (``None`` = plain attention)."""
    return _STATE.mixed.pop(layer_idx, None)


def clear_mixed() -> None:
    """Drop mixing info no attention call consumed (before a new forward)."""
    _STATE.mixed.clear()


def _repeat(x: torch.Tensor, rep: int) -> torch.Tensor:
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def mixed_attention(
    query: torch.Tensor,
    keys_q: torch.Tensor,
    values_q: torch.Tensor,
    keys_fp: torch.Tensor,
    values_fp: torch.Tensor,
    quantized: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Causal attention where query ``t`` sees key/value ``j`` quantized iff ``quantized[t, j]``.

    Args:
        query: ``[B, Hq, Tq, d]``; the queries are the last ``Tq`` positions.
        keys_q, values_q: ``[B, Hkv, Tk, d]`` as stored (quantized where stored quantized).
        keys_fp, values_fp: ``[B, Hkv, Tk, d]`` in full precision.
        quantized: bool ``[Tq, Tk]``.
        attention_mask: the model's mask (bool, True = attend, or additive float), or ``None``.
        scaling: softmax scale.

    Returns:
        ``[B, Tq, Hq, d]``.
    """
    B, Hq, Tq, d = query.shape
    Tk = keys_q.shape[-2]
    rep = Hq // keys_q.shape[1]
    M = quantized.to(query.device)
    s = (
        torch.where(
            M,
            query @ _repeat(keys_q, rep).transpose(-1, -2),
            query @ _repeat(keys_fp, rep).transpose(-1, -2),
        ).float()
        * scaling
    )
    if attention_mask is None:
        causal = torch.arange(Tk, device=query.device) <= (
            Tk - Tq + torch.arange(Tq, device=query.device)
        ).unsqueeze(1)
        s = s.masked_fill(~causal, -math.inf)
    elif attention_mask.dtype == torch.bool:
        s = s.masked_fill(~attention_mask[..., -Tk:], -math.inf)
    else:
        s = s + attention_mask[..., -Tk:].float()
    p = s.softmax(dim=-1).to(query.dtype)
    Mq = M.to(p.dtype)
    out = (p * Mq) @ _repeat(values_q, rep) + (p * (1 - Mq)) @ _repeat(values_fp, rep)
    return out.transpose(1, 2).contiguous()


def kvq_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """SDPA; plus QAQ statistics when collecting, plus streaming-exact mixing when a layer asks."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    s = scaling if scaling is not None else query.shape[-1] ** -0.5
    if _STATE.collector is not None:
        _STATE.collector.add(module.layer_idx, query, key, s)
    mix = take_mixed(module.layer_idx)
    if mix is not None:
        out = mixed_attention(query, key, value, mix.keys, mix.values, mix.quantized, attention_mask, s)
        return out, None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def register() -> str:
    """Register ``kvq`` with transformers' attention and mask interfaces; returns its name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(ATTN_IMPL, kvq_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPL, sdpa_mask)
    return ATTN_IMPL
