"""``QuantizedCache``: a transformers ``Cache`` whose layers store bit-packed K/V.

Every key/value the attention sees is the stored (quantized) one — also in a one-pass forward
(``fakequant``), unlike transformers' own ``QuantizedCache``, which hands back the unquantized
prefill. One layer per model layer, full or sliding as the model's config says
(``config.layer_types``, as ``DynamicCache(config=...)`` builds them): a sliding layer holds at
most what transformers' ``DynamicSlidingWindowLayer`` holds. The quantization unit
(:class:`~kvq.granularity.Granularity`) is one token of a KV head or of a layer, or -- when the
whole cache is quantized at once (``deferred=True`` + :meth:`QuantizedCache.quantize_now`, the
``prefill`` protocol) -- one token across all layers.

What transformers' ``generate`` uses works on the quantized storage: greedy and sampled
decoding, batches with left padding (:func:`watch_padding` tells the cache the padding, so
sinks are each row's first real tokens), beam search (``reorder_cache``: codes are moved, never
re-quantized), ``batch_repeat_interleave`` / ``batch_select_indices``, and ``crop`` where it is
exact (:attr:`QuantizedCache.is_croppable`; assisted decoding refuses a cache that is not,
before decoding starts).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import Cache

from kvq.alloc.base import BitPlan, FixedBits, Kind
from kvq.cache.layers import CacheState, QuantizedLayer, QuantizedSlidingLayer, cat_tokens
from kvq.cache.spec import KVQuantSpec
from kvq.quant.base import QTensor

__all__ = ["QuantizedCache", "layer_types_of", "watch_padding"]

#: transformers' layer types a quantized layer stands in for
_FULL = ("full_attention",)
_SLIDING = ("sliding_attention", "chunked_attention", "hybrid_sliding", "reference_sliding_attention")


def layer_types_of(config: Any) -> tuple[list[str], list[int | None]]:
    """Per layer, transformers' layer type and sliding window, as ``DynamicCache(config)`` reads them."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types, kwargs = get_layer_types_and_kwargs(cfg)
    return list(types), [kw.get("sliding_window") for kw in kwargs]


