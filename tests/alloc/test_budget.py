"""``bits=budget``: the knapsack solver against brute force, and on the tiny model for every kvq
quantizer the achieved bits per element meet the average (metadata included) and more budget
never buys a worse allocation."""

from __future__ import annotations

import itertools
import random

import pytest

from kvq.alloc import BudgetBits
from kvq.alloc.budget import solve_budget
from kvq.results import read_result
from kvq.run import run

from ..conftest import TINY
from ..matrix import METHOD_CLASSES


def _instance(seed: int, n: int = 5, widths=(2, 3, 4)):
    rng = random.Random(seed)
    errors, costs, weights = [], [], []
    for _ in range(n):
        scale = rng.uniform(0.1, 10.0)
        errors.append({b: scale * 4.0**-b * rng.uniform(0.8, 1.2) for b in widths})
        meta = rng.choice([0.0, 0.25, 0.5])
        costs.append({b: b + meta for b in widths})
        weights.append(rng.choice([1.0, 2.0]))
    return errors, costs, weights


def _spend(ws, costs, weights) -> float:
    return sum(w * c[b] for b, c, w in zip(ws, costs, weights)) / sum(weights)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("avg", [2.6, 3.0, 3.4])
def test_solver_is_feasible_and_near_the_brute_force_optimum(seed: int, avg: float) -> None:
    errors, costs, weights = _instance(seed)
    ws = solve_budget(errors, costs, weights, avg)
    feasible = [
        c for c in itertools.product(*[sorted(e) for e in errors]) if _spend(c, costs, weights) <= avg + 1e-12
    ]
    if not feasible:  # even the cheapest widths exceed the budget: the cheapest are returned
        assert ws == [min(c, key=c.get) for c in costs]
        return
    best = min(sum(e[b] for b, e in zip(c, errors)) for c in feasible)
    got = sum(e[b] for b, e in zip(ws, errors))
    assert _spend(ws, costs, weights) <= avg + 1e-9
    assert got <= 1.5 * best  # Lagrangian + greedy top-up: near the optimum of a small knapsack
    # never worse than the best single width that fits
    for b in sorted(errors[0]):
        one = [b] * len(errors)
        if _spend(one, costs, weights) <= avg:
            assert got <= sum(e[b] for e in errors) + 1e-12


def test_more_budget_never_costs_more_error() -> None:
    errors, costs, weights = _instance(7, n=8)
    prev = float("inf")
    for avg in (2.5, 2.75, 3.0, 3.25, 3.5, 4.5):
        ws = solve_budget(errors, costs, weights, avg)
        err = sum(e[b] for b, e in zip(ws, errors))
        assert err <= prev + 1e-12
        prev = err


@pytest.mark.parametrize(
    "bad", [dict(avg=0), dict(avg=float("nan")), dict(n_min=5, n_max=3), dict(avg=6.0, count_metadata=False)]
)
def test_bad_budgets_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="bits\\."):
        BudgetBits(**bad)


#: every kvq quantizer that quantizes (the full-precision baseline left out)
BUDGET_METHODS = sorted(n for n, cls in METHOD_CLASSES.items() if cls().quantizes)


def _budgets(cfg) -> tuple[float, float]:
    """Two averages inside what ``method`` can reach on a 32-feature layer unit in groups of 16:
    30% and 70% of the way from its dearest 2-bit unit to its cheapest 4-bit one (metadata in)."""
    from kvq.experiment import make_point

    q = make_point(cfg).method
    views = [q.for_layer(0, k) for k in ("key", "value")] if hasattr(q, "for_layer") else [q]
    lo = max(v.nbytes_formula(64, 32, 2) * 8 / (64 * 32) for v in views)
    hi = min(v.nbytes_formula(64, 32, 4) * 8 / (64 * 32) for v in views)
    assert lo < hi
    return lo + 0.3 * (hi - lo), lo + 0.7 * (hi - lo)


@pytest.mark.parametrize("method", BUDGET_METHODS)
def test_budget_meets_its_average_on_the_tiny_model(compose, tmp_path, method: str) -> None:
    # a group per 16 features: metadata is a real part of the budget
    over = [*TINY, f"method={method}", "grouping=g32", "grouping.size=16", "bits=budget", "calib.windows=2"]
    results = []
    for avg in _budgets(compose(over)):
        out = tmp_path / f"avg{avg}"
        run(compose([*over, f"bits.avg={avg}"]), out_dir=out)
        rec = read_result(out)
        assert rec["status"] == "ok", rec["reason"]
        m = rec["metrics"]
        assert m["bits/budget/avg"] == pytest.approx(avg)
        assert m["bits/budget/feasible"] == 1.0
        assert m["bits/budget/planned"] <= avg + 1e-9
        # what the caches really hold meets the average, metadata (and nuq's codebooks, stored
        # once and amortised over the evaluated tokens) included
        assert m["kv/cache_bits_per_element"] <= avg + 1e-6
        assert m["kv/bits_per_element"] <= avg + 1e-6
        widths = {v for k, v in m.items() if k.startswith(("bits/key/layer_", "bits/value/layer_"))}
        assert widths <= {2.0, 3.0, 4.0} and len(widths) >= 1
        results.append(m)
    # more budget is spent: the larger average buys more bits
    assert results[1]["kv/cache_bits_per_element"] > results[0]["kv/cache_bits_per_element"]


def test_a_budget_below_the_cheapest_width_is_reported_not_hidden(compose, tmp_path, caplog) -> None:
    """adaptive g16 cannot go below 6 bits/element: the cheapest widths are used, and the run says so."""
    over = [*TINY, "method=adaptive", "grouping=g32", "grouping.size=16", "bits=budget", "bits.avg=3.0"]
    run(compose([*over, "calib.windows=2"]), out_dir=tmp_path)
    m = read_result(tmp_path)["metrics"]
    assert m["bits/budget/feasible"] == 0.0 and m["bits/budget/planned"] > 3.0
    assert {v for k, v in m.items() if k.startswith("bits/key/layer_")} == {2.0}
    assert any("bits.avg=3.0 cannot be met" in r.getMessage() for r in caplog.records)
