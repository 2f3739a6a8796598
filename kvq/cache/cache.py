"""``QuantizedCache``: a transformers ``Cache`` whose layers store bit-packed K/V.

Every key/value the attention sees is the stored (quantized) one — also in a one-pass forward
(``fakequant``), unlike transformers' own ``QuantizedCache``, which hands back the unquantized
prefill. One :class:`~kvq.cache.layers.QuantizedLayer` per model layer; the quantization unit
(:class:`~kvq.granularity.Granularity`) is one token of a KV head or of a layer, or -- when the
whole cache is quantized at once (``deferred=True`` + :meth:`QuantizedCache.quantize_now`, the
``prefill`` protocol) -- one token across all layers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import Cache

from kvq.alloc.base import BitPlan, FixedBits, Kind
from kvq.cache.layers import QuantizedLayer
from kvq.cache.spec import KVQuantSpec
from kvq.quant.base import QTensor

__all__ = ["QuantizedCache"]


class QuantizedCache(Cache):
    """A transformers ``Cache`` made of :class:`QuantizedLayer` s, one per model layer.

    Works with ``model(..., cache=cache)`` and ``model.generate(...,
    cache=cache)``.

    Args:
        spec: quantization settings.
        n_layers: number of model layers (``config.num_hidden_layers``).
        plan: bit widths per unit; default ``FixedBits(4)``.
        deferred: keep new tokens in full precision until :meth:`quantize_now` (prefill
            protocol; required for ``granularity="token"``).
    """

    def __init__(self, spec: KVQuantSpec, n_layers: int, plan: BitPlan | None = None, deferred: bool = False):
        if spec.unit.spans_layers and not deferred:
            raise ValueError(
                "granularity=token spans all layers and needs the whole cache at once: use the prefill "
                "protocol (eval=prefill), or granularity=head/layer"
            )
        self.spec = spec
        self.plan = plan if plan is not None else FixedBits(4)
        self.cross_layer_chunks: dict[Kind, list[QTensor]] = {"key": [], "value": []}
        super().__init__(layers=[QuantizedLayer(i, spec, self.plan, deferred) for i in range(n_layers)])

    def set_rope(self, rope: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The model's rotary embedding as ``rope(x, start) -> (cos, sin)`` (for ``pre_rope``)."""
        for layer in self.layers:
            layer.rope = rope

    def enable_mixing(self) -> None:
        """Reproduce streaming exactly in one-pass forwards (the ``kvq`` attention function mixes
        quantized and full-precision K/V per query; needed with a residual window or key groups)."""
        for layer in self.layers:
            layer.mixing = True

    def set_plan(self, plan: BitPlan) -> None:
        """Use ``plan`` for every chunk stored from now on."""
        self.plan = plan
        for layer in self.layers:
            layer.plan = plan

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
        start = first.n_sinks() + first.n_quantized
        for kind in ("key", "value"):
            xs = [c[kind] for c in chunks]
            B, H, t, d = xs[0].shape
            units = torch.cat([x.permute(0, 2, 1, 3).reshape(B, t, H * d) for x in xs], dim=-1)
            units = units.reshape(B * t, -1)
            q = self.spec.quantizer(kind)
            bits = self.plan.unit_bits(-1, kind, units, start, q)
            qt = q.encode(units, bits)
            self.cross_layer_chunks[kind].append(qt)
            deq = q.decode(qt, xs[0].dtype).view(B, t, len(xs), H, d)
            for li, layer in enumerate(self.layers):
                layer.deq[kind] = layer._cat(
                    layer.deq[kind], deq[:, :, li].permute(0, 2, 1, 3).to(layer.fp_dtype)
                )
                layer.unit_bits_log[kind].append((qt.mean_bits(), qt.n_units))
        for layer in self.layers:
            layer.n_quantized += chunks[0]["key"].shape[-2]

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
        """K and V elements represented."""
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
