"""Tiny, seeded, randomly initialised decoders of six families, with a byte tokenizer, for tests.

``model=tiny_random model.arch=llama|qwen2|mistral|gemma2|gemma3|phi3``. Each builds offline in
milliseconds and keeps what matters to a KV cache from its family:

============  ==============================================================================
``llama``     GQA, RoPE, every layer full attention (``sliding_window`` ignored)
``qwen2``     as llama plus q/k/v biases; full attention (Qwen2's ``use_sliding_window=False``)
``mistral``   every layer sliding (``sliding_window``; null = Mistral v0.2+, no window)
``gemma2``    sliding/full alternating, attention logit softcap 50, final logit softcap 30,
              tied embeddings; needs a window
``gemma3``    5 sliding layers per full one (the last layer full when fewer than 6 layers, so
              the pattern is always hybrid), q/k norms, two RoPE bases; needs a window
``phi3``      fused ``qkv_proj`` / ``gate_up_proj``, every layer sliding (null = no window)
============  ==============================================================================

Gemma tokenizers add a BOS token before every text (Gemma is meaningless without it); the
others add none.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from kvq.models.meta import (
    FULL_ATTENTION,
    SLIDING_ATTENTION,
    LoadedModel,
    ModelMeta,
    check_dtype,
    finish,
    meta_from_config,
    resolve_dtype,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "TINY_ARCHS",
    "TINY_BOS",
    "TINY_BOS_ID",
    "TINY_EOS",
    "TINY_EOS_ID",
    "TinyRandom",
    "TinyRandomLlama",
    "byte_tokenizer",
]

#: The families :class:`TinyRandom` builds.
TINY_ARCHS: tuple[str, ...] = ("llama", "qwen2", "mistral", "gemma2", "gemma3", "phi3")
#: (config class, model class) in ``transformers`` per family
_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
}
_WINDOWLESS = ("llama", "qwen2")  # ignore sliding_window
_NEEDS_WINDOW = ("gemma2", "gemma3")  # sliding_window may not be null
_ADDS_BOS = ("gemma2", "gemma3")

#: Token ids of the tiny byte tokenizer: bytes 0..255 are ids 0..255, then the special tokens.
TINY_BOS, TINY_EOS = "<s>", "</s>"
TINY_BOS_ID, TINY_EOS_ID = 256, 257


@functools.lru_cache(maxsize=2)
def _byte_tokenizer_json(add_bos: bool = False) -> str:
    """Serialised byte-level tokenizer: one token per byte (ids 0-255), plus BOS/EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_to_char = bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    vocab[TINY_BOS] = TINY_BOS_ID
    vocab[TINY_EOS] = TINY_EOS_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{TINY_BOS} $A",
            pair=f"{TINY_BOS} $A {TINY_BOS} $B",
            special_tokens=[(TINY_BOS, TINY_BOS_ID)],
        )
    return tok.to_str()


