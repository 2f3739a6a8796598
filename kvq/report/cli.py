"""``kvq report``: the command line and its rich console summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from .markdown import fmt_num, shown_axes, write_report
from .records import ReportError, collect
from .sections import generation_table, retrieval_table, task_table
from .table import build_table, skipped_and_failed
from .wandb_io import collect_wandb

__all__ = ["main"]


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
                *shown_axes(r),
                fmt_num(r.bits_per_element, ".3f"),
                fmt_num(r.ppl, ".3f"),
                fmt_num(r.delta_ppl_pct, "+.2f"),
            )
        console.print(table)
    beyond = {
        "retrieval": len(retrieval_table(records)),
        "task-accuracy": len(task_table(records)),
        "generation": len(generation_table(records)),
    }
    if any(beyond.values()):
        shown = ", ".join(f"{n} {k} rows" for k, n in beyond.items() if n)
        console.print(f"  beyond perplexity: {shown} (tables in report.md)")
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
