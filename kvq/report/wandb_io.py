"""W&B: log a report to a run (:func:`log_to_wandb`), read records from a project (:func:`collect_wandb`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from kvq.errors import one_line
from kvq.experiment import AXES

from .records import ReportError
from .table import build_table, skipped_and_failed

__all__ = ["collect_wandb", "log_to_wandb"]


def log_to_wandb(records: Sequence[dict[str, Any]], files: dict[str, Path], run: Any) -> None:
    """Log the report to an existing W&B run: ``report/table`` (a ``wandb.Table`` of
    :func:`build_table`), ``report/pareto`` (a ``wandb.Image`` of ``pareto.png``), the retrieval
    heatmap (``report/retrieval``) and the retrieval / task / generation tables when written,
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
    if files.get("heatmap") and Path(files["heatmap"]).exists():
        payload["report/retrieval"] = wandb.Image(
            str(files["heatmap"]), caption="retrieval accuracy: depth x length"
        )
    for key in ("retrieval", "tasks", "generation"):  # the sections beyond perplexity (kvq.report.sections)
        csv = files.get(f"{key}_csv")
        if csv and Path(csv).exists():
            payload[f"report/{key}"] = wandb.Table(dataframe=pd.read_csv(csv))
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
                    if "test/ppl" in summary or "time/eval_s" in summary  # every protocol's aggregate has it
                    else ("failed" if run.state in ("failed", "crashed") else None)
                )
            if status is None:
                continue  # still running
            metrics = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and "/" in k}
            if status == "ok" and "test/ppl" not in metrics and "time/eval_s" not in metrics:
                continue  # not finished (per-batch logs only)
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
        raise ReportError(f"cannot read W&B project {project!r}: {one_line(e)}") from e
    return records
