"""Pure tensor math of KV quantization: quantizers, grouping, outliers, bit packing."""

from kvq.quant.base import MAX_BITS, MIN_BITS, Grouping, QPart, QTensor, Quantizer
from kvq.quant.methods import (
    AdaptiveQuantizer,
    FullPrecision,
    NormalQuantizer,
    UniformQuantizer,
    gaussian_codebook,
)
from kvq.quant.packing import pack_codes, packed_nbytes, unpack_codes

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "AdaptiveQuantizer",
    "FullPrecision",
    "Grouping",
    "NormalQuantizer",
    "QPart",
    "QTensor",
    "Quantizer",
    "UniformQuantizer",
    "gaussian_codebook",
    "pack_codes",
    "packed_nbytes",
    "unpack_codes",
]
