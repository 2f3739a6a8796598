"""Aggregate run records into a table, a markdown report and a perplexity-vs-memory Pareto plot.

``kvq report multirun/2024-06-01/12-00-00 --out report/`` reads every ``result.json`` under the
given run or multirun directories (and the ``dropped.json`` the ``kvq`` sweeper writes for the
jobs it did not launch), and writes

* ``report.csv`` — one row per finished (``ok``) run, full-precision numbers;
* ``report.md`` — the same as markdown tables, one per (model, data, eval) setting, Pareto rows
  marked, the full-precision baselines, and every skipped / failed / dropped run with its reason;
* ``pareto.png`` — perplexity vs KV-cache bits per element, one colour per method, one marker
  per granularity, the Pareto front as a step line, the fp baseline as a dashed line;
* with runs beyond perplexity (:mod:`~kvq.report.sections`): ``retrieval.csv`` and the
  depth x length heatmap ``retrieval.png`` (passkey / needle), ``tasks.csv`` (lm_eval),
  ``generation.csv`` (generate), each with its section of ``report.md``.

The perplexity tables carry the distribution metrics against the fp reference (KL, top-1
agreement, the paired 95% interval of Δppl %, marked ○ when it contains 0).

The Pareto front is taken *within* a setting (same model, data and protocol): perplexities of
different models or texts are not comparable.

Library use::

    from kvq.report import collect, build_table, write_report
    records = collect([Path("multirun")])
    table = build_table(records)          # pandas.DataFrame, one row per ok run
    files = write_report(records, Path("report"))

One module per job: :mod:`~kvq.report.records` (reading), :mod:`~kvq.report.pareto`,
:mod:`~kvq.report.table` (the table, baselines, runs without a result), :mod:`~kvq.report.plot`,
:mod:`~kvq.report.markdown` (``report.md`` and :func:`write_report`), :mod:`~kvq.report.sections`
and :mod:`~kvq.report.heatmap` (retrieval, tasks, generation), :mod:`~kvq.report.wandb_io`,
:mod:`~kvq.report.cli` (``kvq report``) and :mod:`~kvq.report.callback` (the Hydra callback).
"""

from __future__ import annotations

from kvq.experiment import AXES

from .callback import ReportCallback
from .cli import main
from .heatmap import plot_retrieval
from .markdown import write_report
from .pareto import pareto_front
from .records import ReportError, collect
from .sections import generation_table, retrieval_table, task_table
from .table import COLUMNS, baselines, build_table, skipped_and_failed
from .wandb_io import collect_wandb, log_to_wandb

__all__ = [
    "AXES",
    "COLUMNS",
    "ReportCallback",
    "ReportError",
    "baselines",
    "build_table",
    "collect",
    "collect_wandb",
    "generation_table",
    "log_to_wandb",
    "main",
    "pareto_front",
    "plot_retrieval",
    "retrieval_table",
    "skipped_and_failed",
    "task_table",
    "write_report",
]
