"""Aggregate run records into a table, a markdown report and a perplexity-vs-memory Pareto plot.

``kvq report multirun/2024-06-01/12-00-00 --out report/`` reads every ``result.json`` under the
given run or multirun directories (and the ``dropped.json`` the ``kvq`` sweeper writes for the
jobs it did not launch), and writes

* ``report.csv`` — one row per finished (``ok``) run, full-precision numbers;
* ``report.md`` — the same as markdown tables, one per (model, data, eval) setting, Pareto rows
  marked, the full-precision baselines, and every skipped / failed / dropped run with its reason;
* ``pareto.png`` — perplexity vs KV-cache bits per element, one colour per method, one marker
  per granularity, the Pareto front as a step line, the fp baseline as a dashed line.

The Pareto front is taken *within* a setting (same model, data and protocol): perplexities of
different models or texts are not comparable.

Library use::

    from kvq.report import collect, build_table, write_report
    records = collect([Path("multirun")])
    table = build_table(records)          # pandas.DataFrame, one row per ok run
    files = write_report(records, Path("report"))
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = [
    "AXES",
    "COLUMNS",
    "ReportCallback",
    "ReportError",
    "baselines",
    "build_table",
    "collect",
    "collect_wandb",
    "log_to_wandb",
    "main",
    "pareto_front",
    "skipped_and_failed",
    "write_report",
]

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
DROPPED_FILE = "dropped.json"
#: the experimental axes named in a record's ``choices``, in table order
AXES = ("method", "grouping", "bits", "granularity", "model", "data", "eval")
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
    "bits_per_element",
    "compression",
    "pareto",
    "name",
    "path",
)
#: config keys that say where/how a run was executed, not what it measured
_NON_EXPERIMENT = ("logger", "results_dir", "reuse", "cache_dir", "accelerator")
#: natural order of each axis's options (unknown options follow, in natural sort order)
_ORDER = {
    "method": ("none", "uniform", "normal", "adaptive"),
    "grouping": ("none", "g128", "g64", "g32"),  # coarse -> fine (more scales per element)
    "bits": ("b8", "b4", "b3", "b2", "attn"),  # wide -> narrow, then allocated
    "granularity": ("head", "layer", "token"),  # small -> large unit
}
_METHOD_COLOURS = {"none": "#4d4d4d", "uniform": "#1f77b4", "normal": "#2ca02c", "adaptive": "#ff7f0e"}
_EXTRA_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#d62728")
_GRAN_MARKERS = {"head": "s", "layer": "o", "token": "^"}
_EXTRA_MARKERS = ("D", "v", "P", "X", "<", ">")


class ReportError(RuntimeError):
    """A problem the user can fix (bad path, no W&B credentials), reported as one line."""


# ============================================================================== collecting
def _natural_key(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        log.warning("skipping unreadable %s (%s)", path, _first_line(e))
        return None


def _read_result(path: Path) -> dict[str, Any] | None:
    rec = _read_json(path)
    if rec is None:
        return None
    if not isinstance(rec, dict) or rec.get("status") not in ("ok", "skipped", "failed"):
        log.warning("skipping %s: not a kvq run record (no status ok/skipped/failed)", path)
        return None
    metrics = rec.get("metrics")
    if rec["status"] == "ok" and not (isinstance(metrics, dict) and "test/ppl" in metrics):
        log.warning("skipping %s: an ok record without test/ppl (incomplete)", path)
        return None
    rec = dict(rec)
    rec["_path"] = str(path.parent)
    return rec


def _read_dropped(path: Path) -> list[dict[str, Any]]:
    """The jobs the ``kvq`` sweeper dropped before launch, as records (invalid -> skipped)."""
    data = _read_json(path)
    if data is None:
        return []
    if not isinstance(data, list) or not all(isinstance(d, dict) and "overrides" in d for d in data):
        log.warning("skipping %s: not a kvq sweeper dropped.json", path)
        return []
    out = []
    all_overrides = [[str(o) for o in d.get("overrides") or []] for d in data]
    common = set.intersection(*map(set, all_overrides)) if all_overrides else set()
    for d, overrides in zip(data, all_overrides):
        choices = {}
        for o in overrides:
            k, _, v = o.partition("=")
            if k.lstrip("+~") in AXES:
                choices[k.lstrip("+~")] = v
        # the name: the axis choices, plus the other overrides that vary between the dropped jobs
        shown = [o for o in overrides if o.partition("=")[0].lstrip("+~") in AXES or o not in common]
        status = "skipped" if d.get("status") == "invalid" else str(d.get("status") or "dropped")
        out.append(
            {
                "status": status,
                "reason": d.get("reason"),
                "name": " ".join(shown or overrides),
                "choices": choices,
                "config": {},
                "metrics": {},
                "dropped": True,
                "_path": f"{path.parent} (job #{d.get('index', '?')}, not launched)",
            }
        )
    return out


def collect(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Read every run record under ``paths``.

    Each path is a run directory, a multirun directory (searched recursively), or a
    ``result.json`` file. Also reads the ``dropped.json`` that the ``kvq`` Hydra sweeper writes
    into a multirun directory: an *invalid* dropped job becomes a ``skipped`` record, a
    *duplicate* one a ``duplicate`` record (``"dropped": True`` on both).

    A corrupt, truncated or foreign JSON file is reported with a ``logging`` warning and skipped.
    Every record gets ``"_path"`` (the directory it was read from) and ``"_root"`` (the path
    argument it was found under).

    Args:
        paths: directories (or files) to search.

    Returns:
        The records, in path order (natural sort: ``multirun/x/10`` after ``multirun/x/9``).

    Raises:
        ReportError: a path does not exist.
    """
    records: list[dict[str, Any]] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"no such run directory: {p}")
        files = [p] if p.is_file() else [*p.rglob(RESULT_FILE), *p.rglob(DROPPED_FILE)]
        for f in sorted(files, key=lambda f: _natural_key(str(f))):
            r = f.resolve()
            if r in seen:
                continue
            seen.add(r)
            found = _read_dropped(f) if f.name == DROPPED_FILE else [_read_result(f)]
            records.extend({**rec, "_root": str(p)} for rec in found if rec is not None)
    return records


