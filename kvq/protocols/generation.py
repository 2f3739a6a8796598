"""Real generation cost: ``eval=generate`` times ``model.generate`` with kvq's cache and its peers.

For every batch size x prompt length x new tokens (``eval.batch_sizes``, ``eval.prompt_lens``,
``eval.new_tokens``) the same prompts (consecutive slices of the ``data`` node's text) are
generated greedily -- exactly ``N`` new tokens, no early stop -- with each cache of
``eval.caches``:

* ``kvq`` -- the run's method in kvq's ``QuantizedCache`` (quantized as it is stored: every new
  token is encoded when it arrives, and dequantized for every later step);
* ``dynamic`` -- transformers' ``DynamicCache`` (the full-precision reference);
* ``hf_quanto`` / ``hf_hqq`` -- transformers' ``QuantizedCache`` with the quanto / HQQ backend
  (``eval.peer_bits``: the run's key width where the backend has it, else 4;
  ``eval.peer_group_size``, ``eval.peer_residual``: transformers' defaults 64 and 128).

Per cache and grid point: ``tokens_per_s`` (new tokens / wall time of the whole ``generate``),
``decode_tokens_per_s`` (after the first new token), ``prefill_s`` (time to the first new
token), ``kv_bytes`` (what the cache holds at the end) and, on a GPU, ``peak_bytes``
(``torch.cuda.max_memory_allocated`` during the call) and ``peak_extra_bytes`` (that minus the
memory allocated before it: the cache plus activations). Metric names:
``test/gen/<cache>/b<B>_p<P>_n<N>/<figure>``; summed over the grid ``test/gen/<cache>/<figure>``
and the ratios to ``dynamic`` (``speed_vs_dynamic``, ``kv_bytes_vs_dynamic``,
``peak_extra_vs_dynamic``); ``test/tokens_per_s`` is kvq's. Each cache is warmed up once
(a 2-token generate) before it is timed; with ``bits=attn`` the full-precision pass that
collects attention for the plan is not timed. CPU peak memory is not reported (RSS does not
shrink after a call, so it cannot be attributed to one cache); ``kv_bytes`` is exact everywhere.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from kvq.memory import kv_figures, measured
from kvq.protocols.base import Batches, Protocol, layer_bits
from kvq.protocols.setup import KVSetup

__all__ = ["CACHES", "GenPoint", "GenResult", "Generate", "point_label"]

log = logging.getLogger(__name__)

#: the caches ``eval.caches`` may name
CACHES: tuple[str, ...] = ("kvq", "dynamic", "hf_quanto", "hf_hqq")
_PEER_BITS = {"hf_quanto": (2, 4), "hf_hqq": (1, 2, 3, 4, 8)}


def point_label(batch: int, prompt: int, new: int) -> str:
    """A grid point as a metric key part: ``b4_p512_n128``."""
    return f"b{batch}_p{prompt}_n{new}"


@dataclass
class GenPoint:
    """One cache's figures at one grid point (the median over ``eval.repeats`` timed calls)."""

    seconds: float
    prefill_s: float
    decode_s: float
    new_tokens: int
    kv_bytes: int
    peak_bytes: int | None = None
    peak_extra_bytes: int | None = None


@dataclass
class GenResult:
    """One grid point: the figures of every cache, the kvq cache's accounting."""

    batch: int
    prompt: int
    new: int
    caches: dict[str, GenPoint]
    kv_bytes: int = 0
    kv_elements: int = 0
    bits: dict[str, list[float]] = field(default_factory=dict)


