"""The interface every ``method`` option implements: kvq's quantizers and the peer caches alike.

A method is one class (a ``@dataclass`` whose fields are its config knobs) plus one YAML in
``conf/method/``. It builds the cache the model runs with, and declares what it does, so that
no caller -- the run, the protocols, the validator -- ever asks *what kind* of method it is:

* :attr:`~Method.quantizes` -- ``False`` only for the full-precision baseline (``method=none``);
* :attr:`~Method.one_pass_quantized` -- a forward that stores K/V also attends to the quantized
  ones (kvq's cache); ``False`` for a cache that hands back the unquantized K/V of the call that
  stores them (transformers' ``QuantizedCache``), which only a whole-cache protocol can measure;
* :attr:`~Method.one_width` -- keys and values always take one fixed width (no per-unit widths,
  no ``bits.value_bits``);
* :attr:`~Method.error_follows_range` -- the error at ``b`` bits follows QAQ's uniform model
  (``~ range / 2**b``), so ``bits=attn`` means what it computed without the bridge;
* :attr:`~Method.ignores` -- axes and ``kv.*`` knobs that do not change what the method does
  (setting them makes a duplicate experiment);
* :attr:`~Method.resolved_axes` -- axes whose option reaches the method only through its own
  fields (interpolated in its YAML, e.g. ``group_size: ${grouping.size}``): the method's fields
  alone then say what the experiment is (:func:`kvq.validate.experiment_key`);
* :meth:`~Method.build_cache` -- the transformers ``Cache`` for one window (double dispatch:
  a quantizer asks the setup for kvq's ``QuantizedCache`` of itself, a peer builds its own).

``kvq.quant.Quantizer`` implements it for every quantizer (a new one only subclasses it);
``kvq.peers.HFPeer`` for transformers' caches.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol, runtime_checkable

__all__ = ["KNOBS", "CacheSetup", "Method"]

#: the axes and ``kv.*`` knobs a method may ignore (names as a user writes them on the command line)
KNOBS: tuple[str, ...] = (
    "bits",
    "grouping",
    "granularity",
    "kv.residual",
    "kv.sinks",
    "kv.outlier_ratio",
    "kv.key_axis",
    "kv.key_group",
    "kv.pre_rope",
    "rotation",
)


class CacheSetup(Protocol):
    """What :meth:`Method.build_cache` gets (:class:`kvq.protocols.KVSetup` implements it)."""

    n_layers: int
    model_config: Any

    def quantized_cache(self, quantizer: Any, plan: Any = None, deferred: bool = False) -> Any:
        """kvq's ``QuantizedCache`` quantizing keys and values with ``quantizer``."""
        ...


@runtime_checkable
class Method(Protocol):
    """A ``method`` option (see the module docstring)."""

    name: ClassVar[str]
    quantizes: ClassVar[bool]
    one_pass_quantized: ClassVar[bool]
    one_width: ClassVar[bool]
    error_follows_range: ClassVar[bool]
    ignores: ClassVar[tuple[str, ...]]
    resolved_axes: ClassVar[tuple[str, ...]]

    def build_cache(self, setup: CacheSetup, plan: Any = None, deferred: bool = False) -> Any:
        """A fresh cache for one window.

        Args:
            setup: the model and run settings.
            plan: the bit plan (per-unit widths); ``None`` = the setup's allocator.
            deferred: keep new tokens in full precision until the protocol quantizes the whole
                cache at once (``prefill``).
        """
        ...
