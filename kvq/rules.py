"""The validator's rules: predicates over a :class:`~kvq.experiment.Point` with a one-line reason,
a fix, and -- for duplicates -- the canonical rewrite (see :mod:`kvq.validate`).

Rules ask the method what it does (:mod:`kvq.method`), never what kind it is.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from hydra.utils import instantiate

from kvq.alloc import AttentionAwareBits, FixedBits
from kvq.cache import KVSettings
from kvq.errors import flat
from kvq.experiment import BASELINE_NODES, Point, node_of, resolve_key_axis
from kvq.quant import Quantizer

__all__ = ["RULES", "Rewrite", "Rule", "Violation", "eval_name", "kvq_cache", "method_name"]

#: the config defaults of the axes a method may ignore, as objects and as config nodes
_DEFAULT_NODES: dict[str, dict[str, Any]] = {
    a: BASELINE_NODES[a] for a in ("bits", "grouping", "granularity", "rotation")
}
_DEFAULTS: dict[str, Any] = {a: instantiate(n) for a, n in _DEFAULT_NODES.items()}
#: defaults of the ``kv`` node's knobs
_KV_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(KVSettings)}


@dataclass(frozen=True)
class Violation:
    """One broken rule: ``rule`` name, ``kind`` (invalid/duplicate), ``reason`` and ``fix``."""

    rule: str
    kind: str
    reason: str
    fix: str

    def line(self) -> str:
        return flat(f"{self.rule}: {self.reason} (fix: {self.fix})")


#: a rewrite of the resolved experiment config (a plain dict) onto its canonical twin
Rewrite = Callable[[Point, dict[str, Any]], None]


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
        rewrite: for a duplicate rule, ``(point, config dict) -> None`` rewriting the resolved
            experiment config in place onto the canonical experiment it repeats.
    """

    name: str
    kind: str
    applies: Callable[[Point], bool]
    reason: str | Callable[[Point], str]
    fix: str | Callable[[Point], str]
    model_aware: bool = False
    rewrite: Rewrite | None = None

    def __post_init__(self) -> None:
        if (self.kind == "duplicate") != (self.rewrite is not None):
            raise ValueError(
                f"rule {self.name}: a duplicate rule (and only one) carries its canonical rewrite"
            )

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
# predicates: what the method does (kvq.method), what the point is
# ---------------------------------------------------------------------------------------------


def _quantizer(p: Point) -> bool:
    """One of kvq's quantizers (its fields group_size / outlier_ratio define groups and outliers)."""
    return isinstance(p.method, Quantizer) and p.method.quantizes


def _honours(p: Point, knob: str) -> bool:
    """The method quantizes and does not ignore ``knob`` (:data:`kvq.method.KNOBS`)."""
    return bool(p.method.quantizes) and knob not in p.method.ignores


def _knob_value(p: Point, knob: str) -> Any:
    if knob.startswith("kv."):
        return getattr(p.kv, knob[3:])
    return getattr(p, knob)


def _kv_default(p: Point, name: str) -> Any:
    """The default of ``kv.<name>`` at ``p`` (``key_axis``: what its default ``auto`` resolves to)."""
    return resolve_key_axis(p)[0] if name == "key_axis" else _KV_DEFAULTS[name]


def _knob_default(p: Point, knob: str) -> Any:
    return _kv_default(p, knob[3:]) if knob.startswith("kv.") else _DEFAULTS[knob]


def _shown(knob: str, v: Any) -> str:
    """``knob=value`` as a user would write it."""
    if knob == "granularity":
        return f"granularity={v.unit}"
    if knob == "grouping":
        return f"grouping.size={v.size}"
    if knob == "bits":
        if isinstance(v, FixedBits):
            return f"bits.key_bits={v.key_bits}" + (
                f", bits.value_bits={v.value_bits}" if v.value_bits else ""
            )
        return f"bits={type(v).__name__}"
    if knob == "rotation":
        return f"rotation={getattr(v, 'name', type(v).__name__)}"
    return f"{knob}={v}"


def _changed(p: Point, knobs: Sequence[str]) -> list[str]:
    """The knobs among ``knobs`` set away from their defaults, as ``name=value``."""
    out = []
    for knob in knobs:
        v, d = _knob_value(p, knob), _knob_default(p, knob)
        if v is None and knob == "rotation":  # a config without the rotation axis
            continue
        if (float(v) != d) if isinstance(d, float) else (v != d):
            out.append(_shown(knob, v))
    return out


def _ignored_changed(p: Point) -> list[str]:
    return _changed(p, p.method.ignores)


def _reset_ignored(p: Point, c: dict[str, Any]) -> None:
    """Rewrite: every knob the method ignores back to its default."""
    for knob in p.method.ignores:
        if knob.startswith("kv."):
            c.setdefault("kv", {})[knob[3:]] = _kv_default(p, knob[3:])
        else:
            c[knob] = node_of(_DEFAULTS[knob])


