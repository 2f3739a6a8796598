"""QuantizedCache on a tiny random GQA Llama: equivalence, quantized attention, generate, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

from kvq.alloc import AttentionAwareBits, FixedBits
from kvq.alloc.qaq import register_stats_attention
from kvq.cache import KVQuantSpec, NonFiniteKVError, QuantizedCache
from kvq.models import TinyRandomLlama
from kvq.quant import FullPrecision, UniformQuantizer

from .matrix import QUANTIZING

N_LAYERS = 2
VOCAB = 512


@pytest.fixture(scope="module")
def tiny() -> LlamaForCausalLM:
    """kvq's tiny random GQA Llama (2 layers, 4 heads, 2 KV heads), a fresh copy for this module."""
    return TinyRandomLlama(n_layers=N_LAYERS, vocab_size=VOCAB).load().model


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model, ids, cache=None) -> torch.Tensor:
    return model(ids, cache=cache if cache is not None else DynamicCache()).logits


def make(quantizer, bits: int = 4, **kw) -> QuantizedCache:
    return QuantizedCache(KVQuantSpec(quantizer, **kw), N_LAYERS, FixedBits(bits))


def test_none_method_is_identical_to_dynamic_cache(tiny, ids) -> None:
    ref = logits(tiny, ids)
    out = logits(tiny, ids, make(FullPrecision(), fp_dtype=None))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("gran", ["head", "layer"])
@pytest.mark.parametrize(
    "q",
    [f(16 if name == "adaptive" else None, 0.0) for name, f in sorted(QUANTIZING.items())],
    ids=sorted(QUANTIZING),
)
def test_eight_bits_close_and_two_bits_not(tiny, ids, gran, q) -> None:
    ref = logits(tiny, ids)
    err8 = (logits(tiny, ids, make(q, 8, granularity=gran)) - ref).abs().max()
    err2 = (logits(tiny, ids, make(q, 2, granularity=gran)) - ref).abs().max()
    assert err8 < 0.02 * ref.abs().max()
    assert err2 > 3 * err8  # the attention really sees quantized K/V in a one-pass forward


def test_attention_sees_the_quantized_keys(tiny, ids) -> None:
    seen = {}
    cache = make(UniformQuantizer(), 2)
    orig = cache.layers[0].update

    def spy(k, v, *a, **kw):
        out = orig(k, v, *a, **kw)
        seen["in"], seen["out"] = k, out[0]
        return out

    cache.layers[0].update = spy
    logits(tiny, ids, cache)
    assert seen["out"].shape == seen["in"].shape
    expected = UniformQuantizer().fake_quant(seen["in"].half().reshape(-1, 16), 2).view_as(seen["in"])
    assert torch.allclose(seen["out"], expected.float(), atol=1e-3)
    assert not torch.allclose(seen["out"], seen["in"], atol=1e-2)


def test_generate_works_with_the_cache(tiny, ids) -> None:
    prompt = ids[:1, :12]
    ref = tiny.generate(prompt, max_new_tokens=16, do_sample=False)
    cache = make(UniformQuantizer(), 8, residual=4, sinks=2)
    out = tiny.generate(prompt, cache=cache, max_new_tokens=16, do_sample=False)
    assert out.shape == ref.shape == (1, 28)
    assert cache.get_seq_length() == 27  # the last generated token is never fed back
    layer = cache.layers[0]
    assert layer.sink["key"].shape[-2] == 2 and layer.res["key"].shape[-2] == 4
    assert layer.n_quantized == 27 - 2 - 4
    # with 8-bit uniform keys the greedy continuation of a random model matches fp most of the way
    assert (out == ref).float().mean() > 0.7


