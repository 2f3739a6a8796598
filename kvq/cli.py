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

__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "entry_point", "hydra_main", "main"]

EXIT_FAILED = 1  # the run failed (one-line reason on stderr, result.json written)
EXIT_CONFIG = 2  # malformed configuration: unknown key/option, wrong type

_task_started = False


def _multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def entry_point(cfg: DictConfig) -> float:
    """Run one job; a fixable failure becomes one line on stderr.

    In a single run it exits with :data:`EXIT_FAILED`; in a multirun the job returns NaN so the
    other jobs go on (its ``result.json`` says ``failed`` with the reason).
    """
    global _task_started
    _task_started = True
    from kvq.run import KVQError, run

    try:
        return run(cfg)
    except KVQError as e:
        print(f"kvq: error: {e}", file=sys.stderr)
        if _multirun():
            return math.nan
        sys.exit(EXIT_FAILED)


def hydra_main(main: Callable[[], Any]) -> int:
    """Call a ``@hydra.main`` function; composition errors (Hydra exits 1 before the task
    starts) become :data:`EXIT_CONFIG`."""
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code == 1 and not _task_started:
            return EXIT_CONFIG
        return code
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``kvq`` console script."""
    parser = argparse.ArgumentParser(prog="kvq", description="kvq: KV-cache quantization experiments")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser(
        "run", help="evaluate one configuration: kvq run method=adaptive grouping=g128 (Hydra overrides)"
    )
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "run":
        return _run_hydra(rest)
    parser.error(f"unknown command {args.cmd}")
    return 2


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