# ============================================================================== Pareto
def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points when minimising both coordinates.

    A point *dominates* another when it is ``<=`` in both coordinates and ``<`` in at least one.
    The result does not depend on the order of the two coordinates, so ``(bits, ppl)`` and
    ``(ppl, bits)`` give the same set. Ties:

    * equal in one coordinate: only the one better in the other is kept
      (``(4, 10)`` dominates ``(4, 12)`` and ``(6, 10)``);
    * exact duplicates do not dominate each other: all copies are kept (they are equally good);
    * a point with a NaN or infinite coordinate is never on the front and dominates nothing.

    Args:
        points: ``(x, y)`` pairs.

    Returns:
        Sorted indices into ``points`` (``O(n log n)``).
    """
    finite = [i for i, (x, y) in enumerate(points) if math.isfinite(x) and math.isfinite(y)]
    finite.sort(key=lambda i: (points[i][0], points[i][1]))
    front: list[int] = []
    best = math.inf  # lowest y among points with a strictly smaller x
    k = 0
    while k < len(finite):
        x = points[finite[k]][0]
        same_x = []
        while k < len(finite) and points[finite[k]][0] == x:
            same_x.append(finite[k])
            k += 1
        y_min = points[same_x[0]][1]  # sorted by (x, y): the first has the lowest y
        if y_min < best:
            front.extend(i for i in same_x if points[i][1] == y_min)
            best = y_min
    return sorted(front)


# ============================================================================== the table
def _choice(rec: dict[str, Any], axis: str) -> str:
    return str((rec.get("choices") or {}).get(axis, "?"))


def _is_baseline(rec: dict[str, Any]) -> bool:
    target = str(((rec.get("config") or {}).get("method") or {}).get("_target_", ""))
    return _choice(rec, "method") == "none" or target.endswith("FullPrecision")


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


def _rank(axis: str, value: str) -> tuple[int, list[Any]]:
    order = _ORDER.get(axis, ())
    return (order.index(value), []) if value in order else (len(order), _natural_key(value))


def _dedupe(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
    return _dedupe([r for r in records if r.get("status") == "ok"])


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


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
        if _is_baseline(r):
            rows[sid] = {
                **row,
                "ppl": _float(m["test/ppl"]),
                "tokens": m.get("test/tokens"),
                "source": r["_path"],
            }
        elif sid not in rows and "test/baseline_ppl" in m:
            rows[sid] = {
                **row,
                "ppl": _float(m["test/baseline_ppl"]),
                "tokens": m.get("test/tokens"),
                "source": "test/baseline_ppl of " + r.get("name", r["_path"]),
            }
    cols = ["setting", "model", "data", "eval", "ppl", "tokens", "source"]
    ordered = sorted(rows.values(), key=lambda r: _natural_key(r["setting"]))
    return pd.DataFrame(ordered, columns=cols)


def build_table(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per ``ok`` run, sorted by setting, method, grouping, bits, granularity.

    Columns (:data:`COLUMNS`): the axis choices; ``knobs`` (the config values that tell rows with
    the same choices apart, e.g. ``kv.residual=32``; empty otherwise); ``ppl``; ``baseline_ppl``,
    ``delta_ppl`` and ``delta_ppl_pct`` (from the record's ``test/baseline_ppl``,
    ``test/delta_ppl``, ``test/delta_ppl_pct`` when present, else against the ``method=none``
    run of the same model/data/eval; NaN without a baseline); ``bits_per_element``;
    ``compression``; ``pareto`` (on the Pareto front of its setting, see :func:`pareto_front`);
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
        ppl = _float(m["test/ppl"])
        b = _float(m.get("test/baseline_ppl", base.get(setting, math.nan)))
        if _is_baseline(r) and "test/baseline_ppl" not in m:
            b = ppl
        delta = _float(m["test/delta_ppl"]) if "test/delta_ppl" in m else ppl - b
        pct = _float(m["test/delta_ppl_pct"]) if "test/delta_ppl_pct" in m else 100.0 * (ppl - b) / b
        rows.append(
            {
                **{a: _choice(r, a) for a in AXES},
                "knobs": "",
                "ppl": ppl,
                "baseline_ppl": b,
                "delta_ppl": delta,
                "delta_ppl_pct": pct,
                "bits_per_element": _float(m.get("kv/bits_per_element")),
                "compression": _float(m.get("kv/compression")),
                "pareto": False,
                "name": str(r.get("name", "")),
                "path": r["_path"],
                "_setting": setting,
                "_flat": _flatten(
                    {k: v for k, v in (r.get("config") or {}).items() if k not in _NON_EXPERIMENT}
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
    sort_keys = {a: df[a].map(lambda v, a=a: _rank(a, v)) for a in AXES[:4]}
    order = sorted(
        range(len(df)),
        key=lambda i: (
            _natural_key(df.at[i, "_setting"]),
            *(sort_keys[a].iat[i] for a in AXES[:4]),
            _natural_key(df.at[i, "knobs"]),
            df.at[i, "bits_per_element"],
        ),
    )
    df = df.iloc[order].reset_index(drop=True)
    settings = df["_setting"].tolist()
    df = df.drop(columns=["_setting", "_flat"])
    df["pareto"] = df["pareto"].astype(bool)
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


# ============================================================================== the plot
def _palette(values: Iterable[str], fixed: dict[str, str], extra: Sequence[str]) -> dict[str, str]:
    out, n = {}, 0
    for v in values:
        if v in fixed:
            out[v] = fixed[v]
        elif v not in out:
            out[v] = extra[n % len(extra)]
            n += 1
    return out


def _short(row: Any) -> str:
    if row.method == "none":
        return "fp16"
    parts = [row.bits, row.grouping if row.grouping != "none" else ""]
    return " ".join(p for p in parts if p)


#: where a Pareto label may sit, in order of preference: (dx, dy) in points, ha, va.
#: Lower-left first: a point there would dominate the front point, so it is empty of data.
_LABEL_SPOTS = (
    ((-7, -5), "right", "top"),
    ((7, -5), "left", "top"),
    ((-7, 5), "right", "bottom"),
    ((7, 5), "left", "bottom"),
)


def _place_labels(
    ax: Any, texts: list[Any], points: Sequence[tuple[float, float]], fixed: Sequence[Any]
) -> None:
    """Place each label (greedy, in order) at the first spot near its point where it overlaps no
    data point, no other label and no ``fixed`` text and stays inside the axes; else push it down
    step by step with a leader line; a label that still cannot be placed is hidden."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    if not texts:
        return
    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    r = 5.0 * ax.figure.dpi / 72  # about a marker's radius, in pixels
    disp = ax.transData.transform(points) if len(points) else []
    taken: list[Any] = [Bbox.from_extents(x - r, y - r, x + r, y + r) for x, y in disp]

    def box(t: Any) -> Any:  # the text alone, without its leader line
        t.update_positions(renderer)
        return Text.get_window_extent(t, renderer)

    def free(t: Any) -> bool:
        b = box(t)
        inside = frame.x0 <= b.x0 and b.x1 <= frame.x1 and frame.y0 <= b.y0 and b.y1 <= frame.y1
        return inside and not any(b.overlaps(o) for o in taken)

    taken += [box(f) for f in fixed]
    for t in texts:
        t.arrow_patch.set_visible(False)  # a leader line only for a label moved off its point
        ok = False
        for offset, ha, va in _LABEL_SPOTS:
            t.set_position(offset)
            t.set_horizontalalignment(ha)
            t.set_verticalalignment(va)
            if ok := free(t):
                break
        if not ok:
            t.set_position(_LABEL_SPOTS[0][0])
            t.set_horizontalalignment(_LABEL_SPOTS[0][1])
            t.set_verticalalignment(_LABEL_SPOTS[0][2])
            t.arrow_patch.set_visible(True)
            for _ in range(8):
                x, y = t.get_position()  # offset points
                t.set_position((x - 4, y - box(t).height * 72 / ax.figure.dpi))
                if ok := free(t):
                    break
        if ok:
            taken.append(box(t).expanded(1.04, 1.1))
        else:
            t.set_visible(False)


