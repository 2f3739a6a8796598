"""W&B sweeps, checked offline before any agent starts: ``kvq sweep check sweeps/grid.yaml``.

A W&B sweep (``sweeps/*.yaml``) is expanded here exactly as the W&B server would do it, with the
PyPI package ``sweeps`` (the server's own grid/random/bayes code): every point of a ``grid``, or
a sample of ``random``/``bayes`` points (their first proposals are random draws from the same
space; the run count is open-ended: ``run_cap`` or ``wandb agent --count``). For every point:

* the exact command line the agent will run, built with wandb's own code
  (``create_sweep_command`` + ``create_sweep_command_args``, the same macro substitution as
  ``wandb agent``: ``${env}`` -> ``/usr/bin/env``, ``${interpreter}`` -> the literal ``python``
  found first on ``PATH``, ``${program}``, ``${args_no_hyphens}`` -> ``key=value`` overrides);
* its configuration composed by Hydra from those arguments (``malformed`` = the run would exit
  with code 2, which the agent counts as a failure);
* :func:`kvq.validate.triage`: ``invalid`` points run, skip themselves and exit 0 (W&B tag
  ``skipped``); ``duplicate`` points repeat another point's experiment (an agent cannot drop them:
  trim the sweep).
"""

from __future__ import annotations

import copy
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from kvq.errors import one_line

__all__ = [
    "CheckResult",
    "CheckedRun",
    "SweepError",
    "check",
    "command_line",
    "expand",
    "load_sweep",
    "print_check",
]

#: points drawn from a random/bayes sweep when no limit is given
DEFAULT_SAMPLES = 20
#: statuses of a checked run
STATUSES = ("run", "invalid", "duplicate", "malformed")


