"""The protocol interface: how a batch is scored against a quantized KV cache and how the
per-batch results become a run's metrics.

A protocol declares what the validator needs to know about it (:attr:`Protocol.quantizes_whole_cache`,
:meth:`Protocol.cached_tokens`, :meth:`Protocol.context_tokens`, ...) and what the run does around
it (:attr:`Protocol.has_baseline`: a full-precision baseline gives ``test/delta_ppl``;
:attr:`Protocol.uses_reference`: the fp reference of :mod:`kvq.reference` gives the distribution
metrics). Protocols that build their own inputs (retrieval prompts, harness tasks, generation
grids) serve them with :class:`Batches`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from kvq.memory import kv_figures, measured
from kvq.protocols.setup import KVSetup
from kvq.reference import distribution_metrics, log_partition

__all__ = [
    "Batches",
    "Protocol",
    "Timer",
    "WindowResult",
    "layer_bits",
    "nll_and_lse",
    "nll_sum",
    "window_result",
]


@dataclass
class WindowResult:
    """One window's score and cache footprint.

    Attributes:
        nll: summed negative log-likelihood (nats) of the scored tokens.
        tokens: number of scored tokens.
        kv_bytes: bytes the cache stored.
        kv_elements: K/V elements the cache represented.
        bits: mean code width per layer, ``{"key": [...], "value": [...]}``.
        kl: summed KL(p_fp || p) over the scored tokens (``None``: not compared with a reference).
        agree: scored tokens whose argmax equals the fp argmax (``None``: not compared).
        digest: the window's name in the fp reference (:func:`kvq.reference.window_digest`).
        forward_s: seconds of the quantized forward(s) alone: the model through the quantized cache
            (quantization included), not the full-precision pass of ``bits=attn`` nor the
            comparison with the reference (``time/forward_s``: what a grid cannot share).
    """

    nll: float
    tokens: int
    kv_bytes: int
    kv_elements: int
    bits: dict[str, list[float]] = field(default_factory=dict)
    kl: float | None = None
    agree: int | None = None
    digest: str | None = None
    forward_s: float = 0.0


class Timer:
    """Seconds spent inside ``with timer:`` blocks, summed (the device synchronised at the edges)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.seconds = 0.0
        self._cuda = device is not None and device.type == "cuda"
        self._t0 = 0.0

    def __enter__(self) -> Timer:
        if self._cuda:
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self._t0


