"""``bits=budget``: per-layer key and value widths under an average (KVTuner-style mixed precision).

For every quantizer -- uniform, normal, adaptive, nuq -- the allocation asks the method itself how
wrong it is at each width, on the calibration windows (:mod:`kvq.calib`), in the basis and units
the cache quantizes in (rotation, pre-RoPE keys, per-channel key groups included):

* **sensitivity** of (layer ``l``, kind ``k``) at width ``b``:
  ``S(l, k, b) = sum_i F_i (Q_b(x)_i - x_i)**2``, the method's own squared error weighted by the
  diagonal Fisher information ``F_i = (d loss / d x_i)**2`` -- the second-order estimate of the
  loss increase (``loss(x + e) - loss(x) ~ 1/2 e^T F e``), comparable across layers and K/V;
* **cost** of a width: stored bits per element of that unit at that width, from the method's
  own memory formula (payload + per-group metadata; ``count_metadata=false``: the code width),
  plus what the width stores once per model (nuq's codebook of that layer, kind and width)
  amortised over the elements the run evaluates (``data.seq_len x data.max_windows`` tokens), so
  the amortised ``kv/bits_per_element`` meets the average;
* **allocation**: minimise ``sum S`` subject to ``mean cost <= avg`` (keys and values of a layer
  hold the same number of elements): a multiple-choice knapsack, solved by Lagrangian relaxation
  (bisection on the price of a bit, each item picking ``argmin S + lambda * cost``) and then a
  greedy top-up with the best error-per-bit upgrades that still fit.

Widths are one per (layer, kind): a static per-head width would need per-unit widths, which kvq's
shared encode path stores as a uint8 per unit (0.125 bits/element on a 64-feature head); on
SmolLM2 (3 KV heads) it does not pay, so heads share their layer's width.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from kvq.alloc.base import Kind
from kvq.quant.base import Quantizer, check_bits

__all__ = ["BudgetBits", "solve_budget"]

log = logging.getLogger(__name__)


def solve_budget(
    errors: list[dict[int, float]], costs: list[dict[int, float]], weights: list[float], avg: float
) -> list[int]:
    """Pick one width per item minimising ``sum errors`` subject to ``sum w * cost <= avg * sum w``.

    Args:
        errors: per item, ``width -> error``.
        costs: per item, ``width -> bits per element``.
        weights: per item, its number of elements (relative).
        avg: the budget, in bits per element.

    Returns:
        The width of each item (the cheapest widths when even those exceed the budget).
    """
    W = sum(weights)
    cap = avg * W

    def pick(lam: float) -> list[int]:
        return [
            min(e, key=lambda b: (e[b] + lam * w * c[b], c[b])) for e, c, w in zip(errors, costs, weights)
        ]

    def spend(ws: list[int]) -> float:
        return sum(w * c[b] for b, c, w in zip(ws, costs, weights))

    cheapest = [min(c, key=c.get) for c in costs]
    if spend(cheapest) >= cap:
        return cheapest
    lo, hi = 0.0, 1.0
    for _ in range(200):
        if spend(pick(hi)) <= cap:
            break
        hi *= 4.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if spend(pick(mid)) > cap:
            lo = mid
        else:
            hi = mid
    ws = pick(hi)
    # greedy top-up: the upgrades with the largest error saved per bit that still fit
    while True:
        left = cap - spend(ws)
        best, best_gain = None, 0.0
        for i, (e, c, w) in enumerate(zip(errors, costs, weights)):
            for b in e:
                extra = w * (c[b] - c[ws[i]])
                gain = e[ws[i]] - e[b]
                if extra > 0 and extra <= left + 1e-9 and gain > 0 and gain / extra > best_gain:
                    best, best_gain = (i, b), gain / extra
        if best is None:
            return ws
        ws[best[0]] = best[1]


@dataclass
class BudgetBits:
    """Widths per layer and K/V minimising a measured sensitivity under an average (a ``bits`` node).

    Args:
        avg: the budget in bits per element.
        n_min: fewest bits a layer's keys or values get.
        n_max: most bits.
        count_metadata: the budget bounds stored bits per element including per-group metadata
            (scales, zero-points, codebooks of the method's memory formula); ``false`` = the mean
            code width (``kv/bits_per_element`` is then ``avg`` + metadata).
        fallback: width of a (layer, kind) the calibration did not see (``None`` = ``round(avg)``).
    """

    avg: float = 3.0
    n_min: int = 2
    n_max: int = 4
    count_metadata: bool = True
    fallback: int | None = None

    needs_attention = False
    needs_calibration = True
    per_token_keys = False

    plan_widths: dict[tuple[int, str], int] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    report: dict[str, float] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_bits(self.n_min, "bits.n_min")
        check_bits(self.n_max, "bits.n_max")
        if self.n_min > self.n_max:
            raise ValueError(f"bits.n_min ({self.n_min}) must be <= bits.n_max ({self.n_max})")
        if not (isinstance(self.avg, (int, float)) and math.isfinite(self.avg) and self.avg > 0):
            raise ValueError(f"bits.avg must be a positive number, got {self.avg!r}")
        if not self.count_metadata and not self.n_min <= self.avg <= self.n_max:
            raise ValueError(
                f"bits.avg={self.avg} (mean code width) must lie in [bits.n_min, bits.n_max] = [{self.n_min}, {self.n_max}]"
            )
        if self.fallback is not None:
            check_bits(self.fallback, "bits.fallback")

    # -- what the cache and the methods ask ------------------------------------------------
    def widths(self, kind: Kind) -> range:
        """The widths this allocator may give (what a calibrated method fits codebooks for)."""
        return range(self.n_min, self.n_max + 1)

    def max_bits(self) -> int:
        return self.n_max

    def unit_bits(
        self, layer_idx: int, kind: Kind, units: torch.Tensor, start: int, quantizer: Quantizer
    ) -> int:
        b = self.plan_widths.get((layer_idx, kind))
        if b is not None:
            return b
        fb = (
            self.fallback
            if self.fallback is not None
            else int(min(max(round(self.avg), self.n_min), self.n_max))
        )
        return fb

    # -- calibration ------------------------------------------------------------------------
    def calibrate(self, stats: Any, setup: Any) -> None:
        """Measure the method's Fisher-weighted error at every width and solve the budget."""
        method = setup.method
        errors: list[dict[int, float]] = []
        costs: list[dict[int, float]] = []
        weights: list[float] = []
        items: list[tuple[int, str]] = []
        for layer in range(stats.n_layers):
            for kind in ("key", "value"):
                q = method.for_layer(layer, kind) if hasattr(method, "for_layer") else method
                units, fisher = stats.units(layer, kind, setup, q)
                N, D = units.shape
                e, c = {}, {}
                # once-per-model storage of a width (nuq's codebooks), amortised over the run's elements
                per_token = stats.keys[layer][0, :, 0, :].numel()
                run_elements = (stats.eval_tokens or 0) * per_token
                once = getattr(q, "codebook_bytes_for", None)
                for b in self.widths(kind):
                    deq = q.fake_quant(units, b)
                    e[b] = float((fisher.double() * (deq.double() - units.double()) ** 2).sum())
                    c[b] = q.nbytes_formula(N, D, b) * 8 / (N * D) if self.count_metadata else float(b)
                    if self.count_metadata and run_elements and callable(once):
                        c[b] += 8 * once(b) / run_elements
                errors.append(e)
                costs.append(c)
                weights.append(float(stats.keys[layer].numel()))
                items.append((layer, kind))
        ws = solve_budget(errors, costs, weights, self.avg)
        self.plan_widths = {it: int(b) for it, b in zip(items, ws)}
        W = sum(weights)
        planned = sum(w * c[b] for b, c, w in zip(ws, costs, weights)) / W
        feasible = planned <= self.avg + 1e-9
        self.report = {
            "bits/budget/avg": float(self.avg),
            "bits/budget/planned": planned,
            "bits/budget/planned_code": sum(w * b for b, w in zip(ws, weights)) / W,
            "bits/budget/feasible": float(feasible),
        }
        self._warn_if_infeasible(getattr(method, "name", type(method).__name__))

    def _warn_if_infeasible(self, method: str = "the method") -> None:
        if self.report.get("bits/budget/feasible", 1.0) == 0.0:
            log.warning(
                "kvq: bits.avg=%s cannot be met: the cheapest widths (bits.n_min=%d) of method=%s already "
                "cost %.3f bits/element with their metadata; using them (raise bits.avg, use larger groups, "
                "or bits.count_metadata=false)",
                self.avg,
                self.n_min,
                method,
                self.report["bits/budget/planned"],
            )

    def calib_state(self) -> dict[str, Any]:
        return {"widths": dict(self.plan_widths), "report": dict(self.report)}

    def load_calib_state(self, state: dict[str, Any]) -> None:
        self.plan_widths = {tuple(k): int(v) for k, v in state["widths"].items()}  # type: ignore[misc]
        self.report = dict(state.get("report", {}))
        self._warn_if_infeasible()
