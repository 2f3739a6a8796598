"""The markdown report and :func:`write_report` (``report.csv``, ``report.md``, ``pareto.png``)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from kvq.errors import one_line

from .heatmap import plot_retrieval
from .plot import plot_pareto
from .records import ReportError
from .sections import beyond_markdown, generation_table, retrieval_table, task_table
from .table import as_float, baselines, build_table, skipped_and_failed

__all__ = ["fmt_interval", "fmt_num", "shown_axes", "write_report"]


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


def shown_axes(row: Any) -> list[str]:
    """method, grouping, bits, granularity as displayed: the fp16 baseline has no bits/groups."""
    if row.method == "none":
        return ["none", "–", "fp16", "–"]
    return [row.method, row.grouping, row.bits, row.granularity]


def fmt_num(v: float | None, spec: str = ".2f") -> str:
    """``v`` formatted with ``spec``, or ``–`` when it is missing or not finite."""
    return "–" if v is None or not math.isfinite(v) else format(v, spec)


def fmt_interval(lo: float, hi: float, contains_zero: bool) -> str:
    """The paired 95% interval of Δppl %, ``[lo, hi]``, marked ``○`` when it contains 0."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "–"
    return f"[{lo:+.2f}, {hi:+.2f}]" + (" ○" if contains_zero else "")


def _markdown(
    df: pd.DataFrame,
    base: pd.DataFrame,
    issues: list[dict[str, Any]],
    png: str,
    sources: list[str],
    beyond: list[str] | None = None,
) -> str:
    """The text of ``report.md``: counts and sources, the plot, the baselines, one table per
    setting (Pareto rows starred), then the skipped, failed and dropped runs with their reasons."""
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
                    [
                        r.model,
                        r.data,
                        r.eval,
                        r.setting,
                        fmt_num(r.ppl, ".4f"),
                        fmt_num(as_float(r.tokens), ".0f"),
                    ]
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
        dist = bool(sub["kl"].map(math.isfinite).any())  # the fp reference's metrics are there
        header = ["method", "grouping", "bits", "granularity", *(["knobs"] if knobs else [])]
        header += ["ppl", "Δppl", "Δppl %"]
        header += ["Δppl % 95% CI", "KL (nats)", "top-1 agree"] if dist else []
        header += ["bits/element", "compression", "Pareto"]
        rows = []
        for r in sub.itertuples():
            star = "★" if r.pareto else ""
            rows.append(
                [*shown_axes(r), *([r.knobs] if knobs else [])]
                + [
                    fmt_num(r.ppl, ".3f"),
                    fmt_num(r.delta_ppl, "+.3f"),
                    fmt_num(r.delta_ppl_pct, "+.2f"),
                ]
                + (
                    [
                        fmt_interval(
                            r.delta_ppl_pct_lo, r.delta_ppl_pct_hi, r.ci_contains_zero and r.method != "none"
                        ),
                        fmt_num(r.kl, ".2e") if r.kl else fmt_num(r.kl, ".0f"),
                        fmt_num(r.top1_agree, ".4f"),
                    ]
                    if dist
                    else []
                )
                + [
                    fmt_num(r.bits_per_element, ".3f"),
                    fmt_num(r.compression, ".2f") + "×" if math.isfinite(r.compression) else "–",
                    star,
                ]
            )
        b = base_ppl.get(setting)
        lines += [
            "",
            f"## {setting}",
            "",
            f"Baseline (fp16 KV cache) perplexity: {fmt_num(b, '.4f') if b is not None else 'unknown'}. "
            f"{int(sub['pareto'].sum())} of {len(sub)} runs on the Pareto front (★).",
            "",
            _md_table(
                header, rows, ["l"] * (len(header) - (9 if dist else 6)) + ["r"] * (8 if dist else 5) + ["c"]
            ),
        ]
    lines += [
        "",
        "★ = on the Pareto front of its setting: no other run of the same model, data and protocol has "
        "both a lower-or-equal perplexity and a lower-or-equal bits/element (one of them strictly). "
        "Δppl = ppl − baseline ppl; compression = fp16 cache bytes / quantized cache bytes. "
        "Against the fp reference (same windows and tokens): KL = mean per-token KL(p_fp ‖ p_quant) over "
        "the full vocabulary; top-1 agree = fraction of scored tokens whose argmax is the fp argmax; "
        "95% CI = paired bootstrap over windows of Δppl %; ○ = the interval contains 0 (not told apart "
        "from the fp cache on these windows).",
    ]
    lines += beyond or []
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
    """Write ``report.csv``, ``report.md`` and ``pareto.png`` into ``out_dir`` (created), and --
    when there are such runs -- ``retrieval.csv`` with the heatmap ``retrieval.png``,
    ``tasks.csv`` (lm_eval) and ``generation.csv`` (:mod:`kvq.report.sections`).

    Args:
        records: from :func:`collect` (or :func:`collect_wandb`).
        out_dir: the output folder.

    Returns:
        ``{"csv": ..., "md": ..., "png": ...}``, plus ``retrieval_csv``, ``heatmap``, ``tasks_csv``,
        ``generation_csv`` when written.

    Raises:
        ReportError: ``out_dir`` cannot be created.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot create the output folder {out_dir}: {one_line(e)}") from e
    df = build_table(records)
    base = baselines(records)
    issues = skipped_and_failed(records)
    files = {"csv": out_dir / "report.csv", "md": out_dir / "report.md", "png": out_dir / "pareto.png"}
    df.to_csv(files["csv"], index=False)
    plot_pareto(df, base, files["png"])
    retrieval, tasks, generation = retrieval_table(records), task_table(records), generation_table(records)
    for key, table in (("retrieval_csv", retrieval), ("tasks_csv", tasks), ("generation_csv", generation)):
        if len(table):
            files[key] = out_dir / f"{key.removesuffix('_csv')}.csv"
            table.to_csv(files[key], index=False)
    heat = plot_retrieval(retrieval, out_dir / "retrieval.png") if len(retrieval) else None
    if heat is not None:
        files["heatmap"] = heat
    sources = sorted({str(r["_root"]) for r in records if r.get("_root")})
    if len(sources) > 3:
        sources = [*sources[:3], f"… ({len(sources) - 3} more)"]
    beyond = beyond_markdown(retrieval, tasks, generation, heat.name if heat is not None else None)
    files["md"].write_text(_markdown(df, base, issues, files["png"].name, sources or ["?"], beyond))
    return files
