"""One layer of a :class:`~kvq.cache.QuantizedCache`: bit-packed K/V on transformers' layer API.

Per layer the cache holds, in token order::

    [ sinks (S tokens, full precision) | quantized chunks | residual (<= R newest, full precision) ]

Keys reach :meth:`QuantizedLayer.update` after RoPE, shaped ``[B, H_kv, T, head_dim]``. A
dequantized copy of the quantized part is kept as a compute scratch (a fused kernel would
dequantize on the fly); memory metrics count only what is stored.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import DynamicLayer

from kvq.alloc.base import BitPlan, FixedBits, Kind
from kvq.attention import MixedKV, leave_mixed
from kvq.cache.spec import KINDS, KVQuantSpec, NonFiniteKVError, storage_dtype
from kvq.quant.base import QTensor

__all__ = ["QuantizedLayer"]


class QuantizedLayer(DynamicLayer):
    """One layer of a :class:`QuantizedCache`.

    Args:
        layer_idx: index of the model layer.
        spec: quantization settings.
        plan: bit widths per unit (default: 4 bits).
        deferred: store new tokens in full precision until :meth:`flush` (prefill protocol).
    """

    def __init__(
        self, layer_idx: int, spec: KVQuantSpec, plan: BitPlan | None = None, deferred: bool = False
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.spec = spec
        self.plan: BitPlan = plan if plan is not None else FixedBits(4)
        self.deferred = deferred
        self.cumulative_length = 0
        self.sink: dict[Kind, torch.Tensor | None] = {"key": None, "value": None}
        self.res: dict[Kind, torch.Tensor | None] = {"key": None, "value": None}
        self.deq: dict[Kind, torch.Tensor | None] = {"key": None, "value": None}
        self.chunks: dict[Kind, list[QTensor]] = {"key": [], "value": []}
        self.n_quantized = 0
        self.unit_bits_log: dict[Kind, list[tuple[float, int]]] = {"key": [], "value": []}
        self.rope: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None = None
        self.mixing = False

    # -- transformers API ---------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.fp_dtype = storage_dtype(self.spec.fp_dtype) or key_states.dtype

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def reset(self) -> None:
        super().reset()
        self.__init__(self.layer_idx, self.spec, self.plan, self.deferred)  # type: ignore[misc]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("QuantizedCache does not support crop (assisted/speculative decoding)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("QuantizedCache does not support beam search; use greedy or sampling")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new K/V (``[B, H_kv, T, d]``) and return everything the attention must see."""
        for kind, x in (("key", key_states), ("value", value_states)):
            # one reduction instead of an elementwise test: a NaN/Inf makes the sum non-finite;
            # a non-finite sum is confirmed elementwise (huge finite float32 values can overflow it)
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            if not torch.isfinite(x.sum(dtype=acc)) and not torch.isfinite(x).all():
                raise NonFiniteKVError(
                    f"layer {self.layer_idx}: NaN/Inf in the {kind}s reaching the KV cache "
                    "(check the model's dtype: fp16 overflows are common; try model.dtype=float32 or bfloat16)"
                )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        T_new = key_states.shape[-2]
        mix = self.mixing and not self.deferred and T_new > 1 and self.spec.streaming_exact_needs_mixing
        if mix:  # what each query sees depends on its position: keep the full-precision view too
            before = {
                k: self.materialize(k, key_states.dtype) if self.cumulative_length else None for k in KINDS
            }
        q_start = self.cumulative_length
        self.cumulative_length += T_new
        for kind, x in (("key", key_states), ("value", value_states)):
            x = x.to(self.fp_dtype)
            have = 0 if self.sink[kind] is None else self.sink[kind].shape[-2]
            take = min(self.spec.sinks - have, x.shape[-2])
            if take > 0:
                self.sink[kind] = self._cat(self.sink[kind], x[..., :take, :])
                x = x[..., take:, :]
            self.res[kind] = self._cat(self.res[kind], x)
        if not self.deferred:
            self.flush()
        keys, values = (
            self.materialize("key", key_states.dtype),
            self.materialize("value", value_states.dtype),
        )
        if mix:
            fp = {
                k: self._cat(before[k], x.to(self.fp_dtype).to(x.dtype))
                for k, x in (("key", key_states), ("value", value_states))
            }
            leave_mixed(
                self.layer_idx,
                MixedKV(fp["key"], fp["value"], self.query_mix_mask(q_start, T_new, keys.shape[-2])),
            )
        return keys, values

    # -- storage ------------------------------------------------------------------------
    @staticmethod
    def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
        return b if a is None else torch.cat([a, b], dim=-2)

    def materialize(self, kind: Kind, dtype: torch.dtype) -> torch.Tensor:
        """What the attention sees: ``[B, H, sinks + quantized + residual, d]`` in ``dtype``."""
        parts = [p.to(dtype) for p in (self.sink[kind], self.deq[kind], self.res[kind]) if p is not None]
        return torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]

    def take_for_quantization(self, keep: int | None = None) -> dict[Kind, torch.Tensor] | None:
        """Remove and return the residual tokens beyond the newest ``keep`` (``spec.residual``)."""
        keep = self.spec.residual if keep is None else keep
        res = self.res["key"]
        n = 0 if res is None else res.shape[-2] - keep
        n -= n % self.spec.token_block  # whole key groups only: the newest partial group waits
        if n <= 0:
            return None
        out = {}
        for kind in ("key", "value"):
            r = self.res[kind]
            out[kind], self.res[kind] = r[..., :n, :], r[..., n:, :]
        return out

    def append_quantized(self, kind: Kind, qt: QTensor, deq: torch.Tensor) -> None:
        """Record a quantized chunk (and its dequantized scratch ``[B, H, t, d]``)."""
        self.chunks[kind].append(qt)
        self.deq[kind] = self._cat(self.deq[kind], deq.to(self.fp_dtype))
        self.unit_bits_log[kind].append((qt.mean_bits(), qt.n_units))

    def flush(self) -> None:
        """Quantize everything in the residual beyond the newest ``spec.residual`` tokens."""
        if self.spec.unit.spans_layers:
            raise ValueError(
                "granularity=token spans all layers and needs the whole cache at once: use the prefill "
                "protocol (eval=prefill), or granularity=head/layer"
            )
        chunk = self.take_for_quantization()
        if chunk is None:
            return
        start = self.n_sinks() + self.n_quantized
        for kind in ("key", "value"):
            x = chunk[kind]
            pre = kind == "key" and self.spec.pre_rope
            if pre:
                x = self._rotate(x, start, inverse=True)
            q = self.spec.quantizer(kind)
            units = self.spec.units(kind, x)
            bits = self.plan.unit_bits(self.layer_idx, kind, units, start, q)
            qt = q.encode(units, bits)
            deq = self.spec.from_units(kind, q.decode(qt, x.dtype), x.shape)
            self.append_quantized(kind, qt, self._rotate(deq, start) if pre else deq)
        self.n_quantized += chunk["key"].shape[-2]

    def n_sinks(self) -> int:
        return 0 if self.sink["key"] is None else self.sink["key"].shape[-2]

    def _rotate(self, x: torch.Tensor, start: int, inverse: bool = False) -> torch.Tensor:
        """Apply RoPE (or undo it) to keys ``[B, H, t, d]`` at positions ``start..start+t-1``."""
        if self.rope is None:
            raise ValueError("kv.pre_rope=true needs the model's rotary embedding (QuantizedCache.rope)")
        cos, sin = self.rope(x, start)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # rotate_half
        return x * cos - rot * sin if inverse else x * cos + rot * sin

    def query_mix_mask(self, q_start: int, q_len: int, k_len: int) -> torch.Tensor:
        """``[q_len, k_len]`` True where query ``t`` sees key ``j`` quantized in streaming order.

        At position ``t`` a streaming cache holds the sinks, then the tokens quantized so far --
        ``floor((t + 1 - S - R) / G) * G`` of them, in whole blocks of ``G`` -- then the residual.
        """
        S, R, G = self.spec.sinks, self.spec.residual, self.spec.token_block
        t = torch.arange(q_start, q_start + q_len).unsqueeze(1)
        n_q = torch.div((t + 1 - S - R).clamp_min(0), G, rounding_mode="floor") * G
        j = torch.arange(k_len).unsqueeze(0)
        return (j >= S) & (j < S + n_q)

    def stored_tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer stores (the scratch copy excluded)."""
        out = [t for d in (self.sink, self.res) for t in d.values() if t is not None]
        return out + [t for kind in ("key", "value") for qt in self.chunks[kind] for t in qt.tensors()]

    def n_elements(self) -> int:
        """K and V elements held, at the model's real KV head count."""
        if (
            not self.is_initialized
            or self.res["key"] is None
            and self.deq["key"] is None
            and self.sink["key"] is None
        ):
            return 0
        ref = next(t for t in (self.res["key"], self.deq["key"], self.sink["key"]) if t is not None)
        B, H, _, d = ref.shape
        return 2 * B * H * self.cumulative_length * d
