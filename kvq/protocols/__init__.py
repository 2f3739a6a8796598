"""Evaluation protocols (the ``eval`` axis): how a batch is scored with the KV cache quantized.

* :mod:`~kvq.protocols.perplexity` — ``fakequant``, ``prefill``, ``decode`` (with the
  distribution metrics against the fp reference, :mod:`kvq.reference`);
* :mod:`~kvq.protocols.retrieval` — ``passkey``, ``needle``: long-context retrieval by greedy
  generation through the quantized cache;
* :mod:`~kvq.protocols.harness` — ``lm_eval``: lm-evaluation-harness tasks with kvq's cache in place;
* :mod:`~kvq.protocols.generation` — ``generate``: tokens/s and memory per cache;
* :mod:`~kvq.protocols.base` — the :class:`Protocol` interface and its per-window results;
* :mod:`~kvq.protocols.setup` — :class:`KVSetup`, what a protocol builds caches from.
"""

from kvq.protocols.base import Batches, Protocol, WindowResult
from kvq.protocols.generation import Generate
from kvq.protocols.harness import LMEval
from kvq.protocols.perplexity import Decode, FakeQuant, Prefill, WindowProtocol
from kvq.protocols.retrieval import Needle, Passkey, Retrieval
from kvq.protocols.setup import KVSetup, rope_of

__all__ = [
    "Batches",
    "Decode",
    "FakeQuant",
    "Generate",
    "KVSetup",
    "LMEval",
    "Needle",
    "Passkey",
    "Prefill",
    "Protocol",
    "Retrieval",
    "WindowProtocol",
    "WindowResult",
    "rope_of",
]
