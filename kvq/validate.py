"""Declarative validation of a run configuration, before any model loads.

Each :class:`Rule` is a predicate over a :class:`Point` (the run's instantiated axis objects,
plus the model's shape for model-aware rules) with a one-line reason and a suggested fix.
:func:`validate` reports every violation at once. Kinds:

* ``invalid`` — the combination is meaningless: the run is *skipped* (``result.json`` with
  ``status: skipped`` and the reason, exit code 0), the Hydra sweeper drops it before launch;
* ``duplicate`` — the combination is the same experiment as another one (e.g. ``g128`` on a
  64-feature unit is ``grouping=none``): a single run runs it with a warning, a grid drops it.

Impossible values (``n_min > n_max``, bits outside 1..8, ...) are raised by the config classes'
own checks and reported as ``invalid`` too, so a sweep that samples them skips the point instead
of failing the agent. Unknown keys and wrong types are caught earlier, at composition (exit 2).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kvq.alloc import AttentionAwareBits, FixedBits
from kvq.cache import Granularity, KVSettings
from kvq.models import ModelMeta
from kvq.quant import AdaptiveQuantizer, FullPrecision, Grouping, Quantizer

__all__ = ["RULES", "Point", "Report", "Rule", "Violation", "experiment_key", "make_point", "validate"]

#: the non-method axes a ``method=none`` baseline is run with (the config defaults)
BASELINE = {"bits": FixedBits(4), "grouping": Grouping(None), "granularity": Granularity("layer")}


@dataclass(frozen=True)
class Violation:
    """One broken rule: ``rule`` name, ``kind`` (invalid/duplicate), ``reason`` and ``fix``."""

    rule: str
    kind: str
    reason: str
    fix: str

    def line(self) -> str:
        return f"{self.rule}: {self.reason} (fix: {self.fix})"


@dataclass
class Point:
    """A run's axes as objects (``None`` where a node could not be built, see ``errors``).

    Attributes:
        method: the quantizer; bits: the allocator; grouping, granularity, kv, eval: their nodes;
        meta: the model's shape (model-aware rules) or ``None``; errors: node -> message.
    """

    method: Quantizer | None
    bits: Any
    grouping: Grouping | None
    granularity: Granularity | None
    kv: KVSettings | None
    eval: Any
    meta: ModelMeta | None = None
    errors: dict[str, str] = field(default_factory=dict)

    def unit_size(self) -> int | None:
        if self.meta is None or self.granularity is None:
            return None
        per_layer = self.meta.n_kv_heads * self.meta.head_dim
        return {"head": self.meta.head_dim, "layer": per_layer, "token": per_layer * self.meta.n_layers}[
            self.granularity.unit
        ]


@dataclass(frozen=True)
class Rule:
    """A predicate that marks a :class:`Point` as invalid or a duplicate.

    Attributes:
        name: short id (shown in reports).
        kind: ``invalid`` or ``duplicate``.
        applies: ``point -> bool``; True = violated.
        reason: one line (or ``point -> str``).
        fix: one line, the suggested change.
        model_aware: needs ``point.meta``.
    """

    name: str
    kind: str
    applies: Callable[[Point], bool]
    reason: str | Callable[[Point], str]
    fix: str
    model_aware: bool = False

    def check(self, p: Point) -> Violation | None:
        if self.model_aware and p.meta is None:
            return None
        try:
            hit = self.applies(p)
        except AttributeError:  # a node it needs could not be built: reported by `values`
            return None
        if not hit:
            return None
        reason = self.reason(p) if callable(self.reason) else self.reason
        return Violation(self.name, self.kind, reason, self.fix)


def _attn_adaptive(p: Point) -> bool:
    # method=normal is allowed with bits=attn: like uniform it reads bits as 2**bits levels of a
    # fixed-shape grid (Gaussian quantiles) scaled by one statistic of the unit (its std), so
    # QAQ's range/(2e) error model still maps a tolerated error to a level count (tighter in the
    # bulk, looser in the tails) -- QAQ's own code pairs its allocation with a normal quantizer.
    # adaptive's levels are the unit's empirical quantiles: its error is not a function of
    # range / 2**bits at all.
    return isinstance(p.bits, AttentionAwareBits) and isinstance(p.method, AdaptiveQuantizer)


def _group_covers_unit(p: Point) -> bool:
    D = p.unit_size()
    return (
        not isinstance(p.method, FullPrecision)
        and p.grouping is not None
        and p.grouping.size is not None
        and D is not None
        and p.grouping.size >= D
    )


def _baseline_variant(p: Point) -> bool:
    return isinstance(p.method, FullPrecision) and (
        p.bits != BASELINE["bits"]
        or p.grouping != BASELINE["grouping"]
        or p.granularity != BASELINE["granularity"]
    )


RULES: list[Rule] = [
    Rule(
        "attn-adaptive",
        "invalid",
        _attn_adaptive,
        "bits=attn derives bit counts from QAQ's error model, which assumes uniform quantization, while "
        "method=adaptive reads bits as the number of empirical quantile levels (2^bits): the two meanings "
        "of 'bits' do not match",
        "use bits=attn with method=uniform or method=normal, or fixed bits (b2/b3/b4/b8) with method=adaptive",
    ),
    Rule(
        "token-needs-whole-cache",
        "invalid",
        lambda p: p.granularity.unit == "token" and not p.eval.quantizes_whole_cache,
        lambda p: (
            f"granularity=token makes one unit of all layers, but eval={type(p.eval).__name__.lower()} "
            "quantizes layer by layer during the forward"
        ),
        "use eval=prefill with granularity=token, or granularity=head/layer",
    ),
    Rule(
        "group-covers-unit",
        "duplicate",
        _group_covers_unit,
        lambda p: (
            f"grouping size {p.grouping.size} >= the {p.granularity.unit} unit ({p.unit_size()} features "
            f"on {p.meta.name}): the same experiment as grouping=none"
        ),
        "use a smaller grouping, or granularity=layer/token for larger units",
        model_aware=True,
    ),
    Rule(
        "baseline-variant",
        "duplicate",
        _baseline_variant,
        "method=none stores K/V unquantized, so bits/grouping/granularity do not change it: the same "
        "experiment as the baseline with default axes",
        "run method=none with the defaults (bits=b4 grouping=none granularity=layer)",
    ),
]


def _build(node: Any, **kw: Any) -> Any:
    return instantiate(node, **kw, _convert_="all")


def make_point(cfg: DictConfig, meta: ModelMeta | None = None) -> Point:
    """Instantiate the cheap axis nodes of ``cfg`` (no model, no data)."""
    errors: dict[str, str] = {}
    built: dict[str, Any] = {}
    for name in ("grouping", "granularity", "kv", "bits", "eval", "method"):
        try:
            built[name] = _build(cfg[name])
        except Exception as e:  # noqa: BLE001 -- reported as a one-line violation
            errors[name] = _one_line(e)
            built[name] = None
    return Point(meta=meta, errors=errors, **built)


def _one_line(e: BaseException) -> str:
    cause = e
    while cause.__cause__ is not None:  # Hydra wraps the class's own ValueError
        cause = cause.__cause__
    text = str(cause).strip().splitlines()
    return text[0] if text else type(cause).__name__


@dataclass
class Report:
    """All violations of one configuration."""

    violations: list[Violation]

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


def validate(cfg: DictConfig, meta: ModelMeta | None = None, point: Point | None = None) -> Report:
    """Check ``cfg`` against every rule (model-aware ones only when ``meta`` is given)."""
    p = point or make_point(cfg, meta)
    out = [
        Violation("values", "invalid", msg, f"correct {node}.* (see conf/{node}/)")
        for node, msg in p.errors.items()
    ]
    out += [v for r in RULES if (v := r.check(p)) is not None]
    return Report(out)


# Keys that do not change an experiment's result (where it runs, how it is logged).
_NON_EXPERIMENT_KEYS = ("logger", "accelerator", "cache_dir")


def experiment_key(cfg: DictConfig, meta: ModelMeta | None = None) -> str:
    """A hash of what defines the experiment, with duplicates mapped onto one key.

    ``method=none`` ignores bits/grouping/granularity; a group that covers the whole unit is
    ``grouping=none``. Logging and placement keys are left out.
    """
    c = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert isinstance(c, dict)
    for k in _NON_EXPERIMENT_KEYS:
        c.pop(k, None)
    p = make_point(cfg, meta)
    if isinstance(p.method, FullPrecision):
        for k in ("bits", "grouping", "granularity"):
            c.pop(k, None)
        c["method"].pop("group_size", None)
    elif _group_covers_unit(p):
        c["grouping"]["size"] = None
        c["method"]["group_size"] = None
    blob = json.dumps(c, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
