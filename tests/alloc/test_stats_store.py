"""Attention statistics shared across a grid: the stored statistics are the collected ones, a
stored window skips its full-precision pass, knobs and tokens name the file, and a grid of
``bits=attn`` runs computes each window's pass once."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from kvq.alloc import AttentionAwareBits
from kvq.alloc.stats_store import STATS_DIR, AttentionStatsStore
from kvq.attention import register
from kvq.protocols import KVSetup
from kvq.quant import UniformQuantizer
from kvq.results import read_result
from kvq.run import run

from ..conftest import TINY


@pytest.fixture(scope="module")
def model(tiny_spec):
    return tiny_spec.load(attn_implementation=register()).model


def _ids(seed: int, T: int = 24) -> torch.Tensor:
    return torch.randint(0, 200, (1, T), generator=torch.Generator().manual_seed(seed))


class _Forwards:
    """Counts the model's forward calls."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.n = 0
        self._h = model.register_forward_hook(lambda *a: self._add())

    def _add(self) -> None:
        self.n += 1

    def close(self) -> None:
        self._h.remove()


def _setup(model: torch.nn.Module, store: AttentionStatsStore | None, **bits_kw) -> KVSetup:
    bits = AttentionAwareBits(target_error=0.05, **bits_kw)
    bits.stats_store = store
    return KVSetup(UniformQuantizer(), bits, model.config.num_hidden_layers, granularity="head")


def test_stored_statistics_equal_the_collected_ones(model, tmp_path: Path) -> None:
    ids = _ids(0)
    fresh = _setup(model, None)
    plan_ref, out = fresh.plan_from_pass(model, ids)
    assert out is not None
    store = AttentionStatsStore(tmp_path / "s")
    kv = _setup(model, store)
    plan_a, _ = kv.plan_from_pass(model, ids)  # computes and writes
    count = _Forwards(model)
    try:
        plan_b, out_b = kv.plan_from_pass(model, ids)  # reads: no forward at all
    finally:
        count.close()
    assert count.n == 0 and out_b is None
    assert (store.misses, store.hits) == (1, 1)
    for plan in (plan_a, plan_b):
        for li in plan_ref.key_err:
            assert torch.equal(plan.key_err[li], plan_ref.key_err[li])
            assert torch.equal(plan.value_err[li], plan_ref.value_err[li])
    # the widths a cache gets from either plan are identical
    units = torch.randn(2 * 2 * 24, 16, generator=torch.Generator().manual_seed(1))
    q = UniformQuantizer()
    for kind in ("key", "value"):
        assert torch.equal(plan_b.unit_bits(0, kind, units, 0, q), plan_ref.unit_bits(0, kind, units, 0, q))


def test_tokens_and_collector_knobs_name_the_file(model, tmp_path: Path) -> None:
    store = AttentionStatsStore(tmp_path / "s")
    a = _setup(model, store)
    a.plan_from_pass(model, _ids(0))
    a.plan_from_pass(model, _ids(1))  # other tokens: computed
    a.plan_from_pass(model, _ids(0, T=23))  # other shape: computed
    _setup(model, store, last_n=3).plan_from_pass(model, _ids(0))  # other last_n: computed
    _setup(model, store, q_quantile=0.9).plan_from_pass(model, _ids(0))  # other quantile: computed
    assert (store.misses, store.hits) == (5, 0)
    assert len(list((tmp_path / "s").glob("*.pt"))) == 5
    _setup(model, store, last_n=3).plan_from_pass(model, _ids(0))
    assert store.hits == 1
    assert not list((tmp_path / "s").glob(".*.tmp"))  # atomic writes leave no temporaries


def test_rewrite_never_reads_and_a_pass_with_a_cache_always_runs(model, tmp_path: Path) -> None:
    ids = _ids(2)
    store = AttentionStatsStore(tmp_path / "s")
    kv = _setup(model, store)
    kv.plan_from_pass(model, ids)
    again = AttentionStatsStore(tmp_path / "s", rewrite=True)
    _setup(model, again).plan_from_pass(model, ids)
    assert (again.hits, again.misses) == (0, 1)
    # eval=prefill's pass fills a cache: it runs even though the statistics are stored
    cache = kv.cache(deferred=True)
    count = _Forwards(model)
    try:
        _, out = kv.plan_from_pass(model, ids, cache=cache, use_cache=True)
    finally:
        count.close()
    assert count.n == 1 and out is not None and cache.get_seq_length() == ids.shape[1]


def test_a_damaged_file_is_recomputed_with_a_warning(model, tmp_path: Path, caplog) -> None:
    ids = _ids(3)
    store = AttentionStatsStore(tmp_path / "s")
    kv = _setup(model, store)
    plan_ref, _ = kv.plan_from_pass(model, ids)
    store.path(ids, kv.allocator.collector()).write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="kvq.alloc.stats_store"):
        plan, out = kv.plan_from_pass(model, ids)
    assert out is not None and "ignoring unreadable attention statistics" in caplog.text
    assert all(torch.equal(plan.value_err[li], plan_ref.value_err[li]) for li in plan_ref.value_err)


def test_a_grid_of_attention_aware_runs_computes_each_pass_once(
    compose, tmp_path: Path, _results_store
) -> None:
    runs = [["method=uniform"], ["method=normal"], ["method=uniform", "bits.target_error=0.01"]]
    recs = []
    for i, extra in enumerate(runs):
        run(compose([*TINY, "bits=attn", "granularity=head", *extra]), out_dir=tmp_path / str(i))
        recs.append(read_result(tmp_path / str(i)))
    assert all(r["status"] == "ok" for r in recs)
    files = list((_results_store / STATS_DIR).rglob("*.pt"))
    assert len(files) == 2  # TINY: two windows, one file each, shared by the three runs
    # the statistics are the model's, whatever reads them: a run reusing them equals a fresh one
    fresh = tmp_path / "fresh"
    run(compose([*TINY, "bits=attn", "granularity=head", "method=normal", "reuse=false"]), out_dir=fresh)
    assert read_result(fresh)["metrics"]["test/ppl"] == recs[1]["metrics"]["test/ppl"]
    assert recs[1]["metrics"]["time/forward_s"] > 0
