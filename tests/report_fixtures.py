"""Synthetic run records for ``tests/test_report.py`` (shaped like ``kvq.run``'s ``result.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_DEFAULT_CHOICES = {
    "method": "uniform",
    "grouping": "none",
    "bits": "b4",
    "granularity": "layer",
    "model": "smollm2_135m",
    "data": "pydoc",
    "eval": "fakequant",
}


def record(
    status: str = "ok",
    *,
    ppl: float | None = None,
    bpe: float | None = None,
    reason: str | None = None,
    baseline: float | None = None,
    seq_len: int = 512,
    kv_residual: int = 0,
    **choices: str,
) -> dict[str, Any]:
    """One record; ``baseline`` adds ``test/baseline_ppl`` and the delta metrics (as kvq.run does)."""
    ch = {**_DEFAULT_CHOICES, **choices}
    metrics: dict[str, float] = {}
    if status == "ok":
        assert ppl is not None and bpe is not None
        metrics = {
            "test/ppl": ppl,
            "test/nll": 0.0,
            "test/tokens": 1000.0,
            "kv/bits_per_element": bpe,
            "kv/compression": 16.0 / bpe,
        }
        if baseline is not None:
            metrics["test/baseline_ppl"] = baseline
            metrics["test/delta_ppl"] = ppl - baseline
            metrics["test/delta_ppl_pct"] = 100.0 * (ppl - baseline) / baseline
    method_target = (
        "kvq.quant.FullPrecision" if ch["method"] == "none" else f"kvq.quant.{ch['method'].title()}"
    )
    return {
        "status": status,
        "reason": reason,
        "name": "-".join(ch[a] for a in _DEFAULT_CHOICES),
        "choices": ch,
        "config": {
            "method": {"_target_": method_target},
            "model": {"_target_": f"kvq.models.{ch['model']}"},
            "data": {"_target_": f"kvq.data.{ch['data']}", "seq_len": seq_len, "max_windows": 16},
            "eval": {"_target_": f"kvq.protocols.{ch['eval']}"},
            "kv": {"residual": kv_residual, "sinks": 0},
            "seed": 0,
        },
        "metrics": metrics,
        "versions": {},
        "started": 0.0,
        "finished": 1.0,
    }


def grid_records() -> list[dict[str, Any]]:
    """A realistic two-model grid: fp baselines, low-bit blow-ups (log scale), all methods and
    granularities, a skipped and a failed run, a residual-window variant."""
    recs: list[dict[str, Any]] = []
    for model, fp in (("smollm2_135m", 36.08), ("llama2_7b", 5.47)):
        recs.append(record(ppl=fp, bpe=16.0, method="none", model=model))
        table = {
            ("uniform", "none", "b2", "layer"): (2.25, 40.0),
            ("uniform", "g128", "b2", "head"): (2.5, 9.0),
            ("uniform", "g64", "b3", "head"): (3.5, 1.25),
            ("uniform", "g128", "b4", "head"): (4.25, 0.2),
            ("uniform", "none", "b8", "layer"): (8.03, 0.01),
            ("normal", "g64", "b2", "head"): (2.5, 3.1),
            ("normal", "g128", "b4", "layer"): (4.25, 0.35),
            ("adaptive", "g128", "b2", "head"): (2.75, 0.9),
            ("adaptive", "g64", "b3", "layer"): (4.0, 0.12),
            ("adaptive", "g128", "b4", "head"): (5.0, 0.05),
            ("uniform", "g128", "attn", "layer"): (3.1, 0.6),
        }
        for (m, g, b, gran), (bpe, rel) in table.items():
            recs.append(
                record(
                    ppl=fp * (1 + rel),
                    bpe=bpe,
                    baseline=fp,
                    method=m,
                    grouping=g,
                    bits=b,
                    granularity=gran,
                    model=model,
                )
            )
        recs.append(
            record(
                ppl=fp * 1.1,
                bpe=4.6,
                baseline=fp,
                method="uniform",
                grouping="g128",
                bits="b4",
                granularity="head",
                model=model,
                kv_residual=32,
            )
        )
    recs.append(
        record(
            "skipped", reason="attn-adaptive: bits=attn needs a uniform grid", method="adaptive", bits="attn"
        )
    )
    recs.append(record("failed", reason="NaN in layer 3 keys", method="normal", bits="b2", model="llama2_7b"))
    return recs


def write_records(root: Path, records: list[dict[str, Any]]) -> list[Path]:
    """Write each record as ``root/<i>/result.json``."""
    paths = []
    for i, rec in enumerate(records):
        d = root / str(i)
        d.mkdir(parents=True, exist_ok=True)
        (d / "result.json").write_text(json.dumps(rec))
        paths.append(d / "result.json")
    return paths
