"""Declarative validation of a run configuration, before any model loads.

Each :class:`Rule` is a predicate over a :class:`~kvq.experiment.Point` (the run's instantiated
axis objects, plus the model's shape for model-aware rules) with a one-line reason and a
suggested fix. :func:`validate` reports every violation at once. Two tiers:

* static — the config alone (``model_aware=False`` rules);
* model-aware — also the model's shape (head_dim, KV heads, layers, context, sliding layers)
  from ``model.meta()``, which reads the model's config without loading weights.

Kinds:

* ``invalid`` — the combination is meaningless: the run is *skipped* (``result.json`` with
  ``status: skipped`` and the reason, exit code 0), the Hydra sweeper drops it before launch;
* ``duplicate`` — the combination is the same experiment as another one (e.g. ``g128`` on a
  64-feature unit is ``grouping=none``): a single run runs it with a warning, a grid keeps one
  run per experiment. Every duplicate rule carries its *canonical rewrite*, so the experiment
  identity follows from the rules that fired (:func:`experiment_key`).

Rules ask the method what it does (:mod:`kvq.method`), never what kind it is. Impossible values
(``n_min > n_max``, bits outside 1..8, ...) are raised by the config classes' own checks and
reported as ``invalid`` too (rule ``values``), so a sweep that samples them skips the point
instead of failing the agent. Unknown keys and wrong types are caught earlier, at composition
(exit code 2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kvq import rules, rules_needs
from kvq.errors import flat, one_line
from kvq.experiment import NON_EXPERIMENT_KEYS, Point, make_point, node_of
from kvq.rules import Rule, Violation

#: every rule, in the order they are checked (the point's axes first, then what it needs)
RULES: list[Rule] = [*rules.RULES, *rules_needs.RULES]

__all__ = [
    "RULES",
    "MetaCache",
    "Point",
    "Report",
    "Rule",
    "Verdict",
    "Violation",
    "canonical_config",
    "experiment_key",
    "make_point",
    "triage",
    "validate",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# validating one point
# ---------------------------------------------------------------------------------------------


@dataclass
class Report:
    """All violations of one configuration, and the duplicate rules that fired."""

    violations: list[Violation]
    fired: list[Rule] = dataclasses.field(default_factory=list)

    @property
    def invalid(self) -> list[Violation]:
        return [v for v in self.violations if v.kind == "invalid"]

    @property
    def duplicates(self) -> list[Violation]:
        return [v for v in self.violations if v.kind == "duplicate"]

    @property
    def ok(self) -> bool:
        """True when the run should execute (duplicates only warn)."""
        return not self.invalid

    def reason(self) -> str | None:
        """One line: every invalid reason joined, or ``None``."""
        return "; ".join(v.line() for v in self.invalid) or None

    def lines(self) -> list[str]:
        """One line per violation (invalid first)."""
        return [v.line() for v in (*self.invalid, *self.duplicates)]


#: config nodes that are not a config group (no ``conf/<node>/`` folder): where they are defined
_NODE_HOME = {"kv": "the kv: node of conf/config.yaml"}


def _values_fix(node: str) -> str:
    """The fix of an impossible value of ``node``: where its options and defaults are."""
    return f"correct {node}.* (see {_NODE_HOME.get(node, f'the options in conf/{node}/')})"


def validate(cfg: DictConfig, meta: Any = None, point: Point | None = None) -> Report:
    """Check ``cfg`` against every rule (model-aware ones only when ``meta`` is given)."""
    p = point or make_point(cfg, meta)
    out = [Violation("values", "invalid", msg, _values_fix(node)) for node, msg in p.errors.items()]
    fired = []
    for r in RULES:
        v = r.check(p)
        if v is not None:
            out.append(v)
            fired.append(r)
    return Report(out, fired)


# ---------------------------------------------------------------------------------------------
# experiment identity
# ---------------------------------------------------------------------------------------------


def canonical_config(
    cfg: DictConfig, meta: Any = None, point: Point | None = None, report: Report | None = None
) -> dict[str, Any]:
    """The experiment ``cfg`` describes, written canonically (what :func:`experiment_key` hashes).

    The resolved config without :data:`~kvq.experiment.NON_EXPERIMENT_KEYS`; the axis nodes as
    their objects see themselves (a peer's null group size is its default of 64, equal key and
    value widths are "values like keys"); the axes a method reads only through its own fields
    (:attr:`kvq.method.Method.resolved_axes`) left out; then the canonical rewrite of every
    duplicate rule that fired.
    """
    p = point or make_point(cfg, meta)
    report = report or validate(cfg, meta, p)
    c = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert isinstance(c, dict)
    for k in NON_EXPERIMENT_KEYS:
        c.pop(k, None)
    for axis in ("method", "bits", "grouping", "granularity", "kv", "eval", "rotation", "calib"):
        obj = getattr(p, axis)
        if obj is not None and dataclasses.is_dataclass(obj):
            c[axis] = node_of(obj)
    for rule in report.fired:
        if rule.rewrite is not None:
            rule.rewrite(p, c)
    for axis in getattr(p.method, "resolved_axes", ()):
        c.pop(axis, None)
    return c


def experiment_key(
    cfg: DictConfig,
    meta: Any = None,
    point: Point | None = None,
    identity: dict[str, Any] | None = None,
    report: Report | None = None,
) -> str:
    """A hash of what defines the experiment, with duplicates mapped onto one key.

    Args:
        cfg: the composed config.
        meta: the model's shape (model-aware duplicate rules), or ``None``.
        point: the point built from ``cfg`` (built here if not given).
        identity: what else changes the numbers and is not in the config (the resolved compute
            dtype and device kind, fingerprints of local data and weights, versions).
        report: the point's validation (computed here if not given).
    """
    c = canonical_config(cfg, meta, point, report)
    if identity:
        c["_identity"] = identity
    blob = json.dumps(c, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# grids: validate and de-duplicate many configurations at once
# ---------------------------------------------------------------------------------------------


class MetaCache:
    """``model`` node -> model shape (read once per distinct model config; ``None`` on error).

    Reading a GGUF's metadata takes seconds: a grid over hundreds of points asks once per model.
    """

    def __init__(self) -> None:
        self._cache: dict[str, tuple[Any, str | None]] = {}

    def get(self, cfg: DictConfig) -> tuple[Any, str | None]:
        """``(meta, None)`` or ``(None, one-line error)`` for ``cfg.model``."""
        try:
            node = OmegaConf.to_container(cfg.model, resolve=True)
            key = json.dumps(node, sort_keys=True, default=str)
        except Exception as e:  # noqa: BLE001
            return None, one_line(e, root_cause=True)
        if key not in self._cache:
            try:
                self._cache[key] = (instantiate(cfg.model, _convert_="all").meta(), None)
            except Exception as e:  # noqa: BLE001 -- model-aware rules are then skipped
                self._cache[key] = (None, one_line(e, root_cause=True))
        return self._cache[key]


@dataclass
class Verdict:
    """What a grid does with one configuration.

    Attributes:
        index: position in the grid.
        report: its violations.
        key: :func:`experiment_key` (``None`` when invalid or not computable).
        duplicate_of: index of the configuration that runs this experiment instead, or ``None``.
        meta_error: why model-aware rules were not applied (model not readable), or ``None``.
    """

    index: int
    report: Report
    key: str | None = None
    duplicate_of: int | None = None
    meta_error: str | None = None

    @property
    def status(self) -> str:
        """``run``, ``invalid`` (skipped / dropped) or ``duplicate`` (dropped in a grid)."""
        if not self.report.ok:
            return "invalid"
        return "duplicate" if self.duplicate_of is not None else "run"

    def reason(self, twin: str | None = None) -> str:
        """One line for a table of dropped configurations ('' for one that runs).

        Args:
            twin: how to name the configuration a duplicate repeats (default ``#<index>``).
        """
        if self.status == "invalid":
            return "; ".join(v.line() for v in self.report.invalid)
        if self.status == "duplicate":
            why = "; ".join(flat(f"{v.rule}: {v.reason}") for v in self.report.duplicates)
            return f"same experiment as {twin or f'#{self.duplicate_of}'}" + (f" -- {why}" if why else "")
        return ""


def triage(
    cfgs: Sequence[DictConfig], metas: MetaCache | None = None, model_aware: bool = True
) -> list[Verdict]:
    """Validate every configuration of a grid and mark all but one of each experiment as duplicate.

    Among configurations with the same :func:`experiment_key`, the one kept is the first without
    a ``duplicate`` violation (``grouping=none`` rather than ``g128`` on a 64-feature unit,
    ``method=none`` with the default axes), else the first one.

    Args:
        cfgs: composed configurations (a ``hydra`` node, if present, is ignored).
        metas: model shapes, shared between calls (a new cache if ``None``).
        model_aware: apply model-aware rules (reads each model's config, no weights).

    Returns:
        One :class:`Verdict` per configuration, in order.
    """
    metas = metas if metas is not None else MetaCache()
    out: list[Verdict] = []
    for i, cfg in enumerate(cfgs):
        meta, meta_error = metas.get(cfg) if model_aware else (None, None)
        point = make_point(cfg, meta)
        report = validate(cfg, meta, point)
        v = Verdict(i, report, meta_error=meta_error)
        if report.ok:
            try:
                v.key = experiment_key(cfg, meta, point, report=report)
            except Exception as e:  # noqa: BLE001 -- cannot be compared: run it
                log.debug("no experiment key for #%d: %s", i, one_line(e))
        out.append(v)
    groups: dict[str, list[Verdict]] = {}
    for v in out:
        if v.key is not None:
            groups.setdefault(v.key, []).append(v)
    for members in groups.values():
        keep = next((m for m in members if not m.report.duplicates), members[0])
        for m in members:
            if m is not keep:
                m.duplicate_of = keep.index
    return out
