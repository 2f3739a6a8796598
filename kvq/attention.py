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

import math

import torch

__all__ = ["ATTN_IMPL", "kvq_attention", "register"]

ATTN_IMPL = "kvq"


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

    from kvq.alloc import qaq
    from kvq.cache import pop_mixed

    s = scaling if scaling is not None else query.shape[-1] ** -0.5
    if qaq._ACTIVE is not None:
        qaq._ACTIVE.add(module.layer_idx, query, key, s)
    mix = pop_mixed(module.layer_idx)
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
