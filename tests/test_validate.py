"""The validator: declarative rules (static and model-aware), experiment identity, grid triage,
and the whole config space (every combination of group options + random knob values either
validates or is rejected with one line, never a stack trace)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
from hydra.errors import HydraException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from kvq.models import ModelMeta
from kvq.results import read_result
from kvq.validate import (
    RULES,
    MetaCache,
    Report,
    Rule,
    Violation,
    experiment_key,
    make_point,
    triage,
    validate,
)

from .conftest import CONF_DIR, TINY, train_eval_cli

#: shapes of the config's models, as ``model.meta()`` reads them (hub ones from their config.json)
TINY_META = ModelMeta("tiny-random-llama", 2, 4, 2, 16, 64, 512, 2048)
SMOL_META = ModelMeta("SmolLM2-135M-Instruct.Q4_1", 30, 9, 3, 64, 576, 49152, 8192)
LLAMA2_META = ModelMeta("meta-llama/Llama-2-7b-hf", 32, 32, 32, 128, 4096, 32000, 4096)
LLAMA3_META = ModelMeta("meta-llama/Meta-Llama-3-8B", 32, 32, 8, 128, 4096, 128256, 8192)
QWEN_META = ModelMeta("Qwen/Qwen2.5-7B", 28, 28, 4, 128, 3584, 152064, 131072)
S, F = "sliding_attention", "full_attention"
GEMMA2_META = ModelMeta("google/gemma-2-9b", 42, 16, 8, 256, 3584, 256000, 8192, (S, F) * 21, 4096, "gemma2")
GEMMA3_META = ModelMeta(
    "google/gemma-3-4b-pt",
    34,
    8,
    4,
    256,
    2560,
    262208,
    131072,
    ((S,) * 5 + (F,)) * 5 + (S,) * 4,
    1024,
    "gemma3_text",
)
MISTRAL_META = ModelMeta(
    "mistralai/Mistral-7B-v0.1", 32, 32, 8, 128, 4096, 32000, 32768, (S,) * 32, 4096, "mistral"
)
PHI3_META = ModelMeta(
    "microsoft/Phi-3-mini-4k-instruct", 32, 32, 32, 96, 3072, 32064, 4096, (S,) * 32, 2047, "phi3"
)
QWEN3_META = ModelMeta("Qwen/Qwen3-8B", 36, 32, 8, 128, 4096, 151936, 40960, (), None, "qwen3")
#: every conf/model option's shape (the generic hf / gguf options with a stand-in of their kind)
MODEL_METAS = {
    "tiny_random": TINY_META,
    "smollm2_135m": SMOL_META,
    "gguf": SMOL_META,
    "hf": LLAMA3_META,
    "llama2_7b": LLAMA2_META,
    "llama3_8b": LLAMA3_META,
    "mistral_7b": MISTRAL_META,
    "qwen2_5_7b": QWEN_META,
    "qwen3_8b": QWEN3_META,
    "gemma2_9b": GEMMA2_META,
    "gemma3_4b": GEMMA3_META,
    "phi3_mini": PHI3_META,
}


def test_every_model_option_has_a_shape_here() -> None:
    assert set(MODEL_METAS) == set(options("model"))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def rules_of(report: Report) -> set[str]:
    return {v.rule for v in report.violations}


# --------------------------------------------------------------------------- the rule set
def test_rules_are_declarative_and_one_line() -> None:
    names = [r.name for r in RULES]
    assert len(names) == len(set(names))
    for r in RULES:
        assert isinstance(r, Rule) and r.kind in ("invalid", "duplicate")
        for text in (r.reason, r.fix):
            assert callable(text) or (isinstance(text, str) and "\n" not in text)
    assert {"attn-adaptive", "token-needs-whole-cache", "group-covers-unit", "baseline-variant"} <= set(names)
    assert next(r for r in RULES if r.name == "group-covers-unit").model_aware


def test_attn_with_adaptive_is_invalid_in_the_users_terms(compose) -> None:
    rep = validate(compose(["bits=attn", "method=adaptive"]))
    assert not rep.ok and rules_of(rep) == {"attn-adaptive"}
    (v,) = rep.invalid
    assert "bits=attn" in v.reason and "method=adaptive" in v.reason and "uniform" in v.reason
    assert "method=uniform or method=normal" in v.fix and "bits.bridge=true" in v.fix
    line = rep.reason()
    assert line is not None and "\n" not in line and line.startswith("attn-adaptive: ")


@pytest.mark.parametrize("preset", options("experiment"))
def test_experiment_presets_are_valid(compose, preset: str) -> None:
    for meta in (None, SMOL_META, LLAMA3_META):
        assert validate(compose([f"+experiment={preset}"]), meta).violations == [], (preset, meta)


def test_attn_with_adaptive_through_the_bridge_is_valid(compose) -> None:
    # bits.bridge=true: each method supplies its own error per width (measured for adaptive)
    assert validate(compose(["bits=attn", "method=adaptive", "bits.bridge=true"]), SMOL_META).violations == []
    assert validate(compose(["+experiment=qaq_bridge"]), SMOL_META).violations == []


@pytest.mark.parametrize("method", ["uniform", "normal"])
def test_attn_with_uniform_or_normal_is_valid(compose, method: str) -> None:
    # normal: a fixed-shape grid (Gaussian quantiles) scaled by one statistic per unit, so QAQ's
    # error model still maps an error to a level count -- the rationale is in validate.py
    assert validate(compose(["bits=attn", f"method={method}"]), SMOL_META).violations == []


@pytest.mark.parametrize("ev, ok", [("fakequant", False), ("decode", False), ("prefill", True)])
def test_token_granularity_needs_the_whole_cache(compose, ev: str, ok: bool) -> None:
    rep = validate(compose(["granularity=token", f"eval={ev}"]))
    assert rep.ok is ok
    if not ok:
        assert rules_of(rep) == {"token-needs-whole-cache"} and f"eval={ev}" in rep.reason()


def test_group_covers_unit_is_model_aware_and_a_duplicate(compose) -> None:
    cfg = compose(["grouping=g64", "granularity=head"])
    assert validate(cfg).violations == []  # static tier: the unit size is unknown
    rep = validate(cfg, SMOL_META)  # 64-feature heads
    assert rep.ok and rules_of(rep) == {"group-covers-unit"}
    assert "64 features" in rep.duplicates[0].reason and "grouping=none" in rep.duplicates[0].reason
    assert validate(compose(["grouping=g64", "granularity=layer"]), SMOL_META).violations == []  # 192
    assert validate(compose(["grouping=g64", "granularity=head"]), LLAMA3_META).violations == []  # 128


def test_baseline_variants_are_duplicates(compose) -> None:
    assert validate(compose(["method=none"])).violations == []
    for extra in (
        ["bits=b2"],
        ["grouping=g32"],
        ["granularity=head"],
        ["bits=attn"],
        ["kv.outlier_ratio=0.1"],
    ):
        rep = validate(compose(["method=none", *extra]))
        assert rep.ok and rules_of(rep) == {"baseline-variant"}, extra


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["bits=attn", "bits.n_min=6", "bits.n_max=3"], "bits.n_min (6) must be <= bits.n_max (3)"),
        (["bits.key_bits=9"], "bits.key_bits must be an integer in 1..8"),
        (["bits.key_bits=0"], "bits.key_bits must be an integer in 1..8"),
        (["bits=attn", "bits.n_max=12"], "bits.n_max must be an integer in 1..8"),
        (["kv.outlier_ratio=0.5"], "kv.outlier_ratio must be in [0, 0.5)"),
        (["kv.outlier_ratio=-0.1"], "kv.outlier_ratio must be in [0, 0.5)"),
        (["kv.residual=-1"], "kv.residual must be a non-negative integer"),
        (["kv.sinks=-3"], "kv.sinks must be a non-negative integer"),
        (["grouping.size=0"], "grouping.size must be a positive integer or null"),
        (["grouping.size=-32"], "grouping.size must be a positive integer or null"),
        (["eval=prefill", "eval.prefix_len=0"], "eval.prefix_len must be a positive integer"),
        (["data.seq_len=1"], "data.seq_len must be >= 2"),
        (["data.max_windows=0"], "data.max_windows must be >= 1"),
    ],
)
def test_impossible_values_are_invalid_with_one_line(compose, overrides: list[str], needle: str) -> None:
    rep = validate(compose(overrides))
    assert not rep.ok
    (v,) = rep.invalid  # reported once (the method's echo of grouping/kv errors is dropped)
    assert v.rule == "values" and needle in v.reason and "\n" not in v.line()


def test_all_violations_are_reported_at_once(compose) -> None:
    rep = validate(
        compose(["bits=attn", "method=adaptive", "granularity=token", "kv.residual=-1", "data.max_windows=0"])
    )
    assert rules_of(rep) == {"values", "attn-adaptive", "token-needs-whole-cache"}
    assert len(rep.invalid) == 4  # kv and data values, attn-adaptive, token
    assert rep.reason().count("; ") == 3 and "\n" not in rep.reason()


def test_prefill_window_and_nothing_quantized(compose) -> None:
    rep = validate(compose(["eval=prefill", "eval.prefix_len=31", "data.seq_len=32"]))
    assert rules_of(rep) == {"prefill-window"}
    assert validate(compose(["eval=prefill", "eval.prefix_len=30", "data.seq_len=32"])).ok
    # the residual window (plus sinks) covers every cached token: nothing is quantized
    rep = validate(compose(["kv.residual=30", "kv.sinks=2", "data.seq_len=32"]))
    assert rules_of(rep) == {"nothing-quantized"} and "32 tokens" in rep.reason()
    assert validate(compose(["kv.residual=30", "kv.sinks=1", "data.seq_len=32"])).ok
    assert rules_of(validate(compose(["eval=decode", "kv.residual=31", "data.seq_len=32"]))) == {
        "nothing-quantized"
    }
    assert rules_of(validate(compose(["eval=prefill", "kv.residual=16", "data.seq_len=32"]))) == {
        "nothing-quantized"
    }
    assert validate(compose(["method=none", "kv.residual=64", "data.seq_len=32"])).ok  # fp anyway


def test_model_aware_context_and_outliers(compose) -> None:
    rep = validate(compose([*TINY, "data.seq_len=4096"]), TINY_META)
    assert rules_of(rep) == {"beyond-context"} and "2048" in rep.reason()
    # 0.05 of a 16-feature head: floor(0.4) = 0 outliers per side -> same as outlier_ratio=0
    head = ["granularity=head", "grouping=none"]
    rep = validate(compose([*head, "kv.outlier_ratio=0.05"]), TINY_META)
    assert rep.ok and rules_of(rep) == {"outliers-round-to-zero"}
    assert validate(compose([*head, "kv.outlier_ratio=0.2"]), TINY_META).violations == []


@pytest.mark.parametrize("peer", ["hf_quanto", "hf_hqq"])
def test_peer_methods(compose, peer: str) -> None:
    assert validate(compose([f"method={peer}", "eval=prefill"]), SMOL_META).violations == []
    rep = validate(compose([f"method={peer}"]))  # fakequant: the peer cache returns unquantized K/V
    assert rules_of(rep) == {"peer-needs-prefill"} and f"method={peer}" in rep.reason()
    rep = validate(compose([f"method={peer}", "eval=prefill", "bits=attn"]))
    assert rules_of(rep) == {"peer-fixed-bits"} and "bits=attn" in rep.reason()
    rep = validate(compose([f"method={peer}", "eval=prefill", "bits.value_bits=2"]))
    assert rules_of(rep) == {"peer-fixed-bits"}
    rep = validate(compose([f"method={peer}", "eval=prefill", "granularity=token", "kv.sinks=4"]))
    assert rep.ok and rules_of(rep) == {"peer-ignores"}
    assert "granularity=token, kv.sinks=4" in rep.duplicates[0].reason
    rep = validate(
        compose([f"method={peer}", "eval=prefill", "bits=b3" if peer == "hf_quanto" else "bits=b8"])
    )
    assert (rep.ok, rules_of(rep)) == ((False, {"values"}) if peer == "hf_quanto" else (True, set()))
    # the peer's own node defines the experiment; null groups are its default of 64
    k = experiment_key
    base = compose([f"method={peer}", "eval=prefill"])
    assert k(compose([f"method={peer}", "eval=prefill", "grouping=g64"])) == k(base)
    assert k(compose([f"method={peer}", "eval=prefill", "granularity=head", "kv.sinks=2"])) == k(base)
    assert k(compose([f"method={peer}", "eval=prefill", "grouping=g32"])) != k(base)
    assert k(compose([f"method={peer}", "eval=prefill", "bits=b2"])) != k(base)


def test_key_axis_rules(compose) -> None:
    rep = validate(compose(["eval=prefill", "granularity=token", "kv.key_axis=channel"]))
    assert rules_of(rep) == {"key-channel-token"}
    assert validate(compose(["kv.key_axis=channel", "kv.key_group=16"])).violations == []
    rep = validate(compose(["kv.key_axis=token", "kv.key_group=16"]))  # ignored with key_axis=token
    assert rep.ok and rules_of(rep) == {"key-group-unused"}
    token = experiment_key(compose(["kv.key_axis=token"]))
    assert experiment_key(compose(["kv.key_axis=token", "kv.key_group=16"])) == token
    assert experiment_key(compose(["kv.key_axis=channel", "kv.key_group=16"])) != experiment_key(
        compose(["kv.key_axis=channel"])
    )
    assert rules_of(validate(compose(["method=none", "kv.pre_rope=true"]))) == {"baseline-variant"}


@pytest.mark.parametrize(
    "overrides, axis",
    [
        ([], "channel"),  # the default: uniform b4, per-channel keys in groups of 64
        (["method=adaptive", "grouping=g128"], "channel"),
        (["bits=budget"], "channel"),
        (["bits=attn"], "token"),  # per-token key widths
        (["bits=attn", "bits.fixed_key_bits=4"], "channel"),
        (["eval=prefill", "granularity=token"], "token"),
        (["method=none"], "token"),
        (["method=hf_quanto", "eval=prefill"], "token"),  # its own cache
        (["data.seq_len=48"], "token"),  # the cache never holds a whole key group of 64
        (["data.seq_len=48", "kv.key_group=16"], "channel"),
    ],
)
def test_auto_key_axis_resolves_per_point(compose, overrides: list[str], axis: str) -> None:
    from kvq.experiment import make_point, resolve_key_axis

    cfg = compose(overrides)
    assert cfg.kv.key_axis == "auto"
    p = make_point(cfg)
    assert p.kv.key_axis == axis == resolve_key_axis(p)[0]
    rep = validate(cfg)
    assert rep.ok, rep.reason()
    assert not {"attn-channel-keys", "key-channel-token", "nothing-quantized", "baseline-variant"} & rules_of(
        rep
    )
    # auto and the axis it resolves to are one experiment; the other axis is another one
    assert experiment_key(cfg) == experiment_key(compose([*overrides, f"kv.key_axis={axis}"]))
    if axis == "channel":
        assert experiment_key(cfg) != experiment_key(compose([*overrides, "kv.key_axis=token"]))


def test_explicit_key_axis_is_never_changed(compose) -> None:
    # an explicit channel where it cannot apply is refused, not silently turned into token
    assert rules_of(validate(compose(["bits=attn", "kv.key_axis=channel"]))) == {"attn-channel-keys"}
    assert rules_of(validate(compose(["data.seq_len=48", "kv.key_axis=channel"]))) == {"nothing-quantized"}
    assert rules_of(validate(compose(["kv.key_axis=bogus"]))) == {"values"}


def test_attn_with_equal_bounds_is_fixed_bits(compose) -> None:
    a = compose(["bits=attn", "bits.n_min=4", "bits.n_max=4"])
    assert rules_of(validate(a)) == {"attn-fixed"}
    # bits=attn's default key axis is per token (kv.key_axis=auto), so it repeats b4 with token keys
    assert experiment_key(a) == experiment_key(compose(["bits=b4", "kv.key_axis=token"]))
    assert experiment_key(a) != experiment_key(compose(["bits=b4"]))
    assert "kv.key_axis=token" in validate(a).duplicates[0].fix
    assert experiment_key(compose(["bits.value_bits=4"])) == experiment_key(compose(["bits=b4"]))


# --------------------------------------------------------------------------- experiment identity
def test_experiment_key_maps_duplicates_together(compose) -> None:
    k = experiment_key
    base = compose([*TINY, "method=none"])
    assert k(compose([*TINY, "method=none", "bits=b2", "grouping=g32", "granularity=head"])) == k(base)
    assert k(compose([*TINY, "method=none", "kv.outlier_ratio=0.2"])) == k(base)
    # logging, placement and storage do not define the experiment
    for extra in (["logger=wandb"], ["accelerator=cpu"], ["cache_dir=/x"], ["results_dir=/r", "reuse=false"]):
        assert k(compose([*TINY, "method=none", *extra])) == k(base), extra
    # model-aware: g64 covers a 64-feature head of SmolLM2 but not a 128-feature Llama head
    g64, none = compose(["grouping=g64", "granularity=head"]), compose(["grouping=none", "granularity=head"])
    assert k(g64, SMOL_META) == k(none, SMOL_META)
    assert k(g64, LLAMA3_META) != k(none, LLAMA3_META)
    assert k(g64) != k(none)  # without the shape: not known to be the same
    # what changes the experiment changes the key
    assert len({k(compose([f"bits={b}"])) for b in options("bits")}) == len(options("bits")) >= 5
    assert k(compose(["seed=1"])) != k(compose([]))


def test_triage_keeps_the_canonical_configuration(compose) -> None:
    cfgs = [
        compose([*TINY, "grouping=g128"]),  # duplicate of grouping=none on tiny's 32-feature layer
        compose([*TINY, "grouping=none"]),
        compose([*TINY, "method=adaptive", "bits=attn"]),
        compose([*TINY, "method=none", "bits=b2"]),
        compose([*TINY, "method=none", "bits=b8"]),  # no canonical baseline: the first one is kept
        compose([*TINY, "logger=wandb", "grouping=none"]),  # same as #1
    ]
    v = triage(cfgs)
    assert [x.status for x in v] == ["duplicate", "run", "invalid", "run", "duplicate", "duplicate"]
    assert [x.duplicate_of for x in v] == [1, None, None, None, 3, 1]
    assert v[0].reason().startswith("same experiment as #1 -- group-covers-unit: ")
    assert v[5].reason() == "same experiment as #1"
    assert v[2].reason().startswith("attn-adaptive: ") and v[2].key is None
    assert all("\n" not in x.reason() for x in v)
    assert v[0].meta_error is None  # tiny_random's shape was read


def test_triage_static_tier_and_unreadable_models(compose) -> None:
    cfgs = [compose([*TINY, "grouping=g128"]), compose([*TINY, "grouping=none"])]
    assert [x.status for x in triage(cfgs, model_aware=False)] == ["run", "run"]
    metas = MetaCache()
    v = triage([compose(["model=llama2_7b", "grouping=g128"])], metas)  # not in the offline HF cache
    assert v[0].status == "run" and v[0].meta_error and "\n" not in v[0].meta_error


def test_meta_cache_reads_each_model_once(compose, monkeypatch) -> None:
    from kvq import models

    calls = []
    real = models.TinyRandomLlama.meta

    def counting(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(models.TinyRandomLlama, "meta", counting)
    metas = MetaCache()
    triage([compose([*TINY, f"bits=b{b}"]) for b in (2, 3, 4, 8)], metas)
    assert len(calls) == 1
    triage([compose([*TINY, "model.n_layers=3"])], metas)
    assert len(calls) == 2


def test_violation_line_is_always_one_line() -> None:
    v = Violation("r", "invalid", "a\nmulti-line\n reason", "fix\nit")
    assert v.line() == "r: a multi-line reason (fix: fix it)"


# --------------------------------------------------------------------------- the whole space
GROUP_AXES = ("method", "grouping", "bits", "granularity", "eval")


@pytest.fixture(scope="module")
def option_nodes():
    """Each option of each group as composed by Hydra (interpolations kept), and the base config."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import kvq.config  # noqa: F401

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = compose("config", overrides=TINY)
        nodes = {
            g: {o: compose("config", overrides=[*TINY, f"{g}={o}"])[g] for o in options(g)}
            for g in GROUP_AXES
        }
    GlobalHydra.instance().clear()
    return base, nodes