def _nbytes(cache: Any) -> int:
    """Bytes a cache holds: kvq's and the peers' own accounting, else the layers' K/V tensors."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    from kvq.peers import tensor_nbytes

    return sum(tensor_nbytes([getattr(la, "keys", None), getattr(la, "values", None)]) for la in cache.layers)


@dataclass
class Generate(Protocol):
    """Tokens/s and memory of ``model.generate`` per cache (see the module docstring).

    Args:
        batch_sizes: sequences generated at once.
        prompt_lens: prompt tokens per sequence.
        new_tokens: tokens generated per sequence.
        caches: which caches to time (:data:`CACHES`).
        repeats: timed calls per cache and point (the median is reported).
        peer_bits: the peers' width; ``None`` = the run's key bits where the backend has them, else 4.
        peer_group_size: the peers' ``q_group_size``.
        peer_residual: the peers' ``residual_length`` (tokens kept in full precision before re-quantization).
    """

    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    prompt_lens: list[int] = field(default_factory=lambda: [512])
    new_tokens: list[int] = field(default_factory=lambda: [128])
    caches: list[str] = field(default_factory=lambda: list(CACHES))
    repeats: int = 1
    peer_bits: int | None = None
    peer_group_size: int = 64
    peer_residual: int = 128

    has_baseline: ClassVar[bool] = False
    context_knob: ClassVar[str] = "the longest of eval.prompt_lens + the most of eval.new_tokens"

    def __post_init__(self) -> None:
        for name in ("batch_sizes", "prompt_lens", "new_tokens"):
            vals = getattr(self, name)
            if not vals or any(int(v) < 1 for v in vals):
                raise ValueError(f"eval.{name} must be a non-empty list of positive integers, got {vals}")
            setattr(self, name, [int(v) for v in vals])
        bad = [c for c in self.caches if c not in CACHES]
        if not self.caches or bad:
            raise ValueError(f"eval.caches must name some of {', '.join(CACHES)}, got {self.caches}")
        if self.repeats < 1:
            raise ValueError(f"eval.repeats must be >= 1, got {self.repeats}")
        self.caches = list(dict.fromkeys(self.caches))
        self._tokenizer: Any = None
        self._warm: set[str] = set()
        self._points: list[tuple[int, int, int]] = []
        self._served = 0

    # -- what the validator asks ------------------------------------------------------------
    def cached_tokens(self, seq_len: int) -> int:
        return max(self.prompt_lens) + max(self.new_tokens)

    def context_tokens(self, seq_len: int) -> int:
        return max(self.prompt_lens) + max(self.new_tokens)

    # -- inputs -----------------------------------------------------------------------------
    def datamodule(self, source: Any, tokenizer: Any, cache_dir: str | None = None) -> Batches:
        """One batch per (batch size, prompt length, new tokens): ``{"input_ids": LongTensor[B, P]}``,
        in grid order (:meth:`score` takes the new-token count of the point it is served for)."""
        self._tokenizer = tokenizer
        self._warm, self._served, self._points = set(), 0, []
        text = source.datamodule(tokenizer, cache_dir=cache_dir).token_ids
        need = max(self.batch_sizes) * max(self.prompt_lens)
        if text.numel() < need:
            reps = -(-need // max(text.numel(), 1))
            text = text.repeat(reps)
        items = []
        for B in self.batch_sizes:
            for P in self.prompt_lens:
                ids = text[: B * P].view(B, P).clone()
                for N in self.new_tokens:
                    items.append({"input_ids": ids})
                    self._points.append((B, P, N))
        return Batches(items)

    def _new_tokens(self, ids: torch.Tensor) -> int:
        """The grid point a batch stands for (batches are served in the order of the grid)."""
        if not self._points:
            raise ValueError("eval=generate: score() before datamodule()")
        B, P, N = self._points[self._served % len(self._points)]
        self._served += 1
        if tuple(ids.shape) != (B, P):
            raise ValueError(f"eval=generate: batch {tuple(ids.shape)} is not the grid point {(B, P)}")
        return N

    # -- caches -----------------------------------------------------------------------------
    def build(self, name: str, model: torch.nn.Module, ids: torch.Tensor, kv: KVSetup) -> Any:
        """A fresh cache ``name`` for ``ids`` (``None``: the model or backend cannot have it)."""
        if name == "kvq":
            plan = kv.plan_from_pass(model, ids)[0] if kv.needs_attention else None
            return kv.cache(plan)
        if name == "dynamic":
            from transformers import DynamicCache

            return DynamicCache(config=model.config)
        from kvq.peers import HFHQQ, HFQuanto

        bits = self.peer_bits
        if bits is None:
            bits = getattr(kv.allocator, "key_bits", 4)
            bits = bits if bits in _PEER_BITS[name] else 4
        cls = HFQuanto if name == "hf_quanto" else HFHQQ
        try:
            peer = cls(nbits=bits, q_group_size=self.peer_group_size, residual_length=self.peer_residual)
            return peer.build_cache(kv)
        except (ValueError, ImportError, NotImplementedError) as e:
            log.warning("eval=generate: no %s cache for this model (%s)", name, str(e).splitlines()[0])
            return None

    def _generate(self, model: torch.nn.Module, ids: torch.Tensor, cache: Any, n: int) -> GenPoint:
        from transformers import StoppingCriteria, StoppingCriteriaList

        cuda = ids.device.type == "cuda"
        marks: list[float] = []

        class Mark(StoppingCriteria):  # called after every generated token; never stops
            def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
                if cuda and not marks:
                    torch.cuda.synchronize(ids.device)
                marks.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        tok = self._tokenizer
        pad = getattr(tok, "pad_token_id", None)
        pad = pad if pad is not None else getattr(tok, "eos_token_id", None)
        base = 0
        if cuda:
            torch.cuda.synchronize(ids.device)
            torch.cuda.reset_peak_memory_stats(ids.device)
            base = torch.cuda.memory_allocated(ids.device)
        t0 = time.perf_counter()
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            cache=cache,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
            stopping_criteria=StoppingCriteriaList([Mark()]),
        )
        if cuda:
            torch.cuda.synchronize(ids.device)
        t1 = time.perf_counter()
        first = marks[0] if marks else t1
        peak = int(torch.cuda.max_memory_allocated(ids.device)) if cuda else None
        return GenPoint(
            seconds=t1 - t0,
            prefill_s=first - t0,
            decode_s=t1 - first,
            new_tokens=ids.shape[0] * n,
            kv_bytes=_nbytes(cache),
            peak_bytes=peak,
            peak_extra_bytes=None if peak is None else peak - base,
        )

    def score(self, model: torch.nn.Module, ids: torch.Tensor, kv: KVSetup) -> GenResult:
        """Time every cache of :attr:`caches` on one grid point (``ids [B, P]``).

        A peer cache that its backend cannot build or run for these shapes (transformers' caches
        refuse sliding-window models; quanto needs group sizes that divide the stored sizes) is
        left out of the point with a warning; kvq's cache and ``DynamicCache`` are never left out.
        """
        n = self._new_tokens(ids)
        kv.check_model(model)
        out = GenResult(ids.shape[0], ids.shape[1], n, {})
        for name in self.caches:
            try:
                runs = self._time(name, model, ids, kv, n, out)
            except (ValueError, RuntimeError, NotImplementedError) as e:
                if name in ("kvq", "dynamic"):
                    raise
                log.warning(
                    "eval=generate: %s left out at %s (%s)", name, tuple(ids.shape), str(e).splitlines()[0]
                )
                continue
            if runs:
                med = statistics.median(r.seconds for r in runs)
                out.caches[name] = min(runs, key=lambda r: abs(r.seconds - med))
        return out

    def _time(
        self, name: str, model: torch.nn.Module, ids: torch.Tensor, kv: KVSetup, n: int, out: GenResult
    ) -> list[GenPoint]:
        """The timed calls of one cache (after its warm-up, once per run); kvq's accounting into ``out``."""
        if name not in self._warm:
            warm = self.build(name, model, ids, kv)
            if warm is None:
                return []
            self._generate(model, ids, warm, min(2, n))
            self._warm.add(name)
        runs = []
        for _ in range(self.repeats):
            cache = self.build(name, model, ids, kv)
            if cache is None:
                break
            runs.append(self._generate(model, ids, cache, n))
            if name == "kvq":
                m = measured(cache)
                out.kv_bytes, out.kv_elements = m.bytes, m.elements
                out.bits = cache.mean_bits_per_layer() if hasattr(cache, "mean_bits_per_layer") else {}
        return runs

    def progress(self, result: GenResult) -> dict[str, float]:
        r = result.caches.get("kvq")
        return {} if r is None or r.seconds <= 0 else {"test/tokens_per_s": r.new_tokens / r.seconds}

    def aggregate(self, results: list[GenResult], elapsed: float) -> dict[str, float]:
        """Per cache and point, per cache over the grid, the ratios to ``dynamic``, kvq's cache."""
        out: dict[str, float] = {}
        totals: dict[str, dict[str, float]] = {}
        for r in results:
            label = point_label(r.batch, r.prompt, r.new)
            for name, g in r.caches.items():
                pre = f"test/gen/{name}/{label}"
                out[f"{pre}/tokens_per_s"] = g.new_tokens / g.seconds
                if g.new_tokens > r.batch and g.decode_s > 0:
                    out[f"{pre}/decode_tokens_per_s"] = (g.new_tokens - r.batch) / g.decode_s
                out[f"{pre}/prefill_s"] = g.prefill_s
                out[f"{pre}/kv_bytes"] = float(g.kv_bytes)
                if g.peak_bytes is not None:
                    out[f"{pre}/peak_bytes"] = float(g.peak_bytes)
                    out[f"{pre}/peak_extra_bytes"] = float(g.peak_extra_bytes or 0)
                t = totals.setdefault(name, {"s": 0.0, "tok": 0.0, "dec_s": 0.0, "dec_tok": 0.0, "kv": 0.0})
                t["s"] += g.seconds
                t["tok"] += g.new_tokens
                t["dec_s"] += g.decode_s
                t["dec_tok"] += g.new_tokens - r.batch
                t["kv"] = max(t["kv"], g.kv_bytes)
                if g.peak_bytes is not None:
                    t["peak"] = max(t.get("peak", 0.0), g.peak_bytes)
                    t["extra"] = max(t.get("extra", 0.0), g.peak_extra_bytes or 0)
        for name, t in totals.items():
            pre = f"test/gen/{name}"
            out[f"{pre}/tokens_per_s"] = t["tok"] / t["s"]
            if t["dec_s"] > 0 and t["dec_tok"] > 0:
                out[f"{pre}/decode_tokens_per_s"] = t["dec_tok"] / t["dec_s"]
            out[f"{pre}/kv_bytes"] = t["kv"]
            if "peak" in t:
                out[f"{pre}/peak_bytes"], out[f"{pre}/peak_extra_bytes"] = t["peak"], t["extra"]
        ref = totals.get("dynamic")
        for name, t in totals.items():
            if ref is None or name == "dynamic":
                continue
            pre = f"test/gen/{name}"
            out[f"{pre}/speed_vs_dynamic"] = out[f"{pre}/tokens_per_s"] / out["test/gen/dynamic/tokens_per_s"]
            if ref["kv"]:
                out[f"{pre}/kv_bytes_vs_dynamic"] = t["kv"] / ref["kv"]
            if "extra" in t and ref.get("extra"):
                out[f"{pre}/peak_extra_vs_dynamic"] = t["extra"] / ref["extra"]
        if "test/gen/kvq/tokens_per_s" in out:
            out["test/tokens_per_s"] = out["test/gen/kvq/tokens_per_s"]
        nbytes, elements = sum(r.kv_bytes for r in results), sum(r.kv_elements for r in results)
        if nbytes and elements:
            out.update(kv_figures(float(nbytes), float(elements), len(results)))
        out.update(layer_bits(results))  # type: ignore[arg-type]
        out["time/eval_s"] = elapsed
        return {k: v for k, v in out.items() if math.isfinite(v)}
