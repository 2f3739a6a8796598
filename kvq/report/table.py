"""The report's table: one row per finished run, the baselines, and the runs without a result.

A *setting* is a (model, data, eval) choice with its config: the Pareto front and the baseline
are taken within one setting, as perplexities of different models or texts are not comparable.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from typing import Any

import pandas as pd

from kvq.experiment import AXES, NON_EXPERIMENT_KEYS, is_baseline_record

from .pareto import pareto_front
from .records import natural_key

__all__ = ["COLUMNS", "as_float", "baselines", "build_table", "dedupe", "rank", "skipped_and_failed"]

log = logging.getLogger(__name__)

#: the columns of :func:`build_table` (``knobs`` = the settings that tell otherwise equal rows apart)
COLUMNS = (
    "model",
    "data",
    "eval",
    "method",
    "grouping",
    "bits",
    "granularity",
    "knobs",
    "ppl",
    "baseline_ppl",
    "delta_ppl",
    "delta_ppl_pct",
    "delta_ppl_pct_lo",
    "delta_ppl_pct_hi",
    "ci_contains_zero",
    "kl",
    "top1_agree",
    "bits_per_element",
    "compression",
    "pareto",
    "name",
    "path",
)
#: natural order of each axis's options (unknown options follow, in natural sort order)
_ORDER = {
    "method": ("none", "uniform", "normal", "adaptive"),
    "grouping": ("none", "g128", "g64", "g32"),  # coarse -> fine (more scales per element)
    "bits": ("b8", "b4", "b3", "b2", "attn"),  # wide -> narrow, then allocated
    "granularity": ("head", "layer", "token"),  # small -> large unit
}


def _choice(rec: dict[str, Any], axis: str) -> str:
    return str((rec.get("choices") or {}).get(axis, "?"))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}."))
    return {k.rstrip("."): v for k, v in out.items()}


def _setting_config(rec: dict[str, Any]) -> dict[str, Any]:
    c = rec.get("config") or {}
    return {k: c.get(k) for k in ("model", "data", "eval", "seed")}


def _setting_labels(records: list[dict[str, Any]]) -> dict[str, str]:
    """A readable label per setting (model · data · eval), extended by the differing keys when
    two settings share the same choices (e.g. ``data.seq_len`` differs)."""
    by_label: dict[str, dict[str, dict[str, Any]]] = {}
    for r in records:
        label = " · ".join(_choice(r, a) for a in ("model", "data", "eval"))
        by_label.setdefault(label, {})[_setting_id(r)] = _flatten(_setting_config(r))
    out: dict[str, str] = {}
    for label, ids in by_label.items():
        if len(ids) == 1:
            out.update(dict.fromkeys(ids, label))
            continue
        keys = sorted({k for f in ids.values() for k in f})
        diff = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in ids.values()}) > 1]
        for sid, flat in ids.items():
            out[sid] = label + " (" + ", ".join(f"{k}={flat.get(k)}" for k in diff) + ")"
    return out


def _setting_id(rec: dict[str, Any]) -> str:
    choices = [_choice(rec, a) for a in ("model", "data", "eval")]
    return json.dumps([choices, _setting_config(rec)], sort_keys=True, default=str)


def rank(axis: str, value: str) -> tuple[int, list[Any]]:
    """A sort key for an axis option: its place in the axis's natural order (``b8`` before
    ``b4``); unknown options after the known ones, in natural sort order.

    Args:
        axis: the axis (``method``, ``grouping``, ``bits``, ``granularity``; others have no order).
        value: the option.

    Returns:
        ``(position, natural key)``.
    """
    order = _ORDER.get(axis, ())
    return (order.index(value), []) if value in order else (len(order), natural_key(value))


def dedupe(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ok record per experiment ``key`` (the latest finished); records without a key stay."""
    latest: dict[str, dict[str, Any]] = {}
    out: list[dict[str, Any]] = []
    for r in records:
        key = r.get("key")
        if key is None:
            out.append(r)
        elif key not in latest or (r.get("finished") or 0) >= (latest[key].get("finished") or 0):
            latest[key] = r
    n_dup = sum(1 for r in records if r.get("key") is not None) - len(latest)
    if n_dup:
        log.info("%d records repeat an experiment already read (same key): the latest is used", n_dup)
    return out + list(latest.values())