def test_every_combination_of_group_options_validates_or_is_rejected_in_one_line(option_nodes) -> None:
    """method x grouping x bits x granularity x eval (every option of each) on every model's shape."""
    from hydra.utils import instantiate

    base, nodes = option_nodes
    # granularity and eval nodes do not depend on other nodes: built once, swapped into the point
    built = {
        g: {o: instantiate(n, _convert_="all") for o, n in nodes[g].items()} for g in ("granularity", "eval")
    }
    seen_rules: set[str] = set()
    n_ok = 0
    for (m, mn), (g, gn), (b, bn) in itertools.product(*(sorted(nodes[a].items()) for a in GROUP_AXES[:3])):
        cfg = base.copy()
        cfg.method, cfg.grouping, cfg.bits = mn, gn, bn
        point = make_point(cfg)
        if not m.startswith("hf_"):
            assert point.errors == {}, (m, g, b)  # the shipped options themselves are all legal
        else:  # a peer method: hf_quanto takes 2/4 bits, hf_hqq 1/2/3/4/8; other widths are invalid
            assert set(point.errors) <= {"method"} and all(
                "supports bits" in e for e in point.errors.values()
            )
        for gran, ev in itertools.product(sorted(nodes["granularity"]), sorted(nodes["eval"])):
            cfg.granularity, cfg.eval = nodes["granularity"][gran], nodes["eval"][ev]
            p0 = dataclasses.replace(point, granularity=built["granularity"][gran], eval=built["eval"][ev])
            for meta in (None, *MODEL_METAS.values()):
                p = dataclasses.replace(p0, meta=meta)
                rep = validate(cfg, meta, p)
                seen_rules |= rules_of(rep)
                assert all("\n" not in line for line in rep.lines())
                n_ok += rep.ok
            if rep.ok:  # the experiment key is computable (last model's shape)
                assert len(experiment_key(cfg, meta, p)) == 16
    assert {
        "attn-adaptive",
        "token-needs-whole-cache",
        "group-covers-unit",
        "baseline-variant",
        "peer-needs-prefill",
        "peer-fixed-bits",
        "peer-ignores",
        "values",
    } <= seen_rules
    assert n_ok > 0


