"""Run records: one ``result.json`` per run, written atomically."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["RESULT_FILE", "read_result", "versions", "write_result"]

RESULT_FILE = "result.json"
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


def write_result(run_dir: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` to ``run_dir/result.json`` atomically (temp file + rename)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RESULT_FILE
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
