"""Per-channel keys, residual windows and pre-RoPE keys: one-pass evaluation reproduces streaming.

A one-pass (fakequant) forward must show query ``t`` exactly what a streaming cache would hold at
``t``: complete key groups quantized, the newest incomplete group and the residual window in full
precision -- never a key quantized with statistics of tokens after ``t``.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from kvq.alloc import FixedBits
from kvq.attention import register
from kvq.cache import KVQuantSpec
from kvq.models import TinyRandomLlama
from kvq.protocols import Decode, FakeQuant, KVSetup, rope_of
from kvq.quant import AdaptiveQuantizer, UniformQuantizer

T = 40


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    """kvq's tiny random GQA Llama with the ``kvq`` attention, a fresh copy for this module."""
    return TinyRandomLlama().load(attn_implementation=register()).model


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(2))


SPECS = {
    "channel-g8": dict(key_axis="channel", key_group=8),
    "channel-g8-res4": dict(key_axis="channel", key_group=8, residual=4),
    "token-res6": dict(residual=6),
    "channel-g4-sinks2": dict(key_axis="channel", key_group=4, sinks=2),
    "pre-rope": dict(pre_rope=True),
    "pre-rope-channel-g8": dict(pre_rope=True, key_axis="channel", key_group=8, residual=3),
}


def setup(model, quantizer=None, bits: int = 2, **kw) -> KVSetup:
    spec = KVQuantSpec(quantizer or UniformQuantizer(), granularity="head", fp_dtype=None, **kw)
    return KVSetup(spec, FixedBits(bits), 2, model_config=model.config, rope=rope_of(model))


@torch.no_grad()
def one_pass_logits(model, ids, kv: KVSetup) -> torch.Tensor:
    return model(ids, cache=kv.cache(), use_cache=True).logits


@torch.no_grad()
def streaming_logits(model, ids, kv: KVSetup) -> torch.Tensor:
    cache = kv.cache()
    return torch.cat([model(ids[:, t : t + 1], cache=cache).logits for t in range(ids.shape[1])], dim=1)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_one_pass_equals_token_by_token_streaming(model, ids, name: str) -> None:
    kv = setup(model, **SPECS[name])
    one = one_pass_logits(model, ids, kv)
    stream = streaming_logits(model, ids, kv)
    assert torch.allclose(one, stream, atol=2e-4), float((one - stream).abs().max())
    fp = one_pass_logits(model, ids, setup(model, bits=8, **SPECS[name]))
    assert (one - fp).abs().max() > 1e-2  # 2-bit quantization really happened


@pytest.mark.parametrize("name", ["channel-g8", "channel-g8-res4", "token-res6", "pre-rope-channel-g8"])
def test_no_leakage_from_the_future(model, ids, name: str) -> None:
    kv = setup(model, AdaptiveQuantizer(), **SPECS[name])
    base = one_pass_logits(model, ids, kv)
    for t in (5, 12, 23, 30):
        changed = ids.clone()
        changed[0, t + 1] = (changed[0, t + 1] + 17) % 256
        out = one_pass_logits(model, changed, kv)
        assert torch.allclose(out[:, : t + 1], base[:, : t + 1], atol=1e-5), f"logits at <= {t} moved"
        assert not torch.allclose(out[:, t + 1 :], base[:, t + 1 :], atol=1e-5)


def test_channel_keys_store_whole_groups_only(model, ids) -> None:
    kv = setup(model, **SPECS["channel-g8"])
    cache = kv.cache()
    with torch.no_grad():
        model(ids[:, :21], cache=cache)
    layer = cache.layers[0]
    assert layer.n_quantized == 16 and layer.res["key"].shape[-2] == 5  # 21 = 2 groups of 8 + 5 waiting
    (qt,) = layer.chunks["key"]
    assert qt.unit_size == 8 and qt.n_units == 1 * 2 * 2 * 16  # B * H * groups * head_dim channels


def test_fakequant_protocol_refuses_models_without_the_kvq_attention(ids) -> None:
    plain = TinyRandomLlama().load(attn_implementation="sdpa").model
    with pytest.raises(ValueError, match="attention implementation"):
        FakeQuant().score(plain, ids, setup(plain, **SPECS["channel-g8"]))


def test_pre_rope_quantizes_what_rope_rotates(model, ids) -> None:
    """Pre-RoPE keys: dequantized keys are RoPE(Q(K_pre)); post-RoPE: Q(RoPE(K_pre))."""
    pre = one_pass_logits(model, ids, setup(model, **SPECS["pre-rope"]))
    post = one_pass_logits(model, ids, setup(model))
    assert not torch.allclose(pre, post, atol=1e-3)
    # with 8 bits both are close to full precision
    fp = one_pass_logits(model, ids, setup(model, bits=8, pre_rope=True))
    ref = one_pass_logits(
        model, ids, KVSetup(KVQuantSpec(UniformQuantizer(), fp_dtype=None), FixedBits(8), 2)
    )
    assert torch.allclose(fp, ref, atol=0.05)


def test_decode_protocol_matches_fakequant_with_channel_keys(model, ids) -> None:
    kv = setup(model, **SPECS["channel-g8-res4"])
    a = FakeQuant().score(model, ids, kv)
    b = Decode().score(model, ids, kv)
    assert a.tokens == b.tokens and abs(a.nll - b.nll) < 1e-3 * a.nll
    assert b.kv_elements == a.kv_elements * (T - 1) // T  # decode never feeds the last token back
