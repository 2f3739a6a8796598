"""Library chatter a kvq user would otherwise have to read past on every run -- and nothing more.

Only messages that say nothing about the run are dropped: Lightning's litlogger advertisement,
its ``srun`` hint (kvq's SLURM jobs go through submitit, not ``srun python``) and its own pytree
deprecation warning (Lightning calling a deprecated torch API). Every other warning stays
visible.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["silence_library_noise"]

#: (message regex, category) of warnings that concern a library's own code, not the run
_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"The `srun` command is available on your system but is not used", Warning),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", Warning),
)
#: substrings of Lightning info lines that are advertisements
_ADVERTS: tuple[str, ...] = ("litlogger",)


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(a in msg for a in _ADVERTS)


_installed = False


def silence_library_noise() -> None:
    """Install the filters (idempotent)."""
    global _installed
    if _installed:
        return
    for pattern, category in _WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropAdverts())
    _installed = True
