"""Experiment tracking: W&B (online with credentials, offline otherwise — never a prompt).

Offline means no network traffic at all: an offline run turns off wandb's own telemetry
(``WANDB_ERROR_REPORTING=false``; wandb 0.31 otherwise looks up its host from a background
thread to export usage metrics), its system metrics (``x_disable_stats``) and machine-info
probes (``x_disable_machine_info``). Online needs credentials and a reachable host, checked in
a few seconds before the run starts: ``logger.mode=online`` fails fast with one line when either
is missing; ``logger.mode=auto`` with credentials but no network falls back to offline with one
warning line (``wandb sync`` the run later).
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kvq.errors import KVQError, one_line

log = logging.getLogger(__name__)

__all__ = ["NoTracker", "TrackedRun", "WandbTracker", "wandb_base_url", "wandb_has_credentials"]

_MODES = ("auto", "online", "offline", "disabled")
#: seconds a TCP connection to the W&B host may take before the host counts as unreachable
PROBE_TIMEOUT_S = 5.0
_PROBED: dict[str, str | None] = {}


def wandb_base_url() -> str:
    """The W&B server: ``WANDB_BASE_URL``, else wandb's own default."""
    env = os.environ.get("WANDB_BASE_URL")
    if env:
        return env
    try:
        from wandb.sdk.lib.urls import DEFAULT_BASE_URL

        return str(DEFAULT_BASE_URL)
    except ImportError:  # another wandb layout
        return "https://api.wandb.ai"


def wandb_has_credentials() -> bool:
    """Whether an API key is configured (``WANDB_API_KEY`` or a ``~/.netrc`` entry for the host)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(wandb_base_url()).hostname or ""
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _unreachable(url: str) -> str | None:
    """Why the W&B host cannot be reached (``None`` when a TCP connection opens); asked once per
    process and host."""
    if url not in _PROBED:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            with socket.create_connection((parts.hostname or "", port), timeout=PROBE_TIMEOUT_S):
                _PROBED[url] = None
        except OSError as e:
            _PROBED[url] = one_line(e)
    return _PROBED[url]


class TrackedRun:
    """A run being tracked; the null implementation does nothing."""

    run_dir: Path | None = None

    def lightning_logger(self) -> Any:
        return False

    def log(self, metrics: dict[str, float]) -> None: ...

    def summary(self, values: dict[str, Any]) -> None: ...

    def tag(self, *tags: str) -> None: ...

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

    def tag(self, *tags: str) -> None:
        self.run.tags = tuple(sorted(set(self.run.tags or ()) | set(tags)))

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

    def online_or_offline(self) -> str:
        """:meth:`resolved_mode`, with online checked: credentials and a reachable host.

        Raises:
            KVQError: ``logger.mode=online`` without credentials or without a reachable host
                (one line); ``auto`` falls back to offline instead (one warning line).
        """
        mode = self.resolved_mode()
        if mode != "online":
            return mode
        url = wandb_base_url()
        if not wandb_has_credentials():
            raise KVQError(
                f"logger.mode=online needs W&B credentials for {url}: set WANDB_API_KEY or run `wandb login`, "
                "or use logger.mode=offline (or auto: offline without credentials)"
            )
        why = _unreachable(url)
        if why is None:
            return mode
        if self.mode == "online":
            raise KVQError(
                f"logger.mode=online but the W&B host {url} is unreachable ({why}): use logger.mode=offline "
                "and `wandb sync` the run later, or logger.mode=auto (falls back to offline)"
            )
        log.warning("W&B host %s is unreachable (%s): logging offline (`wandb sync` the run later)", url, why)
        return "offline"

    def start(self, run_dir: Path, name: str, config: dict[str, Any], tags: list[str]) -> TrackedRun:
        mode = self.online_or_offline()
        os.environ.setdefault("WANDB_SILENT", "true")
        extra: dict[str, Any] = {}
        if mode in ("offline", "disabled"):  # no network traffic at all (see the module docstring)
            os.environ["WANDB_ERROR_REPORTING"] = "false"
            extra["x_disable_machine_info"] = True
        import wandb

        try:
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
                settings=wandb.Settings(console="off", quiet=True, x_disable_stats=True, **extra),
            )
        except Exception as e:  # noqa: BLE001 -- wandb's errors (auth, comm, usage): one line
            raise KVQError(f"W&B could not start the run ({mode} mode): {one_line(e)}") from None
        log.info("W&B run %s (%s mode) in %s", name, mode, run.dir)
        return _WandbRun(run)


@dataclass
class NoTracker:
    """``logger=none``: no experiment tracking (``result.json`` is still written)."""

    def start(self, run_dir: Path, name: str, config: dict[str, Any], tags: list[str]) -> TrackedRun:
        return TrackedRun()