KNOBS = {
    "kv.residual": st.integers(-4, 600),
    "kv.sinks": st.integers(-2, 40),
    "kv.outlier_ratio": st.floats(-0.2, 0.8, allow_nan=False),
    "grouping.size": st.one_of(st.none(), st.integers(-4, 600)),
    "data.seq_len": st.integers(-1, 5000),
    "data.max_windows": st.one_of(st.none(), st.integers(-1, 3)),
}
FIXED_KNOBS = {
    "bits.key_bits": st.integers(-1, 12),
    "bits.value_bits": st.one_of(st.none(), st.integers(-1, 12)),
}
ATTN_KNOBS = {
    "bits.n_min": st.integers(-1, 10),
    "bits.n_max": st.integers(-1, 10),
    "bits.last_n": st.integers(-2, 20),
    "bits.target_error": st.floats(-0.1, 2.0, allow_nan=False),
    "bits.q_quantile": st.floats(-0.5, 1.5, allow_nan=False),
    "bits.bridge": st.booleans(),
}
BUDGET_KNOBS = {
    "bits.avg": st.floats(-1.0, 9.0, allow_nan=False),
    "bits.n_min": st.integers(-1, 10),
    "bits.n_max": st.integers(-1, 10),
    "bits.count_metadata": st.booleans(),
}
#: the knobs of the allocators that are not FixedBits (b2, b3, ... are)
BITS_KNOBS = {"attn": ATTN_KNOBS, "budget": BUDGET_KNOBS}
PREFILL_KNOBS = {"eval.prefix_len": st.one_of(st.none(), st.integers(-2, 600))}


