"""The report's sections beyond perplexity: retrieval, task accuracy and generation cost.

Runs of ``eval=passkey`` / ``eval=needle``, ``eval=lm_eval`` and ``eval=generate`` carry no
perplexity; each kind gets its own table (:func:`retrieval_table`, :func:`task_table`,
:func:`generation_table`), its own CSV and its own section of ``report.md``
(:func:`beyond_markdown`); retrieval also the depth x length heatmap (:mod:`kvq.report.heatmap`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd

from .table import as_float, dedupe, rank

__all__ = [
    "RETRIEVAL_TASKS",
    "beyond_markdown",
    "generation_table",
    "retrieval_cells",
    "retrieval_table",
    "task_table",
]

#: the retrieval protocols and their accuracy metric (``test/<name>_acc``)
RETRIEVAL_TASKS: tuple[str, ...] = ("passkey", "needle")
_CELL = re.compile(r"^test/(passkey|needle)_acc/len_(\d+)/depth_([0-9.]+)$")
_LEN = re.compile(r"^test/(passkey|needle)_acc/len_(\d+)$")
_GEN = re.compile(r"^test/gen/([^/]+)/(?:(b\d+_p\d+_n\d+)/)?([a-z_]+)$")
_AXES4 = ("method", "grouping", "bits", "granularity")


def _choice(rec: dict[str, Any], axis: str) -> str:
    return str((rec.get("choices") or {}).get(axis, "?"))


def _ok(records: Iterable[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """Finished runs with a metric starting with ``prefix`` (one per experiment key)."""
    return dedupe(
        [
            r
            for r in records
            if r.get("status") == "ok" and any(str(k).startswith(prefix) for k in (r.get("metrics") or {}))
        ]
    )


def _base_row(r: dict[str, Any]) -> dict[str, Any]:
    m = r.get("metrics") or {}
    return {
        "model": _choice(r, "model"),
        "data": _choice(r, "data"),
        **{a: _choice(r, a) for a in _AXES4},
        "bits_per_element": as_float(m.get("kv/bits_per_element")),
        "name": str(r.get("name", "")),
        "path": str(r.get("_path", "")),
    }


def _sorted(df: pd.DataFrame, first: Sequence[str]) -> pd.DataFrame:
    if df.empty:
        return df
    keys = [*first, *_AXES4]
    order = sorted(
        range(len(df)),
        key=lambda i: tuple(
            rank(k, str(df.at[i, k])) if k in _AXES4 else (0, [str(df.at[i, k])]) for k in keys
        ),
    )
    return df.iloc[order].reset_index(drop=True)


def retrieval_cells(rec: dict[str, Any]) -> dict[tuple[str, int, float], float]:
    """``(task, length, depth %) -> accuracy`` of a retrieval record's cells."""
    out = {}
    for k, v in (rec.get("metrics") or {}).items():
        m = _CELL.match(str(k))
        if m:
            out[(m.group(1), int(m.group(2)), float(m.group(3)))] = as_float(v)
    return out


