"""``hydra/sweeper=kvq``: Hydra's basic sweeper that drops invalid and duplicate jobs before launch.

The grid is expanded exactly as by ``BasicSweeper`` (cartesian product of the comma-separated
overrides). Before anything is launched, every job's configuration is composed
(``ConfigLoader.load_sweep_config``) and checked with :func:`kvq.validate.triage`:

* invalid combinations (``method=adaptive bits=attn``, ``granularity=token eval=fakequant``,
  impossible values, ...) are dropped;
* duplicates (the same :func:`kvq.validate.experiment_key`: ``g128`` on a 64-feature unit and
  ``grouping=none``, ``method=none`` with non-default axes, ...) are dropped but one;

a table of what was dropped and why is printed (and saved as ``dropped.json`` in the sweep
directory), and the kept jobs are launched in batches (``max_batch_size``) by the configured
launcher (basic, submitit local or SLURM). Model-aware rules read each model's shape once
(no weights).

Also, for submitit launchers, ``gpus_per_node: 0`` / ``gpus_per_task: 0`` are not sent
(``--gpus-per-node=0`` is rejected on nodes without GPUs).
"""

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from hydra_plugins.kvq_sweeper._jobs import failed_return, job_dir, job_failure

# No `from __future__ import annotations` here: Hydra executes plugin modules without adding
# them to sys.modules, and dataclasses cannot resolve string annotations then.

log = logging.getLogger(__name__)

_NO_GPU_KEYS = ("gpus_per_node", "gpus_per_task")


@dataclass
class KVQSweeperConf:
    """Config of ``hydra/sweeper=kvq`` (``hydra.sweeper.*``).

    Attributes:
        max_batch_size: jobs handed to the launcher at once (``null`` = all).
        params: extra sweep parameters, as in the basic sweeper (``key: "a,b"``).
        model_aware: apply model-aware rules (reads each model's config, no weights).
        drop_invalid: drop invalid combinations (else they launch and record ``skipped``).
        drop_duplicates: drop all but one configuration per experiment.
    """

    _target_: str = "hydra_plugins.kvq_sweeper.kvq_sweeper.KVQSweeper"
    max_batch_size: int | None = None
    params: dict[str, str] | None = None
    model_aware: bool = True
    drop_invalid: bool = True
    drop_duplicates: bool = True


ConfigStore.instance().store(group="hydra/sweeper", name="kvq", node=KVQSweeperConf, provider="kvq")


@dataclass
class Planned:
    """One job of the grid: its overrides and what the sweeper does with it."""

    index: int
    overrides: list[str]
    status: str  # run | invalid | duplicate
    reason: str


