"""``kvq.run(cfg)``: one composed configuration -> one evaluated point of the experiment space."""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kvq.results import versions, write_result
from kvq.validate import Report, make_point, validate

log = logging.getLogger("kvq")

__all__ = ["KVQError", "run"]

_AXES = ("method", "grouping", "bits", "granularity", "model", "data", "eval")


class KVQError(RuntimeError):
    """A failure the user can fix, reported as one line (no stack trace)."""


def _output_dir() -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ValueError, ImportError):
        return Path.cwd()


def _choices(cfg: DictConfig) -> dict[str, str]:
    """The option chosen per axis (from Hydra, else derived from each node's target)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        ch = HydraConfig.get().runtime.choices
        return {a: str(ch.get(a)) for a in _AXES if ch.get(a) is not None}
    except ValueError:
        return {a: str(cfg[a].get("_target_", "?")).rsplit(".", 1)[-1].lower() for a in _AXES if a in cfg}


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def _device(accelerator: str) -> torch.device:
    acc = accelerator.lower()
    if acc in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise KVQError(
                f"accelerator={accelerator} was requested but no CUDA device is available: "
                "use accelerator=auto (GPU when present, CPU otherwise) or accelerator=cpu"
            )
        return torch.device("cuda")
    if acc == "cpu":
        return torch.device("cpu")
    if acc == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    raise KVQError(f"accelerator must be auto, cpu, gpu or cuda, got {accelerator!r}")


def _summary_table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=True, header_style="bold", min_width=min(len(title) + 4, 100))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in rows:
        table.add_row(k, v)
    Console(stderr=False).print(table)


def _fmt(v: float) -> str:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    if abs(v) >= 1e6:
        return f"{v:,.0f}"
    return f"{v:.4g}"


def run(cfg: DictConfig, out_dir: Path | None = None) -> float:
    """Validate, evaluate and record one configuration.

    Args:
        cfg: the composed config (see ``conf/config.yaml``).
        out_dir: where ``result.json`` (and W&B files) go; default: Hydra's run directory.

    Returns:
        ``test/ppl`` (NaN for a skipped or failed run), the value sweepers optimise.

    Raises:
        KVQError: a failure the user can fix (one line); ``result.json`` is written first.
    """
    out_dir = Path(out_dir) if out_dir is not None else _output_dir()
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    choices = _choices(cfg)
    name = "-".join(
        choices.get(a, "?") for a in ("method", "grouping", "bits", "granularity", "model", "data", "eval")
    )
    tags = [f"{a}={c}" for a, c in choices.items()]
    record: dict[str, Any] = {
        "status": "failed",
        "reason": None,
        "name": name,
        "choices": choices,
        "config": resolved,
        "metrics": {},
        "versions": versions(),
        "started": time.time(),
    }
    tracker = instantiate(cfg.logger, _convert_="all")
    tracked = None
    try:
        model_src = instantiate(cfg.model, _convert_="all")
        try:
            meta = model_src.meta()
        except ValueError as e:
            raise KVQError(str(e).splitlines()[0]) from e
        point = make_point(cfg, meta)
        report: Report = validate(cfg, meta, point)
        if not report.ok:
            record.update(status="skipped", reason=report.reason())
            log.warning("skipped: %s", record["reason"])
            tracked = tracker.start(out_dir, name, resolved, [*tags, "skipped"])
            tracked.summary({"status": "skipped", "skip_reason": record["reason"]})
            print(f"kvq: skipped {name}: {record['reason']}")
            return math.nan
        for v in report.duplicates:
            log.warning("duplicate configuration (runs anyway): %s", v.line())
        device = _device(cfg.accelerator)
        tracked = tracker.start(out_dir, name, resolved, tags)
        record["metrics"] = _evaluate(cfg, model_src, meta, point, device, out_dir, tracked, name)
        record["status"] = "ok"
        return float(record["metrics"]["test/ppl"])
    except KVQError as e:
        record["reason"] = str(e)
        raise
    except ValueError as e:  # bad input found while building or loading: one line
        record["reason"] = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise KVQError(record["reason"]) from e
    except BaseException as e:
        record["reason"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise
    finally:
        record["finished"] = time.time()
        write_result(out_dir, record)
        if tracked is not None:
            if record["status"] == "failed":
                tracked.summary({"status": "failed", "fail_reason": record["reason"]})
            tracked.finish(exit_code=0 if record["status"] in ("ok", "skipped") else 1)


def _evaluate(
    cfg: DictConfig,
    model_src: Any,
    meta: Any,
    point: Any,
    device: torch.device,
    out_dir: Path,
    tracked: Any,
    name: str,
) -> dict[str, float]:
    """Load the model and data, run the Lightning test loop, return the metrics."""
    import lightning as L

    from kvq.alloc.qaq import register_stats_attention
    from kvq.cache import KVQuantSpec
    from kvq.module import EvalModule
    from kvq.protocols import KVSetup

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    allocator = point.bits
    attn = register_stats_attention() if getattr(allocator, "needs_attention", False) else None
    loaded = model_src.load(device=device, attn_implementation=attn)
    source = instantiate(cfg.data, _convert_="all")
    dm = source.datamodule(loaded.tokenizer, cache_dir=cfg.cache_dir)
    spec = KVQuantSpec(
        point.method,
        granularity=point.granularity.unit,
        residual=point.kv.residual,
        sinks=point.kv.sinks,
        fp_dtype=point.kv.fp_dtype,
    )
    module = EvalModule(loaded.model, point.eval, KVSetup(spec, allocator, meta.n_layers))
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        logger=tracked.lightning_logger(),
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=str(out_dir),
        inference_mode=True,
    )
    trainer.test(module, datamodule=dm, verbose=False)
    metrics = dict(module.results)
    metrics["mem/peak_bytes"] = float(_peak_bytes(device))
    tracked.summary(metrics)
    _summary_table(
        f"kvq {name}",
        [(k, _fmt(v)) for k, v in metrics.items() if not k.startswith("bits/") or k.endswith("/mean")],
    )
    return metrics