def kvq_cache(p: Point) -> bool:
    """The method runs in kvq's own cache (its unit layout applies; peers build their own)."""
    return bool(p.method.one_pass_quantized)


def eval_name(p: Point) -> str:
    return type(p.eval).__name__.lower()


def method_name(p: Point) -> str:
    """The method's option name (its class's ``name``; the class name when it sets none)."""
    return getattr(p.method, "name", "") or type(p.method).__name__


def _attn_adaptive(p: Point) -> bool:
    # method=normal is allowed with bits=attn: like uniform it reads bits as 2**bits levels of a
    # fixed-shape grid (Gaussian quantiles) scaled by one statistic of the unit (its std), so
    # QAQ's range/(2e) error model still maps a tolerated error to a level count (tighter in the
    # bulk, looser in the tails). QAQ's own code does not pair the two (its attention-aware path
    # raises NotImplementedError with the normal quantizer); kvq allows it for that reason.
    # adaptive's levels are the unit's empirical quantiles: its error is not a function of
    # range / 2**bits at all -- unless bits.bridge=true, where each method supplies its own error
    # per width (measured for adaptive) and the allocation means what it says again.
    return (
        isinstance(p.bits, AttentionAwareBits)
        and not p.bits.bridge
        and p.method.quantizes
        and not p.method.error_follows_range
    )


def _token_unit(p: Point) -> bool:
    return kvq_cache(p) and p.granularity.spans_layers and not p.eval.quantizes_whole_cache


def _group_covers_unit(p: Point) -> bool:
    D = p.unit_size()
    g = p.method.group_size if _quantizer(p) else None
    return g is not None and D is not None and g >= D


def _no_outliers(p: Point) -> bool:
    D = p.unit_size()
    return _quantizer(p) and D is not None and p.method.outlier_ratio > 0 and p.method.n_outliers(D) == 0


def _attn_fixed(p: Point) -> bool:
    return (
        _quantizer(p)
        and isinstance(p.bits, AttentionAwareBits)
        and p.bits.n_min == p.bits.n_max
        and p.bits.fixed_key_bits in (None, p.bits.n_max)
    )


def _prefix_too_long(p: Point) -> bool:
    P = p.prefix_len()
    return P is not None and p.seq_len is not None and not 1 <= P <= p.seq_len - 2


def _nothing_quantized(p: Point) -> bool:
    """kvq's own cache layout keeps every token of a window in full precision."""
    n = p.cached_tokens()
    return (
        p.method.quantizes
        and p.method.one_pass_quantized
        and n is not None
        and n > 0
        and p.kv.quantized_tokens(n) == 0
    )


def _nothing_quantized_reason(p: Point) -> str:
    n = p.cached_tokens()
    why = f"kv.residual={p.kv.residual} + kv.sinks={p.kv.sinks} full-precision tokens"
    if p.kv.key_axis == "channel":
        why += f" and whole key groups of kv.key_group={p.kv.key_group}"
    return (
        f"{why} leave none of the {n} tokens the cache holds per window with eval={eval_name(p)} "
        "quantized: the run would measure the full-precision baseline"
    )


def _beyond_context(p: Point) -> bool:
    return (
        p.meta is not None
        and p.seq_len is not None
        and p.meta.max_position is not None
        and p.seq_len > p.meta.max_position
    )


def _key_channel_token(p: Point) -> bool:
    return kvq_cache(p) and p.granularity.spans_layers and p.kv.key_axis == "channel"


def _key_group_unused(p: Point) -> bool:
    return _honours(p, "kv.key_group") and p.kv.key_axis == "token" and bool(_changed(p, ["kv.key_group"]))


def _attn_channel_keys(p: Point) -> bool:
    return (
        isinstance(p.bits, AttentionAwareBits)
        and p.bits.fixed_key_bits is None
        and _honours(p, "kv.key_axis")
        and p.kv.key_axis == "channel"
    )


def _one_width_bits(p: Point) -> bool:
    if not (p.method.quantizes and p.method.one_width):
        return False
    if isinstance(p.bits, AttentionAwareBits):
        return True
    return isinstance(p.bits, FixedBits) and p.bits.value_bits not in (None, p.bits.key_bits)


# ---------------------------------------------------------------------------------------------
# canonical rewrites of the duplicate rules
# ---------------------------------------------------------------------------------------------


def _rewrite_key_group(p: Point, c: dict[str, Any]) -> None:
    c["kv"]["key_group"] = _KV_DEFAULTS["key_group"]


def _rewrite_attn_fixed(p: Point, c: dict[str, Any]) -> None:
    c["bits"] = node_of(FixedBits(p.bits.n_max))


def _rewrite_no_grouping(p: Point, c: dict[str, Any]) -> None:
    c["method"]["group_size"] = None
    if "grouping" in c:
        c["grouping"] = {"_target_": "kvq.quant.Grouping", "size": None}


