"""The Hydra callback that writes (and logs) the report of a multirun when it ends."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kvq.errors import one_line

from .markdown import write_report
from .records import collect
from .wandb_io import log_to_wandb

__all__ = ["ReportCallback"]

log = logging.getLogger(__name__)


try:  # Hydra is a dependency of kvq; keep the report importable without it all the same
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object  # type: ignore[assignment,misc]


class ReportCallback(_HydraCallback):  # type: ignore[misc,valid-type]
    """Hydra callback: when a multirun finishes, write its report and log it to W&B.

    Registered in ``conf/config.yaml`` under ``hydra.callbacks.report``. Writes
    ``<sweep dir>/report/{report.csv,report.md,pareto.png}`` whenever the grid has a record --
    also when every job failed or was skipped (the failed and skipped rows with their reasons); with ``logger=wandb`` it also logs
    the table and the plot to one W&B run named ``report-<sweep dir>`` (tag ``report``).
    """

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        records = collect([sweep_dir]) if sweep_dir.exists() else []
        if not records:  # nothing launched, nothing dropped: there is nothing to report
            return
        try:  # always, also when every job failed: the failed rows carry their reasons
            files = write_report(records, sweep_dir / "report")
        except Exception as e:  # noqa: BLE001 -- a report must never fail a finished grid
            log.warning("kvq: could not write the grid report: %s", one_line(e))
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
            log.warning("kvq: could not log the grid report to W&B: %s", one_line(e))
