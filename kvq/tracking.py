"""Experiment tracking: W&B (online with credentials, offline otherwise — never a prompt)."""

from __future__ import annotations

import logging
import netrc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["NoTracker", "TrackedRun", "WandbTracker", "wandb_has_credentials"]

_MODES = ("auto", "online", "offline", "disabled")


def wandb_has_credentials() -> bool:
    """Whether an API key is configured (``WANDB_API_KEY`` or a ``~/.netrc`` entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class TrackedRun:
    """A run being tracked; the null implementation does nothing."""

    run_dir: Path | None = None

    def lightning_logger(self) -> Any:
        return False

    def log(self, metrics: dict[str, float]) -> None: ...

    def summary(self, values: dict[str, Any]) -> None: ...

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None: ...

    def log_image(self, key: str, path: Path) -> None: ...

    def finish(self, exit_code: int = 0) -> None: ...


class _WandbRun(TrackedRun):
    def __init__(self, run: Any) -> None:
        self.run = run
        self.run_dir = Path(run.dir).parent if getattr(run, "dir", None) else None

    def lightning_logger(self) -> Any:
        from lightning.pytorch.loggers import WandbLogger

        return WandbLogger(experiment=self.run)

    def log(self, metrics: dict[str, float]) -> None:
        self.run.log(metrics)

    def summary(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        import wandb

        self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def log_image(self, key: str, path: Path) -> None:
        import wandb

        self.run.log({key: wandb.Image(str(path))})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


@dataclass
class WandbTracker:
    """Log to Weights & Biases.

    Args:
        project: W&B project.
        entity: W&B entity (team/user); ``null`` = your default.
        mode: ``auto`` (online when credentials exist, else offline), ``online``, ``offline``,
            ``disabled``. ``WANDB_MODE`` in the environment wins over ``auto``.
        group: W&B group (e.g. one per grid).
        tags: extra tags; the group choices are always added.
    """

    project: str = "kvq"
    entity: str | None = None
    mode: str = "auto"
    group: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"logger.mode must be one of {', '.join(_MODES)}, got {self.mode!r}")

    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        env = os.environ.get("WANDB_MODE")
        if env in ("online", "offline", "disabled", "dryrun"):
            return "offline" if env == "dryrun" else env
        return "online" if wandb_has_credentials() else "offline"

    def start(self, run_dir: Path, name: str, config: dict[str, Any], tags: list[str]) -> TrackedRun:
        import wandb

        mode = self.resolved_mode()
        os.environ.setdefault("WANDB_SILENT", "true")
        run = wandb.init(
            project=self.project,
            entity=self.entity,
            group=self.group,
            name=name,
            tags=sorted(set(tags) | set(self.tags)),
            dir=str(run_dir),
            mode=mode,
            config={"kvq": config},
            reinit="finish_previous",
            settings=wandb.Settings(console="off", quiet=True, x_disable_stats=True),
        )
        log.info("W&B run %s (%s mode) in %s", name, mode, run.dir)
        return _WandbRun(run)


@dataclass
class NoTracker:
    """``logger=none``: no experiment tracking (``result.json`` is still written)."""

    def start(self, run_dir: Path, name: str, config: dict[str, Any], tags: list[str]) -> TrackedRun:
        return TrackedRun()
