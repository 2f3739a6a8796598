"""Run records: one ``result.json`` per run, and a store of records keyed by experiment."""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["DROPPED_FILE", "RESULT_FILE", "ResultStore", "read_result", "versions", "write_result"]

log = logging.getLogger(__name__)

#: every run's record, in its run directory
RESULT_FILE = "result.json"
#: what the ``kvq`` sweeper did not launch (invalid or duplicate jobs), in the sweep directory
DROPPED_FILE = "dropped.json"
_PACKAGES = ("kvq", "torch", "transformers", "lightning", "hydra-core", "wandb", "datasets")


def versions() -> dict[str, str]:
    """Versions of Python and the packages a result depends on."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_result(run_dir: Path, record: dict[str, Any], name: str = RESULT_FILE) -> Path:
    """Write ``record`` to ``run_dir/name`` (``result.json``) atomically (temp file + rename)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    fd, tmp = tempfile.mkstemp(prefix=".result.", suffix=".json.tmp", dir=run_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2, sort_keys=False, default=str, allow_nan=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_result(run_dir: Path) -> dict[str, Any]:
    """Read ``run_dir/result.json``."""
    return json.loads((Path(run_dir) / RESULT_FILE).read_text())


class ResultStore:
    """A folder of run records keyed by experiment (``<key>.json``), shared by every run.

    A finished (``ok``) record is reused by any later run of the same experiment (a re-run grid,
    a requeued SLURM job, a W&B agent that draws the same point). Only results are stored:
    a ``skipped`` verdict is the validator's, recomputed by every run before the store is asked
    (it never answers for a result), and ``failed`` records are not stored, so failures are
    retried. Writes are atomic (temp file + rename);
    a truncated or corrupt record is reported with a warning and recomputed.

    Args:
        root: the folder (created on first write).
    """

    REUSABLE = ("ok",)

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The complete record of ``key``, or ``None`` (absent, corrupt or not reusable)."""
        p = self.path(key)
        if not p.exists():
            return None
        try:
            rec = json.loads(p.read_text())
            if not isinstance(rec, dict) or rec.get("key") != key or rec.get("status") not in self.REUSABLE:
                raise ValueError("incomplete record")
            if rec["status"] == "ok" and "test/ppl" not in rec.get("metrics", {}):
                raise ValueError("no test/ppl in an ok record")
        except (ValueError, OSError) as e:
            log.warning(
                "corrupt result record %s (%s): recomputing", p, str(e).splitlines()[0] if str(e) else e
            )
            return None
        return rec

    def put(self, key: str, record: dict[str, Any]) -> Path | None:
        """Store ``record`` under ``key`` if it is reusable."""
        if record.get("status") not in self.REUSABLE:
            return None
        return write_result(self.root, {**record, "key": key}, name=f"{key}.json")

    def records(self) -> list[dict[str, Any]]:
        """Every readable record in the store."""
        out = []
        for p in sorted(self.root.glob("*.json")):
            rec = self.get(p.stem)
            if rec is not None:
                out.append(rec)
        return out