def _plot(df: pd.DataFrame, base: pd.DataFrame, path: Path) -> Path:
    """Draw ``pareto.png`` on an Agg canvas (no pyplot: the global backend is left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, NullFormatter

    settings = list(dict.fromkeys(df.attrs.get("setting", [])))
    n = max(len(settings), 1)
    ncols = 1 if n <= 2 else 2
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(6.6 * ncols + 2.0, 4.6 * nrows), layout="constrained", dpi=150)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    methods = sorted(set(df["method"]), key=lambda v: _rank("method", v))
    grans = sorted(set(df["granularity"]), key=lambda v: _rank("granularity", v))
    colour = _palette(methods, _METHOD_COLOURS, _EXTRA_COLOURS)
    marker = _palette(grans, _GRAN_MARKERS, _EXTRA_MARKERS)
    base_ppl = dict(zip(base["setting"], base["ppl"]))
    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    setting_col = pd.Series(df.attrs.get("setting", []), index=df.index, dtype=object)
    to_declutter = []
    for ax, setting in zip(axes.flat, settings):
        finite = df["ppl"].map(math.isfinite) & df["bits_per_element"].map(math.isfinite)
        sub = df[(setting_col == setting) & finite]
        for (m, g), grp in sub.groupby(["method", "granularity"], sort=False):
            ax.scatter(
                grp["bits_per_element"],
                grp["ppl"],
                c=colour[m],
                marker=marker[g],
                s=50,
                alpha=0.9,
                edgecolors="white",
                linewidths=0.6,
                zorder=3,
            )
        front = sub[sub["pareto"]].sort_values(["bits_per_element", "ppl"])
        labels = []
        if len(front):
            xs, ys = front["bits_per_element"].tolist(), front["ppl"].tolist()
            x_end = max(sub["bits_per_element"].max(), xs[-1]) * 1.04
            ax.step([*xs, x_end], [*ys, ys[-1]], where="post", color="black", lw=1.3, zorder=2)
            ax.scatter(xs, ys, s=160, facecolors="none", edgecolors="black", linewidths=1.4, zorder=4)
            # lower-left of a front point is empty: anything there would dominate it
            for row in front.drop_duplicates(["bits_per_element", "ppl"]).itertuples():
                labels.append(
                    ax.annotate(
                        _short(row),
                        (row.bits_per_element, row.ppl),
                        xytext=(-7, -5),
                        textcoords="offset points",
                        ha="right",
                        va="top",
                        fontsize=8.5,
                        color=colour[row.method],
                        fontweight="bold",
                        zorder=5,
                        arrowprops={"arrowstyle": "-", "color": colour[row.method], "lw": 0.7, "shrinkB": 5},
                    )
                )
        b = base_ppl.get(setting)
        fixed = []
        if b is not None and math.isfinite(b):
            ax.axhline(b, ls="--", color="#4d4d4d", lw=1.1, zorder=1)
            if len(settings) > 1:  # one setting: the value is in the legend
                fixed.append(
                    ax.annotate(
                        f"fp16 {b:.4g}",
                        (0.01, b),
                        xycoords=("axes fraction", "data"),
                        xytext=(0, 3),
                        textcoords="offset points",
                        ha="left",
                        va="bottom",
                        fontsize=8.5,
                        color="#4d4d4d",
                    )
                )
        xs_all, ys_all = sub["bits_per_element"], sub["ppl"]
        if len(xs_all) and xs_all.min() > 0 and xs_all.max() / xs_all.min() > 6:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(fmt)
        if len(ys_all) and ys_all.min() > 0 and ys_all.max() / ys_all.min() > 3:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(fmt)
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.08, y=0.1)
        ax.set_xlabel("KV-cache bits per element (stored bytes × 8 / elements)", fontsize=10)
        ax.set_ylabel("perplexity (lower is better)", fontsize=10)
        ax.set_title(setting, fontsize=11)
        ax.grid(True, which="major", alpha=0.3)
        ax.tick_params(labelsize=9.5)
        points = list(zip(sub["bits_per_element"], sub["ppl"]))
        to_declutter.append((ax, labels, points, fixed))
    for ax in list(axes.flat)[len(settings) :]:
        ax.set_visible(False)
    if not settings:
        axes.flat[0].text(
            0.5, 0.5, "no finished runs", ha="center", va="center", transform=axes.flat[0].transAxes
        )
    baseline_label = "fp16 baseline"
    if len(settings) == 1 and math.isfinite(_float(base_ppl.get(settings[0]))):
        baseline_label += f"\n(ppl {base_ppl[settings[0]]:.4g})"
    header = {"method": Line2D([], [], ls="none", label="method")}
    handles = [header["method"]]
    handles += [Line2D([], [], ls="none", marker="o", color=colour[m], ms=7, label=m) for m in methods]
    header["granularity"] = Line2D([], [], ls="none", label="granularity")
    handles.append(header["granularity"])
    handles += [Line2D([], [], ls="none", marker=marker[g], color="#777777", ms=7, label=g) for g in grans]
    handles += [
        Line2D([], [], ls="none", label=" "),
        Line2D([], [], color="black", lw=1.3, marker="o", mfc="none", ms=10, label="Pareto front"),
        Line2D([], [], color="#4d4d4d", ls="--", lw=1.1, label=baseline_label),
    ]
    leg = fig.legend(
        handles=handles, loc="outside right upper", fontsize=9.5, frameon=False, handlelength=1.6
    )
    for text in leg.get_texts():
        if text.get_text() in header:
            text.set_fontweight("bold")
            text.set_x(-20)
    fig.suptitle("Perplexity vs KV-cache memory (labels: bits, grouping)", fontsize=12)
    fig.canvas.draw()  # final layout first: label overlaps are measured in display space
    for ax, labels, points, fixed in to_declutter:
        _place_labels(ax, labels, points, fixed)
    fig.savefig(path)
    return path


# ============================================================================== markdown
def _md_escape(v: Any) -> str:
    return " ".join(str(v).split()).replace("|", "\\|")


def _md_table(
    header: Sequence[str], rows: Iterable[Sequence[Any]], align: Sequence[str] | None = None
) -> str:
    align = align or ["l"] * len(header)
    sep = ["---:" if a == "r" else ":---:" if a == "c" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _shown_axes(row: Any) -> list[str]:
    """method, grouping, bits, granularity as displayed: the fp16 baseline has no bits/groups."""
    if row.method == "none":
        return ["none", "–", "fp16", "–"]
    return [row.method, row.grouping, row.bits, row.granularity]


def _num(v: float, spec: str = ".2f") -> str:
    return "–" if v is None or not math.isfinite(v) else format(v, spec)


def _markdown(
    df: pd.DataFrame, base: pd.DataFrame, issues: list[dict[str, Any]], png: str, sources: list[str]
) -> str:
    counts = {s: sum(1 for i in issues if i["status"] == s) for s in ("skipped", "failed", "duplicate")}
    lines = [
        "# kvq report",
        "",
        f"{len(df)} finished runs, {counts['skipped']} skipped, {counts['failed']} failed"
        + (f", {counts['duplicate']} dropped as duplicates" if counts["duplicate"] else "")
        + f" — from {', '.join(f'`{s}`' for s in sources)}, {time.strftime('%Y-%m-%d %H:%M')}.",
        "",
        f"![Perplexity vs KV-cache bits per element]({png})",
        "",
        "## Full-precision baselines",
        "",
    ]
    if len(base):
        lines.append(
            _md_table(
                ["model", "data", "eval", "setting", "ppl", "tokens"],
                [
                    [r.model, r.data, r.eval, r.setting, _num(r.ppl, ".4f"), _num(_float(r.tokens), ".0f")]
                    for r in base.itertuples()
                ],
                ["l", "l", "l", "l", "r", "r"],
            )
        )
    else:
        lines.append("No full-precision baseline among these runs (add `method=none` to the grid).")
    settings = df.attrs.get("setting", [])
    base_ppl = dict(zip(base["setting"], base["ppl"]))
    for setting in dict.fromkeys(settings):
        sub = df[[s == setting for s in settings]]
        knobs = bool((sub["knobs"] != "").any())
        header = ["method", "grouping", "bits", "granularity", *(["knobs"] if knobs else [])]
        header += ["ppl", "Δppl", "Δppl %", "bits/element", "compression", "Pareto"]
        rows = []
        for r in sub.itertuples():
            star = "★" if r.pareto else ""
            rows.append(
                [*_shown_axes(r), *([r.knobs] if knobs else [])]
                + [
                    _num(r.ppl, ".3f"),
                    _num(r.delta_ppl, "+.3f"),
                    _num(r.delta_ppl_pct, "+.2f"),
                    _num(r.bits_per_element, ".3f"),
                    _num(r.compression, ".2f") + "×" if math.isfinite(r.compression) else "–",
                    star,
                ]
            )
        b = base_ppl.get(setting)
        lines += [
            "",
            f"## {setting}",
            "",
            f"Baseline (fp16 KV cache) perplexity: {_num(b, '.4f') if b is not None else 'unknown'}. "
            f"{int(sub['pareto'].sum())} of {len(sub)} runs on the Pareto front (★).",
            "",
            _md_table(header, rows, ["l"] * (len(header) - 6) + ["r"] * 5 + ["c"]),
        ]
    lines += [
        "",
        "★ = on the Pareto front of its setting: no other run of the same model, data and protocol has "
        "both a lower-or-equal perplexity and a lower-or-equal bits/element (one of them strictly). "
        "Δppl = ppl − baseline ppl; compression = fp16 cache bytes / quantized cache bytes.",
    ]
    titles = {
        "skipped": "Skipped runs (invalid combinations)",
        "failed": "Failed runs",
        "duplicate": "Dropped as duplicates (the same experiment runs as another job)",
    }
    for status, title in titles.items():
        items = [i for i in issues if i["status"] == status]
        if status != "duplicate" or items:
            lines += ["", f"## {title}", ""]
        if items:
            lines.append(
                _md_table(["run", "reason", "where"], [[i["name"], i["reason"], i["path"]] for i in items])
            )
        elif status != "duplicate":
            lines.append("None.")
    other = [i for i in issues if i["status"] not in titles]
    if other:
        lines += ["", "## Other records", ""]
        lines.append(
            _md_table(["status", "run", "reason"], [[i["status"], i["name"], i["reason"]] for i in other])
        )
    return "\n".join(lines) + "\n"


def write_report(records: Sequence[dict[str, Any]], out_dir: Path) -> dict[str, Path]:
    """Write ``report.csv``, ``report.md`` and ``pareto.png`` into ``out_dir`` (created).

    Args:
        records: from :func:`collect` (or :func:`collect_wandb`).
        out_dir: the output folder.

    Returns:
        ``{"csv": ..., "md": ..., "png": ...}``.

    Raises:
        ReportError: ``out_dir`` cannot be created.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot create the output folder {out_dir}: {_first_line(e)}") from e
    df = build_table(records)
    base = baselines(records)
    issues = skipped_and_failed(records)
    files = {"csv": out_dir / "report.csv", "md": out_dir / "report.md", "png": out_dir / "pareto.png"}
    df.to_csv(files["csv"], index=False)
    _plot(df, base, files["png"])
    sources = sorted({str(r["_root"]) for r in records if r.get("_root")})
    if len(sources) > 3:
        sources = [*sources[:3], f"… ({len(sources) - 3} more)"]
    files["md"].write_text(_markdown(df, base, issues, files["png"].name, sources or ["?"]))
    return files