def _value(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return "null" if v is None else repr(v) if isinstance(v, float) else str(v)


@st.composite
def configurations(draw) -> list[str]:
    """Random options of *every* group (model, data and logger too) plus random knob values."""
    ov = [f"{g}={draw(st.sampled_from(options(g)))}" for g in (*GROUP_AXES, "model", "data", "logger")]
    chosen = dict(o.split("=") for o in ov)
    knobs = dict(KNOBS)
    knobs.update(BITS_KNOBS.get(chosen["bits"], FIXED_KNOBS))  # each allocator's own fields
    if chosen["eval"] == "prefill":
        knobs.update(PREFILL_KNOBS)
    for key in draw(st.lists(st.sampled_from(sorted(knobs)), unique=True, max_size=4)):
        ov.append(f"{key}={_value(draw(knobs[key]))}")
    return ov


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=configurations())
def test_random_configurations_validate_or_are_rejected_in_one_line(compose, overrides: list[str]) -> None:
    """Composed by Hydra for real; validation never raises; a valid point's cache can be built."""
    try:
        cfg = compose(overrides)
    except (HydraException, OmegaConfBaseException) as e:  # malformed: the CLI exits 2 with this message
        pytest.fail(f"a type-correct override failed composition: {overrides}: {e}")
    model = dict(o.split("=", 1) for o in overrides)["model"]
    for meta in (None, MODEL_METAS[model]):
        rep = validate(cfg, meta)
        assert all("\n" not in line for line in rep.lines())
        assert all(v.rule and v.reason and v.fix for v in rep.violations)
        if rep.ok:
            experiment_key(cfg, meta)
            _build_cache_spec(cfg)  # what the run builds next must not fail on a validated point


