"""``QuantizedCache``: a transformers ``Cache`` whose layers store bit-packed K/V.

Every key/value the attention sees is the stored (quantized) one — also in a one-pass forward
(``fakequant``), unlike transformers' own ``QuantizedCache``, which hands back the unquantized
prefill. Per layer the cache holds, in token order::

    [ sinks (S tokens, full precision) | quantized chunks | residual (<= R newest, full precision) ]

Keys reach :meth:`QuantizedLayer.update` after RoPE, shaped ``[B, H_kv, T, head_dim]``.
Quantization units (granularity):

* ``head``  — one unit per token per KV head: ``[B, H, t, d] -> [B*H*t, d]``;
* ``layer`` — one unit per token per layer: ``[B, H, t, d] -> [B*t, H*d]``;
* ``token`` — one unit per token across all layers: ``[B*t, L*H*d]``. Only possible when the
  whole cache is quantized at once (``deferred=True`` + :meth:`QuantizedCache.quantize_now`,
  the ``prefill`` protocol).

A dequantized copy of the quantized part is kept per layer as a compute scratch (a fused
kernel would dequantize on the fly); memory metrics count only what is stored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from kvq.alloc.base import BitPlan, FixedBits, Kind
from kvq.quant.base import QTensor, Quantizer

__all__ = [
    "GRANULARITIES",
    "Granularity",
    "KVQuantSpec",
    "KVSettings",
    "MixedKV",
    "NonFiniteKVError",
    "QuantizedCache",
    "QuantizedLayer",
]

GRANULARITIES: tuple[str, ...] = ("head", "layer", "token")
KEY_AXES: tuple[str, ...] = ("token", "channel")


class NonFiniteKVError(ValueError):
    """NaN or Inf reached the KV cache."""


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"fp_dtype must be a torch dtype name such as 'float16' or null, got {name!r}")
    return dt


@dataclass
class Granularity:
    """The ``granularity`` axis: what one quantization unit is (``head``, ``layer``, ``token``)."""

    unit: str = "layer"

    def __post_init__(self) -> None:
        if self.unit not in GRANULARITIES:
            raise ValueError(f"granularity.unit must be one of {', '.join(GRANULARITIES)}, got {self.unit!r}")


@dataclass(kw_only=True)
class CacheKnobs:
    """The cache knobs of both the ``kv`` config node (:class:`KVSettings`) and the cache itself
    (:class:`KVQuantSpec`), declared and checked once.

    Args:
        residual: newest tokens kept in full precision (a window, ``>= 0``).
        sinks: first tokens kept in full precision (``>= 0``).
        fp_dtype: storage dtype of the full-precision parts (sinks, residual); ``null``/``None``
            = the model's dtype.
        key_axis: ``token`` (keys quantized like values, per ``granularity``) or ``channel``
            (KIVI/KVQuant: each key channel of a head over ``key_group`` tokens is one unit;
            values stay per token; only whole groups are quantized, the newest incomplete group
            stays in full precision).
        key_group: tokens per key group with ``key_axis=channel``.
        pre_rope: quantize keys before the rotary embedding (KVQuant); RoPE is re-applied after
            dequantization (the cache needs :attr:`QuantizedCache.rope`).
    """

    residual: int = 0
    sinks: int = 0
    fp_dtype: str | None = "float16"
    key_axis: str = "token"
    key_group: int = 32
    pre_rope: bool = False

    def knobs(self) -> dict[str, Any]:
        """These knobs by name (to build a :class:`KVQuantSpec` from a :class:`KVSettings`)."""
        return {f.name: getattr(self, f.name) for f in fields(CacheKnobs)}

    def _check_knobs(self, prefix: str) -> None:
        """One-line ValueErrors, the option named with ``prefix`` (``kv.`` for the config node)."""
        for name in ("residual", "sinks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{prefix}{name} must be a non-negative integer, got {v!r}")
        if self.key_axis not in KEY_AXES:
            raise ValueError(f"{prefix}key_axis must be one of {', '.join(KEY_AXES)}, got {self.key_axis!r}")
        if isinstance(self.key_group, bool) or not isinstance(self.key_group, int) or self.key_group < 1:
            raise ValueError(
                f"{prefix}key_group must be a positive integer (tokens per key group), got {self.key_group!r}"
            )
        _dtype(self.fp_dtype)


@dataclass
class KVSettings(CacheKnobs):
    """Cache knobs shared by every method (the ``kv`` config node): :class:`CacheKnobs` plus

    Args:
        outlier_ratio: fraction of each unit kept in full precision as outliers, in ``[0, 0.5)``
            (applied to the method's quantizer).
    """

    outlier_ratio: float = 0.0

    def __post_init__(self) -> None:
        self._check_knobs("kv.")
        if not 0.0 <= float(self.outlier_ratio) < 0.5:
            raise ValueError(f"kv.outlier_ratio must be in [0, 0.5), got {self.outlier_ratio}")


@dataclass
class KVQuantSpec(CacheKnobs):
    """How a cache quantizes keys and values: the quantizers, the unit, and the
    :class:`CacheKnobs` (keyword-only).

    Args:
        key_quantizer: quantizer for keys.
        value_quantizer: quantizer for values (``None`` = the key quantizer).
        granularity: ``head``, ``layer`` or ``token`` (see module docstring).
    """

    key_quantizer: Quantizer
    value_quantizer: Quantizer | None = None
    granularity: str = "head"

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        self._check_knobs("")
        if self.key_axis == "channel" and self.granularity == "token":
            raise ValueError(
                "key_axis=channel quantizes keys per layer: use granularity=head or layer for values"
            )
        if self.value_quantizer is None:
            self.value_quantizer = self.key_quantizer

    @property
    def token_block(self) -> int:
        """Tokens are quantized in whole blocks of this size (key groups, or single tokens)."""
        return self.key_group if self.key_axis == "channel" else 1

    @property
    def streaming_exact_needs_mixing(self) -> bool:
        """Whether a one-pass forward must mix quantized and full-precision K/V per query
        (a residual window or incomplete key groups make what a query sees depend on its position)."""
        return self.residual > 0 or self.key_axis == "channel"

    def units(self, kind: Kind, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, t, d]`` -> the ``[N, D]`` units of ``kind``."""
        if kind == "key" and self.key_axis == "channel":
            B, H, t, d = x.shape
            G = self.key_group
            return x.reshape(B, H, t // G, G, d).transpose(-1, -2).reshape(-1, G)
        return to_units(x, self.granularity)

    def from_units(self, kind: Kind, u: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of :meth:`units`."""
        if kind == "key" and self.key_axis == "channel":
            B, H, t, d = shape
            G = self.key_group
            return u.reshape(B, H, t // G, d, G).transpose(-1, -2).reshape(B, H, t, d)
        return from_units(u, shape, self.granularity)

    def quantizer(self, kind: Kind) -> Quantizer:
        return self.key_quantizer if kind == "key" else self.value_quantizer  # type: ignore[return-value]


def to_units(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """``[B, H, t, d]`` -> ``[N, D]`` units of one layer (``head`` or ``layer``)."""
    B, H, t, d = x.shape
    if granularity == "head":
        return x.reshape(B * H * t, d)
    return x.permute(0, 2, 1, 3).reshape(B * t, H * d)


def from_units(u: torch.Tensor, shape: torch.Size, granularity: str) -> torch.Tensor:
    """Inverse of :func:`to_units`."""
    B, H, t, d = shape
    if granularity == "head":
        return u.view(B, H, t, d)
    return u.view(B, t, H, d).permute(0, 2, 1, 3)


KINDS: tuple[Kind, Kind] = ("key", "value")


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


#: layer index -> mixing info of the forward in flight, consumed by the ``kvq`` attention function
_MIX: dict[int, MixedKV] = {}


def pop_mixed(layer_idx: int) -> MixedKV | None:
    """Take the mixing info a layer left for its attention call (``None`` = plain attention)."""
    return _MIX.pop(layer_idx, None)


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
        self.fp_dtype = _dtype(self.spec.fp_dtype) or key_states.dtype

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
            _MIX[self.layer_idx] = MixedKV(
                fp["key"], fp["value"], self.query_mix_mask(q_start, T_new, keys.shape[-2])
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
        if self.spec.granularity == "token":
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


class QuantizedCache(Cache):
    """A transformers ``Cache`` made of :class:`QuantizedLayer` s, one per model layer.

    Works with ``model(..., past_key_values=cache)`` and ``model.generate(...,
    past_key_values=cache)``.

    Args:
        spec: quantization settings.
        n_layers: number of model layers (``config.num_hidden_layers``).
        plan: bit widths per unit; default ``FixedBits(4)``.
        deferred: keep new tokens in full precision until :meth:`quantize_now` (prefill
            protocol; required for ``granularity="token"``).
    """

    def __init__(self, spec: KVQuantSpec, n_layers: int, plan: BitPlan | None = None, deferred: bool = False):
        if spec.granularity == "token" and not deferred:
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
        if self.spec.granularity != "token":
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
