"""Pure tensor math of KV quantization: quantizers, grouping, outliers, bit packing, rotations."""

from kvq.quant import fused
from kvq.quant.base import MAX_BITS, MIN_BITS, Grouping, QPart, QTensor, Quantizer
from kvq.quant.methods import (
    AdaptiveQuantizer,
    FullPrecision,
    NormalQuantizer,
    UniformQuantizer,
    gaussian_codebook,
)
from kvq.quant.nuq import NUQQuantizer, weighted_kmeans
from kvq.quant.packing import pack_codes, packed_nbytes, unpack_codes
from kvq.quant.rotation import HadamardRotation, NoRotation, Rotation, fwht

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "AdaptiveQuantizer",
    "FullPrecision",
    "Grouping",
    "HadamardRotation",
    "NUQQuantizer",
    "NoRotation",
    "NormalQuantizer",
    "QPart",
    "QTensor",
    "Quantizer",
    "Rotation",
    "UniformQuantizer",
    "fused",
    "fwht",
    "gaussian_codebook",
    "pack_codes",
    "packed_nbytes",
    "unpack_codes",
    "weighted_kmeans",
]
