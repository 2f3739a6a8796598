"""The ``kvq`` attention implementation, registered with transformers' ``AttentionInterface``.

It is SDPA, plus what kvq needs that no stock implementation does:

* attention statistics for QAQ's allocation (:class:`kvq.alloc.qaq.AttentionStatsCollector`),
  reduced layer by layer while a full-precision pass runs (only the last ``last_n`` query rows
  are ever formed), honouring the model's mask (padding, sliding windows);
* streaming-exact one-pass evaluation: when a :class:`~kvq.cache.QuantizedLayer` keeps a
  residual window or quantizes keys per channel in token groups, what query ``t`` sees depends
  on ``t`` (keys of groups not yet complete at ``t`` are still in full precision). The layer
  leaves the full-precision K/V and a ``[Tq, Tk]`` mask; scores and values are then mixed per
  query: ``where(mask, q·Kq, q·K)`` and ``(P·mask) Vq + (P·~mask) V``. No query ever sees a key
  quantized with statistics of tokens after it;
* logit softcapping (Gemma 2), which SDPA lacks.

Mixing and softcapping run :func:`blockwise_attention`: one block of queries at a time, so
peak memory grows linearly in the context (scores of one block stay under
:data:`BLOCK_BYTES`) instead of materialising ``[B, H, T, T]``. Query rows that may attend to no
key (left-pad positions) give zeros on every path.

The attention owns the state of the forward in flight, behind small functions: the statistics
collector slot (:func:`collecting`, :func:`active_collector`) and the mixing registry the cache
layers write into (:func:`leave_mixed`, :func:`take_mixed`, :func:`clear_mixed`).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = [
    "ATTN_IMPL",
    "BLOCK_BYTES",
    "blockwise_attention",
    "mixed_attention",
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

    def add(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        scaling: float,
        attention_mask: torch.Tensor | None = None,
        softcap: float | None = None,
    ) -> None:
        """Reduce one layer's attention: ``query [B, H, Tq, d]``, ``key [B, H_kv, Tk, d]``, the
        model's mask and logit softcap as the attention call got them."""
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


#: scores of one query block stay under this many bytes (peak memory is linear in the context)
BLOCK_BYTES = 64 * 2**20


def _key_range(Tq: int, Tk: int, q0: int, q1: int, window: int | None) -> tuple[int, int]:
    """Keys a causal (optionally sliding) query block ``[q0, q1)`` can see (the queries are the
    last ``Tq`` of ``Tk`` positions): ``[k_lo, k_hi)``."""
    k_hi = Tk - Tq + q1
    k_lo = 0 if window is None else max(0, Tk - Tq + q0 - window + 1)
    return k_lo, k_hi


def _block_mask(
    attention_mask: torch.Tensor | None,
    Tq: int,
    Tk: int,
    q0: int,
    q1: int,
    k_lo: int,
    k_hi: int,
    window: int | None,
    device: torch.device,
) -> torch.Tensor:
    """The block's mask as additive float or bool ``[B or 1, 1, q1 - q0, k_hi - k_lo]``."""
    if attention_mask is not None:
        off = attention_mask.shape[-1] - Tk  # the mask's last Tk columns are these keys
        rows = attention_mask[..., q0:q1, :] if attention_mask.shape[-2] == Tq else attention_mask
        return rows[..., off + k_lo : off + k_hi]
    q = torch.arange(Tk - Tq + q0, Tk - Tq + q1, device=device).unsqueeze(1)
    k = torch.arange(k_lo, k_hi, device=device).unsqueeze(0)
    ok = k <= q
    if window is not None:
        ok &= k > q - window
    return ok.view(1, 1, q1 - q0, k_hi - k_lo)


