"""Distribution metrics against the fp reference: KL, top-1 agreement, the paired interval, the
reference's storage and reuse (kvq/reference.py, the perplexity protocols, kvq.run)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kvq.alloc import FixedBits
from kvq.protocols import Decode, FakeQuant, KVSetup, Prefill
from kvq.quant import FullPrecision, UniformQuantizer
from kvq.reference import (
    INDEX_FILE,
    REFERENCE_DIR,
    Reference,
    distribution_metrics,
    log_partition,
    paired_interval,
    window_digest,
)
from kvq.results import read_result
from kvq.run import run

from .conftest import TINY


def _windows(n: int = 3, T: int = 24, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (1, T), generator=g) for _ in range(n)]


def _setup(model, method, bits: int = 4) -> KVSetup:
    return KVSetup(method, FixedBits(bits), model.config.num_hidden_layers, model_config=model.config)


def _score(proto, model, kv, windows):
    with torch.inference_mode():
        rs = [proto.score(model, w, kv) for w in windows]
    return rs, proto.aggregate(rs, 1.0)


@pytest.mark.parametrize("proto_cls", [FakeQuant, Prefill, Decode], ids=lambda c: c.__name__)
def test_method_none_is_exact_against_a_separate_forward(tiny_model, tmp_path: Path, proto_cls) -> None:
    model, windows = tiny_model.model, _windows(T=12 if proto_cls is Decode else 24)
    kv = _setup(model, FullPrecision())
    rec = proto_cls()
    rec.reference = Reference(tmp_path / "ref", record=True)
    _, m0 = _score(rec, model, kv, windows)  # the baseline run: records, then compares with itself
    assert Reference.ready(tmp_path / "ref")
    cmp = proto_cls()
    cmp.reference = Reference(tmp_path / "ref", record=False)
    rs, m = _score(cmp, model, kv, windows)  # a second, separate forward of the same windows
    for metrics in (m0, m):
        assert metrics["test/kl"] == 0.0 and metrics["test/top1_agree"] == 1.0
        assert metrics["test/delta_ppl_pct_lo"] == 0.0 and metrics["test/delta_ppl_pct_hi"] == 0.0
    assert all(r.kl == 0.0 and r.agree == r.tokens for r in rs)
    assert [r.digest for r in rs] == [window_digest(w) for w in windows]


def test_kl_grows_as_bits_shrink_and_agreement_falls(tiny_model, tmp_path: Path) -> None:
    model, windows = tiny_model.model, _windows(n=4)
    base = FakeQuant()
    base.reference = Reference(tmp_path, record=True)
    _, fp = _score(base, model, _setup(model, FullPrecision()), windows)
    kl, agree = {}, {}
    for bits in (8, 4, 2):
        p = FakeQuant()
        p.reference = Reference(tmp_path, record=False)
        _, m = _score(p, model, _setup(model, UniformQuantizer(), bits), windows)
        kl[bits], agree[bits] = m["test/kl"], m["test/top1_agree"]
        d = 100 * math.expm1(m["test/nll"] - fp["test/nll"])  # per-token nll: same token count
        assert m["test/delta_ppl_pct_lo"] <= d <= m["test/delta_ppl_pct_hi"]
    assert 0 < kl[8] < kl[4] < kl[2]
    assert agree[8] >= agree[4] >= agree[2] and agree[2] < 1


@pytest.mark.parametrize("shape", [(511, 49152), (3, 1 << 22), (0, 7), (5, 11)])
def test_log_partition_is_torch_logsumexp_bit_for_bit(shape: tuple[int, int]) -> None:
    """The blocked CPU log-partition (the scored windows' hot spot) changes no digit: a row's
    value does not depend on which rows share its block."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(*shape, generator=g) * 4
    want = torch.logsumexp(z, dim=-1)
    got = log_partition(z)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got, want)
    assert torch.equal(log_partition(z.to(torch.bfloat16)), torch.logsumexp(z.to(torch.bfloat16).float(), -1))


def test_paired_interval_is_paired_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(1)
    tokens = np.full(16, 511)
    ref = rng.normal(3.6, 0.3, 16) * tokens  # windows differ a lot from each other ...
    q = ref + 0.01 * tokens + rng.normal(0, 0.5, 16)  # ... the run differs little from the reference
    lo, hi = paired_interval(q, ref, tokens)
    est = 100 * math.expm1((q.sum() - ref.sum()) / tokens.sum())
    assert lo < est < hi and lo > 0  # +1% nll/token is resolved: pairing removes between-window spread
    assert hi - lo < 0.5
    assert paired_interval(q, ref, tokens) == (lo, hi)  # seeded: the same windows, the same interval
    assert paired_interval(ref, ref, tokens) == (0.0, 0.0)
    assert paired_interval([5.0], [4.0], [10]) == pytest.approx((100 * math.expm1(0.1),) * 2)
    with pytest.raises(ValueError):
        paired_interval([1.0], [1.0, 2.0], [1, 1])


