"""KV-cache memory: the bits-per-element formula and the bytes a cache actually holds.

:func:`predict_bytes` computes, from shapes and settings alone, the bytes a
:class:`~kvq.cache.QuantizedCache` stores; :func:`measured` reads them off the cache's tensors.
The two must agree exactly (tested). Per quantized unit of ``D`` features at ``b`` bits:

* payload: ``b`` bits per element (codes packed in runs of 8: ``ceil(n / 8) * b`` bytes);
* metadata: ``16 * m(b)`` bits per group (``m`` = 2 for uniform asymmetric and normal, 1 for
  uniform symmetric, ``2**b`` for adaptive's codebook), ``ceil(D / g)`` groups per unit;
* outliers: ``2k`` per unit, each an fp16 value plus an index (8/16/32 bits by ``D``);
* per-unit widths (attention-aware bits): one uint8 per unit when widths differ;
* sinks and residual tokens: full precision (``fp_dtype``).

All on the real number of KV heads (GQA), so ``kv/bytes_fp16`` is what an fp16
``DynamicCache`` would hold for the same tokens.

**Stored once per model** (calibrated codebooks of ``method=nuq``): not in any window's cache, so
a run counts them once and amortises them over every K/V element it evaluated
(:func:`amortised`)::

    kv/bits_per_element = 8 * (sum_w cache_bytes_w + codebook_bytes) / sum_w elements_w

with ``kv/cache_bits_per_element`` the same without the codebooks, and ``kv/codebook_bytes`` the
bytes of every codebook the run used (2 bytes per fp16 level). A deployment serving more tokens
amortises them further: the figure is an upper bound for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kvq.cache import KVQuantSpec

__all__ = [
    "CacheShape",
    "Measured",
    "amortised",
    "bits_per_element",
    "kv_figures",
    "measured",
    "metrics",
    "predict_bytes",
]


@dataclass(frozen=True)
class CacheShape:
    """The shape of a model's KV cache.

    Args:
        n_layers: decoder layers.
        n_kv_heads: KV heads per layer (not query heads).
        head_dim: features per head.
        batch: sequences held.
    """

    n_layers: int
    n_kv_heads: int
    head_dim: int
    batch: int = 1


def bits_per_element(spec: KVQuantSpec, shape: CacheShape, bits: int, kind: str = "key") -> float:
    """Average stored bits per quantized element at a fixed width (payload + overheads).

    Exact when the number of codes in a chunk is a multiple of 8 (it is for every real head
    size); sinks and residual tokens are not included (see :func:`predict_bytes`).
    """
    q = spec.quantizer(kind)  # type: ignore[arg-type]
    D = spec.unit.unit_size(shape)
    return q.nbytes_formula(8, D, bits) * 8 / (8 * D)


def predict_bytes(
    spec: KVQuantSpec,
    shape: CacheShape,
    total_tokens: int,
    chunks: list[int],
    fp_elem_size: int,
    widths: list[dict[str, dict[int, int]]] | None = None,
    bits: int | tuple[int, int] = 4,
) -> int:
    """Bytes a :class:`QuantizedCache` stores, from shapes and settings alone.

    Args:
        spec: the cache's settings.
        shape: the model's KV shape.
        total_tokens: tokens held per layer.
        chunks: tokens in each quantized chunk, in order (one chunk per flush; with ``head`` or
            ``layer`` granularity every layer holds the same chunks; with ``token`` one chunk
            spans all layers). The other ``total_tokens - sum(chunks)`` tokens are sinks and
            residual, in full precision.
        fp_elem_size: bytes per full-precision element.
        widths: per chunk, ``{"key": {width: units}, "value": {width: units}}`` when widths vary
            per unit (attention-aware bits); ``None`` = fixed ``bits``.
        bits: fixed width, or ``(key_bits, value_bits)``.
    """
    per_token_layer = shape.batch * shape.n_kv_heads * shape.head_dim  # elements, K or V
    fp_tokens = total_tokens - sum(chunks)
    total = 2 * shape.n_layers * fp_tokens * per_token_layer * fp_elem_size
    layer_copies = 1 if spec.unit.spans_layers else shape.n_layers
    kb, vb = (bits, bits) if isinstance(bits, int) else bits
    for i, t in enumerate(chunks):
        for kind, b in (("key", kb), ("value", vb)):
            if kind == "key" and spec.key_axis == "channel":  # one unit per channel per key group
                D = spec.key_group
                n_units = per_token_layer * t // spec.key_group
            else:
                D = spec.unit.unit_size(shape)
                n_units = t * spec.unit.units_per_token(shape.batch, shape.n_kv_heads)
            w = b if widths is None else widths[i][kind]
            q = spec.quantizer(kind)  # type: ignore[arg-type]
            total += layer_copies * q.nbytes_formula(n_units, D, w, fp_elem_size=fp_elem_size)
    return total


@dataclass
class Measured:
    """What a cache holds: stored bytes and represented elements."""

    bytes: int
    elements: int


def measured(cache: Any) -> Measured:
    """Bytes actually held by the cache tensors, and the K/V elements they represent.

    Args:
        cache: a :class:`~kvq.cache.QuantizedCache` or a peer cache (:mod:`kvq.peers`): anything
            with ``nbytes()`` and ``n_elements()``.
    """
    return Measured(bytes=cache.nbytes(), elements=cache.n_elements())


def kv_figures(stored_bytes: float, elements: float, n: int = 1) -> dict[str, float]:
    """The KV-cache figures of ``n`` caches that held ``stored_bytes`` for ``elements`` K/V elements
    in all: ``kv/bytes`` and ``kv/bytes_fp16`` (per cache), ``kv/bits_per_element``,
    ``kv/compression`` (NaN where undefined: no element, or nothing stored)."""
    fp16 = 2.0 * elements
    return {
        "kv/bytes": stored_bytes / max(n, 1),
        "kv/bytes_fp16": fp16 / max(n, 1),
        "kv/bits_per_element": 8.0 * stored_bytes / elements if elements else math.nan,
        "kv/compression": fp16 / stored_bytes if stored_bytes else math.nan,
    }


def metrics(cache: Any) -> dict[str, float]:
    """``kv/bytes``, ``kv/bytes_fp16``, ``kv/bits_per_element``, ``kv/compression`` of one cache."""
    m = measured(cache)
    return kv_figures(float(m.bytes), float(m.elements))


def amortised(figures: dict[str, float], once_bytes: float, n: int | None = None) -> dict[str, float]:
    """The KV figures of a run with ``once_bytes`` stored once per model (codebooks) besides its caches.

    Args:
        figures: a run's metrics with ``kv/bytes`` and ``kv/bytes_fp16`` per cache (:func:`kv_figures`)
            and ``test/windows`` (or ``n``) caches.
        once_bytes: bytes stored once for the whole run.
        n: caches (windows); default ``figures["test/windows"]``.

    Returns:
        ``kv/codebook_bytes``, ``kv/cache_bits_per_element`` (the caches alone) and the amortised
        ``kv/bits_per_element`` and ``kv/compression`` (module docstring), to update ``figures`` with.
    """
    n = int(n if n is not None else figures.get("test/windows", 1) or 1)
    cache_bytes = float(figures.get("kv/bytes", math.nan)) * n
    elements = float(figures.get("kv/bytes_fp16", math.nan)) * n / 2.0
    out = kv_figures(cache_bytes + float(once_bytes), elements, n)
    return {
        "kv/codebook_bytes": float(once_bytes),
        "kv/cache_bits_per_element": float(figures.get("kv/bits_per_element", math.nan)),
        "kv/bits_per_element": out["kv/bits_per_element"],
        "kv/compression": out["kv/compression"],
    }
