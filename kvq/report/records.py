"""Reading run records: every ``result.json`` under a path and the sweeper's ``dropped.json``.

:func:`collect` is the entry point; a record is the dict ``kvq.run`` writes (``status``,
``reason``, ``name``, ``choices``, ``config``, ``metrics``, ...) plus ``"_path"`` (the directory it
was read from) and ``"_root"`` (the path argument it was found under).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kvq.errors import one_line
from kvq.experiment import AXES
from kvq.results import DROPPED_FILE, RESULT_FILE

__all__ = ["ReportError", "collect", "natural_key"]

log = logging.getLogger(__name__)


class ReportError(RuntimeError):
    """A problem the user can fix (bad path, no W&B credentials), reported as one line."""


def natural_key(s: str) -> list[Any]:
    """A sort key that orders the digit runs of ``s`` by value (``x/9`` before ``x/10``).

    Args:
        s: the text to sort.

    Returns:
        ``s`` split into alternating text and ``int`` parts.
    """
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        log.warning("skipping unreadable %s (%s)", path, one_line(e))
        return None


def _read_result(path: Path) -> dict[str, Any] | None:
    rec = _read_json(path)
    if rec is None:
        return None
    if not isinstance(rec, dict) or rec.get("status") not in ("ok", "skipped", "failed"):
        log.warning("skipping %s: not a kvq run record (no status ok/skipped/failed)", path)
        return None
    metrics = rec.get("metrics")
    if rec["status"] == "ok" and not (
        isinstance(metrics, dict) and any(str(k).startswith("test/") for k in metrics)
    ):
        log.warning("skipping %s: an ok record without test/ metrics (incomplete)", path)
        return None
    rec = dict(rec)
    rec["_path"] = str(path.parent)
    return rec


def _read_dropped(path: Path) -> list[dict[str, Any]]:
    """The jobs the ``kvq`` sweeper dropped before launch, as records (invalid -> skipped)."""
    data = _read_json(path)
    if data is None:
        return []
    if not isinstance(data, list) or not all(isinstance(d, dict) and "overrides" in d for d in data):
        log.warning("skipping %s: not a kvq sweeper dropped.json", path)
        return []
    out = []
    all_overrides = [[str(o) for o in d.get("overrides") or []] for d in data]
    common = set.intersection(*map(set, all_overrides)) if all_overrides else set()
    for d, overrides in zip(data, all_overrides):
        choices = {}
        for o in overrides:
            k, _, v = o.partition("=")
            if k.lstrip("+~") in AXES:
                choices[k.lstrip("+~")] = v
        # the name: the axis choices, plus the other overrides that vary between the dropped jobs
        shown = [o for o in overrides if o.partition("=")[0].lstrip("+~") in AXES or o not in common]
        status = "skipped" if d.get("status") == "invalid" else str(d.get("status") or "dropped")
        out.append(
            {
                "status": status,
                "reason": d.get("reason"),
                "name": " ".join(shown or overrides),
                "choices": choices,
                "config": {},
                "metrics": {},
                "dropped": True,
                "_path": f"{path.parent} (job #{d.get('index', '?')}, not launched)",
            }
        )
    return out


def collect(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Read every run record under ``paths``.

    Each path is a run directory, a multirun directory (searched recursively), or a
    ``result.json`` file. Also reads the ``dropped.json`` that the ``kvq`` Hydra sweeper writes
    into a multirun directory: an *invalid* dropped job becomes a ``skipped`` record, a
    *duplicate* one a ``duplicate`` record (``"dropped": True`` on both).

    A corrupt, truncated or foreign JSON file is reported with a ``logging`` warning and skipped.
    Every record gets ``"_path"`` (the directory it was read from) and ``"_root"`` (the path
    argument it was found under).

    Args:
        paths: directories (or files) to search.

    Returns:
        The records, in path order (natural sort: ``multirun/x/10`` after ``multirun/x/9``).

    Raises:
        ReportError: a path does not exist.
    """
    records: list[dict[str, Any]] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"no such run directory: {p}")
        files = [p] if p.is_file() else [*p.rglob(RESULT_FILE), *p.rglob(DROPPED_FILE)]
        for f in sorted(files, key=lambda f: natural_key(str(f))):
            r = f.resolve()
            if r in seen:
                continue
            seen.add(r)
            found = _read_dropped(f) if f.name == DROPPED_FILE else [_read_result(f)]
            records.extend({**rec, "_root": str(p)} for rec in found if rec is not None)
    return records
