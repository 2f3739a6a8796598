"""The bits-per-element formula equals the bytes the cache tensors actually hold."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvq.alloc import FixedBits
from kvq.cache import KVQuantSpec, QuantizedCache
from kvq.memory import CacheShape, bits_per_element, metrics, predict_bytes
from kvq.quant import AdaptiveQuantizer, NormalQuantizer, UniformQuantizer

from .matrix import QUANTIZERS, QUANTIZING


def feed(cache: QuantizedCache, shape: CacheShape, steps: list[int], seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for t in steps:
        for li in range(shape.n_layers):
            k = torch.randn(shape.batch, shape.n_kv_heads, t, shape.head_dim, generator=g)
            cache.update(k, k * 0.5 + 0.1, li)


@settings(max_examples=40, deadline=None)
@given(
    method=st.sampled_from(sorted(QUANTIZERS)),
    gran=st.sampled_from(["head", "layer"]),
    group=st.sampled_from([None, 16, 24, 128]),
    ratio=st.sampled_from([0.0, 0.05]),
    kbits=st.integers(1, 8),
    vbits=st.integers(1, 8),
    residual=st.integers(0, 6),
    sinks=st.integers(0, 3),
    steps=st.lists(st.integers(1, 20), min_size=1, max_size=4),
    heads=st.sampled_from([1, 3]),
    batch=st.sampled_from([1, 2]),
)
def test_formula_equals_stored_bytes(
    method, gran, group, ratio, kbits, vbits, residual, sinks, steps, heads, batch
):
    shape = CacheShape(n_layers=2, n_kv_heads=heads, head_dim=16, batch=batch)
    spec = KVQuantSpec(QUANTIZERS[method](group, ratio), granularity=gran, residual=residual, sinks=sinks)
    cache = QuantizedCache(spec, shape.n_layers, FixedBits(kbits, vbits))
    feed(cache, shape, steps)
    # replay the cache's own bookkeeping of chunks: each flush quantizes what leaves the residual
    chunks, held, sink = [], 0, 0
    for t in steps:
        take = min(sinks - sink, t)
        sink += take
        held += t - take
        if held > residual:
            chunks.append(held - residual)
            held = residual
    total = sum(steps)
    predicted = predict_bytes(spec, shape, total, chunks, fp_elem_size=2, bits=(kbits, vbits))
    assert cache.nbytes() == predicted
    m = metrics(cache)
    assert m["kv/bytes_fp16"] == 2 * 2 * shape.n_layers * batch * heads * 16 * total
    assert m["kv/bits_per_element"] == pytest.approx(8 * predicted / (m["kv/bytes_fp16"] / 2))


def test_variable_widths_and_token_granularity_are_counted() -> None:
    shape = CacheShape(n_layers=3, n_kv_heads=2, head_dim=16, batch=1)
    spec = KVQuantSpec(UniformQuantizer(group_size=24, outlier_ratio=0.05), granularity="token")
    cache = QuantizedCache(spec, shape.n_layers, deferred=True)
    feed(cache, shape, [10])

    class Alternating:
        def unit_bits(self, layer_idx, kind, units, start, quantizer):
            return torch.tensor([2, 5] * (units.shape[0] // 2))

    cache.quantize_now(Alternating())
    widths = [{"key": {2: 5, 5: 5}, "value": {2: 5, 5: 5}}]
    assert cache.nbytes() == predict_bytes(spec, shape, 10, [10], 2, widths=widths)


@pytest.mark.parametrize(
    "quantizer, bits, expected",
    [
        # head_dim 64, per-head units, one group: 4 bits + 2 fp16 / 64 elements
        (UniformQuantizer(), 4, 4 + 32 / 64),
        (UniformQuantizer(symmetric=True), 4, 4 + 16 / 64),
        (UniformQuantizer(group_size=32), 2, 2 + 2 * 32 / 64),
        (NormalQuantizer(), 3, 3 + 32 / 64),
        (AdaptiveQuantizer(), 4, 4 + 16 * 16 / 64),
        (UniformQuantizer(outlier_ratio=0.0625), 4, 4 + 32 / 64 + 4 * (16 + 8) / 64),
    ],
)
def test_bits_per_element_closed_form(quantizer, bits, expected) -> None:
    spec = KVQuantSpec(quantizer, granularity="head")
    assert bits_per_element(spec, CacheShape(30, 3, 64), bits) == pytest.approx(expected)


def test_g128_is_meaningful_on_the_embedded_shape() -> None:
    """SmolLM2-135M: 3 KV heads x 64: g128 differs from no grouping only for layer/token units."""
    shape = CacheShape(30, 3, 64)
    for gran, groups in (("head", 1), ("layer", 2), ("token", 45)):
        q = UniformQuantizer(group_size=128)
        spec = KVQuantSpec(q, granularity=gran)
        D = {"head": 64, "layer": 192, "token": 5760}[gran]
        assert q.n_groups(D) == groups
        assert bits_per_element(spec, shape, 4) == pytest.approx(4 + 32 * groups / D)


@settings(max_examples=25, deadline=None)
@given(
    group=st.sampled_from([2, 4, 8]),
    residual=st.integers(0, 5),
    steps=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    method=st.sampled_from(sorted(QUANTIZING)),
)
def test_formula_with_per_channel_key_groups(group, residual, steps, method) -> None:
    shape = CacheShape(n_layers=2, n_kv_heads=2, head_dim=16, batch=1)
    spec = KVQuantSpec(
        QUANTIZERS[method](None, 0.0),
        granularity="head",
        residual=residual,
        key_axis="channel",
        key_group=group,
    )
    cache = QuantizedCache(spec, shape.n_layers, FixedBits(3))
    feed(cache, shape, steps)
    chunks, held = [], 0
    for t in steps:
        held += t
        n = held - residual
        n -= n % group
        if n > 0:
            chunks.append(n)
            held -= n
    assert all(c % group == 0 for c in chunks)
    assert cache.nbytes() == predict_bytes(spec, shape, sum(steps), chunks, fp_elem_size=2, bits=3)
