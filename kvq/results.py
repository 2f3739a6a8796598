"""Run records: one ``result.json`` per run, and a store of records keyed by experiment."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from kvq.errors import KVQError, one_line

__all__ = [
    "DROPPED_FILE",
    "RESULT_FILE",
    "ResultStore",
    "atomic_write",
    "finite_json",
    "read_result",
    "verdict_key",
    "versions",
    "write_result",
]

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


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, ±Inf) replaced by ``None``: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def _writer() -> str:
    """``host-pid`` of this process, for temp file names (a killed writer's leftover is easy to place;
    uniqueness comes from ``mkstemp``, which creates each name exclusively)."""
    host = "".join(c for c in platform.node().split(".")[0] if c.isalnum() or c in "-_") or "host"
    return f"{host}-{os.getpid()}"


def _file_mode() -> int:
    """``0o666`` less the process umask: what ``open()`` would create (``mkstemp`` makes 0600)."""
    try:  # Linux: read it without changing it (os.umask sets it, for every thread at once)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write: Callable[[IO[Any]], None], text: bool = False) -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a temp file in the same folder (created
    exclusively by ``mkstemp``, named after the writing host and pid), which is flushed to disk,
    given the mode a plain ``open()`` would give it, then renamed over ``path`` in one step.

    A reader sees the old file or a new one, never a partial file; of concurrent writers of one
    name the last rename wins and exactly one complete file remains. On failure the temp file is
    removed and the error raised.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w" if text else "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_result(run_dir: Path, record: dict[str, Any], name: str = RESULT_FILE) -> Path:
    """Write ``record`` to ``run_dir/name`` (``result.json``) atomically (:func:`atomic_write`).

    The file is strict JSON (a non-finite float is written as ``null``) and gets the mode a
    plain ``open()`` would give it (``0644`` under the usual umask), so a store shared by a
    team stays readable by all. Safe under concurrent writers (local_gpus workers, SLURM jobs,
    W&B agents finishing the same experiment).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)

    def dump(f: IO[Any]) -> None:
        json.dump(finite_json(record), f, indent=2, sort_keys=False, default=str, allow_nan=False)
        f.write("\n")

    return atomic_write(run_dir / name, dump, text=True)


def read_result(run_dir: Path) -> dict[str, Any]:
    """Read ``run_dir/result.json``."""
    return json.loads((Path(run_dir) / RESULT_FILE).read_text())


def _garbage(metrics: Any) -> str | None:
    """Why the metrics of an ``ok`` record cannot be a result (``None`` when they can)."""
    # every protocol's result is under test/ (test/ppl; test/passkey_acc, test/<task>/acc, test/gen/...)
    if not isinstance(metrics, dict) or not any(str(k).startswith("test/") for k in metrics):
        return "no test/ metric in an ok record"
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return f"{k} is {v!r}, not a finite number"
    return None


def verdict_key(config: dict[str, Any]) -> str:
    """The name of a skipped verdict in ``<store>/verdicts/``: a hash of the resolved config."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ResultStore:
    """A folder of run records keyed by experiment (``<key>.json``), shared by every run.

    A finished (``ok``) record is reused by any later run of the same experiment (a re-run grid,
    a requeued SLURM job, a W&B agent that draws the same point). Only results answer for
    results: a ``skipped`` verdict is the validator's, recomputed by every run before the store
    is asked; it is kept apart, in ``verdicts/`` (:meth:`put_verdict`), for the record, and never
    read back. ``failed`` records are not stored, so failures are retried. Writes are atomic
    (temp file + rename); a truncated, corrupt or garbage record (an ``ok`` record whose metrics
    are not all finite numbers) is reported with a warning and recomputed.

    Args:
        root: the folder (created on first write).
    """

    REUSABLE = ("ok",)
    VERDICTS = "verdicts"

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
            why = _garbage(rec.get("metrics"))
            if why:
                raise ValueError(why)
        except (ValueError, OSError) as e:
            log.warning("corrupt result record %s (%s): recomputing", p, one_line(e))
            return None
        return rec

    def check_writable(self) -> None:
        """Raise a one-line :class:`~kvq.errors.KVQError` unless records can be written here
        (asked before any compute, so an unwritable store never costs an evaluation)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".probe.", suffix=".tmp", dir=self.root)
            os.close(fd)
            os.unlink(tmp)
        except OSError as e:
            raise KVQError(
                f"results_dir {str(self.root)!r} is not writable ({one_line(e)}): "
                "use results_dir=DIR (or $KVQ_RESULTS_DIR) on a writable folder"
            ) from None

    def put(self, key: str, record: dict[str, Any]) -> Path | None:
        """Store ``record`` under ``key`` if it is a result (``ok`` with finite metrics)."""
        if record.get("status") not in self.REUSABLE or _garbage(record.get("metrics")):
            return None
        return write_result(self.root, {**record, "key": key}, name=f"{key}.json")

    def put_verdict(self, record: dict[str, Any]) -> Path | None:
        """Keep a ``skipped`` record in ``verdicts/`` (never consulted for reuse); ``None`` when
        it cannot be written (a warning: a verdict is recomputed by every run anyway)."""
        if record.get("status") != "skipped":
            return None
        try:
            name = f"{verdict_key(record.get('config') or {})}.json"
            return write_result(self.root / self.VERDICTS, record, name=name)
        except OSError as e:
            log.warning(
                "could not keep the skipped verdict in %s: %s", self.root / self.VERDICTS, one_line(e)
            )
            return None

    def records(self) -> list[dict[str, Any]]:
        """Every readable result in the store (verdicts are not results)."""
        out = []
        for p in sorted(self.root.glob("*.json")):
            rec = self.get(p.stem)
            if rec is not None:
                out.append(rec)
        return out
