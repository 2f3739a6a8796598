"""Command-line entry points: the Hydra task wrapper and the ``kvq`` console script."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig

log = logging.getLogger("kvq")

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "entry_point",
    "failed_jobs",
    "hydra_main",
    "main",
    "mark_composed",
    "note_failed_jobs",
]

EXIT_FAILED = 1  # the run failed (one-line reason on stderr, result.json written); a grid with a failed job
EXIT_CONFIG = 2  # malformed configuration: unknown key/option, wrong type

_composed = False
_failed_jobs = 0


def mark_composed() -> None:
    """Every configuration composed: a later exit code 1 is a failed run, not a malformed config.

    Called when a task starts (single run) and by the ``kvq`` sweeper once all of a grid's jobs
    composed (their tasks may run in other processes, e.g. on SLURM).
    """
    global _composed
    _composed = True


def note_failed_jobs(n: int) -> None:
    """The ``kvq`` sweeper found ``n`` failed jobs in a grid: :func:`hydra_main` exits with
    :data:`EXIT_FAILED` once the multirun (and its report) is done."""
    global _failed_jobs
    _failed_jobs += int(n)


def failed_jobs() -> int:
    """Failed jobs noted by the sweeper in this process (:func:`note_failed_jobs`)."""
    return _failed_jobs


def _multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def entry_point(cfg: DictConfig) -> float:
    """Run one job; a fixable failure becomes one line on stderr.

    In a single run it exits with :data:`EXIT_FAILED` (:data:`EXIT_CONFIG` for a malformed config,
    e.g. an unknown key); in a multirun the job returns NaN so the other jobs go on (its
    ``result.json`` says ``failed`` with the reason).
    """
    mark_composed()
    from kvq.errors import KVQError, MalformedConfig
    from kvq.run import run

    try:
        return run(cfg)
    except KVQError as e:
        print(f"kvq: error: {e}", file=sys.stderr)
        if _multirun():
            return math.nan
        sys.exit(EXIT_CONFIG if isinstance(e, MalformedConfig) else EXIT_FAILED)


def hydra_main(main: Callable[[], Any]) -> int:
    """Call a ``@hydra.main`` function; composition errors (Hydra exits 1 before anything was
    composed, see :func:`mark_composed`) become :data:`EXIT_CONFIG`, and a multirun with a failed
    job (:func:`note_failed_jobs`) exits with :data:`EXIT_FAILED` after writing its report."""
    global _composed, _failed_jobs
    _composed, _failed_jobs = False, 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code == 1 and not _composed:
            return EXIT_CONFIG
        return code
    return EXIT_FAILED if _failed_jobs else 0


def main(argv: list[str] | None = None) -> int:
    """The ``kvq`` console script."""
    parser = argparse.ArgumentParser(prog="kvq", description="kvq: KV-cache quantization experiments")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser(
        "run", help="evaluate one configuration: kvq run method=adaptive grouping=g128 (Hydra overrides)"
    )
    _add_sweep_parser(sub)
    sub.add_parser(
        "report",
        add_help=False,
        help="aggregate result.json files into report.csv, report.md and pareto.png: kvq report multirun/ --out report/",
    )
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "run":
        return _run_hydra(rest)
    if args.cmd == "report":
        from kvq import report

        return report.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "sweep":
        return _sweep(args)
    parser.error(f"unknown command {args.cmd}")
    return 2


def _add_sweep_parser(sub: Any) -> None:
    sweep = sub.add_parser("sweep", help="W&B sweeps: kvq sweep check sweeps/grid.yaml")
    ssub = sweep.add_subparsers(dest="sweep_cmd", required=True)
    check = ssub.add_parser(
        "check",
        help="expand a W&B sweep offline, validate every point, print what will run, be skipped or "
        "duplicate, and each run's exact command line",
    )
    check.add_argument("file", help="the sweep YAML (e.g. sweeps/grid.yaml)")
    check.add_argument(
        "--model-aware",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also apply model-aware rules (reads each model's config, no weights; default: on)",
    )
    check.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="check at most N points (a grid's first N; random/bayes: N draws, default 20)",
    )
    check.add_argument("--seed", type=int, default=0, help="seed of random/bayes draws (default 0)")
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    check.add_argument("--no-commands", action="store_true", help="do not list the command lines")


def _sweep(args: argparse.Namespace) -> int:
    """``kvq sweep check``: 0 = every run executes or skips cleanly, 1 = some would fail the
    agent (malformed), 2 = the sweep file is unusable."""
    import json

    from kvq.sweep import SweepError, check, print_check

    if args.limit is not None and args.limit < 1:
        print("kvq: error: --limit must be >= 1", file=sys.stderr)
        return EXIT_CONFIG
    try:
        result = check(args.file, model_aware=args.model_aware, limit=args.limit, seed=args.seed)
    except SweepError as e:
        print(f"kvq: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print_check(result, commands=not args.no_commands)
    return 0 if result.ok() else EXIT_FAILED


def _run_hydra(overrides: list[str]) -> int:
    """``kvq run ...`` = ``python train_eval.py ...`` with the packaged ``conf/``."""
    from pathlib import Path

    import hydra

    import kvq.config  # noqa: F401

    conf = Path(__file__).resolve().parent.parent / "conf"

    @hydra.main(version_base="1.3", config_path=str(conf), config_name="config")
    def _task(cfg: DictConfig) -> float:
        return entry_point(cfg)

    sys.argv = [sys.argv[0], *overrides]
    return hydra_main(_task)
