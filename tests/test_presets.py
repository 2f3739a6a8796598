"""The quality presets (``+experiment=kvq4|kvq3|kvq2``) compose to what they say, validate, and
run on the tiny model: every K/V quantized, streaming-exact, within their bits per element."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from kvq.results import read_result
from kvq.run import run
from kvq.validate import experiment_key, validate

#: preset -> its bound on kv/bits_per_element on SmolLM2 (what its YAML promises)
PRESETS = {"kvq4": 4.5, "kvq3": 3.0, "kvq2": 2.5}
#: the tiny model with windows of whole per-channel key groups (2 x 128 tokens: no key of a
#: window is left in full precision by an incomplete group)
TINY_LONG = ["model=tiny_random", "logger=none", "data.seq_len=256", "data.max_windows=1", "calib.windows=2"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_composes_to_its_axes(compose, preset: str) -> None:
    cfg = compose([f"+experiment={preset}"])
    assert cfg.eval._target_ == "kvq.protocols.FakeQuant"  # the default protocol is kept
    assert cfg.kv.residual == 0 and cfg.kv.sinks == 0  # every K/V is quantized
    assert cfg.kv.key_axis == "channel"
    if preset == "kvq4":
        assert cfg.method._target_ == "kvq.quant.UniformQuantizer" and cfg.bits.key_bits == 4
    else:
        assert cfg.method._target_ == "kvq.quant.NUQQuantizer" and cfg.bits._target_ == "kvq.alloc.BudgetBits"
        assert cfg.bits.avg <= PRESETS[preset] and cfg.kv.pre_rope
        assert cfg.rotation._target_ == "kvq.quant.HadamardRotation" and not cfg.rotation["keys"]
        # kvq3's key codebooks are plain k-means (Fisher-weighted ones lost on every text measured)
        assert cfg.method.key_weighting == ("uniform" if preset == "kvq3" else "fisher")
    assert validate(cfg).ok, validate(cfg).lines()


def test_the_default_run_is_kvq4(compose) -> None:
    """The default ``python train_eval.py`` is the strong 4.5-bit layout: the same experiment as
    ``+experiment=kvq4`` (per-channel keys in groups of 64, values in groups of 64)."""
    from kvq.experiment import make_point

    p = make_point(compose())
    assert (p.kv.key_axis, p.kv.key_group, p.grouping.size, p.method.group_size) == ("channel", 64, 64, 64)
    assert experiment_key(compose()) == experiment_key(compose(["+experiment=kvq4"]))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_runs_on_the_tiny_model(compose, tmp_path: Path, preset: str) -> None:
    run(compose([f"+experiment={preset}", *TINY_LONG]), out_dir=tmp_path)
    rec = read_result(tmp_path)
    assert rec["status"] == "ok", rec["reason"]
    m = rec["metrics"]
    assert math.isfinite(m["test/ppl"]) and m["eval/streaming_exact"] == 1.0
    # the tiny model's 16-feature heads pay more metadata per element than SmolLM2's: the
    # per-window cache stays within the budget where the budget can be met at all
    if preset != "kvq4":
        assert m["bits/budget/feasible"] == 1.0
        assert m["kv/cache_bits_per_element"] <= m["bits/budget/avg"] + 1e-6
        assert m["kv/codebook_bytes"] > 0
    else:
        # keys: 4 bits + 2 fp16 per 64 tokens; values: 4 bits + 2 fp16 per 32-feature layer unit
        # (a g64 group covers the tiny model's unit)
        assert m["kv/bits_per_element"] == pytest.approx((4 + 32 / 64 + 4 + 32 / 32) / 2)
