"""One layer of a :class:`~kvq.cache.QuantizedCache`: bit-packed K/V on transformers' layer API.

Per layer the cache holds, in token order::

    [ sinks (S tokens, full precision) | quantized chunks | residual (<= R newest, full precision) ]

Keys reach :meth:`QuantizedLayer.update` after RoPE, shaped ``[B, H_kv, T, head_dim]``. A
dequantized copy of the quantized part is kept as a compute scratch (a fused kernel would
dequantize on the fly); memory metrics count only what is stored.

A *sliding* layer (:class:`QuantizedSlidingLayer`, one per ``sliding_attention`` layer of the
model's config) holds at most what transformers' ``DynamicSlidingWindowLayer`` holds: after
each update the oldest tokens beyond the newest ``sliding_window - 1`` are evicted -- exactly,
from the quantized storage too (per-channel key groups leave only whole groups, so up to
``key_group - 1`` older tokens may stay until their group is out).

Left padding: the cache learns each row's leading pad count from the first forward's attention
mask (:func:`kvq.cache.watch_padding`). Sinks are then the first ``S`` *real* tokens of each
row, kept in full precision per row (their positions differ per row, so they are stored beside
the row-uniform layout, which quantizes from position 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from kvq.alloc.base import BitPlan, FixedBits, Kind
from kvq.attention import MixedKV, leave_mixed
from kvq.cache.spec import KINDS, KVQuantSpec, NonFiniteKVError, storage_dtype
from kvq.quant.base import QTensor

__all__ = ["CacheState", "QuantizedLayer", "QuantizedSlidingLayer", "cat_tokens", "unit_rows"]

#: the model's rotary embedding: ``rope(x [B, H, t, d], start, shift [B] or None) -> (cos, sin)``
Rope = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass
class CacheState:
    """What the layers of one cache share.

    Attributes:
        left_pad: ``[B]`` leading pad tokens per row (from the first forward's attention mask),
            or ``None`` (no padding seen).
        rope: the model's rotary embedding (``pre_rope`` keys).
        mixing: one-pass forwards reproduce streaming (see :mod:`kvq.attention`).
    """

    left_pad: torch.Tensor | None = None
    rope: Rope | None = None
    mixing: bool = False


def cat_tokens(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """``a`` and ``b`` (``[B, H, t, d]``) concatenated along tokens (either may be ``None``)."""
    if a is None:
        return b
    if b is None:
        return a
    return torch.cat([a, b], dim=-2)


def unit_rows(spec: KVQuantSpec, kind: Kind, shape: torch.Size, what: str) -> torch.Tensor:
    """For each unit of a ``[B, H, t, d]`` chunk of ``kind``, its token (``what="token"``; the
    first token of a per-channel key group) or its batch row (``what="batch"``): ``[N]``."""
    B, H, t, d = shape
    if what == "token":
        grid = torch.arange(t).view(1, 1, t, 1).expand(B, H, t, d)
    else:
        grid = torch.arange(B).view(B, 1, 1, 1).expand(B, H, t, d)
    return spec.units(kind, grid.contiguous())[:, 0]


class QuantizedLayer(DynamicLayer):
    """One full-attention layer of a :class:`QuantizedCache`.

    Args:
        layer_idx: index of the model layer.
        spec: quantization settings.
        plan: bit widths per unit (default: 4 bits).
        deferred: store new tokens in full precision until :meth:`flush` (prefill protocol).
        state: what the cache's layers share (left padding, rope, mixing).
    """

    is_sliding = False
    #: the window of a sliding layer (``None`` = full attention)
    window: int | None = None

    def __init__(
        self,
        layer_idx: int,
        spec: KVQuantSpec,
        plan: BitPlan | None = None,
        deferred: bool = False,
        state: CacheState | None = None,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.spec = spec
        self.plan: BitPlan = plan if plan is not None else FixedBits(4)
        self.deferred = deferred
        self.state = state if state is not None else CacheState()
        self.cumulative_length = 0
        #: the first ``spec.sinks`` tokens (full precision; only without left padding)
        self.sink: dict[Kind, torch.Tensor | None] = {"key": None, "value": None}
        self.res: dict[Kind, torch.Tensor | None] = {"key": None, "value": None}
        self.deq: dict[Kind, torch.Tensor | None] = {"key": None, "value": None}
        self.chunks: dict[Kind, list[QTensor]] = {"key": [], "value": []}
        #: tokens held in each quantized chunk (K and V chunks alike), oldest first
        self.chunk_tokens: list[int] = []
        #: tokens quantized so far, evicted ones included (the next chunk starts at sinks + this)
        self.n_quantized = 0
        #: absolute position of the oldest token held (tokens before it were evicted)
        self.offset = 0
        #: with left padding: each row's sinks ``[B, H, S, d]`` and their positions ``[B, S]``
        self.row_sinks: dict[Kind, torch.Tensor | None] = {"key": None, "value": None}
        self.row_sink_pos: torch.Tensor | None = None
        self.head_len = spec.sinks  # tokens of the row-uniform sink region (0 with left padding)
        self.unit_bits_log: dict[Kind, list[tuple[float, int]]] = {"key": [], "value": []}

    # -- shared settings ----------------------------------------------------------------
    @property
    def rope(self) -> Rope | None:
        return self.state.rope

    @rope.setter
    def rope(self, value: Rope | None) -> None:
        self.state.rope = value

    @property
    def mixing(self) -> bool:
        return self.state.mixing

    @mixing.setter
    def mixing(self, value: bool) -> None:
        self.state.mixing = value

    # -- transformers API ---------------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor | None:  # type: ignore[override]
        """What the attention sees of the held keys ``[B, H, t, d]`` (dequantized), or ``None``."""
        return self.materialize("key", self.dtype) if self.held() else None

    @keys.setter
    def keys(self, value: Any) -> None:  # the storage is the quantized store: base-class writes are ignored
        pass

    @property
    def values(self) -> torch.Tensor | None:  # type: ignore[override]
        """What the attention sees of the held values ``[B, H, t, d]``, or ``None``."""
        return self.materialize("value", self.dtype) if self.held() else None

    @values.setter
    def values(self, value: Any) -> None:
        pass

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.fp_dtype = storage_dtype(self.spec.fp_dtype) or key_states.dtype
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def reset(self) -> None:
        self.__init__(self.layer_idx, self.spec, self.plan, self.deferred, self.state)  # type: ignore[misc]

    @property
    def is_croppable(self) -> bool:  # type: ignore[override]
        """``crop`` restores exactly the state without the removed tokens: per-token units that
        are quantized on arrival (no residual window, no per-channel key groups, not deferred)."""
        return self.spec.residual == 0 and self.spec.key_axis == "token" and not self.deferred

    def held(self) -> int:
        """Tokens held (sinks, quantized and residual)."""
        return self.cumulative_length - self.offset

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
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
        before = {k: self.materialize(k, key_states.dtype) if mix and self.held() else None for k in KINDS}
        q_start = self.cumulative_length
        if q_start == 0:
            self._start_rows(key_states.shape[0])
        self.cumulative_length += T_new
        for kind, x in (("key", key_states), ("value", value_states)):
            x = x.to(self.fp_dtype)
            self._keep_row_sinks(kind, x, q_start)
            take = min(max(self.head_len - q_start, 0), x.shape[-2])  # sinks: positions < head_len
            if take > 0:
                self.sink[kind] = cat_tokens(self.sink[kind], x[..., :take, :])
                x = x[..., take:, :]
            if x.shape[-2]:
                self.res[kind] = cat_tokens(self.res[kind], x)
        if not self.deferred:
            self.flush()
        keys, values = self.visible("key", key_states.dtype), self.visible("value", value_states.dtype)
        if mix:
            fp = {
                k: cat_tokens(before[k], x.to(self.fp_dtype).to(x.dtype))
                for k, x in (("key", key_states), ("value", value_states))
            }
            k_len = keys.shape[-2]
            k0 = q_start + T_new - k_len  # absolute position of the first key returned
            fp = {k: v[..., v.shape[-2] - k_len :, :] for k, v in fp.items()}
            leave_mixed(
                self.layer_idx,
                MixedKV(fp["key"], fp["value"], self.query_mix_mask(q_start, T_new, k_len, k0)),
            )
        self.after_update()
        return keys, values

    def visible(self, kind: Kind, dtype: torch.dtype) -> torch.Tensor:
        """What the attention of the current call sees (all held tokens for a full layer)."""
        return self.materialize(kind, dtype)

    def after_update(self) -> None:
        """Hook after every update (a sliding layer evicts here)."""

    # -- left padding and per-row sinks -------------------------------------------------
    def _start_rows(self, batch: int) -> None:
        """At the first update: a left-padded batch keeps each row's first real tokens as sinks."""
        pad = self.state.left_pad
        if pad is None or self.spec.sinks == 0 or int(pad.max()) == 0 or pad.numel() != batch:
            return
        self.head_len = 0
        S = self.spec.sinks
        self.row_sink_pos = pad.view(-1, 1).to(torch.long) + torch.arange(S).view(1, -1)

    def _keep_row_sinks(self, kind: Kind, x: torch.Tensor, start: int) -> None:
        """Copy (full precision) the row sinks among positions ``start..start+t-1`` of ``x``."""
        pos = self.row_sink_pos
        if pos is None:
            return
        B, H, t, d = x.shape
        inside = (pos >= start) & (pos < start + t)
        if not bool(inside.any()):
            return
        if self.row_sinks[kind] is None:
            self.row_sinks[kind] = x.new_zeros(B, H, pos.shape[1], d)
        rel = (pos - start).clamp(0, t - 1).to(x.device)
        picked = torch.gather(x, 2, rel.view(B, 1, -1, 1).expand(B, H, -1, d))
        keep = inside.to(x.device).view(B, 1, -1, 1)
        self.row_sinks[kind] = torch.where(keep, picked, self.row_sinks[kind])

    def _apply_row_sinks(self, kind: Kind, x: torch.Tensor, first: int) -> torch.Tensor:
        """``x`` (held tokens from absolute position ``first``) with each row's sinks in place."""
        pos, sinks = self.row_sink_pos, self.row_sinks[kind]
        if pos is None or sinks is None:
            return x
        B, H, t, d = x.shape
        rel = pos.to(x.device) - first
        ok = (rel >= 0) & (rel < t) & (pos.to(x.device) < self.cumulative_length)
        if not bool(ok.any()):
            return x
        x = x.clone()
        idx = rel.clamp(0, max(t - 1, 0)).view(B, 1, -1, 1).expand(B, H, -1, d)
        cur = torch.gather(x, 2, idx)
        new = torch.where(ok.view(B, 1, -1, 1), sinks.to(x.dtype), cur)
        return x.scatter(2, idx, new)

    # -- storage ------------------------------------------------------------------------
    def materialize(self, kind: Kind, dtype: torch.dtype) -> torch.Tensor:
        """What the attention sees: ``[B, H, held, d]`` in ``dtype`` (sinks, dequantized, residual)."""
        parts = [p.to(dtype) for p in (self.sink[kind], self.deq[kind], self.res[kind]) if p is not None]
        x = torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0]
        return self._apply_row_sinks(kind, x, self.offset)

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
        self.deq[kind] = cat_tokens(self.deq[kind], deq.to(self.fp_dtype))
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
        start = self.head_len + self.n_quantized
        for kind in ("key", "value"):
            x = chunk[kind]
            pre = kind == "key" and self.spec.pre_rope
            if pre:
                x = self._rotate(x, start, inverse=True)
            rot = self.spec.rotation
            if rot is not None:
                x = rot.rotate(x, self.layer_idx, kind)
            q = self.spec.quantizer(kind)
            units = self.spec.units(kind, x)
            bits = self.plan.unit_bits(self.layer_idx, kind, units, start, q)
            qt = q.encode(units, bits)
            deq = self.spec.from_units(kind, q.decode(qt, x.dtype), x.shape)
            if rot is not None:
                deq = rot.unrotate(deq, self.layer_idx, kind)
            self.append_quantized(kind, qt, self._rotate(deq, start) if pre else deq)
        self.chunk_tokens.append(chunk["key"].shape[-2])
        self.n_quantized += chunk["key"].shape[-2]

    def n_sinks(self) -> int:
        return 0 if self.sink["key"] is None else self.sink["key"].shape[-2]

    def _rotate(self, x: torch.Tensor, start: int, inverse: bool = False) -> torch.Tensor:
        """Apply RoPE (or undo it) to keys ``[B, H, t, d]`` at positions ``start..start+t-1``
        (shifted per row by its left padding, as transformers' position ids are)."""
        if self.rope is None:
            raise ValueError("kv.pre_rope=true needs the model's rotary embedding (QuantizedCache.rope)")
        cos, sin = self.rope(x, start, self.state.left_pad)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # rotate_half
        return x * cos - rot * sin if inverse else x * cos + rot * sin

    def query_mix_mask(self, q_start: int, q_len: int, k_len: int, k_start: int = 0) -> torch.Tensor:
        """``[q_len, k_len]`` True where query ``t`` sees key ``j`` quantized in streaming order
        (keys from absolute position ``k_start``).

        At position ``t`` a streaming cache holds the sinks, then the tokens quantized so far --
        ``floor((t + 1 - S - R) / G) * G`` of them, in whole blocks of ``G`` -- then the residual.
        """
        S, R, G = self.head_len, self.spec.residual, self.spec.token_block
        t = torch.arange(q_start, q_start + q_len).unsqueeze(1)
        n_q = torch.div((t + 1 - S - R).clamp_min(0), G, rounding_mode="floor") * G
        j = torch.arange(k_start, k_start + k_len).unsqueeze(0)
        return (j >= S) & (j < S + n_q)

    # -- batch ops, crop, eviction on the quantized storage -----------------------------
    def _select_batch(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (``[B']``, repeats allowed), in that order -- exactly."""
        B = self._batch()
        if not B:
            return
        index = index.to(torch.long)
        for kind in KINDS:
            for store in (self.sink, self.deq, self.res, self.row_sinks):
                if store[kind] is not None:
                    store[kind] = store[kind].index_select(0, index.to(store[kind].device))
            new_chunks = []
            for qt in self.chunks[kind]:
                n_rows = qt.n_units // B  # units are batch-major in every layout
                rows = (index.view(-1, 1) * n_rows + torch.arange(n_rows).view(1, -1)).reshape(-1)
                new_chunks.append(qt.take(rows))
            self.chunks[kind] = new_chunks
        if self.row_sink_pos is not None:
            self.row_sink_pos = self.row_sink_pos.index_select(0, index.to(self.row_sink_pos.device))

    def _batch(self) -> int:
        """Batch rows held (0 when nothing is held)."""
        ref = next((d[k] for d in (self.sink, self.deq, self.res) for k in KINDS if d[k] is not None), None)
        return int(ref.shape[0]) if ref is not None else 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row ``i`` becomes old row ``beam_idx[i]`` (codes moved, never re-quantized)."""
        self._select_batch(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_batch(torch.arange(self._batch()).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        idx = indices.nonzero().squeeze(1) if indices.dtype == torch.bool else indices.to(torch.long)
        self._select_batch(idx)

    def _trim_chunk(self, i: int, drop: int, front: bool) -> None:
        """Drop ``drop`` tokens from the front (oldest) or back (newest) of quantized chunk ``i``."""
        t = self.chunk_tokens[i]
        keep_lo, keep_hi = (drop, t) if front else (0, t - drop)
        for kind in KINDS:
            qt = self.chunks[kind][i]
            ref = self.deq[kind]
            shape = torch.Size([ref.shape[0], ref.shape[1], t, ref.shape[3]])
            tok = unit_rows(self.spec, kind, shape, "token")
            rows = ((tok >= keep_lo) & (tok < keep_hi)).nonzero().squeeze(1)
            self.chunks[kind][i] = qt.take(rows)
        self.chunk_tokens[i] = keep_hi - keep_lo

    def _drop_deq(self, n: int, front: bool) -> None:
        for kind in KINDS:
            d = self.deq[kind]
            self.deq[kind] = d[..., n:, :] if front else d[..., : d.shape[-2] - n, :]
            if self.deq[kind].shape[-2] == 0:
                self.deq[kind] = None

    def evict(self, n: int) -> int:
        """Drop the ``n`` oldest held tokens (fewer when a per-channel key group would be split);
        returns how many were dropped."""
        done = 0
        h = self.n_sinks()
        if h and n > 0:
            d = min(n, h)
            for kind in KINDS:
                s = self.sink[kind][..., d:, :]
                self.sink[kind] = s if s.shape[-2] else None
            done += d
        while n - done > 0 and self.chunk_tokens:
            t, want = self.chunk_tokens[0], n - done
            if t <= want:
                for kind in KINDS:
                    self.chunks[kind].pop(0)
                self.chunk_tokens.pop(0)
                self._drop_deq(t, front=True)
                done += t
                continue
            k = want - want % self.spec.token_block
            if k:
                self._trim_chunk(0, k, front=True)
                self._drop_deq(k, front=True)
                done += k
            self.offset += done
            return done
        if n - done > 0 and self.res["key"] is not None:
            d = min(n - done, self.res["key"].shape[-2])
            for kind in KINDS:
                self.res[kind] = self.res[kind][..., d:, :]
            done += d
        self.offset += done
        return done

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest tokens: ``crop(-n)`` removes ``n`` (``crop(m)`` with ``m >= 0`` keeps
        the first ``m``, transformers' legacy form). Exact where :attr:`is_croppable`."""
        n = -tokens_to_remove if tokens_to_remove < 0 else max(self.cumulative_length - tokens_to_remove, 0)
        if n == 0 or not self.is_initialized:
            return
        if not self.is_croppable:
            raise ValueError(
                "this quantized cache cannot be cropped exactly (a residual window, per-channel key groups, "
                "a sliding window or deferred quantization): use kv.residual=0 kv.key_axis=token on full-"
                "attention layers for assisted decoding"
            )
        n = min(n, self.held())
        r = 0 if self.res["key"] is None else self.res["key"].shape[-2]
        d = min(n, r)
        if d:
            for kind in KINDS:
                self.res[kind] = self.res[kind][..., : r - d, :]
        left = n - d
        while left and self.chunk_tokens:
            t = self.chunk_tokens[-1]
            k = min(t, left)
            if k == t:
                for kind in KINDS:
                    self.chunks[kind].pop()
                    self.unit_bits_log[kind].pop()
                self.chunk_tokens.pop()
            else:
                self._trim_chunk(len(self.chunk_tokens) - 1, k, front=False)
            self._drop_deq(k, front=False)
            self.n_quantized -= k
            left -= k
        if left:
            for kind in KINDS:
                s = self.sink[kind]
                self.sink[kind] = s[..., : s.shape[-2] - left, :] if s.shape[-2] > left else None
        self.cumulative_length -= n

    # -- accounting ---------------------------------------------------------------------
    def stored_tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer stores (the scratch copy excluded)."""
        out = [t for d in (self.sink, self.res, self.row_sinks) for t in d.values() if t is not None]
        if self.row_sink_pos is not None and any(v is not None for v in self.row_sinks.values()):
            out.append(self.row_sink_pos)
        return out + [t for kind in KINDS for qt in self.chunks[kind] for t in qt.tensors()]

    def n_elements(self) -> int:
        """K and V elements of what transformers' ``DynamicCache`` holds for the same tokens (the
        reference of the memory figures: a sliding layer holds at most ``window - 1`` tokens)."""
        ref = next((d[k] for d in (self.res, self.deq, self.sink) for k in KINDS if d[k] is not None), None)
        if not self.is_initialized or ref is None:
            return 0
        B, H, _, d = ref.shape
        return 2 * B * H * self.reference_tokens() * d

    def reference_tokens(self) -> int:
        """Tokens ``DynamicCache`` holds for this layer after the same updates."""
        return self.cumulative_length


class QuantizedSlidingLayer(QuantizedLayer):
    """A sliding-window layer: keeps the newest ``sliding_window - 1`` tokens (quantized), as
    transformers' ``DynamicSlidingWindowLayer``; its mask sizes are that layer's.

    Args:
        sliding_window: the model's ``sliding_window`` for this layer.
    """

    is_sliding = True

    def __init__(self, *args: Any, sliding_window: int, **kwargs: Any) -> None:
        self.window = int(sliding_window)
        super().__init__(*args, **kwargs)

    def reset(self) -> None:
        self.__init__(
            self.layer_idx, self.spec, self.plan, self.deferred, self.state, sliding_window=self.window
        )  # type: ignore[misc]

    def get_max_length(self) -> int:
        return self.window

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        cum, W = self.cumulative_length, self.window
        kv_offset = max(cum - W + 1, 0)
        kv_length = W - 1 + query_length if cum >= W else cum + query_length
        return kv_length, kv_offset

    @property
    def is_croppable(self) -> bool:  # type: ignore[override]
        return False  # evicted tokens cannot come back

    def visible(self, kind: Kind, dtype: torch.dtype) -> torch.Tensor:
        """The newest ``window - 1`` tokens held before this call, plus the call's own tokens."""
        x = self.materialize(kind, dtype)
        k_len = min(self.cumulative_length - self._new, self.window - 1) + self._new
        return x[..., x.shape[-2] - k_len :, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        self._new = key_states.shape[-2]
        return super().update(key_states, value_states, *args, **kwargs)

    def after_update(self) -> None:
        extra = self.held() - (self.window - 1)
        if extra > 0:
            self.evict(extra)

    def reference_tokens(self) -> int:
        return min(self.cumulative_length, self.window - 1)
