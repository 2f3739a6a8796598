"""The quantized cache as a full transformers citizen, on tiny random models of six families.

One matrix: architectures (llama, qwen2, mistral, gemma2, gemma3, phi3: sliding windows and
hybrid layouts where the family has them, softcapping for gemma2) x cache configurations
(none, uniform 8 bits, 4 bits with residual and sinks, per-channel keys, attention-aware bits)
x what ``generate`` does (greedy, beam search, left-padded batches, continuing from a returned
cache, one-pass == token by token). Patterns ported from transformers'
``tests/utils/test_cache_utils.py`` and ``tests/generation/test_utils.py`` where they apply:
``method=none`` equals ``DynamicCache(config)`` exactly (logits, generated tokens, beam search,
what each layer holds), sliding layers hold what ``DynamicSlidingWindowLayer`` holds and report
the same mask sizes, batch operations match ``DynamicCache``'s.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from kvq.alloc import AttentionAwareBits, FixedBits
from kvq.attention import register
from kvq.cache import QuantizedCache
from kvq.memory import metrics
from kvq.models import TINY_ARCHS, TinyRandomLlama
from kvq.protocols import Decode, FakeQuant, KVSetup, rope_of
from kvq.quant import FullPrecision, UniformQuantizer

T = 24  # prompt tokens: three times the tiny models' sliding window (8)
NEW = 6

#: name -> (quantizer, bits, cache knobs)
CONFIGS = {
    "none": (FullPrecision(), FixedBits(4), {"fp_dtype": None}),
    "uniform-b8": (UniformQuantizer(), FixedBits(8), {"fp_dtype": None}),
    "b4-residual-sinks": (UniformQuantizer(), FixedBits(4), {"fp_dtype": None, "residual": 3, "sinks": 2}),
    "channel-keys": (
        UniformQuantizer(),
        FixedBits(4),
        {"fp_dtype": None, "key_axis": "channel", "key_group": 4},
    ),
    "attn": (UniformQuantizer(), AttentionAwareBits(target_error=0.01, n_min=2, n_max=6), {"fp_dtype": None}),
}


@pytest.fixture(scope="module", params=TINY_ARCHS)
def arch(request) -> tuple[str, torch.nn.Module]:
    lm = TinyRandomLlama(arch=request.param).load(attn_implementation=register())
    return request.param, lm.model


def _ids(batch: int = 1, n: int = T, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def _setup(model, name: str) -> KVSetup:
    q, bits, knobs = CONFIGS[name]
    return KVSetup(
        q,
        bits,
        model.config.num_hidden_layers,
        model_config=model.config,
        rope=rope_of(model),
        granularity="head",
        knobs=knobs,
    )


def _cache(model, name: str, ids: torch.Tensor | None = None) -> QuantizedCache:
    """A fresh cache; for attention-aware bits, planned from a full-precision pass over ``ids``."""
    kv = _setup(model, name)
    plan = None
    if kv.needs_attention:
        with torch.no_grad():
            plan = kv.plan_from_pass(model, ids)[0]
    return kv.cache(plan)


# --------------------------------------------------------------------------- method=none == DynamicCache
def test_none_equals_dynamic_cache_exactly(arch) -> None:
    name, model = arch
    ids = _ids(2)
    ref_cache, cache = DynamicCache(config=model.config), _cache(model, "none")
    with torch.no_grad():
        ref = model(ids, cache=ref_cache).logits
        out = model(ids, cache=cache).logits
        assert torch.equal(out, ref)
        step = ids[:, :1]
        assert torch.equal(model(step, cache=cache).logits, model(step, cache=ref_cache).logits)
    assert cache.is_sliding == ref_cache.is_sliding
    for ours, theirs in zip(cache.layers, ref_cache.layers):
        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
        assert ours.get_seq_length() == theirs.get_seq_length()
        for q_len in (1, 5):
            assert ours.get_mask_sizes(q_len) == theirs.get_mask_sizes(q_len)
        assert ours.get_max_length() == theirs.get_max_length()
    held = sum(t.keys.numel() + t.values.numel() for t in ref_cache.layers)
    assert cache.nbytes() == held * 4  # fp32 tiny model, kv.fp_dtype=null: the same bytes
    assert metrics(cache)["kv/bytes_fp16"] == held * 2  # the reference is what DynamicCache holds


def test_sliding_layers_hold_what_dynamic_cache_holds(arch) -> None:
    """A window of 8: each sliding layer keeps the newest 7 tokens, quantized, and bits/element
    and compression compare against what DynamicCache(config) holds (not the tokens seen)."""
    name, model = arch
    ids = _ids(1, 3 * T)
    cache, ref_cache = _cache(model, "uniform-b8"), DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :T], cache=cache)
        model(ids[:, :T], cache=ref_cache)
        for t in range(T, 3 * T):
            model(ids[:, t : t + 1], cache=cache)
            model(ids[:, t : t + 1], cache=ref_cache)
    for ours, theirs in zip(cache.layers, ref_cache.layers):
        assert ours.is_sliding == theirs.is_sliding
        assert ours.keys.shape == theirs.keys.shape  # 7 tokens on a sliding layer, all on a full one
        assert ours.get_mask_sizes(1) == theirs.get_mask_sizes(1)
    m = metrics(cache)
    fp16 = sum(t.keys.numel() + t.values.numel() for t in ref_cache.layers) * 2
    assert m["kv/bytes_fp16"] == fp16
    assert 1.5 < m["kv/compression"] < 2.0  # 8-bit codes + fp16 metadata against fp16 DynamicCache


# --------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_generate(arch, name: str) -> None:
    """Greedy generate through the cache equals a manual greedy loop through the same kind of cache."""
    _, model = arch
    ids = _ids()
    out = model.generate(ids, cache=_cache(model, name, ids), max_new_tokens=NEW, do_sample=False)
    assert out.shape == (1, T + NEW)
    cache = _cache(model, name, ids)
    seq = ids
    with torch.no_grad():
        logits = model(ids, cache=cache).logits
        for _ in range(NEW):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            logits = model(nxt, cache=cache).logits
    assert torch.equal(out, seq)
    if name == "none":
        assert torch.equal(out, model.generate(ids, max_new_tokens=NEW, do_sample=False))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_beam_search(arch, name: str) -> None:
    _, model = arch
    ids = _ids()
    out = model.generate(
        ids, cache=_cache(model, name, ids), max_new_tokens=NEW, num_beams=3, do_sample=False
    )
    assert out.shape[1] == T + NEW
    if name == "none":  # beam reordering on the stored K/V is exactly DynamicCache's
        ref = model.generate(ids, max_new_tokens=NEW, num_beams=3, do_sample=False)
        assert torch.equal(out, ref)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_left_padded_batch_equals_each_row_alone(arch, name: str) -> None:
    """A left-padded batch scores each row as it would alone: sinks are the row's first *real*
    tokens, pad query rows give no NaN. (Not compared for per-channel keys, whose token groups are
    formed on the padded positions, nor for attention-aware bits, whose widths depend on the
    window's length, QAQ's T.)"""
    _, model = arch
    a, b = _ids(1, T, seed=1), _ids(1, T - 5, seed=2)
    pad = torch.zeros(1, 5, dtype=torch.long)
    batch = torch.cat([a, torch.cat([pad, b], dim=1)], dim=0)
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)  # as generate numbers a left-padded row's tokens
    with torch.no_grad():
        out = model(batch, attention_mask=mask, position_ids=pos, cache=_cache(model, name, batch)).logits
        alone_b = model(b, cache=_cache(model, name, b)).logits
    assert torch.isfinite(out).all()
    if name not in ("attn", "channel-keys"):
        assert torch.allclose(out[1, 5:], alone_b[0], atol=1e-4), float((out[1, 5:] - alone_b[0]).abs().max())
    gen = model.generate(
        batch, attention_mask=mask, cache=_cache(model, name, batch), max_new_tokens=3, do_sample=False
    )
    assert gen.shape == (2, T + 3)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_continue_from_a_returned_cache(arch, name: str) -> None:
    _, model = arch
    ids = _ids()
    first = model.generate(
        ids, cache=_cache(model, name, ids), max_new_tokens=3, do_sample=False, return_dict_in_generate=True
    )
    again = model.generate(first.sequences, cache=first.cache, max_new_tokens=3, do_sample=False)
    assert again.shape == (1, T + 6) and torch.equal(again[:, : T + 3], first.sequences)
    if name == "none":
        assert torch.equal(again, model.generate(ids, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_one_pass_equals_token_by_token(arch, name: str) -> None:
    """fakequant (one forward per window) == decode (token by token through the cache): the
    one-pass forward is streaming-exact on every family, sliding layers included."""
    _, model = arch
    ids = _ids(1, 3 * T)
    kv = _setup(model, name)
    plan = kv.plan_from_pass(model, ids)[0] if kv.needs_attention else None
    with torch.no_grad():
        one = model(ids, cache=kv.cache(plan)).logits
        cache = kv.cache(plan)
        step = torch.cat([model(ids[:, t : t + 1], cache=cache).logits for t in range(ids.shape[1])], dim=1)
        # a code can flip where one-pass and step-by-step K/V differ in the last float bit: ~1e-3
        assert torch.allclose(one, step, atol=2e-3), float((one - step).abs().max())
        a, b = FakeQuant().score(model, ids, kv), Decode().score(model, ids, kv)  # the protocols agree
    assert a.tokens == b.tokens and abs(a.nll - b.nll) <= 1e-3 * abs(a.nll)


# --------------------------------------------------------------------------- attention paths
def test_softcap_and_pad_rows_match_eager_attention() -> None:
    """Gemma 2's attention logit softcapping: the kvq attention equals transformers' eager one."""
    spec = TinyRandomLlama(arch="gemma2")
    kvq_model = spec.load(attn_implementation=register()).model
    eager = spec.load(attn_implementation="eager").model
    assert kvq_model.config.attn_logit_softcapping
    batch = _ids(2)
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    with torch.no_grad():
        a = kvq_model(batch, attention_mask=mask, cache=DynamicCache(config=kvq_model.config)).logits
        b = eager(batch, attention_mask=mask, cache=DynamicCache(config=eager.config)).logits
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1, 4:], b[1, 4:], atol=1e-5)


def test_blockwise_attention_is_unchanged_by_the_block_size(monkeypatch) -> None:
    from kvq import attention

    model = TinyRandomLlama(arch="mistral").load(attn_implementation=register()).model
    ids = _ids(1, 2 * T)
    kv = _setup(model, "b4-residual-sinks")
    with torch.no_grad():
        whole = model(ids, cache=kv.cache()).logits
        monkeypatch.setattr(attention, "BLOCK_BYTES", 1)  # one query per block
        monkeypatch.setattr(attention, "SDPA_BLOCK", 1)
        blocks = model(ids, cache=kv.cache()).logits
    assert torch.allclose(whole, blocks, atol=1e-5)


# --------------------------------------------------------------------------- the rest of the Cache API
def test_batch_ops_match_dynamic_cache() -> None:
    model = TinyRandomLlama(arch="gemma2").load(attn_implementation=register()).model
    ids = _ids(2)
    ours, ref = _cache(model, "none"), DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=ours)
        model(ids, cache=ref)
    for op, arg in (
        ("batch_repeat_interleave", 2),
        ("batch_select_indices", torch.tensor([3, 0])),
        ("reorder_cache", torch.tensor([1, 1])),
    ):
        getattr(ours, op)(arg)
        getattr(ref, op)(arg)
        for a, b in zip(ours.layers, ref.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values), op


def test_batch_ops_move_codes_without_requantizing() -> None:
    model = TinyRandomLlama().load(attn_implementation=register()).model
    cache = _cache(model, "uniform-b8")
    with torch.no_grad():
        model(_ids(2), cache=cache)
    before = [layer.keys.clone() for layer in cache.layers]
    nbytes = cache.nbytes()
    cache.batch_repeat_interleave(2)
    cache.reorder_cache(torch.tensor([3, 0, 0, 2]))
    for layer, k in zip(cache.layers, before):
        assert torch.equal(layer.keys, k.repeat_interleave(2, dim=0)[[3, 0, 0, 2]])
        assert layer.keys.shape[0] == 4
    assert cache.nbytes() == 2 * nbytes


def test_crop_is_exact_or_declared_before_decoding() -> None:
    model = TinyRandomLlama().load(attn_implementation=register()).model
    ids = _ids(1, T + 3)
    cache = _cache(model, "uniform-b8")
    assert cache.is_croppable
    with torch.no_grad():
        model(ids, cache=cache)
        cache.crop(-3)
        ref = _cache(model, "uniform-b8")
        model(ids[:, :T], cache=ref)
        assert cache.get_seq_length() == T
        for a, b in zip(cache.layers, ref.layers):
            assert torch.equal(a.keys, b.keys)
        nxt = ids[:, T : T + 1]
        assert torch.equal(model(nxt, cache=cache).logits, model(nxt, cache=ref).logits)
    assistant = TinyRandomLlama(seed=1).load(attn_implementation=register()).model
    out = model.generate(
        ids, cache=_cache(model, "uniform-b8"), assistant_model=assistant, max_new_tokens=4, do_sample=False
    )
    assert out.shape == (1, T + 3 + 4)
    # a residual window cannot be cropped exactly: declared, and assisted decoding refuses it at once
    residual = _cache(model, "b4-residual-sinks")
    assert not residual.is_croppable
    with pytest.raises(ValueError, match="cropped"):
        model.generate(ids, cache=residual, assistant_model=assistant, max_new_tokens=4, do_sample=False)
    sliding = TinyRandomLlama(arch="mistral").load(attn_implementation=register()).model
    assert not _cache(sliding, "uniform-b8").is_croppable
