"""What the ``kvq`` sweeper and SLURM launcher share: a job's directory, whether it failed, and the
``result.json`` of a job that failed before (or outside) ``kvq.run`` could write one.

(A leading underscore: Hydra's plugin scanner does not import this module; the plugins do.)
"""

import json
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, OmegaConf, open_dict

from kvq.errors import KVQError, one_line
from kvq.experiment import AXES
from kvq.results import RESULT_FILE, write_result

__all__ = ["failed_return", "job_dir", "job_failure", "record_failed"]


def job_dir(config_loader: Any, config: DictConfig, overrides: Sequence[str], num: int) -> Path:
    """``hydra.sweep.dir/hydra.sweep.subdir`` of job ``num``, as ``run_job`` would make it."""
    cfg = config_loader.load_sweep_config(config, list(overrides))
    with open_dict(cfg):
        cfg.hydra.job.num = num
    return Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)


def _choices(overrides: Sequence[str]) -> dict[str, str]:
    out = {}
    for o in overrides:
        k, _, v = str(o).partition("=")
        if k.lstrip("+~") in AXES:
            out[k.lstrip("+~")] = v
    return out


def record_failed(where: Path, overrides: Sequence[str], reason: str, trace: str | None = None) -> None:
    """Write a ``failed`` ``result.json`` for a job into ``where`` unless the job wrote its own
    (``kvq.run`` always does; a crash outside it, a lost SLURM job or a failed submission do not);
    a traceback, if any, goes to ``where/traceback.txt``."""
    where = Path(where)
    try:
        if trace:
            where.mkdir(parents=True, exist_ok=True)
            (where / "traceback.txt").write_text(trace)
        if (where / RESULT_FILE).exists():
            return
        write_result(
            where,
            {
                "status": "failed",
                "reason": reason,
                "name": " ".join(map(str, overrides)),
                "choices": _choices(overrides),
                "config": {},
                "metrics": {},
                "overrides": list(map(str, overrides)),
            },
        )
    except OSError:  # the report then lacks the row; the console line still says it
        pass


def failed_return(overrides: Sequence[str], reason: str) -> JobReturn:
    """A failed :class:`JobReturn` for a job that never returned one (lost, not submitted)."""
    ret = JobReturn(overrides=list(overrides), status=JobStatus.FAILED)
    ret.return_value = KVQError(reason)
    return ret


def _output_dir(ret: JobReturn) -> Path | None:
    d = OmegaConf.select(ret.hydra_cfg, "hydra.runtime.output_dir") if ret.hydra_cfg is not None else None
    return Path(str(d)) if d else None


def job_failure(ret: JobReturn, fallback_dir: Path | None = None) -> str | None:
    """The one-line reason a job failed, or ``None`` when it did not (ok or skipped).

    A job fails when its task raised (the job's ``result.json`` is written if it has none, the
    traceback beside it), or when its ``result.json`` says ``failed`` (``kvq.run`` turned a
    fixable failure into one line and returned NaN, so the other jobs went on).
    """
    where = _output_dir(ret) or fallback_dir
    if ret.status == JobStatus.FAILED:
        err = ret._return_value
        if isinstance(err, KVQError):
            reason = str(err)
        else:
            reason = f"{type(err).__name__}: {one_line(err)}" if isinstance(err, BaseException) else str(err)
        trace = None
        if isinstance(err, BaseException) and err.__traceback__ is not None:
            trace = "".join(traceback.format_exception(type(err), err, err.__traceback__))
        if where is not None:
            record_failed(where, ret.overrides or [], reason, trace)
        return reason
    if where is None or not (where / RESULT_FILE).is_file():
        return None
    try:
        rec = json.loads((where / RESULT_FILE).read_text())
    except (OSError, ValueError) as e:
        return f"unreadable {where / RESULT_FILE}: {one_line(e)}"
    if isinstance(rec, dict) and rec.get("status") == "failed":
        return str(rec.get("reason") or "failed")
    return None
