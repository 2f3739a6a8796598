"""Attention statistics shared across a grid: ``bits=attn`` plans from a full-precision pass over
each window, and that pass is the same for every configuration of a grid on one (model, data,
protocol) -- only the quantizer, grouping, granularity and targets differ, and they act on the
statistics after they are collected.

So the statistics of each window are computed once and stored, keyed like results (the key of
the run's full-precision baseline experiment, which names the model, its dtype and device, the
data and the protocol)::

    <results_dir>/attention/<baseline key>/<window digest>-n<last_n>-q<q_quantile>.pt

A window is named by a digest of its token ids (:func:`kvq.reference.window_digest`), so a run
only ever reads the statistics of the same tokens; the collector's own knobs (``bits.last_n``,
``bits.q_quantile``) are part of the name. Every later configuration, a resumed grid and a
parallel worker read the file instead of running the pass again; ``reuse=false`` recomputes and
overwrites. A file is written to a temporary name and renamed, so concurrent writers of the same
window leave one complete file. What is stored per layer is the reduced statistics only
(``[B, H_kv, T]`` maxima, ``[B, H_kv]`` query norms, float32): 16 windows of 512 tokens of the
embedded SmolLM2 (30 layers, 3 KV heads) take 3 MB.

Only passes whose sole product is the statistics are skipped (fakequant, decode, generation,
lm-eval: :meth:`kvq.protocols.KVSetup.plan_from_pass` without a cache); ``eval=prefill`` fills
its cache in the same forward, so it runs the pass anyway and only writes the statistics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvq.alloc.qaq import AttentionStats, AttentionStatsCollector
from kvq.reference import window_digest
from kvq.results import atomic_write

__all__ = ["STATS_DIR", "AttentionStatsStore", "attach_attention_stats", "stats_root"]

log = logging.getLogger(__name__)

#: the folder of shared attention statistics under the results store
STATS_DIR = "attention"
_VERSION = 1


def stats_root(results_dir: Path, key: str) -> Path:
    """``<results_dir>/attention/<key>``: the statistics of baseline experiment ``key``'s windows."""
    return Path(results_dir) / STATS_DIR / key


@dataclass
class AttentionStatsStore:
    """Per-window attention statistics on disk (see the module docstring).

    Args:
        root: the folder of one (model, data, protocol) (:func:`stats_root`).
        rewrite: never read, always recompute and overwrite (``reuse=false``).

    Attributes:
        hits: windows whose statistics were read.
        misses: windows whose statistics were computed (and written).
    """

    root: Path
    rewrite: bool = False
    hits: int = 0
    misses: int = 0

    def path(self, ids: torch.Tensor, collector: AttentionStatsCollector) -> Path:
        """The file of window ``ids`` ``[B, T]`` under the collector's knobs."""
        return self.root / f"{window_digest(ids)}-n{collector.last_n}-q{collector.q_quantile:g}.pt"

    def load(self, ids: torch.Tensor, collector: AttentionStatsCollector) -> bool:
        """Fill ``collector.layers`` from the store; ``False`` when there is nothing usable."""
        if self.rewrite:
            return False
        path = self.path(ids, collector)
        if not path.is_file():
            return False
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("version") != _VERSION or blob.get("shape") != list(ids.shape):
                return False
            layers = {int(li): AttentionStats(max_attn=m, q_norm=q) for li, (m, q) in blob["layers"].items()}
        except Exception as e:  # noqa: BLE001 - a damaged file is recomputed, never trusted
            log.warning("ignoring unreadable attention statistics %s (%s)", path, e)
            return False
        collector.layers = layers
        self.hits += 1
        return True

    def save(self, ids: torch.Tensor, collector: AttentionStatsCollector) -> None:
        """Write ``collector.layers`` for window ``ids`` (atomically; a failure only warns)."""
        self.misses += 1
        if not collector.layers:
            return
        path = self.path(ids, collector)
        blob = {
            "version": _VERSION,
            "shape": list(ids.shape),
            "layers": {
                li: (s.max_attn.contiguous(), s.q_norm.contiguous()) for li, s in collector.layers.items()
            },
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f: torch.save(blob, f))
        except OSError as e:
            log.warning("could not store attention statistics %s (%s)", path, e)


def attach_attention_stats(
    point: Any, results_dir: Path, key: str, reuse: bool = True
) -> AttentionStatsStore | None:
    """Give an attention-aware allocator (``point.bits``) the store of its baseline's windows.

    Args:
        point: the run's :class:`kvq.experiment.Point`.
        results_dir: the results store's folder.
        key: the experiment key of the run's baseline (as for :func:`kvq.reference.attach_reference`).
        reuse: ``cfg.reuse`` (``False``: recompute and overwrite).
    """
    bits = point.bits
    if not getattr(bits, "needs_attention", False):
        return None
    store = AttentionStatsStore(stats_root(results_dir, key), rewrite=not reuse)
    bits.stats_store = store
    return store