def _build_cache_spec(cfg) -> None:
    """What ``kvq.run`` builds from the axes before it loads data (as in ``run._evaluate``): the
    method's cache, through the one interface every method has (kvq.method.Method.build_cache)."""
    from kvq.models import TinyRandomLlama
    from kvq.protocols import KVSetup

    p = make_point(cfg)
    if p.eval.quantizes_whole_cache:
        p.eval.split(p.seq_len)
    setup = KVSetup(
        p.method,
        p.bits,
        2,
        model_config=TinyRandomLlama().config(),
        granularity=p.granularity,
        knobs=p.kv.knobs(),
    )
    setup.cache(deferred=p.eval.quantizes_whole_cache)


@pytest.mark.parametrize("rule", ["attn-adaptive", "token-needs-whole-cache", "values"])
def test_invalid_runs_skip_in_process(compose, tmp_path: Path, rule: str) -> None:
    from kvq.run import run

    extra = {
        "attn-adaptive": ["bits=attn", "method=adaptive"],
        "token-needs-whole-cache": ["granularity=token"],
        "values": ["bits=attn", "bits.n_min=5", "bits.n_max=3"],
    }[rule]
    run(compose([*TINY, *extra]), out_dir=tmp_path)
    rec = read_result(tmp_path)
    assert rec["status"] == "skipped" and rec["reason"].startswith(f"{rule}: ") and "\n" not in rec["reason"]


