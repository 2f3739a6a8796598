"""Evaluation protocols: how a window of tokens is scored against a quantized KV cache.

* :class:`FakeQuant` — teacher-forced, one forward per window; every key/value a query attends
  to is the stored (quantized) one. The standard for perplexity tables (KVQuant).
* :class:`Prefill` — QAQ's setting: a prefix is prefilled in full precision, its cache is then
  quantized as a whole (with attention from that prefill for attention-aware bits; the only
  protocol where ``granularity=token`` is possible), and the continuation is scored against it.
* :class:`Decode` — token by token through the cache, as in generation (slow; for checks).

With attention-aware bits, :class:`FakeQuant` and :class:`Decode` first run a full-precision
pass over the window to collect attention statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from kvq.alloc.base import BitPlan
from kvq.attention import ATTN_IMPL, clear_mixed
from kvq.cache import CacheKnobs, KVQuantSpec, QuantizedCache
from kvq.granularity import Granularity
from kvq.memory import measured

__all__ = ["Decode", "FakeQuant", "KVSetup", "Prefill", "Protocol", "WindowResult", "rope_of"]


def rope_of(model: torch.nn.Module) -> Any:
    """``rope(x, start) -> (cos, sin)`` from a transformers model's rotary embedding.

    Returns ``None`` when the model has no ``model.rotary_emb`` (no pre-RoPE quantization then).
    """
    emb = getattr(getattr(model, "model", None), "rotary_emb", None)
    if emb is None:
        return None

    def rope(x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start, start + x.shape[-2], device=x.device).unsqueeze(0).expand(x.shape[0], -1)
        cos, sin = emb(x, pos)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    return rope


@dataclass
class KVSetup:
    """Everything needed to build a cache for one window (a :class:`kvq.method.CacheSetup`).

    Args:
        method: the method (:class:`kvq.method.Method`: a quantizer or a peer cache), or a ready
            :class:`~kvq.cache.KVQuantSpec` (its quantizers, unit and knobs are then used).
        allocator: ``FixedBits``, ``AttentionAwareBits``, ... (the ``bits`` node).
        n_layers: model layers.
        model_config: the model's ``PretrainedConfig`` (peer caches need it).
        rope: the model's rotary embedding as ``rope(x, start) -> (cos, sin)`` (``pre_rope``);
            see :func:`rope_of`.
        granularity: the quantization unit for a quantizer ``method``.
        knobs: the cache knobs (:meth:`kvq.cache.CacheKnobs.knobs`) for a quantizer ``method``.
    """

    method: Any
    allocator: Any
    n_layers: int
    model_config: Any = None
    rope: Any = None
    granularity: Granularity | str = "layer"
    knobs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.method, CacheKnobs):  # a ready spec: its unit and knobs define the setup
            self.granularity, self.knobs = self.method.unit, self.method.knobs()
        self.granularity = Granularity.of(self.granularity)

    @property
    def needs_attention(self) -> bool:
        return bool(getattr(self.allocator, "needs_attention", False))

    @property
    def needs_mixing(self) -> bool:
        """A one-pass forward must mix quantized and full-precision K/V per query (a residual
        window or incomplete per-channel key groups; see :mod:`kvq.attention`)."""
        return bool(self.method.one_pass_quantized) and (
            self.knobs.get("residual", 0) > 0 or self.knobs.get("key_axis", "token") == "channel"
        )

    def cache(self, plan: BitPlan | None = None, deferred: bool = False) -> Any:
        """A fresh cache for one window: the method builds it (:meth:`kvq.method.Method.build_cache`)."""
        return self.method.build_cache(self, plan, deferred)

    def quantized_cache(
        self, quantizer: Any, plan: BitPlan | None = None, deferred: bool = False
    ) -> QuantizedCache:
        """kvq's :class:`~kvq.cache.QuantizedCache` with ``quantizer`` for keys and values."""
        spec = KVQuantSpec(quantizer, granularity=self.granularity, **self.knobs)
        return self.cache_of_spec(spec, plan, deferred)

    def cache_of_spec(
        self, spec: KVQuantSpec, plan: BitPlan | None = None, deferred: bool = False
    ) -> QuantizedCache:
        """kvq's :class:`~kvq.cache.QuantizedCache` for a ready ``spec``."""
        cache = QuantizedCache(spec, self.n_layers, plan if plan is not None else self.allocator, deferred)
        if spec.pre_rope:
            if self.rope is None:
                raise ValueError("kv.pre_rope=true needs the model's rotary embedding (KVSetup.rope)")
            cache.set_rope(self.rope)
        cache.enable_mixing()
        return cache

    def check_model(self, model: torch.nn.Module) -> None:
        """One-line error if the model cannot reproduce streaming in a one-pass forward."""
        if self.needs_mixing:
            impl = getattr(model.config, "_attn_implementation", None)
            if impl != ATTN_IMPL:
                raise ValueError(
                    f"a residual window or per-channel key groups need the '{ATTN_IMPL}' attention "
                    f"implementation (the model uses '{impl}'): load it with kvq.attention.register()"
                )

    def plan_from_pass(self, model: torch.nn.Module, ids: torch.Tensor, **kw: Any) -> tuple[BitPlan, Any]:
        """Run ``model(ids, **kw)`` while collecting attention statistics; returns ``(plan, output)``."""
        col = self.allocator.collector()
        with col.collect():
            out = model(ids, **kw)
        return self.allocator.plan(col.layers, self.granularity, ids.shape[1]), out


