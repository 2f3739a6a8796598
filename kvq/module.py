"""The LightningModule that evaluates a model with its KV cache quantized."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning as L
import torch

from kvq.memory import kv_figures
from kvq.protocols import KVSetup, Protocol, WindowResult

__all__ = ["EvalModule"]


class EvalModule(L.LightningModule):
    """Scores token windows with a protocol and accumulates perplexity and KV memory.

    Run it with ``lightning.Trainer(accelerator="auto", devices=1).test(module, datamodule)``.
    Per window it logs ``test/window_ppl``; at the end of the epoch it logs ``test/ppl``,
    ``test/nll``, ``test/tokens``, ``kv/*`` and per-layer mean bits (``bits/key/layer_XX``,
    ``bits/value/layer_XX``). :attr:`results` holds the same numbers as plain floats.

    Args:
        model: a causal LM (``transformers``), in eval mode.
        protocol: how a window is scored (``FakeQuant``, ``Prefill``, ``Decode``).
        kv: quantization settings and bit allocator.
    """

    def __init__(self, model: torch.nn.Module, protocol: Protocol, kv: KVSetup) -> None:
        super().__init__()
        self.model = model
        self.protocol = protocol
        self.kv = kv
        self.windows: list[WindowResult] = []
        self.results: dict[str, float] = {}
        self._t0 = 0.0

    def on_test_epoch_start(self) -> None:
        self.windows = []
        if torch.cuda.is_available() and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            torch.cuda.synchronize(self.device)
        self._t0 = time.perf_counter()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ids = batch["input_ids"]
        r = self.protocol.score(self.model, ids, self.kv)
        self.windows.append(r)
        self.log(
            "test/window_ppl", math.exp(r.nll / max(r.tokens, 1)), prog_bar=True, batch_size=ids.shape[0]
        )

    def on_test_epoch_end(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - self._t0
        self.results = self.aggregate(self.windows, elapsed)
        for k, v in self.results.items():
            self.log(k, v, batch_size=1)

    @staticmethod
    def aggregate(windows: list[WindowResult], elapsed: float) -> dict[str, float]:
        """Windows -> metrics (perplexity over all scored tokens, memory over all windows)."""
        nll = sum(w.nll for w in windows)
        tokens = sum(w.tokens for w in windows)
        kv_bytes = sum(w.kv_bytes for w in windows)
        elements = sum(w.kv_elements for w in windows)
        out: dict[str, float] = {
            "test/nll": nll / tokens if tokens else math.nan,
            "test/ppl": math.exp(nll / tokens) if tokens else math.nan,
            "test/tokens": float(tokens),
            "test/windows": float(len(windows)),
            **kv_figures(float(kv_bytes), float(elements), len(windows)),
            "time/eval_s": elapsed,
            "time/tokens_per_s": tokens / elapsed if elapsed > 0 else math.nan,
        }
        for kind in ("key", "value"):
            per_layer: list[list[float]] = [w.bits.get(kind, []) for w in windows]
            if per_layer and per_layer[0]:
                for li in range(len(per_layer[0])):
                    out[f"bits/{kind}/layer_{li:02d}"] = sum(p[li] for p in per_layer) / len(per_layer)
                out[f"bits/{kind}/mean"] = sum(
                    out[f"bits/{kind}/layer_{li:02d}"] for li in range(len(per_layer[0]))
                ) / len(per_layer[0])
        return out

    def configure_optimizers(self) -> Any:  # evaluation only
        return None
