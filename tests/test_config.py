"""Test the configs, not only the code: every option of every group composes and instantiates."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf.errors import ConfigKeyError, ValidationError

from kvq.config import GROUPS

from .conftest import CONF_DIR


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


ALL = [(g, o) for g in GROUPS for o in options(g)]


def test_every_group_has_its_contracted_options() -> None:
    # the options the README promises (a group may gain more: options are discovered, not listed)
    assert {"adaptive", "hf_hqq", "hf_quanto", "none", "normal", "uniform"} <= set(options("method"))
    assert {"g128", "g32", "g64", "none"} <= set(options("grouping"))
    assert {"attn", "b2", "b3", "b4", "b8"} <= set(options("bits"))
    assert {"head", "layer", "token"} <= set(options("granularity"))
    assert {
        "llama2_7b",
        "llama3_8b",
        "mistral_7b",
        "qwen2_5_7b",
        "smollm2_135m",
        "tiny_random",
        "gguf",
        "hf",
    } <= set(options("model"))
    assert {"c4", "local", "ptb", "pydoc", "wikitext2"} <= set(options("data"))
    assert {"decode", "fakequant", "prefill"} <= set(options("eval"))
    assert {"none", "wandb"} <= set(options("logger"))


def test_every_option_is_a_discovered_target() -> None:
    """Each YAML's _target_ class has its schema registered (nothing lists them by hand)."""
    import yaml
    from hydra.core.config_store import ConfigStore
    from hydra.utils import get_class

    repo = ConfigStore.instance().repo["schema"]
    for group in GROUPS:
        for path in (CONF_DIR / group).glob("*.yaml"):
            cls = get_class(yaml.safe_load(path.read_text())["_target_"])
            assert cls in GROUPS[group], (group, path.name)
            assert f"{cls.__name__}.yaml" in repo[group], (group, cls.__name__)


@pytest.mark.parametrize("group, option", ALL, ids=[f"{g}={o}" for g, o in ALL])
def test_compose_and_instantiate_every_option(compose, group: str, option: str) -> None:
    cfg = compose([f"{group}={option}"])
    node = cfg[group]
    obj = instantiate(node, _convert_="all")
    assert type(obj) in GROUPS[group]
    assert f"{type(obj).__module__}.{type(obj).__qualname__}".endswith(node._target_.rsplit(".", 1)[-1])


def test_defaults(compose) -> None:
    cfg = compose()
    assert cfg.method._target_ == "kvq.quant.UniformQuantizer"
    assert cfg.bits.key_bits == 4 and cfg.grouping.size == 64
    assert cfg.kv.key_axis == "auto" and cfg.kv.key_group == 64
    assert cfg.model._target_ == "kvq.models.SmolLM2Embedded"
    assert cfg.data._target_ == "kvq.data.PyDoc" and cfg.eval._target_ == "kvq.protocols.FakeQuant"
    assert cfg.logger._target_ == "kvq.tracking.WandbTracker"
    assert (
        cfg.granularity.unit == "layer"
    )  # g128 is meaningful on the embedded model's 192-feature layer unit


def test_grouping_flows_into_the_method(compose) -> None:
    cfg = compose(["method=adaptive", "grouping=g128", "kv.outlier_ratio=0.01"])
    q = instantiate(cfg.method)
    assert q.group_size == 128 and q.outlier_ratio == 0.01


def test_knobs(compose) -> None:
    cfg = compose(
        [
            "data=local",
            "data.path=/x.txt",
            "data.seq_len=128",
            "data.max_windows=3",
            "model.dtype=bfloat16",
            "seed=7",
        ]
    )
    assert (cfg.data.path, cfg.data.seq_len, cfg.data.max_windows, cfg.model.dtype, cfg.seed) == (
        "/x.txt",
        128,
        3,
        "bfloat16",
        7,
    )


@pytest.mark.parametrize(
    "override, error",
    [
        ("method.grop_size=3", ConfigCompositionException),  # typo in a key
        ("bits.key_bits=four", ConfigCompositionException),  # wrong type
        ("seeed=1", ConfigCompositionException),  # unknown top-level key
        ("method=foo", ConfigCompositionException),  # unknown option
    ],
)
def test_malformed_configs_fail_at_composition(compose, override: str, error) -> None:
    with pytest.raises((error, ConfigKeyError, ValidationError)):
        compose([override])


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_experiment_presets_compose(compose, preset: str) -> None:
    cfg = compose([f"+experiment={preset}"])
    for group in ("method", "bits", "grouping", "granularity", "eval"):
        instantiate(cfg[group], _convert_="all")
    if preset.startswith("kivi"):
        assert cfg.kv.key_axis == "channel" and cfg.granularity.unit == "head"
    if preset.startswith("qaq"):
        assert (
            cfg.bits._target_ == "kvq.alloc.AttentionAwareBits"
            and cfg.eval._target_ == "kvq.protocols.Prefill"
        )
