"""Attention-aware bit allocation after QAQ (Dong et al., arXiv 2403.04643).

For a unit with value range ``r`` (``2 max|x|`` for symmetric quantizers, ``max - min``
otherwise, outliers excluded) and a tolerated per-element error ``e``, QAQ's uniform error model
gives ``n = ceil(log2(r / (2 e) + 1))`` bits, clamped to ``[n_min, n_max]``, with

* keys:   ``e = sqrt(12 / q_norm * ln(T**3 / (T - 1) * eps**2 + 1))`` where ``q_norm`` is a high
  percentile of the squared norm of the (softmax-scaled) queries of the head;
* values: ``e = sqrt(12 / T) * eps / a`` where ``a`` is the largest attention the unit received
  over the last ``last_n`` query rows;
* the newest ``last_n - 1`` tokens have too little attention history and get ``n_max``.

Attention statistics are reduced layer by layer while the full-precision pass runs
(:class:`AttentionStatsCollector`): only the last ``last_n`` query rows of attention are ever
formed, and only ``[B, H_kv, T]`` maxima plus ``[B, H_kv]`` query norms are kept per layer.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from kvq import attention
from kvq.alloc.base import Kind
from kvq.granularity import Granularity
from kvq.quant.base import Quantizer, check_bits

__all__ = [
    "WHOLE_WINDOW_NOTE",
    "AttentionAwareBits",
    "AttentionStats",
    "AttentionStatsCollector",
    "bridge_bits",
    "qaq_bits",
    "qaq_key_error",
    "qaq_value_error",
]


def qaq_key_error(q_norm: torch.Tensor, T: int, eps: float) -> torch.Tensor:
    """Tolerated key error ``sqrt(12 / q_norm * ln(T^3 / (T - 1) * eps^2 + 1))``."""
    T = max(int(T), 2)
    return torch.sqrt(12.0 / q_norm.double().clamp_min(1e-30) * math.log(T**3 / (T - 1) * eps**2 + 1.0))


def qaq_value_error(max_attn: torch.Tensor, T: int, eps: float) -> torch.Tensor:
    """Tolerated value error ``sqrt(12 / T) * eps / a``."""
    return math.sqrt(12.0 / max(int(T), 1)) * eps / max_attn.double().clamp_min(1e-30)


def qaq_bits(unit_range: torch.Tensor, err: torch.Tensor, n_min: int, n_max: int) -> torch.Tensor:
    """``ceil(log2(range / (2 e) + 1))`` clamped to ``[n_min, n_max]``; ``e = 0`` gives ``n_max``.

    Args:
        unit_range: ``[N]`` value range of each unit.
        err: ``[N]`` tolerated error of each unit.
    """
    r = unit_range.double()
    e = err.double()
    n = torch.ceil(torch.log2(r / (2 * e.clamp_min(1e-300)) + 1.0))
    n = torch.where(e <= 0, torch.full_like(n, n_max), n)
    return n.clamp(n_min, n_max).to(torch.int64)


@dataclass
class AttentionStats:
    """One layer's reduced attention statistics.

    Attributes:
        max_attn: ``[B, H_kv, T]`` largest attention each key position received over the last
            ``last_n`` query rows (query heads folded onto their KV head with a max).
        q_norm: ``[B, H_kv]`` percentile of the squared scaled-query norm (folded with a max).
    """

    max_attn: torch.Tensor
    q_norm: torch.Tensor


@dataclass
class AttentionStatsCollector:
    """Collects :class:`AttentionStats` per layer during a full-precision forward.

    Use :meth:`collect` around ``model(...)``; the model must use the ``kvq`` attention
    implementation (:mod:`kvq.attention`), which computes the normal SDPA output and, on the
    side, the last ``last_n`` rows of attention.
    """

    last_n: int = 5
    q_quantile: float = 0.99
    layers: dict[int, AttentionStats] = field(default_factory=dict)

    def collect(self) -> contextlib.AbstractContextManager[AttentionStatsCollector]:
        """Collect while the block runs: ``with col.collect(): model(ids)``."""
        return attention.collecting(self)

    def add(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        scaling: float,
        attention_mask: torch.Tensor | None = None,
        softcap: float | None = None,
    ) -> None:
        """Reduce one layer's attention, as the model computes it.

        Args:
            query: ``[B, H, Tq, d]`` queries after RoPE (the last ``Tq`` of ``Tk`` positions).
            key: ``[B, H_kv, Tk, d]`` all keys the queries attend to (after RoPE).
            scaling: the softmax scale of the attention scores.
            attention_mask: the model's mask (bool or additive, ``[B or 1, 1, Tq, >= Tk]``):
                padding and sliding windows are honoured; ``None`` = causal.
            softcap: the model's logit softcap (Gemma 2), applied before the softmax.
        """
        B, H, Tq, _ = query.shape
        H_kv, Tk = key.shape[1], key.shape[2]
        rep = H // H_kv
        q = query.float() * scaling
        n = min(self.last_n, Tq)
        rows = q[:, :, Tq - n :, :].reshape(B, H_kv, rep, n, -1)  # [B, H_kv, rep, n, d]
        scores = rows @ key.float().unsqueeze(2).transpose(-1, -2)  # [B, H_kv, rep, n, Tk]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is None:
            q_pos = torch.arange(Tk - n, Tk, device=q.device).unsqueeze(-1)
            allowed = (torch.arange(Tk, device=q.device) <= q_pos).view(1, 1, 1, n, Tk)
            scores = scores.masked_fill(~allowed, -math.inf)
            valid_q = None
        else:
            m = attention_mask[..., attention_mask.shape[-1] - Tk :]
            m_rows = m[..., Tq - n :, :] if m.shape[-2] == Tq else m
            if m.dtype == torch.bool:
                scores = scores.masked_fill(~m_rows.unsqueeze(2), -math.inf)
                live = m.any(dim=-1) if m.shape[-2] == Tq else None  # [B or 1, 1, Tq]
            else:
                scores = scores + m_rows.unsqueeze(2).float()
                live = torch.isfinite(m.amax(dim=-1)) if m.shape[-2] == Tq else None
            valid_q = None if live is None else live.expand(B, 1, Tq)
        top = scores.amax(dim=-1, keepdim=True)
        attn = torch.where(torch.isfinite(top), scores.softmax(dim=-1), 0.0)  # pad query rows: 0
        max_attn = attn.amax(dim=(2, 3))  # [B, H_kv, Tk]: over the rows and the group's heads
        qn2 = (q**2).sum(-1)  # [B, H, Tq]
        if valid_q is not None:  # pad query rows do not define the query norm
            qn2 = qn2.masked_fill(~valid_q.to(qn2.device), math.nan)
            qn = torch.nanquantile(qn2, self.q_quantile, dim=-1)
        else:
            qn = torch.quantile(qn2, self.q_quantile, dim=-1)  # [B, H]
        q_norm = qn.view(B, H_kv, rep).amax(dim=2)
        self.layers[layer_idx] = AttentionStats(max_attn=max_attn.cpu(), q_norm=q_norm.cpu())


#: what a one-pass (fakequant/decode) run with attention-aware bits records about its allocation
WHOLE_WINDOW_NOTE = (
    "bits=attn with a one-pass protocol: the widths come from a full-precision pass over the whole window "
    "(QAQ's prefill statistics), so a token's width depends on the attention of the window's last "
    "bits.last_n queries, which come after it; the K/V each query sees are streaming-exact, their widths "
    "are not (eval=prefill plans from the prefix alone)"
)


def register_stats_attention() -> str:
    """Register the ``kvq`` attention implementation (SDPA + statistics); returns its name."""
    return attention.register()


@dataclass
class AttentionAwareBits:
    """QAQ's attention-aware allocation (a ``bits`` config node).

    Args:
        target_error: QAQ's ``eps`` for keys and values.
        key_target_error: overrides ``target_error`` for keys.
        value_target_error: overrides ``target_error`` for values.
        last_n: query rows whose attention defines a value's importance.
        n_min: fewest bits a unit gets.
        n_max: most bits a unit gets (also the newest ``last_n - 1`` tokens).
        q_quantile: percentile of the squared query norm used as ``q_norm``.
        bridge: instead of QAQ's uniform-only formula, ask the quantizer for its own error at
            each width (:meth:`kvq.quant.Quantizer.unit_rms_error`: analytic for uniform,
            measured for normal and adaptive, per group) and give each unit the fewest bits
            whose RMS error meets QAQ's tolerance expressed as an RMS (``e / sqrt(3)``, the RMS
            of a uniform error in ``[-e, e]``). For the uniform method without grouping this is
            QAQ's formula; it makes ``bits=attn`` meaningful for every method.
        fixed_key_bits: fixed width for keys (attention-aware bits for values only); needed with
            per-channel key groups (``kv.key_axis=channel``), which have no per-token key unit.
    """

    target_error: float = 0.002
    key_target_error: float | None = None
    value_target_error: float | None = None
    last_n: int = 5
    n_min: int = 2
    n_max: int = 8
    q_quantile: float = 0.99
    bridge: bool = False
    fixed_key_bits: int | None = None
    #: the per-window statistics shared across a grid (:mod:`kvq.alloc.stats_store`; not a config field)
    stats_store: Any = field(default=None, init=False, repr=False, compare=False)

    needs_attention = True

    @property
    def per_token_keys(self) -> bool:
        """Keys get per-token widths unless ``fixed_key_bits`` fixes them."""
        return self.fixed_key_bits is None

    def __post_init__(self) -> None:
        check_bits(self.n_min, "bits.n_min")
        check_bits(self.n_max, "bits.n_max")
        if self.n_min > self.n_max:
            raise ValueError(f"bits.n_min ({self.n_min}) must be <= bits.n_max ({self.n_max})")
        for name in ("target_error", "key_target_error", "value_target_error"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ValueError(f"bits.{name} must be a positive number, got {v!r}")
        if self.last_n < 1:
            raise ValueError(f"bits.last_n must be >= 1, got {self.last_n}")
        if not 0.0 < self.q_quantile <= 1.0:
            raise ValueError(f"bits.q_quantile must be in (0, 1], got {self.q_quantile}")
        if self.fixed_key_bits is not None:
            check_bits(self.fixed_key_bits, "bits.fixed_key_bits")

    def eps(self, kind: Kind) -> float:
        v = self.key_target_error if kind == "key" else self.value_target_error
        return self.target_error if v is None else v

    def max_bits(self) -> int:
        return self.n_max

    def collector(self) -> AttentionStatsCollector:
        return AttentionStatsCollector(last_n=self.last_n, q_quantile=self.q_quantile)

    def plan(self, stats: dict[int, AttentionStats], granularity: Granularity | str, seq_len: int) -> QAQPlan:
        """Tolerated errors per unit from collected statistics.

        Args:
            stats: per-layer statistics of a full-precision pass over ``seq_len`` tokens.
            granularity: ``head`` (``[B, H_kv, T]`` units), ``layer`` (``[B, T]``) or ``token``
                (``[B, T]`` shared by all layers; reductions also take the max over layers).
        """
        unit = Granularity.of(granularity)
        T = seq_len
        key_err: dict[int, torch.Tensor] = {}
        val_err: dict[int, torch.Tensor] = {}
        for li, s in stats.items():
            B, H, Tk = s.max_attn.shape
            ke = qaq_key_error(s.q_norm, T, self.eps("key"))  # [B, H]
            ve = qaq_value_error(s.max_attn, T, self.eps("value"))  # [B, H, T]
            if unit.per_head:
                key_err[li] = ke.unsqueeze(-1).expand(B, H, Tk).clone()
                val_err[li] = ve
            else:  # one unit spans the heads: the strictest head decides
                key_err[li] = ke.amin(dim=1, keepdim=True).expand(B, Tk).clone()
                val_err[li] = ve.amin(dim=1)
        if unit.spans_layers:
            k = torch.stack(list(key_err.values())).amin(dim=0)
            v = torch.stack(list(val_err.values())).amin(dim=0)
            key_err, val_err = {-1: k}, {-1: v}
        newest = max(self.last_n - 1, 0)
        for d in (key_err, val_err):
            for t in d.values():
                if newest:
                    t[..., max(t.shape[-1] - newest, 0) :] = 0.0  # -> n_max
        return QAQPlan(self, key_err, val_err)


@dataclass
class QAQPlan:
    """A :class:`~kvq.alloc.base.BitPlan` from tolerated errors per unit position.

    Attributes:
        alloc: the allocator (clamps, targets).
        key_err: per layer, ``[B, H_kv, T]`` (head) or ``[B, T]`` (layer/token, layer ``-1``).
        value_err: same for values.
    """

    alloc: AttentionAwareBits
    key_err: dict[int, torch.Tensor]
    value_err: dict[int, torch.Tensor]

    def unit_bits(
        self, layer_idx: int, kind: Kind, units: torch.Tensor, start: int, quantizer: Quantizer
    ) -> int | torch.Tensor:
        if kind == "key" and self.alloc.fixed_key_bits is not None:
            return self.alloc.fixed_key_bits
        table = (self.key_err if kind == "key" else self.value_err).get(layer_idx)
        N = units.shape[0]
        if table is None:
            return torch.full((N,), self.alloc.n_max, dtype=torch.int64)
        T = table.shape[-1]
        lead = table.shape[:-1].numel()
        t = N // lead
        err = torch.zeros(*table.shape[:-1], t, dtype=torch.float64)  # positions past the plan: n_max
        stop = min(start + t, T)
        if stop > start:
            err[..., : stop - start] = table[..., start:stop]
        err = err.reshape(-1)
        if self.alloc.bridge:
            return bridge_bits(quantizer, units, err.to(units.device), self.alloc.n_min, self.alloc.n_max)
        rng = quantizer.unit_range(units)
        return qaq_bits(rng.cpu(), err, self.alloc.n_min, self.alloc.n_max).to(units.device)


def bridge_bits(
    quantizer: Quantizer, units: torch.Tensor, err: torch.Tensor, n_min: int, n_max: int
) -> torch.Tensor:
    """The fewest bits in ``[n_min, n_max]`` whose RMS error meets ``err / sqrt(3)`` per unit.

    Args:
        quantizer: supplies its own error per width (:meth:`~kvq.quant.Quantizer.unit_rms_error`).
        units: ``[N, D]``.
        err: ``[N]`` tolerated error (QAQ's ``e``; 0 = ``n_max``).

    Returns:
        int64 ``[N]``.
    """
    target = err.double() / math.sqrt(3.0)
    bits = torch.full(err.shape, n_max, dtype=torch.int64, device=units.device)
    todo = target > 0
    for b in range(n_min, n_max):
        if not todo.any():
            break
        rows = todo.nonzero().squeeze(1)
        ok = quantizer.unit_rms_error(units.index_select(0, rows), b).double() <= target[rows]
        bits[rows[ok]] = b
        todo[rows[ok]] = False
    return bits
