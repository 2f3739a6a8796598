"""Peer baselines inside kvq: transformers' own ``QuantizedCache`` (quanto and HQQ backends).

``method=hf_quanto`` / ``method=hf_hqq`` put transformers' ``QuantizedCache`` in the model, so
one grid and one ``kvq report`` compare kvq's quantizers with what users would otherwise use.
That cache quantizes a prefill only for storage and returns the unquantized K/V of the current
call, so it is evaluated with ``eval=prefill`` (the prefix is quantized, the continuation scored
against it); the validator rejects other protocols. Memory is read off the tensors it holds
(packed codes, scales and zero-points in the model's compute dtype, the full-precision residual).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import QuantizedCache as HFQuantizedCacheBase

__all__ = ["HFHQQ", "HFPeer", "HFQuanto", "PeerCache", "tensor_nbytes"]


def tensor_nbytes(obj: Any) -> int:
    """Bytes held by a tensor, a tensor subclass (recursively flattened), or containers of them."""
    if isinstance(obj, torch.Tensor):
        if hasattr(obj, "__tensor_flatten__") and type(obj) is not torch.Tensor:
            names, _ = obj.__tensor_flatten__()
            return sum(tensor_nbytes(getattr(obj, n)) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_nbytes(v) for v in obj)
    return 0


class PeerCache(HFQuantizedCacheBase):
    """transformers' ``QuantizedCache`` with kvq's accounting interface."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._kv_shape: tuple[int, int, int] | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ):
        B, H, _, d = key_states.shape
        self._kv_shape = (B, H, d)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def quantize_now(self, plan: Any = None) -> None:
        """Nothing to do: this cache quantizes its prefill as it stores it."""

    def nbytes(self) -> int:
        total = 0
        for layer in self.layers:
            total += tensor_nbytes(getattr(layer, "_quantized_keys", None))
            total += tensor_nbytes(getattr(layer, "_quantized_values", None))
            total += tensor_nbytes(layer.keys) + tensor_nbytes(layer.values)
        return total

    def n_elements(self) -> int:
        if self._kv_shape is None:
            return 0
        B, H, d = self._kv_shape
        return sum(2 * B * H * layer.get_seq_length() * d for layer in self.layers)

    def mean_bits_per_layer(self) -> dict[str, list[float]]:
        nbits = float(self.layers[0].nbits) if self.layers else 0.0
        return {"key": [nbits] * len(self.layers), "value": [nbits] * len(self.layers)}


@dataclass
class HFPeer:
    """Base of the peer methods: the settings of transformers' ``QuantizedCache``.

    Args:
        nbits: code width (quanto: 2 or 4; HQQ: 1, 2, 3, 4 or 8).
        q_group_size: elements per group along the quantization axis (``null`` = 64, transformers'
            default).
        residual_length: newest tokens kept in full precision before re-quantization.
        axis_key: axis of the key groups (0 = per channel over tokens, as KIVI; 1/-1 = per token).
        axis_value: axis of the value groups.
    """

    nbits: int = 4
    q_group_size: int | None = 64
    residual_length: int = 128
    axis_key: int = 0
    axis_value: int = 0

    backend: ClassVar[str] = ""
    supported_bits: ClassVar[tuple[int, ...]] = ()

    # -- the method interface (kvq.method.Method) -----------------------------------------
    quantizes: ClassVar[bool] = True
    #: the storing call gets its own K/V back unquantized: measure with a whole-cache protocol
    one_pass_quantized: ClassVar[bool] = False
    #: one width (nbits) for keys and values
    one_width: ClassVar[bool] = True
    error_follows_range: ClassVar[bool] = True
    #: transformers' cache has no kvq unit layout, sinks, outliers, per-channel key groups or rotation
    #: (bits, grouping and kv.residual reach it through nbits, q_group_size and residual_length)
    ignores: ClassVar[tuple[str, ...]] = (
        "granularity",
        "kv.sinks",
        "kv.outlier_ratio",
        "kv.key_axis",
        "kv.key_group",
        "kv.pre_rope",
        "rotation",
    )
    #: nbits and q_group_size come from the bits and grouping options (conf/method/hf_*.yaml)
    resolved_axes: ClassVar[tuple[str, ...]] = ("bits", "grouping")

    def __post_init__(self) -> None:
        if self.nbits not in self.supported_bits:
            raise ValueError(
                f"method=hf_{self.backend} supports bits {', '.join(map(str, self.supported_bits))}, got {self.nbits}"
            )
        if self.q_group_size is None:  # transformers' QuantizedCache default
            self.q_group_size = 64
        if self.q_group_size < 1:
            raise ValueError(f"method.q_group_size must be a positive integer, got {self.q_group_size}")
        if self.residual_length < 0:
            raise ValueError(f"method.residual_length must be >= 0, got {self.residual_length}")

    def build_cache(self, setup: Any, plan: Any = None, deferred: bool = False) -> PeerCache:
        """A fresh transformers ``QuantizedCache`` for the setup's model (``plan`` and ``deferred``
        do not apply: it quantizes what it stores, with one width)."""
        return PeerCache(
            backend=self.backend,
            config=setup.model_config,
            nbits=self.nbits,
            axis_key=self.axis_key,
            axis_value=self.axis_value,
            q_group_size=self.q_group_size,
            residual_length=self.residual_length,
        )


@dataclass
class HFQuanto(HFPeer):
    """transformers ``QuantizedCache(backend="quanto")`` (optimum-quanto)."""

    backend: ClassVar[str] = "quanto"
    name: ClassVar[str] = "hf_quanto"
    supported_bits: ClassVar[tuple[int, ...]] = (2, 4)


@dataclass
class HFHQQ(HFPeer):
    """transformers ``QuantizedCache(backend="hqq")`` (Half-Quadratic Quantization)."""

    backend: ClassVar[str] = "hqq"
    name: ClassVar[str] = "hf_hqq"
    supported_bits: ClassVar[tuple[int, ...]] = (1, 2, 3, 4, 8)
