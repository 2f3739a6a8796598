"""Structured-config schemas for every config group, discovered from ``conf/`` and registered in
Hydra's ConfigStore.

Each option of a group is a YAML file in ``conf/<group>/`` whose ``_target_`` is a ``@dataclass``
(kvq's or anyone's importable class). The schemas are *discovered*: every ``_target_`` found in
``conf/<group>/*.yaml`` gets a schema derived from the class itself (``_target_`` plus the
class's init fields and their types), registered as ``schema/<group>/<ClassName>``, so a typo in
a key or a wrong type fails at composition. The YAML files pull their schema in with
``defaults: [/schema/<group>/<ClassName>@_here_, _self_]``. Adding an option is therefore one
class and one YAML -- nothing here lists them.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.core.config_store import ConfigStore
from hydra.utils import get_class
from omegaconf import MISSING

from kvq.cache import KVSettings

__all__ = ["CONF_DIR", "GROUPS", "SCHEMA_GROUPS", "RunConfig", "discover", "register_configs", "schema"]

#: the project's config directory (``train_eval.py`` composes from it)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
#: the config groups whose options are ``_target_`` dataclasses with a discovered schema
SCHEMA_GROUPS: tuple[str, ...] = (
    "method",
    "grouping",
    "bits",
    "granularity",
    "model",
    "data",
    "eval",
    "logger",
    "rotation",
    "calib",
)

_SCHEMAS: dict[type, type] = {}


def schema(cls: type) -> type:
    """A structured-config dataclass for ``cls``: ``_target_`` plus the class's own init fields."""
    if cls in _SCHEMAS:
        return _SCHEMAS[cls]
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__module__}.{cls.__qualname__} is a config target but not a @dataclass")
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


def discover(conf_dir: Path = CONF_DIR) -> dict[str, tuple[type, ...]]:
    """``group -> the classes its options target``, read from ``conf_dir/<group>/*.yaml``.

    Raises:
        ValueError: an option's ``_target_`` cannot be imported, or two different classes of one
            group share a name (their schemas would collide).
    """
    out: dict[str, tuple[type, ...]] = {}
    for group in SCHEMA_GROUPS:
        classes: dict[str, type] = {}
        for path in sorted((conf_dir / group).glob("*.yaml")):
            node = yaml.safe_load(path.read_text()) or {}
            target = node.get("_target_") if isinstance(node, dict) else None
            if not isinstance(target, str):
                continue
            try:
                cls = get_class(target)
            except Exception as e:  # noqa: BLE001 -- one line naming the file
                raise ValueError(f"{path}: _target_ {target!r} cannot be imported ({e})") from e
            other = classes.setdefault(cls.__name__, cls)
            if other is not cls:
                raise ValueError(
                    f"{path}: {target} and {other.__module__}.{other.__qualname__} share the schema name "
                    f"schema/{group}/{cls.__name__}: rename one class"
                )
        out[group] = tuple(classes.values())
    return out


#: config group -> the classes its options target (discovered from conf/)
GROUPS: dict[str, tuple[type, ...]] = discover()


@dataclass
class RunConfig:
    """The top-level schema: one node per experimental axis plus run-wide knobs.

    Attributes:
        rotation: the transform around the quantizer (``conf/rotation/``, :mod:`kvq.quant.rotation`).
        calib: calibration windows of calibrated methods and allocators (``conf/calib/``, :mod:`kvq.calib`).
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
    rotation: Any = MISSING
    calib: Any = MISSING
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