def test_residual_and_sinks_stay_full_precision(tiny, ids) -> None:
    cache = make(UniformQuantizer(), 2, residual=5, sinks=3, fp_dtype=None)
    seen = {}
    orig = cache.layers[1].update

    def spy(k, v, *a, **kw):
        out = orig(k, v, *a, **kw)
        seen["in"], seen["out"] = k, out[0]
        return out

    cache.layers[1].update = spy
    logits(tiny, ids, cache)
    k_in, k_out = seen["in"], seen["out"]
    assert torch.equal(k_out[..., :3, :], k_in[..., :3, :])
    assert torch.equal(k_out[..., -5:, :], k_in[..., -5:, :])
    assert not torch.allclose(k_out[..., 3:-5, :], k_in[..., 3:-5, :], atol=1e-3)


def test_attention_aware_plan_in_the_cache(tiny, ids) -> None:
    name = register_stats_attention()
    tiny.set_attn_implementation(name)
    try:
        alloc = AttentionAwareBits(target_error=0.01, n_min=2, n_max=6)
        col = alloc.collector()
        with col.collect(), torch.no_grad():
            fp = tiny(ids).logits
        assert sorted(col.layers) == list(range(N_LAYERS))
        assert col.layers[0].max_attn.shape == (2, 2, 48)
    finally:
        tiny.set_attn_implementation("sdpa")
    assert torch.allclose(fp, logits(tiny, ids), atol=1e-5)  # stats pass does not change the output
    for gran in ("head", "layer"):
        cache = QuantizedCache(KVQuantSpec(UniformQuantizer(), granularity=gran), N_LAYERS)
        cache.set_plan(alloc.plan(col.layers, gran, 48))
        logits(tiny, ids, cache)
        mb = cache.mean_bits_per_layer()
        assert all(2 <= b <= 6 for b in mb["key"] + mb["value"])
        widths = torch.unique(cache.layers[0].chunks["value"][0].unit_bits)
        assert widths.numel() > 1  # different units really got different widths


def test_token_granularity_quantizes_across_layers_after_prefill(tiny, ids) -> None:
    spec = KVQuantSpec(UniformQuantizer(), granularity="token")
    with pytest.raises(ValueError, match="eval=prefill"):
        QuantizedCache(spec, N_LAYERS)
    cache = QuantizedCache(spec, N_LAYERS, FixedBits(3), deferred=True)
    with torch.no_grad():
        tiny(ids[:, :32], cache=cache)
    assert all(not layer.chunks["key"] for layer in cache.layers) and cache.layers[0].deq["key"] is None
    cache.quantize_now()
    (qt,) = cache.cross_layer_chunks["key"]
    assert qt.unit_size == N_LAYERS * 2 * 16 and qt.n_units == 2 * 32
    with torch.no_grad():
        out = tiny(ids[:, 32:], cache=cache).logits
    assert out.shape == (2, 16, VOCAB)


def test_prefill_protocol_quantizes_the_prefix_only(tiny, ids) -> None:
    cache = QuantizedCache(
        KVQuantSpec(UniformQuantizer(), fp_dtype=None), N_LAYERS, FixedBits(2), deferred=True
    )
    with torch.no_grad():
        tiny(ids[:, :32], cache=cache)
        cache.quantize_now()
        q = tiny(ids[:, 32:], cache=cache).logits
    ref = logits(tiny, ids)[:, 32:]
    assert not torch.allclose(q, ref, atol=1e-3)
    assert cache.layers[0].n_quantized == 32 and cache.layers[0].res["key"].shape[-2] == 16


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_kv_names_layer_and_kind(bad) -> None:
    layer = make(UniformQuantizer()).layers[1]
    k = torch.randn(1, 2, 4, 16)
    v = k.clone()
    v[0, 1, 2, 3] = bad
    with pytest.raises(NonFiniteKVError, match=r"^layer 1: NaN/Inf in the values"):
        layer.update(k, v)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"granularity": "channel"}, "granularity"),
        ({"residual": -1}, "residual"),
        ({"sinks": -2}, "sinks"),
        ({"fp_dtype": "float17"}, "fp_dtype"),
    ],
)
def test_invalid_spec(kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        KVQuantSpec(UniformQuantizer(), **kw)
