"""Integration on the embedded real model (SmolLM2-135M, GGUF): the default run and the library."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kvq.alloc import AttentionAwareBits, FixedBits
from kvq.alloc.qaq import register_stats_attention
from kvq.cache import KVQuantSpec
from kvq.data import LocalText
from kvq.protocols import FakeQuant, KVSetup, Prefill
from kvq.quant import FullPrecision, UniformQuantizer
from kvq.results import read_result
from kvq.run import run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_default_run_two_windows(compose, tmp_path: Path) -> None:
    """The canonical command on the embedded model and data, 2 windows."""
    ppl = run(
        compose(["method=adaptive", "grouping=g128", "logger=none", "data.max_windows=2"]), out_dir=tmp_path
    )
    rec = read_result(tmp_path)
    assert rec["status"] == "ok"
    m = rec["metrics"]
    assert 5 < ppl < 60, ppl  # fp perplexity of SmolLM2-135M on the pydoc text is ~15
    assert m["test/tokens"] == 2 * 511
    # 30 layers x 3 KV heads x 64 x 512 tokens x K,V x fp16
    assert m["kv/bytes_fp16"] == 30 * 3 * 64 * 512 * 2 * 2
    # kv.key_axis=auto -> channel: keys in per-channel groups of kv.key_group=64 tokens, values in
    # layer units of 192 features (g128 -> groups of 128 + 64); every group has 16 fp16 levels
    keys, values = 4 + 16 * 16 / 64, 4 + 2 * 16 * 16 / 192
    assert m["kv/bits_per_element"] == pytest.approx((keys + values) / 2)


@pytest.fixture(scope="module")
def windows(smollm2, wikitext2_raw_path) -> torch.Tensor:
    return LocalText(path=str(wikitext2_raw_path), max_windows=2).datamodule(smollm2.tokenizer).windows


def _ppl(model, windows, kv, proto: FakeQuant | Prefill | None = None) -> float:
    proto = proto or FakeQuant()
    nll = tok = 0
    with torch.inference_mode():
        for w in windows:
            r = proto.score(model, w.unsqueeze(0), kv)
            nll, tok = nll + r.nll, tok + r.tokens
    return math.exp(nll / tok)


def test_quality_ordering_on_wikitext2(smollm2, windows) -> None:
    model, n = smollm2.model, smollm2.meta.n_layers
    fp = _ppl(model, windows, KVSetup(KVQuantSpec(FullPrecision(), fp_dtype=None), FixedBits(4), n))
    u8 = _ppl(model, windows, KVSetup(KVQuantSpec(UniformQuantizer(), granularity="layer"), FixedBits(8), n))
    u4 = _ppl(
        model,
        windows,
        KVSetup(KVQuantSpec(UniformQuantizer(group_size=32), granularity="layer"), FixedBits(4), n),
    )
    u2 = _ppl(
        model,
        windows,
        KVSetup(KVQuantSpec(UniformQuantizer(group_size=32), granularity="layer"), FixedBits(2), n),
    )
    assert 20 < fp < 60  # WikiText-2 perplexity of SmolLM2-135M (36.08 on 16 windows)
    assert abs(u8 - fp) / fp < 0.01
    assert fp < u4 < u2
    assert (u4 - fp) / fp < 0.15


def test_attention_aware_prefill_on_the_real_model(smollm2, windows) -> None:
    model, n = smollm2.model, smollm2.meta.n_layers
    model.set_attn_implementation(register_stats_attention())
    try:
        kv = KVSetup(
            KVQuantSpec(UniformQuantizer(), granularity="head"), AttentionAwareBits(n_min=2, n_max=8), n
        )
        ppl = _ppl(model, windows, kv, Prefill())
    finally:
        model.set_attn_implementation("sdpa")
    assert math.isfinite(ppl) and ppl > 1