def nll_and_lse(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Summed cross-entropy of ``logits [B, t, V]`` against ``targets [B, t]`` (summed in float64)
    and each position's log-partition ``[B * t]`` (float32), computed once for the nll and the KL
    against the fp reference (:func:`kvq.reference.summary_stats`)."""
    z = logits.detach().reshape(-1, logits.shape[-1]).float()
    lse = log_partition(z)
    picked = z.gather(1, targets.reshape(-1, 1).to(z.device)).squeeze(1)
    return float((lse - picked).sum(dtype=torch.float64)), lse


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed cross-entropy of ``logits [B, t, V]`` against ``targets [B, t]``."""
    return nll_and_lse(logits, targets)[0]


def window_result(nll: float, tokens: int, cache: Any) -> WindowResult:
    m = measured(cache)
    return WindowResult(nll, tokens, m.bytes, m.elements, cache.mean_bits_per_layer())


@dataclass
class Protocol:
    """Base class of the ``eval`` config nodes.

    A protocol scores one batch at a time (:meth:`score`, called by
    :class:`kvq.module.EvalModule`'s test step), turns the per-batch results into the run's
    metrics (:meth:`aggregate`) and may serve its own batches (:meth:`datamodule`; the default
    is the text windows of the ``data`` node). The perplexity protocols share this default
    aggregation; protocols with other results override :meth:`aggregate` and :meth:`progress`.

    Attributes:
        reference: the fp reference the run records or compares with (set by
            :func:`kvq.reference.attach_reference`; not a config field).
    """

    reference: Any = field(default=None, init=False, repr=False, compare=False)

    #: a full-precision baseline of the same protocol gives ``test/baseline_ppl`` and the deltas
    has_baseline: ClassVar[bool] = True
    #: the scored windows are compared with the fp reference (``test/kl``, ``test/top1_agree``)
    uses_reference: ClassVar[bool] = False
    #: the knobs that set :meth:`context_tokens` (named by the validator's context rule)
    context_knob: ClassVar[str] = "data.seq_len"
    #: Python modules the protocol imports when it runs (the validator skips the run without them)
    requires: ClassVar[tuple[str, ...]] = ()

    def score(self, model: torch.nn.Module, ids: torch.Tensor, kv: KVSetup) -> Any:
        """Score one batch (``ids [B, T]`` for the text-window protocols)."""
        raise NotImplementedError

    def datamodule(self, source: Any, tokenizer: Any, cache_dir: str | None = None) -> Any:
        """The batches to score: the ``data`` node's token windows by default."""
        return source.datamodule(tokenizer, cache_dir=cache_dir)

    def progress(self, result: Any) -> dict[str, float]:
        """What the progress bar shows after a batch (the window's perplexity by default)."""
        return {"test/window_ppl": math.exp(result.nll / max(result.tokens, 1))}

    def aggregate(self, results: list[Any], elapsed: float) -> dict[str, float]:
        """Per-batch results -> metrics: perplexity over all scored tokens, KV memory per window,
        mean code width per layer (``bits/{key,value}/layer_XX`` and ``.../mean``)."""
        nll = sum(w.nll for w in results)
        tokens = sum(w.tokens for w in results)
        kv_bytes = sum(w.kv_bytes for w in results)
        elements = sum(w.kv_elements for w in results)
        out: dict[str, float] = {
            "test/nll": nll / tokens if tokens else math.nan,
            "test/ppl": math.exp(nll / tokens) if tokens else math.nan,
            "test/tokens": float(tokens),
            "test/windows": float(len(results)),
            **kv_figures(float(kv_bytes), float(elements), len(results)),
            "time/eval_s": elapsed,
            "time/forward_s": sum(getattr(w, "forward_s", 0.0) for w in results),
            "time/tokens_per_s": tokens / elapsed if elapsed > 0 else math.nan,
        }
        out.update(layer_bits(results))
        if self.reference is not None:
            self.reference.finish()
            out.update(distribution_metrics(results, self.reference))
        return out

    @property
    def quantizes_whole_cache(self) -> bool:
        """Whether the cache is quantized at once after a prefill (``granularity=token`` works)."""
        return False

    def prefix_tokens(self, seq_len: int) -> int | None:
        """Tokens prefilled before the whole cache is quantized (``None``: not such a protocol)."""
        return None

    def cached_tokens(self, seq_len: int) -> int:
        """Most tokens the cache holds when it quantizes, in a window of ``seq_len``."""
        return seq_len

    def context_tokens(self, seq_len: int) -> int | None:
        """Most positions one sequence of this protocol occupies in the model (``data.seq_len``
        for window protocols; prompt plus answer for retrieval and generation; ``None``: unknown)."""
        return seq_len


class _Items(Dataset):
    def __init__(self, items: Sequence[dict[str, torch.Tensor]]) -> None:
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return self.items[idx]


class Batches(L.LightningDataModule):
    """Ready batches, served in order: for protocols that build their own inputs.

    Args:
        items: one batch each, ``{"input_ids": LongTensor[B, T]}`` (served as is, not collated).
    """

    def __init__(self, items: Sequence[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.items = list(items)

    def test_dataloader(self) -> DataLoader:
        """The batches in order (``batch_size=None``: no extra batch dimension)."""
        return DataLoader(_Items(self.items), batch_size=None, shuffle=False, num_workers=0)


def layer_bits(results: list[WindowResult]) -> dict[str, float]:
    """Mean code width per layer over windows: ``bits/{key,value}/layer_XX`` and ``.../mean``."""
    out: dict[str, float] = {}
    for kind in ("key", "value"):
        per_layer: list[list[float]] = [w.bits.get(kind, []) for w in results]
        if per_layer and per_layer[0]:
            n = len(per_layer[0])
            for li in range(n):
                out[f"bits/{kind}/layer_{li:02d}"] = sum(p[li] for p in per_layer) / len(per_layer)
            out[f"bits/{kind}/mean"] = sum(out[f"bits/{kind}/layer_{li:02d}"] for li in range(n)) / n
    return out
