"""Model loaders: hub ids and local folders, any local GGUF file, the embedded SmolLM2, tiny random
models of six families.

Every loader is a small ``@dataclass`` whose fields are its constructor arguments (so each can
be a Hydra ``_target_``), validated in ``__post_init__`` with one-line ``ValueError`` messages.
Each offers:

- ``load(device, attn_implementation) -> LoadedModel``: the model in eval mode on ``device``
  with the requested dtype, its tokenizer (and whether it adds a BOS), and its :class:`ModelMeta`.
- ``meta() -> ModelMeta``: the architecture numbers, per-layer attention kind (full or sliding)
  and sliding window, read *without* loading weights.
- ``cache_key() -> str``: a stable string naming the weights (device not included).
- ``fingerprint() -> str``: what the weights and tokenizer *are* (content hash of local files,
  the HF-cache snapshot commit of a hub id, the cache key of a tiny model).

=====================  =====================================  ===========================
loader                 config                                  module
=====================  =====================================  ===========================
:class:`HubModel`      ``model=hf model.name_or_path=...``    :mod:`kvq.models.hub`
:class:`GGUFModel`     ``model=gguf model.path=FILE.gguf``    :mod:`kvq.models.gguf`
:class:`SmolLM2Embedded`  ``model=smollm2_135m`` (default)    :mod:`kvq.models.gguf`
:class:`TinyRandom`    ``model=tiny_random model.arch=...``   :mod:`kvq.models.tiny`
=====================  =====================================  ===========================

Offline use: a hub id that is not in the local HF cache raises :class:`ModelUnavailableError`
with one line naming the offline alternatives, never a deep stack trace.
"""

from __future__ import annotations

from kvq.models.digest import file_digest, folder_digest
from kvq.models.gguf import (
    EMBEDDED_GGUF_FILE,
    EMBEDDED_PACKAGE,
    GGUFModel,
    SmolLM2Embedded,
    embedded_gguf_path,
)
from kvq.models.hub import OFFLINE_HINT, HubModel
from kvq.models.loading import clear_model_cache, load_cached
from kvq.models.meta import (
    DTYPES,
    FULL_ATTENTION,
    SLIDING_ATTENTION,
    SLIDING_LAYER_TYPES,
    LoadedModel,
    ModelMeta,
    ModelUnavailableError,
    meta_from_config,
    resolve_dtype,
    tokenizer_adds_bos,
)
from kvq.models.tiny import (
    TINY_ARCHS,
    TINY_BOS,
    TINY_BOS_ID,
    TINY_EOS,
    TINY_EOS_ID,
    TinyRandom,
    TinyRandomLlama,
    byte_tokenizer,
)

__all__ = [
    "DTYPES",
    "EMBEDDED_GGUF_FILE",
    "EMBEDDED_PACKAGE",
    "FULL_ATTENTION",
    "OFFLINE_HINT",
    "SLIDING_ATTENTION",
    "SLIDING_LAYER_TYPES",
    "TINY_ARCHS",
    "TINY_BOS",
    "TINY_BOS_ID",
    "TINY_EOS",
    "TINY_EOS_ID",
    "GGUFModel",
    "HubModel",
    "LoadedModel",
    "ModelMeta",
    "ModelUnavailableError",
    "SmolLM2Embedded",
    "TinyRandom",
    "TinyRandomLlama",
    "byte_tokenizer",
    "clear_model_cache",
    "embedded_gguf_path",
    "file_digest",
    "folder_digest",
    "load_cached",
    "meta_from_config",
    "resolve_dtype",
    "tokenizer_adds_bos",
]