def blockwise_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    window: int | None = None,
    mixed: MixedKV | None = None,
) -> torch.Tensor:
    """Causal attention computed one query block at a time, so peak memory grows linearly in the
    context; logit softcapping (Gemma 2) and streaming-exact mixing on every path.

    With ``mixed``, query ``t`` sees key/value ``j`` quantized iff ``mixed.quantized[t, j]`` and
    in full precision otherwise: scores ``where(M, q·Kq, q·K)``, output ``(P·M) Vq + (P·~M) V``.
    A query row that may attend to no key at all (a left-pad position) gets zeros, not NaN.

    Args:
        query: ``[B, Hq, Tq, d]``; the queries are the last ``Tq`` positions.
        key, value: ``[B, Hkv, Tk, d]`` as the cache returned them (quantized where stored so).
        attention_mask: the model's mask (bool, True = attend, or additive float,
            ``[B or 1, 1, Tq, >= Tk]``), or ``None`` (causal, within ``window`` if given).
        scaling: softmax scale.
        softcap: ``cap * tanh(scores / cap)`` before masking (``None`` = none).
        window: sliding window of the layer (only needed without a mask; ``None`` = full).
        mixed: the full-precision K/V and the per-query quantized mask of a streaming-exact
            one-pass forward (:class:`MixedKV`), or ``None``.

    Returns:
        ``[B, Tq, Hq, d]``.
    """
    B, Hq, Tq, d = query.shape
    Hkv, Tk = key.shape[1], key.shape[2]
    if (
        softcap is None
        and mixed is not None
        and (attention_mask is None or attention_mask.dtype == torch.bool)
    ):
        return _mixed_sdpa(query, key, value, attention_mask, scaling, window, mixed)
    rep = Hq // Hkv
    q = query.view(B, Hkv, rep, Tq, d)  # query heads grouped onto their KV head: no key copies
    kq, vq = key.unsqueeze(2), value.unsqueeze(2)
    kf = vf = M = None
    if mixed is not None:
        kf, vf = mixed.keys.unsqueeze(2), mixed.values.unsqueeze(2)
        M = mixed.quantized.to(query.device)
    per_row = B * Hq * Tk * 4 * (3 if mixed is not None else 2)
    step = max(1, min(Tq, BLOCK_BYTES // max(per_row, 1)))
    out = query.new_empty(B, Hkv, rep, Tq, d)
    for q0 in range(0, Tq, step):
        q1 = min(Tq, q0 + step)
        k_lo, k_hi = _key_range(Tq, Tk, q0, q1, window if attention_mask is None else None)
        qb = q[:, :, :, q0:q1]
        s = qb @ kq[..., k_lo:k_hi, :].transpose(-1, -2)
        if M is not None:
            mb = M[q0:q1, k_lo:k_hi]
            s = torch.where(mb, s, qb @ kf[..., k_lo:k_hi, :].transpose(-1, -2))
        s = s.float() * scaling  # [B, Hkv, rep, nq, nk]
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        mask = _block_mask(attention_mask, Tq, Tk, q0, q1, k_lo, k_hi, window, query.device)
        mask = mask.unsqueeze(2)  # [B or 1, 1, 1, nq, nk]
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask.float()
        live = torch.isfinite(s.amax(dim=-1, keepdim=True))  # rows with at least one key
        p = torch.where(live, s.softmax(dim=-1), 0.0).to(query.dtype)
        if M is None:
            ob = p @ vq[..., k_lo:k_hi, :]
        else:
            pm = p * mb.to(p.dtype)
            ob = pm @ vq[..., k_lo:k_hi, :] + (p - pm) @ vf[..., k_lo:k_hi, :]
        out[:, :, :, q0:q1] = ob
    return out.view(B, Hq, Tq, d).transpose(1, 2).contiguous()


#: queries per SDPA call of the mixed path (its extra keys are the block's mixed columns)
SDPA_BLOCK = 256


def _mixed_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    window: int | None,
    mixed: MixedKV,
) -> torch.Tensor:
    """Streaming-exact mixing with SDPA, one query block at a time (``[B, Tq, Hq, d]``).

    In a block, a key column every query sees quantized (or every query sees in full precision)
    enters once, in that form; only the block's *mixed* columns (seen quantized by some of its
    queries: the newest complete key group, the residual edge) enter twice, quantized and full
    precision, each masked to the queries that see it so. SDPA does the rest: the cost is one
    attention over the keys plus the block's mixed columns, not two score matrices.
    """
    B, Hq, Tq, d = query.shape
    Tk = key.shape[2]
    M = mixed.quantized.to(query.device)
    out = query.new_empty(B, Hq, Tq, d)
    for q0 in range(0, Tq, SDPA_BLOCK):
        q1 = min(Tq, q0 + SDPA_BLOCK)
        k_lo, k_hi = _key_range(Tq, Tk, q0, q1, window if attention_mask is None else None)
        mb = M[q0:q1, k_lo:k_hi]  # [nq, nk]: True = this query sees this key quantized
        any_q = mb.any(dim=0)
        mixed_cols = any_q & ~mb.all(dim=0)
        from_q = any_q.view(1, 1, -1, 1)  # the quantized copy (all-quantized and mixed columns)
        ks = torch.where(from_q, key[..., k_lo:k_hi, :], mixed.keys[..., k_lo:k_hi, :])
        vs = torch.where(from_q, value[..., k_lo:k_hi, :], mixed.values[..., k_lo:k_hi, :])
        base = _block_mask(attention_mask, Tq, Tk, q0, q1, k_lo, k_hi, window, query.device)
        mask = base & (~mixed_cols | mb)
        band = mixed_cols.nonzero().squeeze(1)
        if band.numel():  # the mixed columns again, in full precision, for the queries that see them so
            ks = torch.cat([ks, mixed.keys[..., k_lo:k_hi, :].index_select(2, band)], dim=2)
            vs = torch.cat([vs, mixed.values[..., k_lo:k_hi, :].index_select(2, band)], dim=2)
            mask = torch.cat([mask, base[..., band] & ~mb[:, band]], dim=-1)
        mask = mask.expand(B, 1, q1 - q0, mask.shape[-1])
        ob = torch.nn.functional.scaled_dot_product_attention(
            query[:, :, q0:q1], ks, vs, attn_mask=mask, scale=scaling, enable_gqa=ks.shape[1] != Hq
        )
        dead = ~mask.any(dim=-1, keepdim=True)  # a left-pad query row attends to nothing: zeros
        out[:, :, q0:q1] = ob.masked_fill(dead, 0.0) if bool(dead.any()) else ob
    return out.transpose(1, 2).contiguous()


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
    """Causal attention where query ``t`` sees key/value ``j`` quantized iff ``quantized[t, j]``
    (:func:`blockwise_attention` with mixing); ``[B, Tq, Hq, d]``."""
    mix = MixedKV(keys_fp, values_fp, quantized)
    return blockwise_attention(query, keys_q, values_q, attention_mask, scaling, mixed=mix)


def kvq_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA; plus QAQ statistics when collecting, plus streaming-exact mixing when a layer asks,
    plus logit softcapping (which SDPA lacks), block-wise when it cannot use SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    s = scaling if scaling is not None else query.shape[-1] ** -0.5
    if _STATE.collector is not None:
        _STATE.collector.add(module.layer_idx, query, key, s, attention_mask=attention_mask, softcap=softcap)
    mix = take_mixed(module.layer_idx)
    if mix is None and softcap is None:
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            dead = ~attention_mask[..., -key.shape[-2] :].any(dim=-1)  # [B or 1, 1, Tq]
            if bool(dead.any()):  # a left-pad query row attends to nothing: zeros, not NaN
                out = out.masked_fill(dead.transpose(1, 2).unsqueeze(-1), 0.0)
        return out, None
    out = blockwise_attention(
        query, key, value, attention_mask, s, softcap=softcap, window=sliding_window, mixed=mix
    )
    return out, None


def register() -> str:
    """Register ``kvq`` with transformers' attention and mask interfaces; returns its name."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(ATTN_IMPL, kvq_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPL, sdpa_mask)
    return ATTN_IMPL