# ============================================================================== W&B
def log_to_wandb(records: Sequence[dict[str, Any]], files: dict[str, Path], run: Any) -> None:
    """Log the report to an existing W&B run: ``report/table`` (a ``wandb.Table`` of
    :func:`build_table`), ``report/pareto`` (a ``wandb.Image`` of ``pareto.png``),
    ``report/not_ok`` (skipped/failed runs with reasons, when any) and summary counts.

    Args:
        records: the records the report was built from.
        files: what :func:`write_report` returned (only ``"png"`` is used).
        run: a ``wandb`` run (``wandb.init(...)``), or a :class:`kvq.tracking.TrackedRun`
            wrapping one.
    """
    import wandb

    from kvq.tracking import TrackedRun

    if isinstance(run, TrackedRun):  # kvq.tracking's wrapper -> the wandb run
        run = getattr(run, "run", None)
        if run is None:  # tracking is off (NoTracker)
            return
    df = build_table(records)
    issues = skipped_and_failed(records)
    payload: dict[str, Any] = {
        "report/table": wandb.Table(dataframe=df.drop(columns=["path"]).astype({"pareto": bool})),
    }
    if files.get("png") and Path(files["png"]).exists():
        payload["report/pareto"] = wandb.Image(str(files["png"]), caption="perplexity vs KV bits per element")
    if issues:
        payload["report/not_ok"] = wandb.Table(
            columns=["status", "name", "reason"], data=[[i["status"], i["name"], i["reason"]] for i in issues]
        )
    run.log(payload)
    for k, v in {
        "report/ok": len(df),
        "report/skipped": sum(i["status"] == "skipped" for i in issues),
        "report/failed": sum(i["status"] == "failed" for i in issues),
        "report/pareto_runs": int(df["pareto"].sum()) if len(df) else 0,
    }.items():
        run.summary[k] = v


