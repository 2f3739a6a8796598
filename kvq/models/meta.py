"""What every loader returns: :class:`ModelMeta`, :class:`LoadedModel`, dtypes and their helpers.

:class:`ModelMeta` is read from a model's config alone (no weights): the numbers that size a KV
cache and, per layer, whether the layer attends to the whole past or to a sliding window, the
way transformers' ``DynamicCache(config=...)`` builds its layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DTYPES",
    "FULL_ATTENTION",
    "SLIDING_ATTENTION",
    "SLIDING_LAYER_TYPES",
    "LoadedModel",
    "ModelMeta",
    "ModelUnavailableError",
    "resolve_dtype",
    "tokenizer_adds_bos",
]

#: Accepted ``dtype`` strings. ``"auto"`` means bfloat16 on CUDA and float32 elsewhere.
DTYPES: tuple[str, ...] = ("auto", "float32", "float16", "bfloat16")

#: transformers' names of the two attention kinds of a decoder layer (``config.layer_types``).
FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"
#: layer types whose cache keeps only a window of the past (transformers' sliding cache layers)
SLIDING_LAYER_TYPES: frozenset[str] = frozenset(
    {SLIDING_ATTENTION, "chunked_attention", "hybrid_sliding", "reference_sliding_attention"}
)


class ModelUnavailableError(ValueError):
    """A model (hub id, folder or file) cannot be found or loaded; the message is one line."""


@dataclass(frozen=True)
class ModelMeta:
    """Architecture numbers of a causal LM, enough to size a KV cache.

    Attributes:
        name: Human-readable model name (hub id, folder, GGUF file stem, ...).
        n_layers: Number of decoder layers (one K and one V cache per layer).
        n_heads: Number of query heads.
        n_kv_heads: Number of key/value heads (``< n_heads`` under GQA/MQA).
        head_dim: Features per head; K and V of one token in one layer are
            ``[n_kv_heads, head_dim]`` each.
        hidden_size: Model width.
        vocab_size: Size of the output vocabulary (rows of the LM head).
        max_position: Maximum context the model was configured for, or None if unknown.
        layer_types: One entry per layer, transformers' names (``"full_attention"``,
            ``"sliding_attention"``, ...); empty = every layer full attention (filled in).
        sliding_window: Window of the sliding layers (transformers' ``sliding_window``: a
            sliding layer's cache keeps the last ``sliding_window - 1`` tokens), None without any.
        arch: transformers' ``model_type`` (``"llama"``, ``"gemma2"``, ``"gemma3_text"``, ...),
            None if unknown.
    """

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position: int | None
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    arch: str | None = None

    def __post_init__(self) -> None:
        types = tuple(str(t) for t in self.layer_types) or (FULL_ATTENTION,) * int(self.n_layers)
        if len(types) != int(self.n_layers):
            raise ValueError(f"model {self.name!r}: {len(types)} layer_types for {self.n_layers} layers")
        object.__setattr__(self, "layer_types", types)

    def is_sliding(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` attends to a sliding window (its cache is bounded)."""
        return self.layer_types[layer] in SLIDING_LAYER_TYPES

    @property
    def n_sliding(self) -> int:
        """Number of sliding-window layers."""
        return sum(t in SLIDING_LAYER_TYPES for t in self.layer_types)

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        """Indices of the sliding-window layers."""
        return tuple(i for i, t in enumerate(self.layer_types) if t in SLIDING_LAYER_TYPES)


@dataclass
class LoadedModel:
    """A loaded model with its tokenizer and metadata.

    Attributes:
        model: The causal LM, in eval mode, on the requested device and dtype.
        tokenizer: Its tokenizer.
        meta: Architecture numbers (same as the loader's ``meta()``).
        add_bos: Whether the tokenizer puts a BOS token before a text by default
            (None = read from the tokenizer with :func:`tokenizer_adds_bos`).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    meta: ModelMeta
    add_bos: bool | None = None

    def __post_init__(self) -> None:
        if self.add_bos is None:
            self.add_bos = tokenizer_adds_bos(self.tokenizer)


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` starts an encoded text with its BOS token (its own behaviour).

    Asks the tokenizer itself (``tokenizer("a")["input_ids"]`` starts with ``bos_token_id``),
    which covers post-processor templates (Llama 3, Gemma) where ``add_bos_token`` says nothing;
    falls back to the ``add_bos_token`` attribute if encoding fails.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    try:
        ids = tokenizer("a")["input_ids"]
    except Exception:  # noqa: BLE001 -- an odd tokenizer: trust its attribute
        return bool(getattr(tokenizer, "add_bos_token", False))
    if ids and isinstance(ids[0], list):  # batched output of an exotic tokenizer
        ids = ids[0]
    return bool(ids) and int(ids[0]) == int(bos)


def check_dtype(dtype: str) -> None:
    """Raise a one-line ``ValueError`` unless ``dtype`` is one of :data:`DTYPES`."""
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")


def resolve_dtype(name: str, device: str | torch.device | None = "cpu") -> torch.dtype:
    """Turn a dtype string into a ``torch.dtype``.

    Args:
        name: One of :data:`DTYPES`. ``"auto"`` gives bfloat16 on a CUDA device and float32
            otherwise.
        device: The device the model will run on (string, ``torch.device`` or None = CPU).

    Returns:
        The torch dtype.

    Raises:
        ValueError: For an unknown name.
    """
    check_dtype(name)
    if name == "auto":
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    return getattr(torch, name)


def _layer_types(cfg: Any, n_layers: int) -> tuple[tuple[str, ...], int | None]:
    """``(layer_types, sliding_window)`` of a decoder config, as ``DynamicCache(config)`` sees them."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types, kwargs = get_layer_types_and_kwargs(cfg)
    except (ImportError, AttributeError, TypeError):  # older transformers: the same rule, by hand
        types = getattr(cfg, "layer_types", None)
        window = getattr(cfg, "sliding_window", None)
        if types is None:
            types = [SLIDING_ATTENTION if window is not None else FULL_ATTENTION] * n_layers
        kwargs = [{"sliding_window": window} if t in SLIDING_LAYER_TYPES else {} for t in types]
    windows = [
        int(kw["sliding_window"])
        for t, kw in zip(types, kwargs, strict=False)
        if t in SLIDING_LAYER_TYPES and kw.get("sliding_window") is not None
    ]
    return tuple(str(t) for t in types), (max(windows) if windows else None)


def meta_from_config(name: str, config: PretrainedConfig) -> ModelMeta:
    """Build a :class:`ModelMeta` from a transformers config (the decoder of multimodal configs)."""
    if hasattr(config, "get_text_config"):
        try:
            cfg = config.get_text_config(decoder=True)
        except TypeError:  # pragma: no cover - older transformers
            cfg = config.get_text_config()
    else:
        cfg = config
    n_layers = int(cfg.num_hidden_layers)
    n_heads = int(cfg.num_attention_heads)
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    hidden = int(cfg.hidden_size)
    head_dim = getattr(cfg, "head_dim", None) or hidden // n_heads
    max_pos = getattr(cfg, "max_position_embeddings", None)
    layer_types, window = _layer_types(cfg, n_layers)
    return ModelMeta(
        name=name,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        head_dim=int(head_dim),
        hidden_size=hidden,
        vocab_size=int(cfg.vocab_size),
        max_position=int(max_pos) if max_pos is not None else None,
        layer_types=layer_types,
        sliding_window=window,
        arch=getattr(config, "model_type", None) or None,
    )


#: the old private name, kept for callers that imported it
_meta_from_config = meta_from_config


def finish(
    model: PreTrainedModel,
    device: str | torch.device,
    dtype: torch.dtype,
    attn_implementation: str | None,
) -> PreTrainedModel:
    """Put a model on its device/dtype, in eval mode, with the requested attention backend; a
    kvq ``QuantizedCache`` passed to it learns its batch's left padding (:func:`kvq.cache.watch_padding`)."""
    from kvq.cache import watch_padding

    if attn_implementation is not None and model.config._attn_implementation != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    model = model.to(device=torch.device(device), dtype=dtype)
    model.eval()
    return watch_padding(model)
