"""What a finished evaluation may claim: finite metrics, and that it quantized something.

A run reports ``ok`` only if both hold (:mod:`kvq.run`): non-finite metrics fail it with one
line naming where they came from (:func:`check_finite`; non-finite weights are named before the
evaluation starts, :func:`check_weights`); a quantizing method whose cache stored
no quantized unit at all measured the full-precision baseline, and the run is skipped
(:func:`nothing_quantized`) -- the rules (:mod:`kvq.rules`, ``nothing-quantized``) catch the
known cases before anything loads, this catches the rest.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch

from kvq.errors import KVQError

__all__ = ["NOTHING_QUANTIZED", "NonFiniteMetrics", "check_finite", "check_weights", "nothing_quantized"]

#: the skip reason of a run whose cache quantized nothing
NOTHING_QUANTIZED = (
    "nothing-quantized: the cache stored no quantized unit in any layer (bits/key/mean = "
    "bits/value/mean = 0), so the run measured the full-precision baseline "
    "(fix: keep kv.residual + kv.sinks (and one kv.key_group with kv.key_axis=channel) below the "
    "tokens the cache holds per window, or raise data.seq_len)"
)

#: where each metric family comes from, for the one line of a non-finite metric
_SOURCES = {
    "test": "the model's loss on the scored tokens (its logits: check the weights and model.dtype)",
    "kv": "the KV-cache memory accounting",
    "bits": "the bit allocation",
    "mem": "the memory probe",
    "time": "the timer",
}


class NonFiniteMetrics(KVQError):
    """An evaluation produced a NaN or infinite metric: the run fails (one line)."""


def check_finite(metrics: dict[str, Any], what: str) -> None:
    """Raise :class:`NonFiniteMetrics` if any metric is NaN or infinite.

    Args:
        metrics: name -> value.
        what: where they came from (``"the evaluation of <run>"``), named in the message.
    """
    bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return
    sources = dict.fromkeys(_SOURCES.get(k.split("/", 1)[0], k) for k in bad)
    shown = ", ".join(f"{k}={metrics[k]}" for k in bad[:4]) + (
        f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""
    )
    raise NonFiniteMetrics(f"non-finite metrics from {what}: {shown}; from {'; '.join(sources)}")


#: models whose weights were found finite (each loaded model is checked once)
_CHECKED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def check_weights(model: torch.nn.Module, name: str) -> None:
    """Raise :class:`NonFiniteMetrics` naming the first parameters that hold NaN or Inf.

    A model with a non-finite weight can only produce non-finite numbers (or crash a metric that
    assumes finite logits); the line says which weights, once per loaded model (one pass over
    the parameters, memory-bound).
    """
    if model in _CHECKED:
        return
    with torch.no_grad():
        bad = [
            n
            for n, p in model.named_parameters()
            if p.is_floating_point() and not bool(torch.isfinite(p).all())
        ]
    if bad:
        shown = ", ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
        raise NonFiniteMetrics(
            f"the weights of {name} are not finite (NaN or Inf in {shown}): every metric would be; "
            "check the weight files (model.*) and model.dtype"
        )
    _CHECKED.add(model)


def nothing_quantized(point: Any, metrics: dict[str, Any]) -> bool:
    """Whether a quantizing method in kvq's own cache stored no quantized unit in any layer.

    Peers (``one_pass_quantized`` false) report their nominal width, not what they stored, and
    are not judged here; nor is the full-precision baseline (``method=none``).
    """
    method = point.method
    if not getattr(method, "quantizes", False) or not getattr(method, "one_pass_quantized", False):
        return False
    means = [metrics.get(f"bits/{kind}/mean") for kind in ("key", "value")]
    return all(m is not None and m == 0 for m in means)
