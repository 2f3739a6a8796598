"""``kvq.run(cfg)``: one composed configuration -> one evaluated point of the experiment space.

1. validate (an invalid combination is *skipped*: recorded with its reason, W&B tag ``skipped``);
2. results store: the same experiment already finished -> reuse its record, do not recompute;
3. load model (cached in-process across the jobs of a local grid) and data;
4. ``lightning.Trainer.test(EvalModule)`` with a ``QuantizedCache`` in the model;
5. the full-precision baseline of the same (model, data, protocol) from the store (computed
   once if missing) -> ``test/delta_ppl`` and ``test/delta_ppl_pct``;
6. ``result.json`` (always, atomically), the store, W&B, a console table.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import resource
import signal
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from kvq.alloc.stats_store import attach_attention_stats
from kvq.errors import KVQError, MalformedConfig, one_line
from kvq.experiment import (
    AXES,
    BASELINE_CHOICES,
    baseline_config,
    experiment_config,
    identity,
    make_point,
    resolve_key_axis,
    run_name,
    unknown_keys,
)
from kvq.outcome import NOTHING_QUANTIZED, check_finite, check_weights, nothing_quantized
from kvq.reference import attach_reference, reference_ready
from kvq.results import ResultStore, versions, write_result
from kvq.validate import Report, experiment_key, validate

log = logging.getLogger("kvq")

__all__ = ["KVQError", "Terminated", "baseline_config", "run"]


class Terminated(SystemExit):
    """SIGTERM arrived during a run: the process exits with 128 + 15 after recording the run.

    A :class:`SystemExit`, so nothing between the signal and the interpreter's exit swallows it
    (Lightning's test loop otherwise only *notes* a SIGTERM that arrives during its last batch).
    """

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)

    def __str__(self) -> str:
        return "terminated by SIGTERM; finished results are in the store, re-run the same command to resume"


@contextmanager
def _exit_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` raised in the main thread, for the duration of a run.

    Only where SIGTERM would otherwise kill the process on the spot (its default action): a
    handler someone else installed (submitit's preemption handling on SLURM, a test harness) is
    left alone. Lightning's ``Trainer`` chains the handler found here to its own, so the signal
    also stops an evaluation at once. The first SIGTERM raises; later ones (while the run's
    record is written) are ignored, so the atomic writes finish.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return
    pid = os.getpid()
    fired = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal fired
        if fired or os.getpid() != pid:  # a forked data-loader worker inherits the handler
            return
        fired = True
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _output_dir() -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ValueError, ImportError):
        return Path.cwd()


def _original_cwd() -> Path:
    try:
        from hydra.utils import get_original_cwd

        return Path(get_original_cwd())
    except ValueError:
        return Path.cwd()


def _results_dir(cfg: DictConfig) -> Path:
    p = Path(str(cfg.get("results_dir") or "results")).expanduser()
    return p if p.is_absolute() else _original_cwd() / p


def _choices(cfg: DictConfig) -> dict[str, str]:
    """The option chosen per axis (from Hydra, else derived from each node's target)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        ch = HydraConfig.get().runtime.choices
        return {a: str(ch.get(a)) for a in AXES if ch.get(a) is not None}
    except ValueError:
        return {a: str(cfg[a].get("_target_", "?")).rsplit(".", 1)[-1].lower() for a in AXES if a in cfg}


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
    Console().print(table)


def _fmt(v: float) -> str:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    if abs(v) >= 1e6:
        return f"{v:,.0f}"
    return f"{v:.4g}"


_models: dict[str, Any] = {"loads": 0, "last": None}  # weakref to the model the last run used


def _note_model(loaded: Any) -> None:
    """Count model loads in this process: ``load_cached`` handing out another object than last time
    loaded one (a weak reference: the cache alone decides when the old model is freed)."""
    last = _models["last"]
    if last is None or last() is not loaded:
        _models["loads"] += 1
        _models["last"] = weakref.ref(loaded)


def _process() -> dict[str, Any]:
    """Where a run ran: host, pid, ``CUDA_VISIBLE_DEVICES`` and the models this process loaded so far."""
    return {
        "host": platform.node(),
        "pid": os.getpid(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "model_loads": _models["loads"],
    }


def run(cfg: DictConfig, out_dir: Path | None = None) -> float:
    """Validate, evaluate and record one configuration.

    Args:
        cfg: the composed config (see ``conf/config.yaml``).
        out_dir: where ``result.json`` (and W&B files) go; default: Hydra's run directory.

    Returns:
        ``test/ppl`` (NaN for a skipped or failed run), the value sweepers optimise.

    Raises:
        KVQError: a failure the user can fix (one line); ``result.json`` is written first.
        Terminated: SIGTERM arrived; the run is recorded as ``failed`` (not stored, so a re-run
            recomputes it) and the process should exit with 143.
    """
    with _exit_on_sigterm():
        return _run(cfg, out_dir)


def _run(cfg: DictConfig, out_dir: Path | None) -> float:
    out_dir = Path(out_dir) if out_dir is not None else _output_dir()
    resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    choices = _choices(cfg)
    name = run_name(choices)
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
    tracked = None
    store = ResultStore(_results_dir(cfg))
    reuse = bool(cfg.get("reuse", True))
    try:
        tracker = instantiate(cfg.logger, _convert_="all")
        model_src = instantiate(cfg.model, _convert_="all")
        try:
            meta = model_src.meta()
        except ValueError as e:
            raise KVQError(str(e).splitlines()[0]) from e
        bad = unknown_keys(cfg)
        if bad:
            raise MalformedConfig("; ".join(bad))
        point = make_point(cfg, meta)
        _record_key_axis(resolved, cfg, point)
        report: Report = validate(cfg, meta, point)
        if not report.ok:  # validated before the store is asked: a verdict never answers for a result
            tracked = tracker.start(out_dir, name, resolved, [*tags, "skipped"])
            return _skip(record, tracked, name, report.reason() or "invalid")
        for v in report.duplicates:
            log.warning("duplicate configuration (runs anyway): %s", v.line())
        device = _device(cfg.accelerator)
        ident = identity(cfg, model_src, device)
        key = record["key"] = experiment_key(
            experiment_config(cfg), meta, point, identity=ident, report=report
        )
        prev = store.get(key) if reuse else None
        if prev is not None:
            record.update(
                status=prev["status"],
                reason=prev["reason"],
                metrics=prev["metrics"],
                reused_from=str(store.path(key)),
            )
            print(f"kvq: {name}: reusing the finished result {store.path(key)} ({prev['status']})")
            tracked = tracker.start(out_dir, name, resolved, [*tags, prev["status"], "reused"])
            tracked.summary({**prev["metrics"], "status": prev["status"], "skip_reason": prev["reason"]})
            return float(prev["metrics"].get("test/ppl", math.nan))
        store.check_writable()  # before any compute: an unwritable store must not cost an evaluation
        tracked = tracker.start(out_dir, name, resolved, tags)
        # the baseline first: it writes the fp reference the distribution metrics compare with
        base = _baseline_ppl(cfg, model_src, meta, point, device, store, ident, reuse=reuse)
        bkey = experiment_key(baseline_config(cfg), meta, identity=ident)
        attach_reference(point, store.root, bkey, reuse)
        attach_attention_stats(point, store.root, bkey, reuse)  # bits=attn: one fp pass per window per grid
        metrics = _evaluate(cfg, model_src, meta, point, device, tracked.lightning_logger())
        check_finite(metrics, f"the evaluation of {name}")
        if nothing_quantized(point, metrics):
            tracked.tag("skipped")
            return _skip(record, tracked, name, NOTHING_QUANTIZED)
        if base is not None:
            metrics["test/baseline_ppl"] = base
            metrics["test/delta_ppl"] = metrics["test/ppl"] - base
            metrics["test/delta_ppl_pct"] = 100.0 * (metrics["test/ppl"] - base) / base
        # a plan from a full-precision pass over the whole window sees later tokens: say so
        sees_window = (
            bool(getattr(point.bits, "needs_attention", False)) and not point.eval.quantizes_whole_cache
        )
        metrics["eval/streaming_exact"] = 0.0 if sees_window else 1.0
        if sees_window:
            from kvq.alloc.qaq import WHOLE_WINDOW_NOTE

            record["notes"] = [WHOLE_WINDOW_NOTE]
        record["metrics"] = metrics
        record["status"] = "ok"
        tracked.summary(metrics)
        _summary_table(
            f"kvq {name}",
            [(k, _fmt(v)) for k, v in metrics.items() if not k.startswith("bits/") or k.endswith("/mean")],
        )
        return float(metrics.get("test/ppl", math.nan))  # retrieval, lm_eval, generate: no ppl
    except KVQError as e:
        record["reason"] = str(e)
        raise
    except ValueError as e:  # bad input found while building or loading: one line
        record["reason"] = one_line(e, root_cause=True)
        raise KVQError(record["reason"]) from e
    except InstantiationException as e:  # a node that cannot be built: its own one line
        record["reason"] = one_line(e, root_cause=True)
        raise KVQError(record["reason"]) from e
    except Terminated as e:
        record["reason"] = str(e)
        print(f"kvq: {name}: {e}", file=sys.stderr)
        raise
    except BaseException as e:
        record["reason"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise
    finally:
        record["finished"] = time.time()
        record["process"] = _process()  # which worker ran it (local_gpus: one per device)
        write_result(out_dir, record)
        if "key" in record and "reused_from" not in record and record["status"] == "ok":
            store.put(record["key"], record)
        if record["status"] == "skipped":
            store.put_verdict(record)  # kept apart, for the record: never consulted for reuse
        if tracked is not None:
            if record["status"] == "failed":
                tracked.summary({"status": "failed", "fail_reason": record["reason"]})
            tracked.finish(exit_code=0 if record["status"] in ("ok", "skipped") else 1)


def _record_key_axis(resolved: dict[str, Any], cfg: DictConfig, point: Any) -> None:
    """Write what ``kv.key_axis=auto`` resolved to into the run's recorded config (result.json,
    W&B) and say it once."""
    if OmegaConf.select(cfg, "kv.key_axis") != "auto" or point.kv is None:
        return
    axis, why = resolve_key_axis(point)
    resolved.setdefault("kv", {})["key_axis"] = axis
    if getattr(point.method, "quantizes", False):
        print(f"kvq: kv.key_axis=auto -> {axis} ({why})")


def _skip(record: dict[str, Any], tracked: Any, name: str, reason: str) -> float:
    """Record a skipped run (its one-line reason: console, W&B summary, ``result.json``)."""
    record.update(status="skipped", reason=reason, metrics={})
    log.warning("skipped: %s", reason)
    tracked.summary({"status": "skipped", "skip_reason": reason})
    print(f"kvq: skipped {name}: {reason}")
    return math.nan


def _evaluate(
    cfg: DictConfig, model_src: Any, meta: Any, point: Any, device: torch.device, logger: Any = False
) -> dict[str, float]:
    """Load the model (cached) and data, run the Lightning test loop, return the metrics."""
    import lightning as L

    from kvq.attention import register
    from kvq.calib import calibrate, calibrated_metrics
    from kvq.models import load_cached
    from kvq.module import EvalModule
    from kvq.noise import silence_library_noise
    from kvq.protocols import KVSetup, rope_of

    silence_library_noise()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    # the kvq attention = SDPA (+ QAQ statistics, + streaming-exact mixing): one model serves every job
    loaded = load_cached(model_src, device=device, attn_implementation=register())
    _note_model(loaded)
    check_weights(loaded.model, getattr(meta, "name", "the model"))
    source = instantiate(cfg.data, _convert_="all")
    dm = point.eval.datamodule(source, loaded.tokenizer, cache_dir=cfg.cache_dir)
    kv = KVSetup(
        point.method,
        point.bits,
        meta.n_layers,
        model_config=loaded.model.config,
        rope=rope_of(loaded.model),
        granularity=point.granularity,
        knobs=point.kv.knobs(),
        rotation=point.rotation,
    )
    # calibrated methods / allocators (method=nuq, bits=budget) fit on the calib windows first
    calibrate(
        kv,
        point.calib,
        loaded.model,
        loaded.tokenizer,
        source,
        store=_results_dir(cfg) / "calib",
        model_tag=f"{(getattr(model_src, 'fingerprint', None) or model_src.cache_key)()}|{device.type}",
        cache_dir=cfg.cache_dir,
        protocol=point.eval,  # the sensitivity where this protocol's queries see quantized K/V
    )
    module = EvalModule(loaded.model, point.eval, kv)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        logger=logger,
        enable_checkpointing=False,
        enable_model_summary=False,
        inference_mode=True,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.test(module, datamodule=dm, verbose=False)
    metrics = calibrated_metrics(kv, dict(module.results))  # codebooks stored once, budget report
    metrics["mem/peak_bytes"] = float(_peak_bytes(device))
    return metrics


def _baseline_ppl(
    cfg: DictConfig,
    model_src: Any,
    meta: Any,
    point: Any,
    device: torch.device,
    store: ResultStore,
    ident: dict[str, Any] | None = None,
    reuse: bool = True,
) -> float | None:
    """Perplexity of the full-precision baseline (from the store; computed once if missing, and
    again when ``reuse`` is off, so a delta is never taken against a stale baseline). Its key
    carries the run's ``identity`` (dtype, device, fingerprints, versions)."""
    if not point.method.quantizes or not point.eval.has_baseline:
        return None
    bcfg = baseline_config(cfg)
    key = experiment_key(bcfg, meta, identity=ident)
    rec = store.get(key) if reuse else None
    if rec is None or rec["status"] != "ok" or not reference_ready(point, store.root, key):
        print(f"kvq: computing the full-precision baseline (stored as {store.path(key)})")
        t0 = time.time()
        bpoint = make_point(bcfg, meta)
        attach_reference(bpoint, store.root, key, reuse=reuse)  # it writes the fp reference
        metrics = _evaluate(bcfg, model_src, meta, bpoint, device)
        check_finite(metrics, "the full-precision baseline (method=none)")
        choices = {**_choices(cfg), **BASELINE_CHOICES}
        rec = {
            "status": "ok",
            "reason": None,
            "name": "baseline-" + "-".join(choices.get(a, "?") for a in ("model", "data", "eval")),
            "choices": choices,
            "config": OmegaConf.to_container(bcfg, resolve=True),
            "metrics": metrics,
            "versions": versions(),
            "started": t0,
            "finished": time.time(),
        }
        store.put(key, rec)
    return float(rec["metrics"]["test/ppl"])
