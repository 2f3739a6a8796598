"""Task accuracy with lm-evaluation-harness, kvq's quantized cache in place: ``eval=lm_eval``.

``python train_eval.py eval=lm_eval eval.tasks=[hellaswag,piqa] method=uniform bits=b4`` runs
lm-eval's harness (``lm_eval.simple_evaluate`` on an ``HFLM`` wrapping the already loaded model)
and reports ``test/<task>/acc`` with ``test/<task>/acc_stderr`` (and every other numeric metric
of the task: ``acc_norm``, ``exact_match/<filter>``, ...), the mean accuracy over the tasks
(``test/lm_eval_acc``) and the caches' ``kv/*`` figures.

The harness calls the model's forward itself, so kvq puts its cache *inside* that forward
(:func:`quantized_forward`): while the harness runs, every forward that comes without a cache
gets a fresh ``kv.cache()`` (with ``bits=attn``, a plan from a full-precision pass over the same
tokens first) and ``use_cache=True``; every ``generate`` without one gets one too (generation
tasks). So a loglikelihood request -- context plus continuation in one forward -- is scored with
``fakequant`` semantics: every key/value a query attends to is the quantized one. The model's own
``forward``/``generate`` are restored afterwards.

Tasks come from lm-eval's registry (hub datasets: on a cluster with a network or a warm HF cache)
or from ``eval.include_path`` (a folder of task YAMLs; a local task with ``dataset_path: json``
and a JSONL file runs fully offline). ``eval.batch_size=1`` (the default) never pads: with
padding, the pad tokens of a shorter request would share per-channel key groups.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar

import torch

from kvq.attention import clear_mixed
from kvq.memory import kv_figures, measured
from kvq.protocols.base import Batches, Protocol, layer_bits
from kvq.protocols.setup import KVSetup

__all__ = ["CacheUse", "HarnessResult", "LMEval", "quantized_forward", "task_metrics"]

log = logging.getLogger(__name__)


@dataclass
class CacheUse:
    """What the caches put into the model's forwards held, summed over forwards."""

    forwards: int = 0
    generates: int = 0
    kv_bytes: int = 0
    kv_elements: int = 0
    bits: list[dict[str, list[float]]] = field(default_factory=list)


@contextmanager
def quantized_forward(model: torch.nn.Module, kv: KVSetup) -> Iterator[CacheUse]:
    """Inside the block, ``model.forward`` / ``model.generate`` called without a cache get a
    fresh quantized cache from ``kv`` (and ``use_cache=True``); both are restored after it.

    Yields:
        The :class:`CacheUse` the block's forwards add to.
    """
    use = CacheUse()
    own = {name: name in vars(model) for name in ("forward", "generate")}
    forward, generate = model.forward, model.generate
    inner = [False]

    def has_cache(kwargs: dict[str, Any]) -> bool:
        return kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None

    def plan_for(ids: torch.Tensor) -> Any:
        if not kv.needs_attention:
            return None
        inner[0] = True
        try:
            return kv.plan_from_pass(model, ids)[0]
        finally:
            inner[0] = False

    def record(cache: Any) -> None:
        if hasattr(cache, "nbytes") and hasattr(cache, "n_elements"):
            m = measured(cache)
            use.kv_bytes += m.bytes
            use.kv_elements += m.elements
            if hasattr(cache, "mean_bits_per_layer"):
                use.bits.append(cache.mean_bits_per_layer())

    def quantized(*args: Any, **kwargs: Any) -> Any:
        if inner[0] or has_cache(kwargs):
            return forward(*args, **kwargs)
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:  # inputs_embeds only: nothing kvq can plan for
            return forward(*args, **kwargs)
        cache = kv.cache(plan_for(ids))
        clear_mixed()
        out = forward(*args, **{**kwargs, "cache": cache, "use_cache": True})
        use.forwards += 1
        record(cache)
        return out

    def quantized_generate(*args: Any, **kwargs: Any) -> Any:
        if has_cache(kwargs):
            return generate(*args, **kwargs)
        ids = args[0] if args else kwargs.get("input_ids")
        cache = kv.cache(plan_for(ids) if ids is not None else None)
        out = generate(*args, **{**kwargs, "cache": cache})
        use.generates += 1
        record(cache)
        return out

    model.forward = quantized  # type: ignore[method-assign]
    model.generate = quantized_generate  # type: ignore[method-assign]
    try:
        yield use
    finally:
        for name, orig in (("forward", forward), ("generate", generate)):
            if own[name]:
                setattr(model, name, orig)
            else:
                delattr(model, name)