def retrieval_table(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per (retrieval run, task): the axes, ``acc`` overall, ``acc@<L>`` per length,
    ``bits_per_element``; ``attrs["cells"]`` holds each row's :func:`retrieval_cells`."""
    rows, cells = [], []
    for r in _ok(records, "test/"):
        m = r["metrics"]
        for task in RETRIEVAL_TASKS:
            if f"test/{task}_acc" not in m:
                continue
            row = {"task": task, **_base_row(r), "acc": as_float(m[f"test/{task}_acc"])}
            for k, v in m.items():
                lm = _LEN.match(str(k))
                if lm and lm.group(1) == task:
                    row[f"acc@{int(lm.group(2))}"] = as_float(v)
            rows.append(row)
            cells.append({(L, d): a for (t, L, d), a in retrieval_cells(r).items() if t == task})
    df = pd.DataFrame(rows)
    if not df.empty:
        lens = sorted((c for c in df.columns if c.startswith("acc@")), key=lambda c: int(c[4:]))
        df = df[[c for c in df.columns if not c.startswith("acc@")] + lens]
        order = _sorted(df.assign(_i=range(len(df))), ["task", "model", "data"])
        cells = [cells[i] for i in order["_i"]]
        df = order.drop(columns="_i")
    df.attrs["cells"] = cells
    return df


def task_table(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per (lm_eval run, task): the axes, ``acc``, ``acc_stderr``, ``acc_norm``,
    ``acc_norm_stderr``, ``samples`` (NaN where a task does not report one)."""
    rows = []
    for r in _ok(records, "test/lm_eval_acc"):
        m = r["metrics"]
        tasks = sorted({str(k).split("/")[1] for k in m if str(k).endswith("/samples")})
        for task in tasks:
            get = {
                f: as_float(m.get(f"test/{task}/{f}"))
                for f in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")
            }
            rows.append(
                {"task": task, **_base_row(r), **get, "samples": as_float(m.get(f"test/{task}/samples"))}
            )
    return _sorted(pd.DataFrame(rows), ["task", "model", "data"])


def generation_table(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per (generate run, cache, grid point; ``point="all"`` for the grid's totals):
    ``tokens_per_s``, ``decode_tokens_per_s``, ``prefill_s``, ``kv_bytes``, ``peak_bytes``,
    ``peak_extra_bytes`` and the ratios to ``DynamicCache`` (NaN where not measured)."""
    figures = (
        "tokens_per_s",
        "decode_tokens_per_s",
        "prefill_s",
        "kv_bytes",
        "peak_bytes",
        "peak_extra_bytes",
        "speed_vs_dynamic",
        "kv_bytes_vs_dynamic",
        "peak_extra_vs_dynamic",
    )
    rows: dict[tuple[int, str, str], dict[str, Any]] = {}
    for i, r in enumerate(_ok(records, "test/gen/")):
        for k, v in r["metrics"].items():
            g = _GEN.match(str(k))
            if not g or g.group(3) not in figures:
                continue
            cache, point, fig = g.group(1), g.group(2) or "all", g.group(3)
            row = rows.setdefault((i, cache, point), {**_base_row(r), "cache": cache, "point": point})
            row[fig] = as_float(v)
    df = pd.DataFrame(list(rows.values()))
    for f in figures:
        if not df.empty and f not in df.columns:
            df[f] = math.nan
    return df


def _fmt(v: Any, spec: str) -> str:
    v = as_float(v)
    return "–" if not math.isfinite(v) else format(v, spec)


def _md(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str) -> list[str]:
    sep = ["---:" if a == "r" else "---" for a in align]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def _axes(row: Any) -> list[str]:
    if row.method == "none":
        return ["none", "–", "fp16", "–"]
    return [row.method, row.grouping, row.bits, row.granularity]


def beyond_markdown(
    retrieval: pd.DataFrame, tasks: pd.DataFrame, generation: pd.DataFrame, heatmap: str | None
) -> list[str]:
    """The lines of ``report.md`` for the retrieval, task-accuracy and generation-cost runs."""
    lines: list[str] = []
    if len(retrieval):
        lens = [c for c in retrieval.columns if c.startswith("acc@")]
        lines += ["", "## Long-context retrieval (passkey / needle)", ""]
        lines += [
            "Greedy answers through the quantized cache (prompt prefilled, the whole cache quantized, "
            "then decoded); accuracy = fraction of prompts whose first generated number is the hidden one.",
            "",
        ]
        if heatmap:
            lines += [f"![Retrieval accuracy by depth and length]({heatmap})", ""]
        header = ["task", "model", "method", "grouping", "bits", "granularity", "acc", *lens, "bits/element"]
        rows = [
            [row["task"], row["model"], *_axes(pd.Series(row)), _fmt(row["acc"], ".2f")]
            + [_fmt(row.get(c), ".2f") for c in lens]
            + [_fmt(row["bits_per_element"], ".3f")]
            for row in retrieval.to_dict("records")
        ]
        lines += _md([h.replace("acc@", "acc @ ") for h in header], rows, "llllll" + "r" * (len(lens) + 2))
    if len(tasks):
        lines += ["", "## Task accuracy (lm-evaluation-harness)", ""]
        lines += ["kvq's quantized cache in every forward of the harness; ± = lm-eval's standard error.", ""]
        rows = [
            [row["task"], row["model"], *_axes(pd.Series(row))]
            + [
                f"{_fmt(row['acc'], '.4f')} ± {_fmt(row['acc_stderr'], '.4f')}",
                f"{_fmt(row['acc_norm'], '.4f')} ± {_fmt(row['acc_norm_stderr'], '.4f')}",
                _fmt(row["samples"], ".0f"),
                _fmt(row["bits_per_element"], ".3f"),
            ]
            for row in tasks.to_dict("records")
        ]
        header = [
            "task",
            "model",
            "method",
            "grouping",
            "bits",
            "granularity",
            "acc",
            "acc_norm",
            "docs",
            "bits/element",
        ]
        lines += _md(header, rows, "llllllrrrr")
    if len(generation):
        lines += ["", "## Generation cost (model.generate)", ""]
        lines += [
            "tokens/s = new tokens / wall time of the whole call; decode = after the first new token; "
            "KV bytes = what the cache holds at the end; peak (GPU only) = max allocated during the call, "
            "extra = above what was allocated before it; × = relative to DynamicCache.",
            "",
        ]
        rows = [
            [row["model"], *_axes(pd.Series(row)), row["cache"], row["point"]]
            + [
                _fmt(row["tokens_per_s"], ".1f"),
                _fmt(row["decode_tokens_per_s"], ".1f"),
                _fmt(row["prefill_s"], ".3f"),
                _fmt(
                    row["kv_bytes"] / 2**20 if math.isfinite(as_float(row["kv_bytes"])) else math.nan, ".2f"
                ),
                _fmt(as_float(row["peak_extra_bytes"]) / 2**20, ".1f"),
                _fmt(row["speed_vs_dynamic"], ".2f"),
                _fmt(row["kv_bytes_vs_dynamic"], ".3f"),
            ]
            for row in generation.to_dict("records")
        ]
        header = [
            "model", "method", "grouping", "bits", "granularity", "cache", "point", "tokens/s",
            "decode tokens/s", "prefill s", "KV MiB", "peak extra MiB", "speed ×", "KV ×",
        ]  # fmt: skip
        lines += _md(header, rows, "lllllll" + "r" * 7)
    return lines