class QuantizedCache(Cache):
    """A transformers ``Cache`` made of :class:`~kvq.cache.layers.QuantizedLayer` s.

    Works with ``model(..., cache=cache)`` and ``model.generate(..., cache=cache)``.

    Args:
        spec: quantization settings.
        n_layers: number of model layers (``config.num_hidden_layers``); with ``config`` it may
            be omitted.
        plan: bit widths per unit; default ``FixedBits(4)``.
        deferred: keep new tokens in full precision until :meth:`quantize_now` (prefill
            protocol; required for ``granularity="token"``).
        config: the model's config: sliding layers where it has them (``layer_types``).
    """

    def __init__(
        self,
        spec: KVQuantSpec,
        n_layers: int | None = None,
        plan: BitPlan | None = None,
        deferred: bool = False,
        *,
        config: Any = None,
    ):
        if spec.unit.spans_layers and not deferred:
            raise ValueError(
                "granularity=token spans all layers and needs the whole cache at once: use the prefill "
                "protocol (eval=prefill), or granularity=head/layer"
            )
        self.spec = spec
        self.plan = plan if plan is not None else FixedBits(4)
        self.state = CacheState()
        self.cross_layer_chunks: dict[Kind, list[QTensor]] = {"key": [], "value": []}
        if config is not None:
            types, windows = layer_types_of(config)
        elif n_layers is not None:
            types, windows = ["full_attention"] * n_layers, [None] * n_layers
        else:
            raise ValueError("QuantizedCache needs n_layers or the model's config")
        if n_layers is not None and len(types) != n_layers:
            raise ValueError(f"the config has {len(types)} layers, n_layers={n_layers}")
        layers: list[QuantizedLayer] = []
        for i, (kind, window) in enumerate(zip(types, windows)):
            if kind in _SLIDING and window is not None:
                layers.append(
                    QuantizedSlidingLayer(i, spec, self.plan, deferred, self.state, sliding_window=window)
                )
            elif kind in _FULL or kind in _SLIDING:
                layers.append(QuantizedLayer(i, spec, self.plan, deferred, self.state))
            else:
                raise ValueError(
                    f"layer {i} is a '{kind}' layer: kvq quantizes attention KV caches (full and sliding "
                    "attention layers) only"
                )
        if spec.unit.spans_layers and any(layer.is_sliding for layer in layers):
            raise ValueError(
                "granularity=token makes one unit of a token across all layers, but sliding layers drop "
                "old tokens: use granularity=head or layer on a model with sliding layers"
            )
        super().__init__(layers=layers)

    # -- settings -----------------------------------------------------------------------
    def set_rope(self, rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The model's rotary embedding as ``rope(x, start, shift) -> (cos, sin)`` (for ``pre_rope``)."""
        self.state.rope = rope

    def enable_mixing(self) -> None:
        """Reproduce streaming exactly in one-pass forwards (the ``kvq`` attention function mixes
        quantized and full-precision K/V per query; needed with a residual window or key groups)."""
        self.state.mixing = True

    def set_left_padding(self, left_pad: torch.Tensor | None) -> None:
        """Leading pad tokens per row (``[B]``), before the first update (see :func:`watch_padding`)."""
        self.state.left_pad = None if left_pad is None else left_pad.detach().to(torch.long).cpu()

    def set_plan(self, plan: BitPlan) -> None:
        """Use ``plan`` for every chunk stored from now on."""
        self.plan = plan
        for layer in self.layers:
            layer.plan = plan

    # -- what generate uses -------------------------------------------------------------
    @property
    def is_croppable(self) -> bool:
        """Whether ``crop`` restores exactly the state without the removed tokens."""
        return not any(self.cross_layer_chunks.values()) and all(layer.is_croppable for layer in self.layers)

    def _reindex_padding(self, index: torch.Tensor) -> None:
        if self.state.left_pad is not None:
            self.state.left_pad = self.state.left_pad.index_select(0, index.to(torch.long).cpu())

    def _batch_op_on_cross_layer(self, index: torch.Tensor) -> None:
        if any(self.cross_layer_chunks.values()):
            raise ValueError(
                "granularity=token chunks span every layer: batch operations (beam search) are not supported "
                "on them; use granularity=head or layer"
            )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch_op_on_cross_layer(beam_idx)
        super().reorder_cache(beam_idx)
        self._reindex_padding(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        B = next((layer._batch() for layer in self.layers if layer._batch()), 0)
        index = torch.arange(B).repeat_interleave(repeats)
        self._batch_op_on_cross_layer(index)
        super().batch_repeat_interleave(repeats)
        self._reindex_padding(index)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        index = indices.nonzero().squeeze(1) if indices.dtype == torch.bool else indices
        self._batch_op_on_cross_layer(index)
        super().batch_select_indices(index)
        self._reindex_padding(index)

    # -- whole-cache quantization (prefill) ---------------------------------------------
    def quantize_now(self, plan: BitPlan | None = None) -> None:
        """Quantize everything held in full precision (but sinks and the newest ``residual``)."""
        if plan is not None:
            self.set_plan(plan)
        if not self.spec.unit.spans_layers:
            for layer in self.layers:
                layer.flush()
            return
        chunks = [layer.take_for_quantization() for layer in self.layers]
        if any(c is None for c in chunks):
            return
        first = self.layers[0]
        start = first.head_len + first.n_quantized
        rot = self.spec.rotation
        for kind in ("key", "value"):
            xs = [c[kind] for c in chunks]
            if rot is not None:
                xs = [rot.rotate(x, li, kind) for li, x in enumerate(xs)]
            B, H, t, d = xs[0].shape
            units = torch.cat([x.permute(0, 2, 1, 3).reshape(B, t, H * d) for x in xs], dim=-1)
            units = units.reshape(B * t, -1)
            q = self.spec.quantizer(kind)
            bits = self.plan.unit_bits(-1, kind, units, start, q)
            qt = q.encode(units, bits)
            self.cross_layer_chunks[kind].append(qt)
            deq = q.decode(qt, xs[0].dtype).view(B, t, len(xs), H, d)
            for li, layer in enumerate(self.layers):
                x = deq[:, :, li].permute(0, 2, 1, 3)
                if rot is not None:
                    x = rot.unrotate(x, li, kind)
                layer.deq[kind] = cat_tokens(layer.deq[kind], x.to(layer.fp_dtype))
                layer.unit_bits_log[kind].append((qt.mean_bits(), qt.n_units))
        for layer in self.layers:
            layer.n_quantized += chunks[0]["key"].shape[-2]

    # -- accounting ---------------------------------------------------------------------
    def stored_tensors(self) -> list[torch.Tensor]:
        """Every tensor the cache stores (scratch copies excluded)."""
        out = [t for layer in self.layers for t in layer.stored_tensors()]
        return out + [
            t for kind in ("key", "value") for qt in self.cross_layer_chunks[kind] for t in qt.tensors()
        ]

    def nbytes(self) -> int:
        """Bytes actually held by the stored tensors."""
        return sum(t.numel() * t.element_size() for t in self.stored_tensors())

    def n_elements(self) -> int:
        """K and V elements ``DynamicCache(config)`` holds for the same tokens (the reference)."""
        return sum(layer.n_elements() for layer in self.layers)

    def mean_bits_per_layer(self) -> dict[str, list[float]]:
        """Mean code width of the quantized units of each layer, for keys and values."""
        out: dict[str, list[float]] = {}
        for kind in ("key", "value"):
            vals = []
            for layer in self.layers:
                log = layer.unit_bits_log[kind]
                n = sum(c for _, c in log)
                vals.append(sum(b * c for b, c in log) / n if n else 0.0)
            out[kind] = vals
        return out


def _padding_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    mask = kwargs.get("attention_mask")
    if not isinstance(cache, QuantizedCache) or cache.get_seq_length() != 0:
        return
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        m = mask.to(torch.bool)
        # leading zeros of each row (a row of zeros only: all of it)
        lead = torch.where(m.any(dim=1), m.to(torch.int8).argmax(dim=1), m.shape[1])
        cache.set_left_padding(lead)
    else:
        cache.set_left_padding(None)


def watch_padding(model: torch.nn.Module) -> torch.nn.Module:
    """Let every :class:`QuantizedCache` passed to ``model`` learn the left padding of its batch
    from the first forward's 2-D ``attention_mask`` (a forward pre-hook; idempotent).

    transformers hands a cache only keys and values, never the mask; kvq needs the padding to
    keep each row's first *real* tokens as sinks (and to re-apply RoPE at the rows' true
    positions with ``kv.pre_rope``). kvq's own loaders call it; call it on a model you load
    yourself before ``generate`` with a padded batch.
    """
    if not getattr(model, "_kvq_watches_padding", False):
        model.register_forward_pre_hook(_padding_hook, with_kwargs=True)
        model._kvq_watches_padding = True
    return model