def _ok(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The finished perplexity runs (retrieval, lm_eval and generate runs have their own sections,
    :mod:`kvq.report.sections`)."""
    return dedupe([r for r in records if r.get("status") == "ok" and "test/ppl" in (r.get("metrics") or {})])


def as_float(v: Any) -> float:
    """``float(v)``, or NaN when ``v`` is missing (``None``) or not a number."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _interval(m: dict[str, Any]) -> dict[str, Any]:
    """The paired 95% interval of Δppl % and whether it contains 0 (not told apart from fp)."""
    lo, hi = as_float(m.get("test/delta_ppl_pct_lo")), as_float(m.get("test/delta_ppl_pct_hi"))
    inside = math.isfinite(lo) and math.isfinite(hi) and lo <= 0.0 <= hi
    return {"delta_ppl_pct_lo": lo, "delta_ppl_pct_hi": hi, "ci_contains_zero": inside}


def baselines(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """The full-precision perplexity per setting (model, data, eval).

    From the ``method=none`` run of the setting when there is one, else from the
    ``test/baseline_ppl`` that quantized runs carry (the baseline ``kvq.run`` stored once).

    Returns:
        Columns ``setting, model, data, eval, ppl, tokens, source``; one row per setting.
    """
    ok = _ok(records)
    labels = _setting_labels(ok)
    rows: dict[str, dict[str, Any]] = {}
    for r in ok:
        sid = _setting_id(r)
        m = r["metrics"]
        row = {
            "setting": labels[sid],
            "model": _choice(r, "model"),
            "data": _choice(r, "data"),
            "eval": _choice(r, "eval"),
        }
        if is_baseline_record(r):
            rows[sid] = {
                **row,
                "ppl": as_float(m["test/ppl"]),
                "tokens": m.get("test/tokens"),
                "source": r["_path"],
            }
        elif sid not in rows and "test/baseline_ppl" in m:
            rows[sid] = {
                **row,
                "ppl": as_float(m["test/baseline_ppl"]),
                "tokens": m.get("test/tokens"),
                "source": "test/baseline_ppl of " + r.get("name", r["_path"]),
            }
    cols = ["setting", "model", "data", "eval", "ppl", "tokens", "source"]
    ordered = sorted(rows.values(), key=lambda r: natural_key(r["setting"]))
    return pd.DataFrame(ordered, columns=cols)


def build_table(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per ``ok`` run, sorted by setting, method, grouping, bits, granularity.

    Columns (:data:`COLUMNS`): the axis choices; ``knobs`` (the config values that tell rows with
    the same choices apart, e.g. ``kv.residual=32``; empty otherwise); ``ppl``; ``baseline_ppl``,
    ``delta_ppl`` and ``delta_ppl_pct`` (from the record's ``test/baseline_ppl``,
    ``test/delta_ppl``, ``test/delta_ppl_pct`` when present, else against the ``method=none``
    run of the same model/data/eval; NaN without a baseline); ``bits_per_element``;
    ``compression``; ``delta_ppl_pct_lo`` / ``delta_ppl_pct_hi`` (the paired 95% interval of
    Δppl %) and ``ci_contains_zero`` (the interval contains 0: not told apart from the fp cache);
    ``kl`` (mean per-token KL from the fp distribution) and ``top1_agree`` (NaN where the record
    has none); ``pareto`` (on the Pareto front of its setting, see :func:`pareto_front`);
    ``name``; ``path`` (the run directory). The DataFrame's ``attrs["setting"]`` holds each row's
    setting label. Repeated records of one experiment (same ``key``) count once.
    """
    ok = _ok(records)
    labels = _setting_labels(ok)
    base = {row.setting: row.ppl for row in baselines(ok).itertuples()}
    rows = []
    for r in ok:
        m = r["metrics"]
        setting = labels[_setting_id(r)]
        ppl = as_float(m["test/ppl"])
        b = as_float(m.get("test/baseline_ppl", base.get(setting, math.nan)))
        if is_baseline_record(r) and "test/baseline_ppl" not in m:
            b = ppl
        delta = as_float(m["test/delta_ppl"]) if "test/delta_ppl" in m else ppl - b
        pct = as_float(m["test/delta_ppl_pct"]) if "test/delta_ppl_pct" in m else 100.0 * (ppl - b) / b
        rows.append(
            {
                **{a: _choice(r, a) for a in AXES},
                "knobs": "",
                "ppl": ppl,
                "baseline_ppl": b,
                "delta_ppl": delta,
                "delta_ppl_pct": pct,
                **_interval(m),
                "kl": as_float(m.get("test/kl")),
                "top1_agree": as_float(m.get("test/top1_agree")),
                "bits_per_element": as_float(m.get("kv/bits_per_element")),
                "compression": as_float(m.get("kv/compression")),
                "pareto": False,
                "name": str(r.get("name", "")),
                "path": r["_path"],
                "_setting": setting,
                "_flat": _flatten(
                    {k: v for k, v in (r.get("config") or {}).items() if k not in NON_EXPERIMENT_KEYS}
                ),
            }
        )
    df = pd.DataFrame(rows, columns=[*COLUMNS, "_setting", "_flat"])
    if df.empty:
        df = df.drop(columns=["_setting", "_flat"])
        df.attrs["setting"] = []
        return df
    # knobs: config values that differ between rows sharing setting + axis choices
    for _, idx in df.groupby(["_setting", *AXES[:4]], sort=False).groups.items():
        if len(idx) < 2:
            continue
        flats = [df.at[i, "_flat"] for i in idx]
        keys = sorted({k for f in flats for k in f})
        diff = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1]
        for i, f in zip(idx, flats):
            df.at[i, "knobs"] = ", ".join(f"{k}={f.get(k)}" for k in diff)
    for _, idx in df.groupby("_setting", sort=False).groups.items():
        idx = list(idx)
        pts = [(df.at[i, "bits_per_element"], df.at[i, "ppl"]) for i in idx]
        for j in pareto_front(pts):
            df.at[idx[j], "pareto"] = True
    sort_keys = {a: df[a].map(lambda v, a=a: rank(a, v)) for a in AXES[:4]}
    order = sorted(
        range(len(df)),
        key=lambda i: (
            natural_key(df.at[i, "_setting"]),
            *(sort_keys[a].iat[i] for a in AXES[:4]),
            natural_key(df.at[i, "knobs"]),
            df.at[i, "bits_per_element"],
        ),
    )
    df = df.iloc[order].reset_index(drop=True)
    settings = df["_setting"].tolist()
    df = df.drop(columns=["_setting", "_flat"])
    df["pareto"] = df["pareto"].astype(bool)
    df["ci_contains_zero"] = df["ci_contains_zero"].astype(bool)
    df.attrs["setting"] = settings
    return df


def skipped_and_failed(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every run that has no result, with its reason.

    Returns:
        Dicts ``{"status", "name", "reason", "path"}``: ``skipped`` (invalid combination, run or
        dropped by the sweeper), ``failed``, then ``duplicate`` (dropped by the sweeper: the same
        experiment runs under another job). Repeats (same status, name, reason) count once.
    """
    out, seen = [], set()
    order = {"skipped": 0, "failed": 1}
    for r in sorted(
        (r for r in records if r.get("status") != "ok"), key=lambda r: order.get(str(r.get("status")), 2)
    ):
        item = {
            "status": str(r.get("status")),
            "name": str(r.get("name") or "?"),
            "reason": " ".join(str(r.get("reason") or "no reason recorded").split()),
            "path": str(r.get("_path", "")),
        }
        k = (item["status"], item["name"], item["reason"])
        if k not in seen:
            seen.add(k)
            out.append(item)
    return out