class KVQSweeper(BasicSweeper):
    """Basic sweeper + pre-launch validation and de-duplication (see the module docstring)."""

    def __init__(
        self,
        max_batch_size: int | None = None,
        params: dict[str, str] | None = None,
        model_aware: bool = True,
        drop_invalid: bool = True,
        drop_duplicates: bool = True,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.model_aware = model_aware
        self.drop_invalid = drop_invalid
        self.drop_duplicates = drop_duplicates
        self.plan: list[Planned] = []

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        launcher = OmegaConf.select(config, "hydra.launcher")
        if isinstance(launcher, DictConfig):
            with read_write(launcher), open_dict(launcher):
                for key in _NO_GPU_KEYS:
                    if key in launcher and launcher[key] == 0:
                        launcher[key] = None
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)

    # ------------------------------------------------------------------ planning
    def _compose(self, overrides: Sequence[str]) -> DictConfig:
        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with read_write(cfg), open_dict(cfg):
            del cfg["hydra"]
        return cfg

    def plan_jobs(self, jobs: Sequence[Sequence[str]]) -> list[Planned]:
        """Compose and triage every job (composition errors propagate: exit code 2)."""
        from hydra.errors import ConfigCompositionException

        from kvq.experiment import unknown_keys
        from kvq.validate import MetaCache, triage

        tic = time.perf_counter()
        cfgs = [self._compose(j) for j in jobs]
        for j, cfg in zip(jobs, cfgs):
            bad = unknown_keys(cfg)
            if bad:  # malformed like a composition error: nothing is launched (exit code 2)
                raise ConfigCompositionException(f"{' '.join(j)}: {'; '.join(bad)}")
        metas = MetaCache()
        verdicts = triage(cfgs, metas, model_aware=self.model_aware)
        warned: set = set()
        for v in verdicts:
            if v.meta_error and v.meta_error not in warned:
                warned.add(v.meta_error)
                log.warning("kvq sweeper: model-aware checks skipped for some jobs: %s", v.meta_error)
        plan = []
        for j, v in zip(jobs, verdicts):
            status = v.status
            if (status == "invalid" and not self.drop_invalid) or (
                status == "duplicate" and not self.drop_duplicates
            ):
                status = "run"
            plan.append(Planned(v.index, list(j), status, v.reason() if status != "run" else ""))
        log.debug("kvq sweeper: checked %d jobs in %.2f s", len(jobs), time.perf_counter() - tic)
        return plan

    # ------------------------------------------------------------------ sweep
    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        params_conf = self._parse_config()
        params_conf.extend(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides(params_conf)
        swept = {o.get_key_element() for o in overrides if o.is_sweep_override()}
        jobs = self.split_arguments(overrides, None)[0]

        self.plan = self.plan_jobs(jobs)
        kept = [p.overrides for p in self.plan if p.status == "run"]
        dropped = [p for p in self.plan if p.status != "run"]

        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        (sweep_dir / "dropped.json").write_text(
            json.dumps(
                [
                    {"index": p.index, "overrides": p.overrides, "status": p.status, "reason": p.reason}
                    for p in dropped
                ],
                indent=2,
            )
            + "\n"
        )
        _print_plan(self.plan, swept)
        for p in dropped:
            log.debug("dropped #%d [%s] %s: %s", p.index, p.status, " ".join(p.overrides), p.reason)

        returns: list[Sequence[JobReturn]] = []
        if not kept:
            log.warning("kvq sweeper: every one of the %d jobs was dropped: nothing to launch", len(jobs))
            self.overrides = []
            return returns
        # Every job composed: a failure from here on is a job's (exit 1), not a malformed config
        # (exit 2, kvq.cli.hydra_main) -- jobs on SLURM run their task in other processes.
        from kvq.cli import mark_composed, note_failed_jobs

        mark_composed()
        self.overrides = list(self.split_overrides_to_chunks(kept, self.max_batch_size))
        self.batch_index = 0
        initial_job_idx = 0
        failed: list[tuple[int, str]] = []
        while not self.is_done():
            batch = self.get_job_batch()
            results, launch_error = self._launch(batch, initial_job_idx)
            if launch_error is not None:
                last = initial_job_idx + len(batch) - 1
                print(
                    f"kvq sweeper: could not launch jobs #{initial_job_idx}-#{last}: {launch_error}",
                    flush=True,
                )
            for i, (overrides, r) in enumerate(zip(batch, results)):
                num = initial_job_idx + i
                why = job_failure(r, self._job_dir(overrides, num) if r.hydra_cfg is None else None)
                if why is not None:  # the grid goes on; the report lists it; the exit code says it
                    failed.append((num, why))
                    if launch_error is None:
                        print(f"kvq sweeper: job #{num} failed: {why}", flush=True)
            initial_job_idx += len(batch)
            returns.append(results)
        close = getattr(self.launcher, "close", None)  # a launcher with workers (local_gpus) stops them
        if callable(close):
            close()
        if failed:
            note_failed_jobs(len(failed))
            print(
                f"kvq sweeper: {len(failed)} of {initial_job_idx} jobs failed "
                f"(#{', #'.join(str(n) for n, _ in failed)}); the report lists their reasons",
                flush=True,
            )
        return returns

    def _job_dir(self, overrides: Sequence[str], num: int) -> Path:
        assert self.hydra_context is not None and self.config is not None
        return job_dir(self.hydra_context.config_loader, self.config, overrides, num)

    def _launch(
        self, batch: Sequence[Sequence[str]], initial_job_idx: int
    ) -> tuple[Sequence[JobReturn], str | None]:
        """Launch a batch: ``(returns, None)``; a launcher that fails (a rejected submission, no
        GPU on the cluster, ...) fails each job of the batch with its one line instead of ending
        the grid with a stack trace: ``(failed returns, that line)``."""
        assert self.launcher is not None
        try:
            return self.launcher.launch(batch, initial_job_idx=initial_job_idx), None
        except Exception as e:  # noqa: BLE001
            from kvq.errors import one_line

            line = one_line(e, chain=True, limit=400)
            log.debug("launcher failure", exc_info=True)
            return [failed_return(o, f"not launched: {line}") for o in batch], line


def _print_plan(plan: Sequence[Planned], swept: set) -> None:
    """The dropped jobs as a table (one reason each), then a one-line count."""
    from rich.console import Console
    from rich.table import Table

    dropped = [p for p in plan if p.status != "run"]
    n_inv = sum(p.status == "invalid" for p in dropped)
    console = Console(width=None if Console().is_terminal else 200)
    if dropped:
        table = Table(title="kvq sweeper: dropped before launch", show_lines=False, header_style="bold")
        table.add_column("grid #", justify="right")  # position in the grid, not the job number
        table.add_column("overrides")
        table.add_column("dropped as")
        table.add_column("reason", overflow="fold")
        for p in dropped:
            shown = [o for o in p.overrides if o.split("=", 1)[0] in swept] or p.overrides
            table.add_row(str(p.index), " ".join(shown), p.status, p.reason)
        console.print(table)
    console.print(
        f"kvq sweeper: {len(plan)} combinations -> {len(plan) - len(dropped)} jobs to launch, "
        f"{len(dropped)} dropped ({n_inv} invalid, {len(dropped) - n_inv} duplicate)"
    )