def _rewrite_no_outliers(p: Point, c: dict[str, Any]) -> None:
    c["method"]["outlier_ratio"] = 0.0
    c["kv"]["outlier_ratio"] = 0.0


# ---------------------------------------------------------------------------------------------
# the rules
# ---------------------------------------------------------------------------------------------

RULES: list[Rule] = [
    Rule(
        "attn-adaptive",
        "invalid",
        _attn_adaptive,
        lambda p: (
            "bits=attn picks each unit's bit count from QAQ's error bound for a uniform grid "
            f"(error ~ range / 2^bits), but method={method_name(p)} "
            "spends 2^bits levels on the unit's own quantiles, whose error does not follow that bound: "
            "the bits QAQ allocates would not mean what it computed"
        ),
        "use bits.bridge=true (each method's own error per width decides), bits=attn with method=uniform "
        "or method=normal, or fixed bits (b2/b3/b4/b8) with this method",
    ),
    Rule(
        "token-needs-whole-cache",
        "invalid",
        _token_unit,
        lambda p: (
            f"granularity=token makes one unit of a token across all layers, but eval={eval_name(p)} "
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
        _attn_channel_keys,
        "bits=attn gives each token (and head) its own bit width, but kv.key_axis=channel quantizes keys "
        "per channel over groups of tokens: there is no per-token key unit to give bits to",
        "set bits.fixed_key_bits=N (attention-aware bits for values only), use kv.key_axis=token, or fixed bits",
    ),
    Rule(
        "peer-needs-prefill",
        "invalid",
        lambda p: p.method.quantizes and not p.method.one_pass_quantized and not p.eval.quantizes_whole_cache,
        lambda p: (
            f"method={method_name(p)} hands back the unquantized K/V of the call that stores them: with "
            f"eval={eval_name(p)} every query would see full-precision keys and values"
        ),
        "use eval=prefill with this method (it quantizes a prefilled cache, then scores against it)",
    ),
    Rule(
        "peer-fixed-bits",
        "invalid",
        _one_width_bits,
        lambda p: (
            f"method={method_name(p)} quantizes keys and values with one fixed width (method.nbits): "
            + (
                "the per-unit widths of bits=attn cannot be applied"
                if isinstance(p.bits, AttentionAwareBits)
                else f"bits.value_bits={p.bits.value_bits} != bits.key_bits={p.bits.key_bits} cannot be applied"
            )
        ),
        "use fixed bits (b2/b3/b4/b8) without value_bits with this method",
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
        _nothing_quantized_reason,
        lambda p: (
            f"keep kv.residual + kv.sinks (and, with kv.key_axis=channel, one kv.key_group) below "
            f"{p.cached_tokens()}, or raise data.seq_len"
        ),
    ),
    Rule(
        "baseline-variant",
        "duplicate",
        lambda p: not p.method.quantizes and bool(_ignored_changed(p)),
        lambda p: (
            f"method=none stores K/V unquantized, so {', '.join(_ignored_changed(p))} do not change it: "
            "the same experiment as the baseline with default axes"
        ),
        "run method=none with the defaults (bits=b4 grouping=g64 granularity=layer, default kv.*)",
        rewrite=_reset_ignored,
    ),
    Rule(
        "peer-ignores",
        "duplicate",
        lambda p: p.method.quantizes and bool(_ignored_changed(p)),
        lambda p: (
            f"method={method_name(p)} builds its own cache, which ignores {', '.join(_ignored_changed(p))}: "
            "the same experiment as with their defaults"
        ),
        lambda p: f"leave {', '.join(p.method.ignores)} at their defaults with this method",
        rewrite=_reset_ignored,
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
        rewrite=_rewrite_key_group,
    ),
    Rule(
        "attn-fixed",
        "duplicate",
        _attn_fixed,
        lambda p: (
            f"bits=attn with bits.n_min = bits.n_max = {p.bits.n_max} gives every unit {p.bits.n_max} bits: "
            f"the same experiment as fixed bits (b{p.bits.n_max})"
        ),
        lambda p: (
            f"use bits=b{p.bits.n_max}"
            + (" kv.key_axis=token" if p.kv.key_axis == "token" else "")
            + ", or widen [bits.n_min, bits.n_max]"
        ),
        rewrite=_rewrite_attn_fixed,
    ),
    Rule(
        "group-covers-unit",
        "duplicate",
        _group_covers_unit,
        lambda p: (
            f"grouping size {p.method.group_size} >= the {p.granularity.unit} unit ({p.unit_size()} features "
            f"on {p.meta.name}): the same experiment as grouping=none"
        ),
        "use a smaller grouping, or granularity=layer/token for larger units",
        model_aware=True,
        rewrite=_rewrite_no_grouping,
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
        rewrite=_rewrite_no_outliers,
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
