"""The quantized KV cache: knobs and spec, layers, and the transformers ``Cache`` made of them."""

from kvq.cache.cache import QuantizedCache, layer_types_of, watch_padding
from kvq.cache.layers import QuantizedLayer, QuantizedSlidingLayer
from kvq.cache.spec import KINDS, CacheKnobs, KVQuantSpec, KVSettings, NonFiniteKVError, storage_dtype
from kvq.granularity import GRANULARITIES, Granularity

__all__ = [
    "GRANULARITIES",
    "KINDS",
    "CacheKnobs",
    "Granularity",
    "KVQuantSpec",
    "KVSettings",
    "NonFiniteKVError",
    "QuantizedCache",
    "QuantizedLayer",
    "QuantizedSlidingLayer",
    "layer_types_of",
    "storage_dtype",
    "watch_padding",
]
