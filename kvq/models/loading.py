"""In-process model cache: one model load per local grid (jobs of a Hydra multirun share it)."""

from __future__ import annotations

from typing import Any

import torch

from kvq.models.meta import LoadedModel

__all__ = ["clear_model_cache", "load_cached"]

_LOADED: dict[tuple[str, str, str | None], LoadedModel] = {}


def load_cached(
    source: Any, device: str | torch.device = "cpu", attn_implementation: str | None = None
) -> LoadedModel:
    """``source.load(...)``, reusing the model loaded last when the model config is the same.

    Jobs of a local Hydra multirun run in one process: jobs with the same model share one
    load. Only the most recent model is kept (a new one releases the old), so memory stays
    bounded on grids over several models.

    Args:
        source: a model config object (``HubModel``, ``GGUFModel``, ``SmolLM2Embedded``, ...).
        device: where the model goes.
        attn_implementation: attention implementation to load with.
    """
    key = (source.cache_key(), str(torch.device(device)), attn_implementation)
    hit = _LOADED.get(key)
    if hit is None:
        _LOADED.clear()
        hit = _LOADED[key] = source.load(device=device, attn_implementation=attn_implementation)
    return hit


def clear_model_cache() -> None:
    """Drop the cached model."""
    _LOADED.clear()