def task_metrics(results: dict[str, Any], tasks: list[str]) -> dict[str, float]:
    """lm-eval's ``results`` -> ``test/<task>/<metric>`` (``acc,none`` -> ``acc``; other filters
    as ``<metric>/<filter>``), ``test/<task>/samples`` and ``test/lm_eval_acc`` (the mean ``acc``
    of the requested tasks that report one). Non-numeric or non-finite values are left out."""
    out: dict[str, float] = {}
    for task, vals in (results.get("results") or {}).items():
        for k, v in vals.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            metric, _, filt = str(k).partition(",")
            if not filt:  # e.g. "samples"-like counters without a filter
                continue
            out[f"test/{task}/{metric if filt == 'none' else f'{metric}/{filt}'}"] = float(v)
    for task, n in (results.get("n-samples") or {}).items():
        eff = n.get("effective") if isinstance(n, dict) else None
        if isinstance(eff, (int, float)):
            out[f"test/{task}/samples"] = float(eff)
    accs = [out[f"test/{t}/acc"] for t in tasks if f"test/{t}/acc" in out]
    if accs:
        out["test/lm_eval_acc"] = sum(accs) / len(accs)
    return out


@dataclass
class HarnessResult:
    """The harness's metrics and what the caches held."""

    metrics: dict[str, float]
    use: CacheUse


@dataclass
class LMEval(Protocol):
    """lm-evaluation-harness tasks with kvq's cache in every forward (see the module docstring).

    Args:
        tasks: lm-eval task (or group) names, e.g. ``[hellaswag, piqa, arc_easy]``.
        include_path: a folder of extra task YAMLs (local tasks), or ``None``.
        num_fewshot: few-shot examples (``None``: the task's default).
        limit: documents per task (an int, or a fraction of the task when < 1); ``None`` = all.
        batch_size: requests per forward (1: no padding).
        bootstrap_iters: lm-eval's bootstrap resamples for the stderr of non-mean metrics.
        seed: lm-eval's random, numpy, torch and few-shot seeds.
    """

    tasks: list[str] = field(default_factory=lambda: ["hellaswag", "piqa"])
    include_path: str | None = None
    num_fewshot: int | None = None
    limit: float | None = None
    batch_size: int = 1
    bootstrap_iters: int = 1000
    seed: int = 0

    has_baseline: ClassVar[bool] = False
    requires: ClassVar[tuple[str, ...]] = ("lm_eval",)

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("eval.tasks must name at least one lm-eval task, e.g. eval.tasks=[piqa]")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"eval.limit must be > 0 or null, got {self.limit}")
        self.tasks = [str(t) for t in self.tasks]
        self._tokenizer: Any = None

    def context_tokens(self, seq_len: int) -> int | None:
        return None  # the tasks decide

    def datamodule(self, source: Any, tokenizer: Any, cache_dir: str | None = None) -> Batches:
        """One placeholder batch: the harness builds its own requests."""
        self._tokenizer = tokenizer
        return Batches([{"input_ids": torch.zeros(1, 1, dtype=torch.long)}])

    def task_manager(self) -> Any:
        """lm-eval's ``TaskManager`` with :attr:`include_path`."""
        from lm_eval.tasks import TaskManager

        return TaskManager(include_path=self.include_path) if self.include_path else TaskManager()

    def score(self, model: torch.nn.Module, ids: torch.Tensor, kv: KVSetup) -> HarnessResult:
        """Run the harness on ``model`` with kvq's cache in its forward (``ids`` is a placeholder)."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        for name in ("lm_eval", "lm-eval"):
            logging.getLogger(name).setLevel(logging.WARNING)
        kv.check_model(model)
        limit = self.limit
        if limit is not None and limit >= 1:
            limit = int(limit)
        with quantized_forward(model, kv) as use:
            lm = HFLM(pretrained=model, tokenizer=self._tokenizer, batch_size=self.batch_size)
            res = simple_evaluate(
                model=lm,
                tasks=list(self.tasks),
                num_fewshot=self.num_fewshot,
                limit=limit,
                bootstrap_iters=self.bootstrap_iters,
                task_manager=self.task_manager(),
                log_samples=False,
                random_seed=self.seed,
                numpy_random_seed=self.seed,
                torch_random_seed=self.seed,
                fewshot_random_seed=self.seed,
            )
        if not res:
            raise ValueError(f"lm-eval returned no results for eval.tasks={self.tasks}")
        return HarnessResult(task_metrics(res, self.tasks), use)

    def progress(self, result: HarnessResult) -> dict[str, float]:
        acc = result.metrics.get("test/lm_eval_acc")
        return {} if acc is None else {"test/lm_eval_acc": acc}

    def aggregate(self, results: list[HarnessResult], elapsed: float) -> dict[str, float]:
        """The harness's metrics, the caches' figures per forward, the time."""
        out: dict[str, float] = {}
        for r in results:
            out.update(r.metrics)
        use = CacheUse()
        for r in results:
            use.forwards += r.use.forwards
            use.generates += r.use.generates
            use.kv_bytes += r.use.kv_bytes
            use.kv_elements += r.use.kv_elements
            use.bits += r.use.bits
        out["test/lm_eval_forwards"] = float(use.forwards + use.generates)
        if use.kv_bytes and use.kv_elements:
            out.update(kv_figures(float(use.kv_bytes), float(use.kv_elements), use.forwards + use.generates))
        out.update(layer_bits([SimpleNamespace(bits=b) for b in use.bits]))  # type: ignore[misc]
        out["time/eval_s"] = elapsed
        return {k: v for k, v in out.items() if math.isfinite(v)}