def collect_wandb(
    project: str, entity: str | None = None, filters: dict[str, Any] | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """Records from the runs of a W&B project (needs the network and credentials).

    Each run becomes a record like a ``result.json``: ``status`` from the summary (or the
    ``skipped`` tag), ``reason`` from ``skip_reason``/``fail_reason``, ``choices`` from the
    ``axis=option`` tags, ``config`` from ``wandb.config["kvq"]``, ``metrics`` from the summary.

    Raises:
        ReportError: no credentials, or the project cannot be read (one line).
    """
    from kvq.tracking import wandb_has_credentials

    if not wandb_has_credentials():
        raise ReportError(
            "reading W&B needs credentials: run `wandb login` or set WANDB_API_KEY "
            "(or report from local run directories instead)"
        )
    import wandb

    try:
        api = wandb.Api(timeout=30)
        path = f"{entity}/{project}" if entity else project
        runs = api.runs(path, filters=filters or {})
        records = []
        for i, run in enumerate(runs):
            if limit is not None and i >= limit:
                break
            summary = {k: v for k, v in dict(run.summary).items() if not k.startswith("_")}
            tags = list(run.tags or [])
            choices = {k: v for k, _, v in (t.partition("=") for t in tags) if k in AXES}
            status = summary.get("status") or ("skipped" if "skipped" in tags else None)
            if status is None:
                status = (
                    "ok"
                    if "test/ppl" in summary
                    else ("failed" if run.state in ("failed", "crashed") else None)
                )
            if status is None:
                continue  # still running
            metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and "/" in k}
            if status == "ok" and "test/ppl" not in metrics:
                continue
            records.append(
                {
                    "status": status,
                    "reason": summary.get("skip_reason") or summary.get("fail_reason"),
                    "name": run.name,
                    "choices": choices,
                    "config": dict(run.config).get("kvq", {}),
                    "metrics": metrics,
                    "_path": run.url,
                }
            )
    except ReportError:
        raise
    except Exception as e:  # the public API raises many types (network, auth, missing project)
        raise ReportError(f"cannot read W&B project {project!r}: {_first_line(e)}") from e
    return records