def test_windows_not_in_the_reference_give_no_metrics(tiny_model, tmp_path: Path, caplog) -> None:
    model = tiny_model.model
    p = FakeQuant()
    p.reference = Reference(tmp_path, record=True)
    _score(p, model, _setup(model, FullPrecision()), _windows(seed=0))
    q = FakeQuant()
    q.reference = Reference(tmp_path, record=False)
    _, m = _score(q, model, _setup(model, UniformQuantizer()), _windows(seed=1))  # other tokens
    assert "test/kl" not in m and "does not cover" in caplog.text
    assert math.isfinite(m["test/ppl"])


def test_gemma2_softcapped_logits_are_recomputed_exactly(tmp_path: Path) -> None:
    from kvq.models import TinyRandom

    lm = TinyRandom(arch="gemma2").load()  # final_logit_softcapping: the head applies it too
    kv = _setup(lm.model, FullPrecision())
    p = FakeQuant()
    p.reference = Reference(tmp_path, record=True)
    _, m = _score(p, lm.model, kv, _windows(n=1))
    assert m["test/kl"] == 0.0


def test_reference_storage_is_small_and_exact(tiny_model, tmp_path: Path) -> None:
    model, windows = tiny_model.model, _windows(n=2)
    p = FakeQuant()
    p.reference = Reference(tmp_path, record=True)
    _score(p, model, _setup(model, FullPrecision()), windows)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    H = model.config.hidden_size
    assert index["tokens"] == 2 * 23 and index["hidden_size"] == H and index["dtype"] == "float32"
    assert index["linear"] is True  # the tiny Llama's logits are W h: the fast KL applies
    for d in index["windows"]:
        hid, u = np.load(tmp_path / f"{d}.npy"), np.load(tmp_path / f"{d}.u.npy")
        lse, top1 = np.load(tmp_path / f"{d}.lse.npy"), np.load(tmp_path / f"{d}.top1.npy")
        assert hid.shape == u.shape == (23, H) and hid.dtype == u.dtype == np.float32
        assert lse.shape == top1.shape == (23,) and lse.dtype == np.float64 and top1.dtype == np.int64
    # per scored token: hidden (4 H) + u (4 H) + lse (8) + argmax (8) bytes, plus a 128-byte header a file
    assert index["bytes"] == 2 * 23 * (8 * H + 16) + 2 * 4 * 128


def test_the_stored_summary_gives_the_kl_of_the_full_distributions(tiny_model, tmp_path: Path) -> None:
    """``(lse - lse_ref) - (h - h_ref) . W^T p_ref`` equals the KL summed over the whole vocabulary
    (float64 reference) as closely as the direct float32 sum does, and the agreement is the argmax
    comparison."""
    from kvq.reference import capture_hidden, distribution_stats, head_of

    model, windows = tiny_model.model, _windows(n=2)
    base = FakeQuant()
    base.reference = Reference(tmp_path, record=True)
    _score(base, model, _setup(model, FullPrecision()), windows)
    base.reference.finish()
    p = FakeQuant()
    p.reference = Reference(tmp_path, record=False)
    rs, _ = _score(p, model, _setup(model, UniformQuantizer(), 3), windows)
    head = head_of(model)
    for w, r in zip(windows, rs):
        with torch.inference_mode(), capture_hidden(model) as seen:
            fp = model(w).logits[0, :-1].double().log_softmax(-1)
            q = model(w, cache=_setup(model, UniformQuantizer(), 3).cache(), use_cache=True).logits
        q = q[0, :-1].double().log_softmax(-1)
        kl = float((fp.exp() * (fp - q)).sum())
        with torch.inference_mode():
            direct, _ = distribution_stats(seen[1][0, :-1], seen[0][0, :-1], head)
        assert r.kl > 0 and abs(r.kl - kl) <= max(2 * abs(direct - kl), 1e-7 * r.tokens)
        assert r.agree == int((fp.argmax(-1) == q.argmax(-1)).sum())


