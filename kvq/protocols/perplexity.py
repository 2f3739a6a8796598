"""Perplexity protocols: how a window of tokens is scored against a quantized KV cache.

* :class:`FakeQuant` — teacher-forced, one forward per window; every key/value a query attends
  to is the stored (quantized) one. The standard for perplexity tables (KVQuant).
* :class:`Prefill` — QAQ's setting: a prefix is prefilled in full precision, its cache is then
  quantized as a whole (with attention from that prefill for attention-aware bits; the only
  protocol where ``granularity=token`` is possible), and the continuation is scored against it.
* :class:`Decode` — token by token through the cache, as in generation (slow; for checks).

With attention-aware bits, :class:`FakeQuant` and :class:`Decode` first run a full-precision
pass over the window to collect attention statistics.

Every perplexity protocol is compared with the fp reference of its baseline (:mod:`kvq.reference`)
when the run attaches one: the final hidden states of the scored positions are captured (a hook
on the output embedding), and the window result carries its summed KL and argmax agreements.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvq.attention import clear_mixed
from kvq.memory import measured
from kvq.protocols.base import Protocol, Timer, WindowResult, nll_and_lse, nll_sum, window_result
from kvq.protocols.setup import KVSetup
from kvq.reference import capture_hidden

__all__ = ["Decode", "FakeQuant", "Prefill", "WindowProtocol"]


@dataclass
class WindowProtocol(Protocol):
    """A perplexity protocol over text windows, compared with the fp reference when one is attached."""

    uses_reference: ClassVar[bool] = True

    def _capture(self, model: torch.nn.Module) -> Any:
        """Capture the final hidden states of the block's forwards (only with a reference)."""
        return capture_hidden(model) if self.reference is not None else nullcontext([])

    def _compare(
        self,
        model: torch.nn.Module,
        ids: torch.Tensor,
        r: WindowResult,
        hidden: torch.Tensor,
        logits: torch.Tensor,
        lse: torch.Tensor | None = None,
    ) -> WindowResult:
        """Fill ``r.kl``, ``r.agree`` and ``r.digest`` against the reference.

        Args:
            hidden: the scored positions' final hidden states ``[B, n, H]``.
            logits: the model's logits for them ``[B, n, V]`` (the KL's run side; the last row checks
                the head).
            lse: their log-partitions ``[B * n]`` when the nll already computed them.
        """
        if self.reference is None:
            return r
        h = hidden.reshape(-1, hidden.shape[-1])
        z = logits.reshape(-1, logits.shape[-1])
        got = self.reference.observe(model, ids, h, r.nll, r.tokens, check=(h[-1], z[-1]), logits=z, lse=lse)
        if got is not None:
            r.digest, r.kl, r.agree = got
        return r


@dataclass
class FakeQuant(WindowProtocol):
    """Teacher-forced perplexity, one forward per window, all K/V quantized."""

    def score(self, model: torch.nn.Module, ids: torch.Tensor, kv: KVSetup) -> WindowResult:
        kv.check_model(model)
        plan = kv.plan_from_pass(model, ids)[0] if kv.needs_attention else None
        timer = Timer(ids.device)
        with timer:
            cache = kv.cache(plan)
            clear_mixed()
            with self._capture(model) as seen:
                logits = model(ids, cache=cache, use_cache=True).logits
        nll, lse = nll_and_lse(logits[:, :-1], ids[:, 1:])
        r = window_result(nll, ids[:, 1:].numel(), cache)
        r.forward_s = timer.seconds
        return self._compare(model, ids, r, seen[-1][:, :-1], logits[:, :-1], lse) if seen else r


@dataclass
class Prefill(WindowProtocol):
    """Prefill a prefix, quantize its cache, score the continuation against it.

    The continuation's own K/V stay in full precision while it is scored (they are the
    not-yet-committed residual), as in transformers' ``QuantizedCache``; the first continuation
    token, predicted by the full-precision prefill, is not scored.

    Args:
        prefix_len: prefix tokens; ``None`` = half the window.
    """

    prefix_len: int | None = None

    def __post_init__(self) -> None:
        if self.prefix_len is not None and self.prefix_len < 1:
            raise ValueError(f"eval.prefix_len must be a positive integer or null, got {self.prefix_len}")

    @property
    def quantizes_whole_cache(self) -> bool:
        return True

    def prefix_tokens(self, seq_len: int) -> int:
        return seq_len // 2 if self.prefix_len is None else self.prefix_len

    def cached_tokens(self, seq_len: int) -> int:
        return self.prefix_tokens(seq_len)

    def split(self, T: int) -> int:
        P = self.prefix_tokens(T)
        if not 1 <= P <= T - 2:
            raise ValueError(
                f"eval.prefix_len={P} leaves nothing to score in a window of {T}: lower it or raise data.seq_len"
            )
        return P

    def score(self, model: torch.nn.Module, ids: torch.Tensor, kv: KVSetup) -> WindowResult:
        P = self.split(ids.shape[1])
        timer = Timer(ids.device)
        with timer:  # the prefill (its pass is the statistics pass of bits=attn) and the continuation
            cache = kv.prefilled(model, ids[:, :P])
        m = measured(cache)
        bits = cache.mean_bits_per_layer()
        with timer, self._capture(model) as seen:
            logits = model(ids[:, P:], cache=cache, use_cache=True).logits
        nll, lse = nll_and_lse(logits[:, :-1], ids[:, P + 1 :])
        r = WindowResult(nll, ids[:, P + 1 :].numel(), m.bytes, m.elements, bits, forward_s=timer.seconds)
        return self._compare(model, ids, r, seen[-1][:, :-1], logits[:, :-1], lse) if seen else r


@dataclass
class Decode(WindowProtocol):
    """Token-by-token scoring through the cache, as in generation."""

    def cached_tokens(self, seq_len: int) -> int:
        return seq_len - 1  # the last token is never fed

    def score(self, model: torch.nn.Module, ids: torch.Tensor, kv: KVSetup) -> WindowResult:
        plan = kv.plan_from_pass(model, ids)[0] if kv.needs_attention else None
        cache = kv.cache(plan)
        nll = 0.0
        timer = Timer(ids.device)
        steps = []
        with self._capture(model) as seen:
            for t in range(ids.shape[1] - 1):
                with timer:
                    logits = model(ids[:, t : t + 1], cache=cache, use_cache=True).logits
                nll += nll_sum(logits[:, -1:], ids[:, t + 1 : t + 2])
                if seen:
                    steps.append(logits[:, -1:])
        r = window_result(nll, ids[:, 1:].numel(), cache)
        r.forward_s = timer.seconds
        return self._compare(model, ids, r, torch.cat(seen, dim=1), torch.cat(steps, dim=1)) if seen else r