def _sweeps() -> Any:
    """The ``sweeps`` package (its import warns about pydantic v1-style configs: silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sweeps

    return sweeps


class SweepError(ValueError):
    """The sweep file cannot be used (missing, not YAML, not a valid W&B sweep): one line."""


def load_sweep(path: str | Path) -> dict[str, Any]:
    """Read a W&B sweep YAML and check it against the W&B sweep schema."""
    SweepConfig = _sweeps().SweepConfig

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: a sweep is a mapping (method, parameters, command, ...)")
    try:
        SweepConfig(raw)  # the schema check (it also fills defaults: the raw file is returned)
    except Exception as e:  # jsonschema.ValidationError and friends
        msg = getattr(e, "message", None) or str(e).splitlines()[0]
        raise SweepError(f"{path}: not a valid W&B sweep: {msg}") from e
    return raw


def expand(
    sweep: dict[str, Any], limit: int | None = None, seed: int = 0
) -> tuple[list[dict[str, Any]], int | None]:
    """The sweep's points as ``{parameter: value}`` dicts, with the ``sweeps`` package.

    Args:
        sweep: a sweep config (:func:`load_sweep`).
        limit: at most this many points (a grid's first ones; default: all of a grid,
            :data:`DEFAULT_SAMPLES` draws of a random/bayes sweep).
        seed: seed of random/bayes draws.

    Returns:
        ``(points, total)``: ``total`` is the grid's size, or the sweep's ``run_cap`` (``None``
        when unbounded) for random/bayes.
    """
    sweeps = _sweeps()
    from sweeps.run import SweepRun

    method = sweep.get("method")
    if method == "grid":
        runs: list[SweepRun] = []
        while limit is None or len(runs) < limit:
            n = 256 if limit is None else min(256, limit - len(runs))
            batch = [r for r in sweeps.next_runs(sweep, runs, n=n) if r is not None]
            if not batch:
                break
            runs += batch
        total = len(runs) if limit is None else _grid_size(sweep)
        return [_values(r.config) for r in runs], total
    if method in ("random", "bayes"):
        # bayes proposes its first runs at random from the same space (no results yet)
        state = random.getstate()
        random.seed(seed)
        try:
            drawn = sweeps.next_runs({**sweep, "method": "random"}, [], n=limit or DEFAULT_SAMPLES)
        finally:
            random.setstate(state)
        return [_values(r.config) for r in drawn], sweep.get("run_cap")
    raise SweepError(f"unknown sweep method {method!r} (grid, random, bayes)")


def _grid_size(sweep: dict[str, Any]) -> int:
    sweeps = _sweeps()

    runs: list[Any] = []
    while True:
        batch = [r for r in sweeps.next_runs(sweep, runs, n=1024) if r is not None]
        if not batch:
            return len(runs)
        runs += batch


def _values(config: dict[str, Any]) -> dict[str, Any]:
    """``{name: {"value": v}}`` (a run's sweep config) -> ``{name: v}``."""
    return {k: v["value"] for k, v in config.items()}


def command_line(sweep: dict[str, Any], params: dict[str, Any]) -> list[str]:
    """The command ``wandb agent`` runs for one point (its ``_command_run`` substitution)."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    template = create_sweep_command(copy.deepcopy(sweep.get("command")) or None)
    sweep_vars: dict[str, Any] = create_sweep_command_args(
        {"args": {k: {"value": v} for k, v in params.items()}}
    )
    sweep_vars["interpreter"] = ["python"]
    sweep_vars["program"] = [sweep["program"]] if sweep.get("program") else []
    sweep_vars["args_json_file"] = ["wandb/sweep-SWEEP_ID/config-RUN_ID.json"]
    sweep_vars["env"] = ["/usr/bin/env"]
    out: list[str] = []
    for c in template:
        c = str(c)
        if c.startswith("${") and c.endswith("}"):
            out += [str(x) for x in (sweep_vars.get(c[2:-1]) or [])]
        else:
            out.append(c)
    return out


def _run_overrides(sweep: dict[str, Any], argv: list[str], params: dict[str, Any]) -> list[str]:
    """The Hydra overrides of a command line: what follows the program."""
    program = sweep.get("program")
    if program and program in argv:
        return argv[argv.index(program) + 1 :]
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    return list(
        create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args_no_hyphens"]
    )


def _config_dir(sweep: dict[str, Any], base: Path | None) -> Path:
    """``conf/`` beside the sweep's program if there is one, else the package's."""
    program = sweep.get("program")
    if program:
        p = Path(program)
        for cand in ((base / p) if base else None, p):
            if cand is not None and (cand.parent / "conf" / "config.yaml").is_file():
                return (cand.parent / "conf").resolve()
    return Path(__file__).resolve().parent.parent / "conf"


@dataclass
class CheckedRun:
    """One point of a sweep.

    Attributes:
        index: position in the expansion.
        params: ``{parameter: value}``.
        argv: the command line the agent runs.
        status: ``run``, ``invalid`` (runs, skips itself, exit 0), ``duplicate`` (runs, repeats
            ``duplicate_of``) or ``malformed`` (exit code 2: the agent counts a failure).
        reason: one line ('' for ``run``).
        duplicate_of: index of the point with the same experiment.
    """

    index: int
    params: dict[str, Any]
    argv: list[str]
    status: str = "run"
    reason: str = ""
    duplicate_of: int | None = None


@dataclass
class CheckResult:
    """What ``kvq sweep check`` found."""

    path: str
    method: str
    total: int | None
    runs: list[CheckedRun] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.runs)

    def ok(self) -> bool:
        """No run would fail the agent."""
        return self.count("malformed") == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "method": self.method,
            "total": self.total,
            "checked": len(self.runs),
            "counts": {s: self.count(s) for s in STATUSES},
            "warnings": self.warnings,
            "runs": [vars(r) for r in self.runs],
        }


def check(
    sweep: dict[str, Any] | str | Path,
    *,
    model_aware: bool = True,
    limit: int | None = None,
    seed: int = 0,
    base: Path | None = None,
) -> CheckResult:
    """Expand a sweep, build every command line, compose and validate every point.

    Args:
        sweep: a sweep config or the path of its YAML.
        model_aware: apply model-aware rules (reads each model's config, no weights).
        limit: check at most this many points (see :func:`expand`).
        seed: seed of random/bayes draws.
        base: directory the agent starts in (to find the program's ``conf/``); default: cwd.

    Returns:
        A :class:`CheckResult`.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import kvq.config  # noqa: F401 -- registers the schemas
    from kvq.experiment import unknown_keys
    from kvq.validate import MetaCache, triage

    path = ""
    if not isinstance(sweep, dict):
        path = str(sweep)
        sweep = load_sweep(sweep)
    points, total = expand(sweep, limit=limit, seed=seed)
    result = CheckResult(path, str(sweep.get("method")), total)
    if "program" not in sweep:
        result.warnings.append("no 'program': the agent's ${program} is empty")
    cmd = [str(c) for c in (sweep.get("command") or [])]
    if cmd and "${args_no_hyphens}" not in cmd:
        result.warnings.append(
            "the command does not pass ${args_no_hyphens}: Hydra takes key=value overrides, "
            "not --key=value flags"
        )
    conf = _config_dir(sweep, base or Path.cwd())
    composed: list[tuple[CheckedRun, DictConfig]] = []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            for i, params in enumerate(points):
                argv = command_line(sweep, params)
                run = CheckedRun(i, params, argv)
                result.runs.append(run)
                try:
                    cfg = compose("config", overrides=_run_overrides(sweep, argv, params))
                except Exception as e:  # noqa: BLE001 -- what the run would print before exit 2
                    run.status = "malformed"
                    run.reason = one_line(e, chain=True)
                    continue
                bad = unknown_keys(cfg)
                if bad:  # the run exits 2 before it validates
                    run.status, run.reason = "malformed", "; ".join(bad)
                    continue
                composed.append((run, cfg))
    finally:
        GlobalHydra.instance().clear()
    metas = MetaCache()
    verdicts = triage([c for _, c in composed], metas, model_aware=model_aware)
    for (run, _), v in zip(composed, verdicts):
        run.status = v.status
        if v.duplicate_of is not None:
            run.duplicate_of = composed[v.duplicate_of][0].index
        run.reason = v.reason(twin=f"#{run.duplicate_of}")
        if v.status == "run" and v.report.duplicates:  # its twin is not in this sweep
            run.reason = "note: " + "; ".join(f"{d.rule}: {d.reason}" for d in v.report.duplicates)
        if v.meta_error and (w := f"model-aware checks skipped: {v.meta_error}") not in result.warnings:
            result.warnings.append(w)
    return result


def _shown(params: dict[str, Any], varying: Sequence[str]) -> str:
    keys = [k for k in params if k in varying] or list(params)
    return " ".join(f"{k}={params[k]}" for k in keys)


def print_check(result: CheckResult, commands: bool = True, console: Any = None) -> None:
    """Print counts, tables of skipped / duplicate / malformed runs, and every command line."""
    import shlex

    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if Console().is_terminal else 200, highlight=False)
    varying = [
        k
        for k in (result.runs[0].params if result.runs else {})
        if len({repr(r.params[k]) for r in result.runs}) > 1
    ]
    n = len(result.runs)
    if result.method == "grid":
        scope = f"grid of {result.total} runs" + (f", first {n} checked" if result.total != n else "")
    else:
        cap = (
            f"run_cap {result.total}"
            if result.total
            else "no run_cap: runs until stopped or wandb agent --count"
        )
        scope = f"{result.method} search ({cap}); {n} sampled points checked"
    console.print(f"[bold]{result.path or 'sweep'}[/bold]: {scope}")
    for w in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    console.print(
        f"  will execute: {result.count('run')}\n"
        f"  skipped (invalid; the run records the reason, tags W&B 'skipped', exits 0): {result.count('invalid')}\n"
        f"  duplicates (run anyway, an agent cannot drop them; same result as another run): "
        f"{result.count('duplicate')}\n"
        f"  malformed (exit code 2: the agent counts a failure): {result.count('malformed')}"
    )
    for status, title in (
        ("malformed", "malformed: the run fails at composition"),
        ("invalid", "skipped: invalid combinations"),
        ("duplicate", "duplicates"),
        ("run", "notes: runs that repeat an experiment outside this sweep"),
    ):
        rows = [r for r in result.runs if r.status == status and r.reason]
        if not rows:
            continue
        table = Table(title=title, header_style="bold", title_justify="left")
        table.add_column("#", justify="right")
        table.add_column("parameters")
        table.add_column("reason", overflow="fold")
        for r in rows:
            table.add_row(str(r.index), _shown(r.params, varying), r.reason)
        console.print(table)
    if commands:
        console.print(
            "command lines (run by `wandb agent` in its working directory; `python` is the first one on "
            "PATH: activate the venv first):"
        )
        for r in result.runs:
            console.print(f"  #{r.index:<4} {r.status:<9} {shlex.join(r.argv)}", markup=False, soft_wrap=True)