def test_runs_report_distribution_metrics_and_reuse_the_reference(
    compose, tmp_path: Path, capsys, _results_store: Path
) -> None:
    store = _results_store
    out = {}
    for extra in (["bits=b8"], ["bits=b2"], ["eval=prefill", "bits=b2"]):
        run(compose([*TINY, *extra]), out_dir=tmp_path / "_".join(extra))
        out[" ".join(extra)] = read_result(tmp_path / "_".join(extra))["metrics"]
    text = capsys.readouterr().out
    assert text.count("computing the full-precision baseline") == 2  # fakequant once, prefill once
    b8, b2 = out["bits=b8"], out["bits=b2"]
    assert 0 < b8["test/kl"] < b2["test/kl"] and b8["test/top1_agree"] >= b2["test/top1_agree"]
    for m in out.values():
        assert m["test/delta_ppl_pct_lo"] <= m["test/delta_ppl_pct"] <= m["test/delta_ppl_pct_hi"]
        assert m["test/ref_windows"] == 2
    refs = sorted((store / REFERENCE_DIR).iterdir())
    assert len(refs) == 2 and all(Reference.ready(r) for r in refs)
    # the baseline's own record carries kl 0 / agreement 1 (it wrote the reference)
    baseline = [json.loads(f.read_text()) for f in store.glob("*.json")]
    base_fq = [r for r in baseline if r["name"].startswith("baseline-") and r["name"].endswith("fakequant")]
    assert (
        base_fq
        and base_fq[0]["metrics"]["test/kl"] == 0.0
        and base_fq[0]["metrics"]["test/top1_agree"] == 1.0
    )
    # a lost reference is recomputed with its baseline; reuse=false recomputes both
    for r in refs:
        (r / INDEX_FILE).unlink()
    run(compose([*TINY, "bits=b3"]), out_dir=tmp_path / "c")
    assert "computing the full-precision baseline" in capsys.readouterr().out
    assert read_result(tmp_path / "c")["metrics"]["test/kl"] > 0
    run(compose([*TINY, "bits=b3", "reuse=false"]), out_dir=tmp_path / "d")
    assert "computing the full-precision baseline" in capsys.readouterr().out
    assert read_result(tmp_path / "d")["metrics"]["test/kl"] == pytest.approx(
        read_result(tmp_path / "c")["metrics"]["test/kl"], rel=1e-9
    )


def test_distribution_metrics_need_every_window() -> None:
    class W:
        def __init__(self, kl):
            self.nll, self.tokens, self.kl, self.agree, self.digest = 1.0, 1, kl, 1, "x"

    class R:
        root = "r"

        def baseline(self, digest):
            return (1.0, 1)

    assert distribution_metrics([W(0.5), W(None)], R()) == {}
    m = distribution_metrics([W(0.5), W(0.25)], R())
    assert m["test/kl"] == 0.375 and m["test/top1_agree"] == 1.0
    assert distribution_metrics([W(0.5)], None) == {}


def test_report_shows_distribution_columns_and_marks_intervals_containing_zero(tmp_path: Path) -> None:
    from kvq.report import build_table, collect, write_report

    from .report_fixtures import record, write_records

    recs = [
        record(ppl=10.0, bpe=16.0, method="none"),
        record(ppl=10.02, bpe=8.5, method="uniform", bits="b8", baseline=10.0),
        record(ppl=13.0, bpe=2.5, method="uniform", bits="b2", baseline=10.0),
    ]
    extra = [(0.0, 1.0, 0.0, 0.0), (1e-4, 0.999, -0.1, 0.3), (0.2, 0.8, 25.0, 35.0)]
    for r, (kl, agree, lo, hi) in zip(recs, extra):
        r["metrics"].update(
            {
                "test/kl": kl,
                "test/top1_agree": agree,
                "test/delta_ppl_pct_lo": lo,
                "test/delta_ppl_pct_hi": hi,
            }
        )
    write_records(tmp_path / "runs", recs)
    records = collect([tmp_path / "runs"])
    df = build_table(records)
    by = {row["bits"]: row for row in df.to_dict("records")}
    assert by["b8"]["ci_contains_zero"] and not by["b2"]["ci_contains_zero"]
    assert by["b2"]["kl"] == 0.2 and by["b8"]["top1_agree"] == 0.999
    md = write_report(records, tmp_path / "out")["md"].read_text()
    assert "Δppl % 95% CI" in md and "KL (nats)" in md and "top-1 agree" in md
    assert "[-0.10, +0.30] ○" in md and "[+25.00, +35.00] |" in md
    assert "| none | – | fp16 | – | 10.000 | +0.000 | +0.00 | [+0.00, +0.00] |" in md  # no mark on fp itself


def test_non_finite_logits_are_not_mistaken_for_an_unknown_logit_transform(
    tiny_model, tmp_path: Path
) -> None:
    """A window whose logits are NaN (a broken quantizer) gives no distribution metrics for that
    window -- the run's own non-finite check reports it -- instead of a misleading ValueError."""
    model = tiny_model.model
    ref = Reference(tmp_path, record=True)
    ids = _windows(n=1)[0]
    hidden = torch.full((ids.shape[1], model.config.hidden_size), float("nan"))
    logits = torch.full((model.config.vocab_size,), float("nan"))
    assert ref.observe(model, ids, hidden, float("nan"), ids.shape[1], check=(hidden[0], logits)) is None
    # a finite window afterwards is still checked against the model's head
    with pytest.raises(ValueError, match="unknown logit transform"):
        bad = torch.randn(model.config.hidden_size)
        ref.observe(
            model, ids, hidden.nan_to_num(0.0), 1.0, 1, check=(bad, torch.zeros(model.config.vocab_size) + 99)
        )