@dataclass
class WindowResult:
    """One window's score and cache footprint.

    Attributes:
        nll: summed negative log-likelihood (nats) of the scored tokens.
        tokens: number of scored tokens.
        kv_bytes: bytes the cache stored.
        kv_elements: K/V elements the cache represented.
        bits: mean code width per layer, ``{"key": [...], "value": [...]}``.
    """

    nll: float
    tokens: int
    kv_bytes: int
    kv_elements: int
    bits: dict[str, list[float]] = field(default_factory=dict)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed cross-entropy of ``logits [B, t, V]`` against ``targets [B, t]``."""
    logits = logits.detach()
    return float(
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum")
    )


def _result(nll: float, tokens: int, cache: Any) -> WindowResult:
    m = measured(cache)
    return WindowResult(nll, tokens, m.bytes, m.elements, cache.mean_bits_per_layer())


@dataclass
class Protocol:
    """Base class of the ``eval`` config nodes."""

    def score(self, model: torch.nn.Module, ids: torch.Tensor, kv: KVSetup) -> WindowResult:
        """Score one window ``ids [B, T]``."""
        raise NotImplementedError

    @property
    def quantizes_whole_cache(self) -> bool:
        """Whether the cache is quantized at once after a prefill (``granularity=token`` works)."""
        return False

    def prefix_tokens(self, seq_len: int) -> int | None:
        """Tokens prefilled before the whole cache is quantized (``None``: not such a protocol)."""
        return None

    def cached_tokens(self, seq_len: int) -> int:
        """Most tokens the cache holds when it quantizes, in a window of ``seq_len``."""
        return seq_len


@dataclass
class FakeQuant(Protocol):
    """Teacher-forced perplexity, one forward per window, all K/V quantized."""

    def score(self, model: torch.nn.Module, ids: torch.Tensor, kv: KVSetup) -> WindowResult:
        kv.check_model(model)
        plan = kv.plan_from_pass(model, ids)[0] if kv.needs_attention else None
        cache = kv.cache(plan)
        clear_mixed()
        logits = model(ids, cache=cache, use_cache=True).logits
        return _result(_nll(logits[:, :-1], ids[:, 1:]), ids[:, 1:].numel(), cache)


@dataclass
class Prefill(Protocol):
    """Prefill a prefix, quantize its cache, score the continuation against it.

    The continuation's own K/V stay in full precision while it is scored (they are the
    not-yet-committed residual), as in transformers' ``QuantizedCache``; the first continuation
    token, predicted by the full-precision prefill, is not scored.

    Args:
        prefix_len: prefix tokens; ``None`` = half the window.
    """

    prefix_len: int | None = None

    def __post_init__(self) -> None:
        if self.prefix_len is not None and self.prefix_len < 1:
            raise ValueError(f"eval.prefix_len must be a positive integer or null, got {self.prefix_len}")

    @property
    def quantizes_whole_cache(self) -> bool:
        return True

    def prefix_tokens(self, seq_len: int) -> int:
        return seq_len // 2 if self.prefix_len is None else self.prefix_len

    def cached_tokens(self, seq_len: int) -> int:
        return self.prefix_tokens(seq_len)

    def split(self, T: int) -> int:
        P = self.prefix_tokens(T)
        if not 1 <= P <= T - 2:
            raise ValueError(
                f"eval.prefix_len={P} leaves nothing to score in a window of {T}: lower it or raise data.seq_len"
            )
        return P

    def score(self, model: torch.nn.Module, ids: torch.Tensor, kv: KVSetup) -> WindowResult:
        P = self.split(ids.shape[1])
        cache = kv.cache(deferred=True)
        if kv.needs_attention:
            plan, _ = kv.plan_from_pass(model, ids[:, :P], cache=cache, use_cache=True)
        else:
            model(ids[:, :P], cache=cache, use_cache=True)
            plan = None
        cache.quantize_now(plan)
        m = measured(cache)
        bits = cache.mean_bits_per_layer()
        logits = model(ids[:, P:], cache=cache, use_cache=True).logits
        nll = _nll(logits[:, :-1], ids[:, P + 1 :])
        return WindowResult(nll, ids[:, P + 1 :].numel(), m.bytes, m.elements, bits)


@dataclass
class Decode(Protocol):
    """Token-by-token scoring through the cache, as in generation."""

    def cached_tokens(self, seq_len: int) -> int:
        return seq_len - 1  # the last token is never fed

    def score(self, model: torch.nn.Module, ids: torch.Tensor, kv: KVSetup) -> WindowResult:
        plan = kv.plan_from_pass(model, ids)[0] if kv.needs_attention else None
        cache = kv.cache(plan)
        nll = 0.0
        for t in range(ids.shape[1] - 1):
            logits = model(ids[:, t : t + 1], cache=cache, use_cache=True).logits
            nll += _nll(logits[:, -1:], ids[:, t + 1 : t + 2])
        return _result(nll, ids[:, 1:].numel(), cache)