def byte_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerBase:
    """A fast, offline byte-level tokenizer: round-trips any text, ids < 258.

    Args:
        add_bos: Put ``<s>`` (id 256) before every encoded text (as Gemma's tokenizer does);
            by default no special token is added.

    Returns:
        A ``PreTrainedTokenizerFast`` named ``kvq/tiny-byte-tokenizer`` (``...-bos`` with BOS).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_byte_tokenizer_json(bool(add_bos))),
        bos_token=TINY_BOS,
        eos_token=TINY_EOS,
        name_or_path="kvq/tiny-byte-tokenizer" + ("-bos" if add_bos else ""),
        model_max_length=1 << 30,
    )


@dataclass
class TinyRandom:
    """A seeded, randomly initialised causal LM of one family (:data:`TINY_ARCHS`), for tests.

    Same seed and fields give the same weights; the global RNG is left untouched. Builds in well
    under a second, offline, with :func:`byte_tokenizer`.

    Attributes:
        seed: Seed for the weight initialisation.
        n_layers: Decoder layers.
        hidden_size: Model width; divisible by ``n_heads`` unless ``head_dim`` is given.
        n_heads: Query heads; must be divisible by ``n_kv_heads``.
        n_kv_heads: Key/value heads.
        intermediate_size: MLP width.
        vocab_size: Vocabulary size; at least 258 (256 bytes + BOS + EOS).
        max_position: ``max_position_embeddings``.
        dtype: One of :data:`~kvq.models.DTYPES`.
        arch: The family, one of :data:`TINY_ARCHS`.
        head_dim: Features per head (even); None = ``hidden_size // n_heads``.
        sliding_window: Window of the sliding layers (>= 2); ignored by llama and qwen2; null =
            no window for mistral and phi3 (not allowed for the gemmas).
    """

    seed: int = 0
    n_layers: int = 2
    hidden_size: int = 64
    n_heads: int = 4
    n_kv_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 512
    max_position: int = 2048
    dtype: str = "float32"
    arch: str = "llama"
    head_dim: int | None = None
    sliding_window: int | None = 8

    def __post_init__(self) -> None:
        if self.arch not in TINY_ARCHS:
            raise ValueError(f"model.arch must be one of {', '.join(TINY_ARCHS)} (got {self.arch!r})")
        for name in ("n_layers", "hidden_size", "n_heads", "n_kv_heads", "intermediate_size", "max_position"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model.{name} must be >= 1 (got {getattr(self, name)})")
        if self.head_dim is None and self.hidden_size % self.n_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.n_heads ({self.n_heads})"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim is not None and (int(self.head_dim) < 2 or int(self.head_dim) % 2):
            raise ValueError(f"model.head_dim must be an even number >= 2 or null (got {self.head_dim})")
        if self.vocab_size < TINY_EOS_ID + 1:
            raise ValueError(
                f"model.vocab_size must be >= {TINY_EOS_ID + 1} for the byte tokenizer (got {self.vocab_size})"
            )
        if self.sliding_window is not None and int(self.sliding_window) < 2:
            raise ValueError(f"model.sliding_window must be >= 2 or null (got {self.sliding_window})")
        if self.sliding_window is None and self.arch in _NEEDS_WINDOW:
            raise ValueError(
                f"model.sliding_window must be set for model.arch={self.arch} (its sliding layers need "
                "a window), e.g. model.sliding_window=8"
            )
        check_dtype(self.dtype)

    @property
    def window(self) -> int | None:
        """The sliding window the built model uses (None for a family or variant without one)."""
        return None if self.arch in _WINDOWLESS or self.sliding_window is None else int(self.sliding_window)

    def _head_dim(self) -> int:
        return int(self.head_dim) if self.head_dim is not None else self.hidden_size // self.n_heads

    def _family_kwargs(self) -> dict[str, Any]:
        """Config arguments that make the tiny model a member of its family."""
        hd, window = self._head_dim(), self.window
        if self.arch == "llama":
            return {"tie_word_embeddings": False}
        if self.arch == "qwen2":
            return {"tie_word_embeddings": False, "use_sliding_window": False}
        if self.arch == "mistral":
            return {"tie_word_embeddings": False, "sliding_window": window}
        if self.arch == "phi3":
            return {
                "tie_word_embeddings": False,
                "sliding_window": window,
                "pad_token_id": None,
                "original_max_position_embeddings": self.max_position,
            }
        common = {
            "head_dim": hd,
            "query_pre_attn_scalar": hd,
            "sliding_window": window,
            "pad_token_id": None,
            "tie_word_embeddings": True,
        }
        if self.arch == "gemma2":  # as google/gemma-2-*: softcapped attention logits and outputs
            return {**common, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
        # gemma3: every 6th layer full; with fewer than 6 layers the last one is full
        types = [SLIDING_ATTENTION if (i + 1) % 6 else FULL_ATTENTION for i in range(self.n_layers)]
        if FULL_ATTENTION not in types:
            types[-1] = FULL_ATTENTION
        return {**common, "layer_types": types}

    def config(self, attn_implementation: str | None = None) -> Any:
        """The transformers config the model is built from (``LlamaConfig``, ``Gemma2Config``, ...)."""
        import transformers

        kwargs: dict[str, Any] = {}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        if self.head_dim is not None:
            kwargs["head_dim"] = int(self.head_dim)
        kwargs.update(self._family_kwargs())
        config_cls = getattr(transformers, _CLASSES[self.arch][0])
        return config_cls(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            max_position_embeddings=self.max_position,
            bos_token_id=TINY_BOS_ID,
            eos_token_id=TINY_EOS_ID,
            **kwargs,
        )

    def meta(self) -> ModelMeta:
        """Architecture numbers from the config (nothing is built)."""
        return meta_from_config(f"tiny-random-{self.arch}", self.config())

    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The byte tokenizer; it adds BOS for the gemma families."""
        return byte_tokenizer(add_bos=self.arch in _ADDS_BOS)

    def load(self, device: str | torch.device = "cpu", attn_implementation: str | None = None) -> LoadedModel:
        """Build the seeded random model and the byte tokenizer.

        Args:
            device: Where to put the model.
            attn_implementation: transformers attention backend; None = library default.

        Returns:
            The model (eval mode), tokenizer and meta.
        """
        import transformers

        config = self.config()
        model_cls = getattr(transformers, _CLASSES[self.arch][1])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = model_cls(config)
        model = finish(model, device, resolve_dtype(self.dtype, device), attn_implementation)
        return LoadedModel(
            model=model, tokenizer=self.tokenizer(), meta=self.meta(), add_bos=self.arch in _ADDS_BOS
        )

    def cache_key(self) -> str:
        """A stable key made of every field that changes the weights (llama keys as before)."""
        key = (
            f"tiny_random_{self.arch}:seed={self.seed}:L={self.n_layers}:d={self.hidden_size}:h={self.n_heads}"
            f":kv={self.n_kv_heads}:ff={self.intermediate_size}:V={self.vocab_size}:P={self.max_position}"
        )
        if self.head_dim is not None:
            key += f":hd={self.head_dim}"
        if self.arch not in _WINDOWLESS:
            key += f":sw={self.window}"
        return f"{key}:{self.dtype}"

    def fingerprint(self) -> str:
        """The cache key: seed and fields fully determine weights and tokenizer."""
        return self.cache_key()


@dataclass
class TinyRandomLlama(TinyRandom):
    """The ``model=tiny_random`` target: a :class:`TinyRandom`, a Llama unless ``arch`` says otherwise.

    Kept under its historic name (configs, results and tests name it); same fields, same
    weights and cache keys as before for ``arch="llama"``.
    """
