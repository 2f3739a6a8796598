"""Structured-config schemas for every config group, registered in Hydra's ConfigStore.

Each option of a group is a YAML file in ``conf/<group>/`` whose ``_target_`` is a ``kvq``
dataclass; its schema (the dataclass fields plus ``_target_``) is derived here from the class
itself, so a typo in a key or a wrong type fails at composition. The YAML files pull their
schema in with ``defaults: [/schema/<group>/<Class>@_here_, _self_]``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from kvq import data, models, peers, protocols, tracking
from kvq.alloc import AttentionAwareBits, FixedBits
from kvq.cache import Granularity, KVSettings
from kvq.quant import AdaptiveQuantizer, FullPrecision, Grouping, NormalQuantizer, UniformQuantizer

__all__ = ["GROUPS", "RunConfig", "register_configs", "schema"]

#: config group -> the classes its options may target
GROUPS: dict[str, tuple[type, ...]] = {
    "method": (
        FullPrecision,
        UniformQuantizer,
        NormalQuantizer,
        AdaptiveQuantizer,
        peers.HFQuanto,
        peers.HFHQQ,
    ),
    "grouping": (Grouping,),
    "bits": (FixedBits, AttentionAwareBits),
    "granularity": (Granularity,),
    "model": (models.SmolLM2Embedded, models.TinyRandomLlama, models.HubModel, models.GGUFModel),
    "data": (data.PyDoc, data.WikiText2, data.PTB, data.C4, data.LocalText),
    "eval": (protocols.FakeQuant, protocols.Prefill, protocols.Decode),
    "logger": (tracking.WandbTracker, tracking.NoTracker),
}

_SCHEMAS: dict[type, type] = {}


def schema(cls: type) -> type:
    """A structured-config dataclass for ``cls``: ``_target_`` plus the class's own fields."""
    if cls in _SCHEMAS:
        return _SCHEMAS[cls]
    hints = typing.get_type_hints(cls)
    fields: list[tuple[str, Any, Any]] = [
        ("_target_", str, field(default=f"{cls.__module__}.{cls.__qualname__}"))
    ]
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = field(default=f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = field(default_factory=f.default_factory)
        else:
            default = field(default=MISSING)
        fields.append((f.name, hints[f.name], default))
    _SCHEMAS[cls] = dataclasses.make_dataclass(f"{cls.__name__}Conf", fields)
    return _SCHEMAS[cls]


@dataclass
class RunConfig:
    """The top-level schema: one node per experimental axis plus run-wide knobs.

    Attributes:
        seed: global seed (``lightning.seed_everything``).
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``/``cuda``).
        cache_dir: token-cache folder (``null`` = ``~/.cache/kvq``).
        results_dir: the store of finished runs (:class:`kvq.results.ResultStore`).
        reuse: reuse a finished run of the same experiment from the store.
    """

    method: Any = MISSING
    grouping: Any = MISSING
    bits: Any = MISSING
    granularity: Any = MISSING
    model: Any = MISSING
    data: Any = MISSING
    eval: Any = MISSING
    logger: Any = MISSING
    kv: Any = field(default_factory=schema(KVSettings))
    seed: int = 0
    accelerator: str = "auto"
    cache_dir: str | None = None
    results_dir: str = "results"
    reuse: bool = True


def register_configs() -> None:
    """Register every schema (``schema/<group>/<Class>``) and the base config ``kvq_base``."""
    cs = ConfigStore.instance()
    for group, classes in GROUPS.items():
        for cls in classes:
            cs.store(group=f"schema/{group}", name=cls.__name__, node=schema(cls))
    cs.store(group="schema/kv", name="KVSettings", node=schema(KVSettings))
    cs.store(name="kvq_base", node=RunConfig)


register_configs()