# ============================================================================== CLI
def _print_summary(records: list[dict[str, Any]], df: pd.DataFrame, files: dict[str, Path]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    issues = skipped_and_failed(records)
    n = {s: sum(i["status"] == s for i in issues) for s in ("skipped", "failed", "duplicate")}
    line = f"[bold]{len(df)}[/] ok, [bold]{n['skipped']}[/] skipped, [bold]{n['failed']}[/] failed"
    if n["duplicate"]:
        line += f", {n['duplicate']} dropped as duplicates"
    console.print(f"kvq report: {line}")
    settings = df.attrs.get("setting", [])
    for setting in dict.fromkeys(settings):
        sub = df[[s == setting and p for s, p in zip(settings, df["pareto"])]]
        sub = sub.sort_values("bits_per_element", kind="stable")
        table = Table(title=f"Pareto set — {setting}", header_style="bold")
        for col, just in [
            ("method", "left"),
            ("grouping", "left"),
            ("bits", "left"),
            ("granularity", "left"),
            ("bits/elem", "right"),
            ("ppl", "right"),
            ("Δppl %", "right"),
        ]:
            table.add_column(col, justify=just)  # type: ignore[arg-type]
        for r in sub.itertuples():
            table.add_row(
                *_shown_axes(r),
                _num(r.bits_per_element, ".3f"),
                _num(r.ppl, ".3f"),
                _num(r.delta_ppl_pct, "+.2f"),
            )
        console.print(table)
    for i in issues:
        if i["status"] in ("skipped", "failed"):
            style = "yellow" if i["status"] == "skipped" else "red"
            console.print(Text.assemble(("  " + i["status"], style), f" {i['name']}: {i['reason']}"))
    for k, p in files.items():
        console.print(Text(f"wrote {k}: {p}"))


def main(argv: list[str] | None = None) -> int:
    """``kvq report [RUN_DIRS...] --out DIR [--wandb-project P]``.

    Returns:
        0 = report written; 1 = no records found; 2 = a path does not exist, the output folder
        cannot be created, or W&B cannot be read.
    """
    parser = argparse.ArgumentParser(
        prog="kvq report",
        description="Aggregate run records (result.json) into report.csv, report.md and pareto.png.",
    )
    parser.add_argument(
        "run_dirs",
        nargs="*",
        type=Path,
        metavar="RUN_DIRS",
        help="run or multirun directories, searched recursively (default: ./multirun and ./outputs)",
    )
    parser.add_argument("--out", type=Path, default=Path("report"), help="output folder (default: ./report)")
    parser.add_argument(
        "--wandb-project", default=None, metavar="P", help="also read the runs of W&B project P"
    )
    parser.add_argument("--wandb-entity", default=None, metavar="E", help="W&B entity of --wandb-project")
    args = parser.parse_args(argv)

    dirs = list(args.run_dirs)
    if not dirs and not args.wandb_project:
        dirs = [p for p in (Path("multirun"), Path("outputs")) if p.is_dir()]
    try:
        records = collect(dirs)
        if args.wandb_project:
            records += collect_wandb(args.wandb_project, args.wandb_entity)
    except ReportError as e:
        print(f"kvq: error: {e}", file=sys.stderr)
        return 2
    if not records:
        where = ", ".join(map(str, dirs)) or "(no run directories: pass RUN_DIRS)"
        print(f"kvq report: no run records (result.json) found in {where}", file=sys.stderr)
        return 1
    try:
        files = write_report(records, args.out)
    except ReportError as e:
        print(f"kvq: error: {e}", file=sys.stderr)
        return 2
    _print_summary(records, build_table(records), files)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


try:  # Hydra is a dependency of kvq; keep the report importable without it all the same
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object  # type: ignore[assignment,misc]


class ReportCallback(_HydraCallback):  # type: ignore[misc,valid-type]
    """Hydra callback: when a multirun finishes, write its report and log it to W&B.

    Registered in ``conf/config.yaml`` under ``hydra.callbacks.report``. Writes
    ``<sweep dir>/report/{report.csv,report.md,pareto.png}``; with ``logger=wandb`` it also logs
    the table and the plot to one W&B run named ``report-<sweep dir>`` (tag ``report``).
    """

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        records = collect([sweep_dir]) if sweep_dir.exists() else []
        if not any(r.get("status") == "ok" for r in records):
            return
        try:
            files = write_report(records, sweep_dir / "report")
        except Exception as e:  # noqa: BLE001 -- a report must never fail a finished grid
            log.warning("kvq: could not write the grid report: %s", _first_line(e))
            return
        print(f"kvq: grid report: {files['md']} ({files['png'].name})")
        try:
            from hydra.utils import instantiate

            tracker = instantiate(config.logger, _convert_="all")
            run = tracker.start(
                sweep_dir / "report", f"report-{sweep_dir.name}", {"sweep_dir": str(sweep_dir)}, ["report"]
            )
            log_to_wandb(records, files, run)
            run.finish()
        except Exception as e:  # noqa: BLE001
            log.warning("kvq: could not log the grid report to W&B: %s", _first_line(e))