# --------------------------------------------------------------------------- the real CLI
@pytest.mark.slow
def test_cli_impossible_value_is_skipped_with_exit_zero(tmp_path: Path) -> None:
    out = train_eval_cli(
        [*TINY, "bits=attn", "bits.n_min=6", "bits.n_max=3", f"hydra.run.dir={tmp_path}"], tmp_path
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rec = read_result(tmp_path)
    assert rec["status"] == "skipped" and "bits.n_min (6) must be <= bits.n_max (3)" in rec["reason"]
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_cli_malformed_grid_exits_2_before_any_launch(tmp_path: Path) -> None:
    # single runs: tests/test_run.py::test_cli_bad_input_exit_codes (wrong type, unknown key)
    out = train_eval_cli(["-m", *TINY, "grouping.size=32,abc", f"hydra.sweep.dir={tmp_path}/m"], tmp_path)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "could not be converted to Integer" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "m" / "0").exists()  # nothing launched


def test_malformed_composition_raises_hydra_errors(compose) -> None:
    # what the CLI turns into exit code 2 (tests above): composition fails, before validation
    for bad in (["grouping.size=abc"], ["nonexistent=1"], ["bits=b5"]):
        with pytest.raises((HydraException, OmegaConfBaseException)):
            compose(bad)
    assert OmegaConf.is_config(compose(["grouping.size=48"]))


