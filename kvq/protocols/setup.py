"""What a protocol needs to build a cache for one window: :class:`KVSetup` (a
:class:`kvq.method.CacheSetup`) and the model's rotary embedding (:func:`rope_of`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kvq.alloc.base import BitPlan
from kvq.attention import ATTN_IMPL
from kvq.cache import CacheKnobs, KVQuantSpec, QuantizedCache
from kvq.granularity import Granularity

__all__ = ["KVSetup", "rope_of"]


def rope_of(model: torch.nn.Module) -> Any:
    """``rope(x, start, shift=None) -> (cos, sin)`` from a transformers model's rotary embedding.

    ``x`` is ``[B, H, t, d]`` at cache positions ``start..start+t-1``; ``shift`` (``[B]``) is each
    row's left padding: transformers numbers a left-padded row's real tokens from 0, so their
    rotary positions are the cache positions minus the padding. Returns ``None`` when the model
    has no ``model.rotary_emb`` (no pre-RoPE quantization then).
    """
    emb = getattr(getattr(model, "model", None), "rotary_emb", None)
    if emb is None:
        return None

    def rope(
        x: torch.Tensor, start: int, shift: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start, start + x.shape[-2], device=x.device).unsqueeze(0).expand(x.shape[0], -1)
        if shift is not None and shift.numel() == x.shape[0]:
            pos = (pos - shift.to(x.device).view(-1, 1)).clamp_min(0)
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
        rotation: the transform applied around the quantizer (:attr:`kvq.cache.KVQuantSpec.rotation`).
    """

    method: Any
    allocator: Any
    n_layers: int
    model_config: Any = None
    rope: Any = None
    granularity: Granularity | str = "layer"
    knobs: dict[str, Any] = field(default_factory=dict)
    rotation: Any = None

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
        spec = KVQuantSpec(quantizer, granularity=self.granularity, rotation=self.rotation, **self.knobs)
        return self.cache_of_spec(spec, plan, deferred)

    def cache_of_spec(
        self, spec: KVQuantSpec, plan: BitPlan | None = None, deferred: bool = False
    ) -> QuantizedCache:
        """kvq's :class:`~kvq.cache.QuantizedCache` for a ready ``spec``."""
        cache = QuantizedCache(
            spec,
            self.n_layers,
            plan if plan is not None else self.allocator,
            deferred,
            config=self.model_config,
        )
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

    def prefilled(self, model: torch.nn.Module, prefix: torch.Tensor) -> Any:
        """A deferred cache filled by one forward of ``prefix`` ``[B, P]`` and then quantized as a
        whole (with the attention-aware plan of that forward when the allocator needs one)."""
        cache = self.cache(deferred=True)
        if self.needs_attention:
            plan, _ = self.plan_from_pass(model, prefix, cache=cache, use_cache=True)
        else:
            model(prefix, cache=cache, use_cache=True)
            plan = None
        cache.quantize_now(plan)
        return cache

    def plan_from_pass(self, model: torch.nn.Module, ids: torch.Tensor, **kw: Any) -> tuple[BitPlan, Any]:
        """Run ``model(ids, **kw)`` while collecting attention statistics; returns ``(plan, output)``.

        With the allocator's shared store (:mod:`kvq.alloc.stats_store`), a pass whose only product
        is the statistics (no ``kw``: no cache to fill) is read from the store when another
        configuration already ran it on the same tokens; the output is then ``None``.
        """
        col = self.allocator.collector()
        store = getattr(self.allocator, "stats_store", None)
        if not kw and store is not None and store.load(ids, col):
            return self.allocator.plan(col.layers, self.granularity, ids.shape[1]), None
        with col.collect():
            out = model(ids, **kw)
        if store is not None:
            store.save(ids, col)
        return self.allocator.plan(col.layers, self.granularity, ids.shape[1]), out
