"""The LightningModule that evaluates a model with its KV cache quantized."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from kvq.protocols import KVSetup, Protocol

__all__ = ["EvalModule"]


class EvalModule(L.LightningModule):
    """Scores batches with a protocol and accumulates its metrics.

    Run it with ``lightning.Trainer(accelerator="auto", devices=1).test(module, datamodule)``.
    Per batch it logs what the protocol shows on the progress bar (``test/window_ppl`` for the
    perplexity protocols); at the end of the epoch it logs the protocol's aggregate
    (:meth:`kvq.protocols.Protocol.aggregate`: ``test/ppl``, ``kv/*``, per-layer mean bits ...).
    :attr:`results` holds the same numbers as plain floats.

    Args:
        model: a causal LM (``transformers``), in eval mode.
        protocol: how a batch is scored (``FakeQuant``, ``Prefill``, ``Decode``, ...).
        kv: quantization settings and bit allocator.
    """

    def __init__(self, model: torch.nn.Module, protocol: Protocol, kv: KVSetup) -> None:
        super().__init__()
        self.model = model
        self.protocol = protocol
        self.kv = kv
        self.windows: list[Any] = []
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
        for k, v in self.protocol.progress(r).items():
            self.log(k, v, prog_bar=True, batch_size=ids.shape[0])

    def on_test_epoch_end(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - self._t0
        self.results = self.protocol.aggregate(self.windows, elapsed)
        for k, v in self.results.items():
            self.log(k, v, batch_size=1)

    def configure_optimizers(self) -> Any:  # evaluation only
        return None