def test_attention_aware_bits_with_per_channel_keys_are_rejected(compose) -> None:
    from kvq.validate import validate

    cfg = compose(["model=tiny_random", "bits=attn", "kv.key_axis=channel"])
    rep = validate(cfg)
    assert [v.rule for v in rep.invalid] == ["attn-channel-keys"]
    assert "\n" not in rep.reason()


def test_attention_aware_values_with_per_channel_keys_are_valid(compose) -> None:
    from kvq.validate import validate

    cfg = compose(
        ["model=tiny_random", "bits=attn", "bits.fixed_key_bits=4", "kv.key_axis=channel", "eval=prefill"]
    )
    assert validate(cfg).ok


def test_token_units_on_a_model_with_sliding_layers_are_invalid(compose) -> None:
    """The model's layer types come from its config (no weights): sliding layers drop old tokens,
    so a unit spanning every layer cannot exist there."""
    cfg = compose(["granularity=token", "eval=prefill"])
    assert validate(cfg, LLAMA3_META).ok
    for meta in (MISTRAL_META, GEMMA2_META, GEMMA3_META):
        rep = validate(cfg, meta)
        assert [v.rule for v in rep.invalid] == ["token-sliding"] and "\n" not in rep.reason()
    assert validate(compose(["granularity=layer", "eval=prefill"]), GEMMA3_META).ok
