"""Declarative validation of a run configuration, before any model loads.

Each :class:`Rule` is a predicate over a :class:`Point` (the run's instantiated axis objects,
plus the model's shape for model-aware rules) with a one-line reason and a suggested fix.
:func:`validate` reports every violation at once. Two tiers:

* static — the config alone (``model_aware=False`` rules);
* model-aware — also the model's shape (head_dim, KV heads, layers, context) from
  ``model.meta()``, which reads the model's config without loading weights.

Kinds:

* ``invalid`` — the combination is meaningless: the run is *skipped* (``result.json`` with
  ``status: skipped`` and the reason, exit code 0), the Hydra sweeper drops it before launch;
* ``duplicate`` — the combination is the same experiment as another one (e.g. ``g128`` on a
  64-feature unit is ``grouping=none``): a single run runs it with a warning, a grid keeps one
  run per experiment (:func:`experiment_key`, :func:`triage`).

Impossible values (``n_min > n_max``, bits outside 1..8, ...) are raised by the config classes'
own checks and reported as ``invalid`` too (rule ``values``), so a sweep that samples them skips
the point instead of failing the agent. Unknown keys and wrong types are caught earlier, at
composition (exit code 2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kvq.alloc import AttentionAwareBits, FixedBits
from kvq.cache import Granularity, KVSettings
from kvq.models import ModelMeta
from kvq.protocols import Decode
from kvq.quant import AdaptiveQuantizer, FullPrecision, Grouping, Quantizer

__all__ = [
    "RULES",
    "MetaCache",
    "Point",
    "Report",
    "Rule",
    "Verdict",
    "Violation",
    "experiment_key",
    "make_point",
    "triage",
    "validate",
]

log = logging.getLogger(__name__)

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
        return _flat(f"{self.rule}: {self.reason} (fix: {self.fix})")


@dataclass
class Point:
    """A run's axes as objects (``None`` where a node could not be built, see ``errors``).

    Attributes:
        method: the quantizer (or a peer method); bits: the allocator; grouping, granularity, kv, eval: their nodes;
        meta: the model's shape (model-aware rules) or ``None``; errors: node -> message;
        seq_len: tokens per evaluation window (``data.seq_len``), ``None`` if unknown.
    """

    method: Any  # a Quantizer, or a peer method (kvq.peers)
    bits: Any
    grouping: Grouping | None
    granularity: Granularity | None
    kv: KVSettings | None
    eval: Any
    meta: ModelMeta | None = None
    errors: dict[str, str] = field(default_factory=dict)
    seq_len: int | None = None

    def unit_size(self) -> int | None:
        """Features in one quantization unit on this model (``None`` without the model's shape)."""
        if self.meta is None or self.granularity is None:
            return None
        per_layer = self.meta.n_kv_heads * self.meta.head_dim
        return {"head": self.meta.head_dim, "layer": per_layer, "token": per_layer * self.meta.n_layers}[
            self.granularity.unit
        ]

    def prefix_len(self) -> int | None:
        """Prefix tokens of the ``prefill`` protocol (``None`` for other protocols or unknown)."""
        if self.eval is None or not self.eval.quantizes_whole_cache or self.seq_len is None:
            return None
        p = getattr(self.eval, "prefix_len", None)
        return self.seq_len // 2 if p is None else p

    def cached_tokens(self) -> int | None:
        """Most tokens the cache holds when it quantizes, per window (``None`` if unknown)."""
        if self.eval is None or self.seq_len is None:
            return None
        if self.eval.quantizes_whole_cache:  # prefill: the prefix
            return self.prefix_len()
        if isinstance(self.eval, Decode):  # token by token: the last token is never fed
            return self.seq_len - 1
        return self.seq_len  # fakequant: the whole window in one forward


@dataclass(frozen=True)
class Rule:
    """A predicate that marks a :class:`Point` as invalid or a duplicate.

    Attributes:
        name: short id (shown in reports).
        kind: ``invalid`` or ``duplicate``.
        applies: ``point -> bool``; True = violated.
        reason: one line (or ``point -> str``).
        fix: one line, the suggested change (or ``point -> str``).
        model_aware: needs ``point.meta``.
    """

    name: str
    kind: str
    applies: Callable[[Point], bool]
    reason: str | Callable[[Point], str]
    fix: str | Callable[[Point], str]
    model_aware: bool = False

    def check(self, p: Point) -> Violation | None:
        if self.model_aware and p.meta is None:
            return None
        try:
            hit = self.applies(p)
        except (AttributeError, TypeError):  # a node it needs could not be built: see `values`
            return None
        if not hit:
            return None
        reason = self.reason(p) if callable(self.reason) else self.reason
        fix = self.fix(p) if callable(self.fix) else self.fix
        return Violation(self.name, self.kind, reason, fix)


# ---------------------------------------------------------------------------------------------
# predicates
# ---------------------------------------------------------------------------------------------


def _kvq(p: Point) -> bool:
    """One of kvq's own quantizers (not the full-precision baseline, not a peer cache)."""
    return isinstance(p.method, Quantizer) and not isinstance(p.method, FullPrecision)


def _peer(p: Point) -> bool:
    """A peer method (:mod:`kvq.peers`: transformers' ``QuantizedCache``), which builds its own cache."""
    return bool(getattr(p.method, "is_peer", False))


#: defaults of the ``kv`` node's knobs (a knob away from its default may be ignored by a cache)
_KV_DEFAULTS = {f.name: f.default for f in dataclasses.fields(KVSettings)}


def _kv_changed(p: Point, *names: str) -> list[str]:
    """The ``kv.*`` knobs among ``names`` set away from their defaults."""
    if p.kv is None:
        return []
    out = []
    for n in names:
        if not hasattr(p.kv, n) or n not in _KV_DEFAULTS:
            continue
        v, d = getattr(p.kv, n), _KV_DEFAULTS[n]
        if (v != d) if not isinstance(d, float) else float(v) != d:
            out.append(f"kv.{n}={v}")
    return out


def _attn_adaptive(p: Point) -> bool:
    # method=normal is allowed with bits=attn: like uniform it reads bits as 2**bits levels of a
    # fixed-shape grid (Gaussian quantiles) scaled by one statistic of the unit (its std), so
    # QAQ's range/(2e) error model still maps a tolerated error to a level count (tighter in the
    # bulk, looser in the tails) -- QAQ's own code pairs its allocation with a normal quantizer.
    # adaptive's levels are the unit's empirical quantiles: its error is not a function of
    # range / 2**bits at all -- unless bits.bridge=true, where each method supplies its own error
    # per width (measured for adaptive) and the allocation means what it says again.
    return (
        isinstance(p.bits, AttentionAwareBits)
        and not getattr(p.bits, "bridge", False)
        and isinstance(p.method, AdaptiveQuantizer)
    )


def _token_unit(p: Point) -> bool:
    if p.granularity is None or p.eval is None or _peer(p):
        return False
    return p.granularity.unit == "token" and not p.eval.quantizes_whole_cache


def _group_covers_unit(p: Point) -> bool:
    D = p.unit_size()
    return (
        _kvq(p)
        and p.grouping is not None
        and p.grouping.size is not None
        and D is not None
        and p.grouping.size >= D
    )


def _no_outliers(p: Point) -> bool:
    D = p.unit_size()
    return _kvq(p) and D is not None and p.method.outlier_ratio > 0 and p.method.n_outliers(D) == 0


def _baseline_variant(p: Point) -> bool:
    return isinstance(p.method, FullPrecision) and (
        p.bits != BASELINE["bits"]
        or p.grouping != BASELINE["grouping"]
        or p.granularity != BASELINE["granularity"]
        or bool(_kv_changed(p, "outlier_ratio", "key_axis", "key_group", "pre_rope"))
    )


def _attn_fixed(p: Point) -> bool:
    return (
        _kvq(p)
        and isinstance(p.bits, AttentionAwareBits)
        and p.bits.n_min == p.bits.n_max
        and p.bits.fixed_key_bits in (None, p.bits.n_max)
    )


def _prefix_too_long(p: Point) -> bool:
    P = p.prefix_len()
    return P is not None and p.seq_len is not None and not 1 <= P <= p.seq_len - 2


def _nothing_quantized(p: Point) -> bool:
    n = p.cached_tokens()
    return _kvq(p) and p.kv is not None and n is not None and n > 0 and p.kv.residual + p.kv.sinks >= n


def _beyond_context(p: Point) -> bool:
    return (
        p.meta is not None
        and p.seq_len is not None
        and p.meta.max_position is not None
        and p.seq_len > p.meta.max_position
    )


def _key_channel_token(p: Point) -> bool:
    return (
        _kvq(p)
        and p.granularity is not None
        and p.granularity.unit == "token"
        and getattr(p.kv, "key_axis", "token") == "channel"
    )


def _key_group_unused(p: Point) -> bool:
    return _kvq(p) and getattr(p.kv, "key_axis", "token") == "token" and bool(_kv_changed(p, "key_group"))


def _peer_protocol(p: Point) -> bool:
    return _peer(p) and p.eval is not None and not p.eval.quantizes_whole_cache


def _peer_bits(p: Point) -> bool:
    if not _peer(p):
        return False
    if isinstance(p.bits, AttentionAwareBits):
        return True
    return isinstance(p.bits, FixedBits) and p.bits.value_bits not in (None, p.bits.key_bits)


def _peer_ignored(p: Point) -> list[str]:
    if not _peer(p):
        return []
    out = (
        []
        if p.granularity is None or p.granularity == BASELINE["granularity"]
        else [f"granularity={p.granularity.unit}"]
    )
    return out + _kv_changed(p, "sinks", "outlier_ratio", "key_axis", "key_group", "pre_rope")


def _eval_name(p: Point) -> str:
    return type(p.eval).__name__.lower()


def _method_name(p: Point) -> str:
    return f"hf_{getattr(p.method, 'backend', '')}" if _peer(p) else type(p.method).__name__


# ---------------------------------------------------------------------------------------------
# the rules
# ---------------------------------------------------------------------------------------------

RULES: list[Rule] = [
    Rule(
        "attn-adaptive",
        "invalid",
        _attn_adaptive,
        "bits=attn picks each unit's bit count from QAQ's error bound for a uniform grid "
        "(error ~ range / 2^bits), but method=adaptive spends 2^bits levels on the unit's own "
        "quantiles, whose error does not follow that bound: the bits QAQ allocates would not mean "
        "what it computed",
        "use bits.bridge=true (each method's own error per width decides), bits=attn with method=uniform "
        "or method=normal, or fixed bits (b2/b3/b4/b8) with method=adaptive",
    ),
    Rule(
        "token-needs-whole-cache",
        "invalid",
        _token_unit,
        lambda p: (
            f"granularity=token makes one unit of a token across all layers, but eval={_eval_name(p)} "
            "quantizes layer by layer during the forward, before the other layers exist"
        ),
        "use eval=prefill with granularity=token, or granularity=head/layer",
    ),
    Rule(
        "key-channel-token",
        "invalid",
        _key_channel_token,
        "kv.key_axis=channel groups each key channel of a head over tokens within a layer, but "
        "granularity=token makes one unit of a token across all layers",
        "use granularity=head or layer with kv.key_axis=channel, or kv.key_axis=token",
    ),
    Rule(
        "attn-channel-keys",
        "invalid",
        lambda p: (
            isinstance(p.bits, AttentionAwareBits)
            and p.bits.fixed_key_bits is None
            and p.kv is not None
            and p.kv.key_axis == "channel"
            and not getattr(p.method, "is_peer", False)
        ),
        "bits=attn gives each token (and head) its own bit width, but kv.key_axis=channel quantizes keys "
        "per channel over groups of tokens: there is no per-token key unit to give bits to",
        "set bits.fixed_key_bits=N (attention-aware bits for values only), use kv.key_axis=token, or fixed bits",
    ),
    Rule(
        "peer-needs-prefill",
        "invalid",
        _peer_protocol,
        lambda p: (
            f"method={_method_name(p)} is transformers' QuantizedCache, which hands back the unquantized K/V "
            f"of the call that stores them: with eval={_eval_name(p)} every query would see full-precision "
            "keys and values"
        ),
        "use eval=prefill with peer methods (hf_quanto, hf_hqq)",
    ),
    Rule(
        "peer-fixed-bits",
        "invalid",
        _peer_bits,
        lambda p: (
            f"method={_method_name(p)} quantizes keys and values with one fixed width (method.nbits): "
            + (
                "the per-unit widths of bits=attn cannot be applied"
                if isinstance(p.bits, AttentionAwareBits)
                else f"bits.value_bits={p.bits.value_bits} != bits.key_bits={p.bits.key_bits} cannot be applied"
            )
        ),
        "use fixed bits (b2/b3/b4/b8) without value_bits with peer methods",
    ),
    Rule(
        "prefill-window",
        "invalid",
        _prefix_too_long,
        lambda p: (
            f"eval=prefill with a prefix of {p.prefix_len()} tokens leaves nothing to score in a window "
            f"of data.seq_len={p.seq_len} (the prefix must be 1..seq_len-2)"
        ),
        "lower eval.prefix_len (null = half the window) or raise data.seq_len",
    ),
    Rule(
        "nothing-quantized",
        "invalid",
        _nothing_quantized,
        lambda p: (
            f"kv.residual={p.kv.residual} + kv.sinks={p.kv.sinks} full-precision tokens cover all "
            f"{p.cached_tokens()} tokens the cache holds per window with eval={_eval_name(p)}: nothing is "
            "quantized, the run would measure the full-precision baseline"
        ),
        lambda p: f"keep kv.residual + kv.sinks below {p.cached_tokens()}, or raise data.seq_len",
    ),
    Rule(
        "baseline-variant",
        "duplicate",
        _baseline_variant,
        "method=none stores K/V unquantized, so bits, grouping, granularity and the kv quantization "
        "knobs (outlier_ratio, key_axis, key_group, pre_rope) do not change it: the same experiment as "
        "the baseline with default axes",
        "run method=none with the defaults (bits=b4 grouping=none granularity=layer, default kv.*)",
    ),
    Rule(
        "peer-ignores",
        "duplicate",
        lambda p: bool(_peer_ignored(p)),
        lambda p: (
            f"method={_method_name(p)} builds transformers' own cache, which ignores "
            f"{', '.join(_peer_ignored(p))}: the same experiment as with their defaults"
        ),
        "leave granularity, kv.sinks, kv.outlier_ratio, kv.key_axis, kv.key_group, kv.pre_rope at their "
        "defaults with peer methods",
    ),
    Rule(
        "key-group-unused",
        "duplicate",
        _key_group_unused,
        lambda p: (
            f"kv.key_group={p.kv.key_group} only applies with kv.key_axis=channel: the same experiment as "
            "the default key_group"
        ),
        "set kv.key_axis=channel, or leave kv.key_group at its default",
    ),
    Rule(
        "attn-fixed",
        "duplicate",
        _attn_fixed,
        lambda p: (
            f"bits=attn with bits.n_min = bits.n_max = {p.bits.n_max} gives every unit {p.bits.n_max} bits: "
            f"the same experiment as fixed bits (b{p.bits.n_max})"
        ),
        lambda p: f"use bits=b{p.bits.n_max}, or widen [bits.n_min, bits.n_max]",
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
        "outliers-round-to-zero",
        "duplicate",
        _no_outliers,
        lambda p: (
            f"outlier_ratio={p.method.outlier_ratio} keeps 0 outliers per side of a {p.unit_size()}-feature "
            f"{p.granularity.unit} unit on {p.meta.name}: the same experiment as kv.outlier_ratio=0"
        ),
        lambda p: f"use kv.outlier_ratio >= {2 / p.unit_size():.3g} (one outlier per side), or 0",
        model_aware=True,
    ),
    Rule(
        "beyond-context",
        "invalid",
        _beyond_context,
        lambda p: (
            f"data.seq_len={p.seq_len} exceeds the {p.meta.max_position} positions {p.meta.name} was "
            "built for: the perplexity would measure the model out of its context, not the cache"
        ),
        lambda p: f"use data.seq_len <= {p.meta.max_position}",
        model_aware=True,
    ),
]


# ---------------------------------------------------------------------------------------------
# building a point, validating it
# ---------------------------------------------------------------------------------------------


def _build(node: Any, **kw: Any) -> Any:
    return instantiate(node, **kw, _convert_="all")


#: method fields that interpolate another node by default (``conf/method/*.yaml``), as they appear
#: in the method's error message: an error of the source node is reported once, not again by the
#: method
_ECHOES = (
    ("group_size", "grouping"),
    ("outlier_ratio", "kv"),
    ("supports bits", "bits"),
    ("residual_length", "kv"),
)


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
    m = errors.get("method", "")
    if any(f in m and src in errors for f, src in _ECHOES):
        del errors["method"]
    seq_len = _select_int(cfg, "data.seq_len")
    max_windows = _select_int(cfg, "data.max_windows")
    if seq_len is not None and seq_len < 2:
        errors["data"] = f"data.seq_len must be >= 2 (got {seq_len})"
        seq_len = None
    elif max_windows is not None and max_windows < 1:
        errors["data"] = f"data.max_windows must be >= 1 or null for all (got {max_windows})"
    return Point(meta=meta, errors=errors, seq_len=seq_len, **built)


def _select_int(cfg: DictConfig, key: str) -> int | None:
    v = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    return None if isinstance(v, bool) or not isinstance(v, int) else v


def _flat(text: str) -> str:
    return " ".join(text.split())


def _one_line(e: BaseException) -> str:
    cause = e
    while cause.__cause__ is not None:  # Hydra wraps the class's own ValueError
        cause = cause.__cause__
    text = str(cause).strip().splitlines()
    return _flat(text[0]) if text else type(cause).__name__


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

    def lines(self) -> list[str]:
        """One line per violation (invalid first)."""
        return [v.line() for v in (*self.invalid, *self.duplicates)]


def validate(cfg: DictConfig, meta: ModelMeta | None = None, point: Point | None = None) -> Report:
    """Check ``cfg`` against every rule (model-aware ones only when ``meta`` is given)."""
    p = point or make_point(cfg, meta)
    out = [
        Violation("values", "invalid", msg, f"correct {node}.* (see conf/{node}/)")
        for node, msg in p.errors.items()
    ]
    out += [v for r in RULES if (v := r.check(p)) is not None]
    return Report(out)


# ---------------------------------------------------------------------------------------------
# experiment identity
# ---------------------------------------------------------------------------------------------

# Keys that do not change an experiment's result (where it runs, how it is logged).
_NON_EXPERIMENT_KEYS = ("logger", "accelerator", "cache_dir", "hydra", "results_dir", "reuse")


def experiment_key(cfg: DictConfig, meta: ModelMeta | None = None, point: Point | None = None) -> str:
    """A hash of what defines the experiment, with duplicates mapped onto one key.

    ``method=none`` ignores bits, grouping, granularity and the kv quantization knobs; a peer
    method (``hf_*``) is defined by its own node (nbits, q_group_size, residual_length, axes);
    a group that covers the whole unit is ``grouping=none``; an outlier ratio that keeps no
    outlier is 0; ``bits=attn`` with ``n_min == n_max`` is fixed bits; ``value_bits == key_bits``
    is ``value_bits: null``; ``kv.key_group`` only counts with ``kv.key_axis=channel``. Logging,
    placement and storage keys are left out.
    """
    c = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert isinstance(c, dict)
    for k in _NON_EXPERIMENT_KEYS:
        c.pop(k, None)
    p = point or make_point(cfg, meta)
    method = c.get("method") if isinstance(c.get("method"), dict) else {}
    kv = c.get("kv") if isinstance(c.get("kv"), dict) else {}
    ignored_kv = ("outlier_ratio", "key_axis", "key_group", "pre_rope")
    if isinstance(p.method, FullPrecision):
        for k in ("bits", "grouping", "granularity"):
            c.pop(k, None)
        method.pop("group_size", None)
        for k in ignored_kv:
            kv.pop(k, None)
    elif _peer(p):
        for k in ("bits", "grouping", "granularity"):
            c.pop(k, None)  # nbits and q_group_size are resolved into the method node
        for k in ("sinks", *ignored_kv):
            kv.pop(k, None)
        if "q_group_size" in method and method["q_group_size"] is None:
            method["q_group_size"] = 64  # what transformers' QuantizedCache uses for null
    else:
        if _group_covers_unit(p):
            c["grouping"]["size"] = None
            method["group_size"] = None
        if _no_outliers(p):
            method["outlier_ratio"] = 0.0
            kv["outlier_ratio"] = 0.0
        if _attn_fixed(p):
            c["bits"] = {"_target_": "kvq.alloc.FixedBits", "key_bits": p.bits.n_max, "value_bits": None}
        bits = c.get("bits")
        if (
            isinstance(p.bits, FixedBits)
            and isinstance(bits, dict)
            and bits.get("value_bits") == p.bits.key_bits
        ):
            bits["value_bits"] = None
        if kv.get("key_axis", "token") == "token":
            kv.pop("key_group", None)
    blob = json.dumps(c, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# grids: validate and de-duplicate many configurations at once
# ---------------------------------------------------------------------------------------------


class MetaCache:
    """``model`` node -> :class:`ModelMeta` (read once per distinct model config; ``None`` on error).

    Reading a GGUF's metadata takes seconds: a grid over hundreds of points asks once per model.
    """

    def __init__(self) -> None:
        self._cache: dict[str, tuple[ModelMeta | None, str | None]] = {}

    def get(self, cfg: DictConfig) -> tuple[ModelMeta | None, str | None]:
        """``(meta, None)`` or ``(None, one-line error)`` for ``cfg.model``."""
        try:
            node = OmegaConf.to_container(cfg.model, resolve=True)
            key = json.dumps(node, sort_keys=True, default=str)
        except Exception as e:  # noqa: BLE001
            return None, _one_line(e)
        if key not in self._cache:
            try:
                self._cache[key] = (_build(cfg.model).meta(), None)
            except Exception as e:  # noqa: BLE001 -- model-aware rules are then skipped
                self._cache[key] = (None, _one_line(e))
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
            why = "; ".join(_flat(f"{v.rule}: {v.reason}") for v in self.report.duplicates)
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
                v.key = experiment_key(cfg, meta, point)
            except Exception as e:  # noqa: BLE001 -- cannot be compared: run it
                log.debug("no experiment key for #%d: %s", i, _one_line(e))
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
