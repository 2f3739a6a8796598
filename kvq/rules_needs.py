"""The validator's rules about what a point needs beyond its axes: a protocol's context and
packages, a model's sliding-window layers, a calibrated method or allocator (:mod:`kvq.calib`).

The same kind of :class:`~kvq.rules.Rule` as :mod:`kvq.rules`; :mod:`kvq.validate` applies both lists.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kvq.experiment import Point, node_of
from kvq.quant import Quantizer
from kvq.rules import Rule, eval_name, kvq_cache, method_name

__all__ = ["RULES"]

RULES: list[Rule] = []


# ---------------------------------------------------------------------------------------------
# what a protocol needs beyond text windows (kvq.protocols: retrieval, lm_eval, generate)
# ---------------------------------------------------------------------------------------------


def _protocol_context(p: Point) -> int | None:
    """Positions one sequence of the protocol occupies, where it is not ``data.seq_len``."""
    ctx = getattr(p.eval, "context_tokens", None)
    n = ctx(p.seq_len or 0) if callable(ctx) else None
    return None if n is None or n == p.seq_len else int(n)


def _protocol_beyond_context(p: Point) -> bool:
    n = _protocol_context(p)
    return n is not None and p.meta.max_position is not None and n > p.meta.max_position


def _missing_packages(p: Point) -> list[str]:
    import importlib.util

    return [m for m in getattr(p.eval, "requires", ()) if importlib.util.find_spec(m) is None]


RULES.extend(
    [
        Rule(
            "protocol-beyond-context",
            "invalid",
            _protocol_beyond_context,
            lambda p: (
                f"eval={eval_name(p)} feeds up to {_protocol_context(p)} positions per sequence "
                f"({p.eval.context_knob}), more than the {p.meta.max_position} positions {p.meta.name} was "
                "built for: the result would measure the model out of its context, not the cache"
            ),
            lambda p: f"keep {p.eval.context_knob} within {p.meta.max_position} positions",
            model_aware=True,
        ),
        Rule(
            "protocol-needs-package",
            "invalid",
            lambda p: bool(_missing_packages(p)),
            lambda p: f"eval={eval_name(p)} needs the Python package(s) {', '.join(_missing_packages(p))}",
            "pip install -c constraints.txt -e . (lm-eval is a kvq dependency)",
        ),
    ]
)


def _token_unit_on_sliding(p: Point) -> bool:
    return (
        kvq_cache(p)
        and p.granularity.spans_layers
        and any(t != "full_attention" for t in getattr(p.meta, "layer_types", ()) or ())
    )


RULES.append(
    Rule(
        "token-sliding",
        "invalid",
        _token_unit_on_sliding,
        lambda p: (
            f"granularity=token makes one unit of a token across all layers, but {p.meta.name} has "
            f"{sum(t != 'full_attention' for t in p.meta.layer_types)} sliding-window layers, which drop old "
            "tokens: a token's unit would be missing from them"
        ),
        "use granularity=head or granularity=layer on a model with sliding layers",
        model_aware=True,
    )
)


# ---------------------------------------------------------------------------------------------
# calibrated methods and allocators (kvq.calib), rotations
# ---------------------------------------------------------------------------------------------


def _calibrated(p: Point) -> bool:
    """Something in the point is fitted on calibration windows before evaluation."""
    return bool(p.method.quantizes) and any(
        getattr(obj, "needs_calibration", False) for obj in (p.method, p.bits)
    )


def _calib_overlap(p: Point) -> bool:
    return (
        p.calib is not None and p.data is not None and _calibrated(p) and p.calib.overlap(p.data) is not None
    )


def _calib_key(c: Any) -> dict[str, Any]:
    """A calibration node's fields but its seed (the run's seed, which is part of the key anyway)."""
    return {f.name: getattr(c, f.name) for f in dataclasses.fields(c) if f.init and f.name != "seed"}


def _calib_unused(p: Point) -> bool:
    if p.calib is None or _calibrated(p):
        return False
    return _calib_key(p.calib) != _calib_key(type(p.calib)())


def _rewrite_calib_unused(p: Point, c: dict[str, Any]) -> None:
    c["calib"] = node_of(dataclasses.replace(type(p.calib)(), seed=p.calib.seed))


def _budget_peer(p: Point) -> bool:
    return (
        getattr(p.bits, "needs_calibration", False)
        and hasattr(p.bits, "avg")
        and p.method.quantizes
        and not isinstance(p.method, Quantizer)
    )


RULES.extend(
    [
        Rule(
            "calib-overlap",
            "invalid",
            _calib_overlap,
            lambda p: (
                f"method={method_name(p)} / bits={type(p.bits).__name__} are fitted on calibration windows, "
                f"but {p.calib.overlap(p.data)}"
            ),
            "set data.max_windows=N (calibration then uses the tokens after them), or calib=pydoc / calib=local "
            "with another text",
        ),
        Rule(
            "layer-codebooks-token",
            "invalid",
            lambda p: kvq_cache(p) and getattr(p.method, "per_layer", False) and p.granularity.spans_layers,
            lambda p: (
                f"method={method_name(p)} fits one codebook per layer, but granularity=token makes one unit of "
                "a token across all layers"
            ),
            "use granularity=head or granularity=layer with this method",
        ),
        Rule(
            "budget-needs-kvq-cache",
            "invalid",
            _budget_peer,
            lambda p: (
                f"bits=budget gives each layer's keys and values their own width, but method={method_name(p)} "
                "quantizes everything with one fixed width (method.nbits)"
            ),
            "use bits=budget with kvq's quantizers (uniform, normal, adaptive, nuq), or fixed bits with this method",
        ),
        Rule(
            "calib-unused",
            "duplicate",
            _calib_unused,
            lambda p: (
                f"nothing in method={method_name(p)} bits={type(p.bits).__name__} is calibrated, so the calib "
                "settings do not change it: the same experiment as the default calib"
            ),
            "leave calib at its default unless method=nuq or bits=budget",
            rewrite=_rewrite_calib_unused,
        ),
    ]
)
