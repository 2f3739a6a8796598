"""Hub ids and local folders: :class:`HubModel` (``AutoModelForCausalLM`` / ``AutoTokenizer``).

Every failure is one line that says what is wrong and what to change: a hub id missing from the
offline HF cache, a local folder without config/weights/tokenizer or with a corrupt weight file,
a model that needs its repository's code while ``model.trust_remote_code`` is false.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from kvq.errors import one_line
from kvq.models.digest import folder_digest
from kvq.models.meta import (
    LoadedModel,
    ModelMeta,
    ModelUnavailableError,
    check_dtype,
    finish,
    meta_from_config,
    resolve_dtype,
)

__all__ = ["OFFLINE_HINT", "HubModel"]

OFFLINE_HINT = (
    "point model.name_or_path at a local folder, use a local GGUF file (model=gguf "
    "model.path=FILE.gguf) or the embedded model: model=smollm2_135m"
)
_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.safetensors.index.json", "*.bin.index.json")
_TOKENIZER_GLOBS = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
    "*.tiktoken",
)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")

T = TypeVar("T")


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


def _hub_errors() -> tuple[type[BaseException], ...]:
    """huggingface_hub's lookup errors that are not OSError subclasses in some versions."""
    try:
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        return (HfHubHTTPError, LocalEntryNotFoundError)
    except Exception:  # pragma: no cover
        return ()


def _looks_like_path(name: str) -> bool:
    """A string that can only be a filesystem path, not a hub id (``name`` or ``org/name``)."""
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name in {".", ".."}
        or name.count("/") > 1
        or "\\" in name
        or bool(re.match(r"^[A-Za-z]:", name))
    )


def _has_any(folder: Path, globs: tuple[str, ...]) -> bool:
    return any(any(folder.glob(g)) for g in globs)


def _known_model_type(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def _remote_code_line(name: str, model_type: str | None) -> str:
    kind = f" (architecture {model_type!r} is not part of transformers)" if model_type else ""
    return (
        f"model {name!r} needs the model code shipped in its repository{kind}: "
        "set model.trust_remote_code=true if you trust that code"
    )


def _unknown_type_line(name: str, model_type: str | None) -> str:
    import transformers

    return (
        f"model {name!r} has model_type {model_type!r}, which transformers {transformers.__version__} "
        "does not know: upgrade transformers, or set model.trust_remote_code=true if the repository "
        "ships its model code"
    )


@dataclass
class HubModel:
    """A causal LM from the Hugging Face hub (or its local cache) or from a local folder.

    Loads with ``AutoModelForCausalLM`` / ``AutoTokenizer``. Offline (``HF_HUB_OFFLINE=1`` or no
    network), a hub id must already be in the HF cache; otherwise :class:`ModelUnavailableError`.

    Attributes:
        name_or_path: Hub id (``org/name``) or a folder written by ``save_pretrained``; required
            (None only so that ``model=hf`` composes; using it then raises a one-line error).
        dtype: One of :data:`~kvq.models.DTYPES`.
        revision: Hub branch, tag or commit; None = the default branch.
        trust_remote_code: Allow model code from the hub repository (off by default).
        local_files_only: Never contact the hub, even when online.
    """

    name_or_path: str | None = None
    dtype: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    local_files_only: bool = False

    def __post_init__(self) -> None:
        if self.name_or_path is not None:
            if not isinstance(self.name_or_path, (str, os.PathLike)) or not str(self.name_or_path).strip():
                raise ValueError("model.name_or_path must be a non-empty hub id or folder path")
            self.name_or_path = str(self.name_or_path)
        check_dtype(self.dtype)

    # -- helpers ------------------------------------------------------------------------------

    def _name(self) -> str:
        if self.name_or_path is None:
            raise ModelUnavailableError(
                "model.name_or_path is required for model=hf: pass model.name_or_path=org/name "
                "(a hub id) or model.name_or_path=/path/to/folder"
            )
        return self.name_or_path

    def _local_folder(self) -> Path | None:
        """The local folder this names, None for a hub id; raises if a path-like name is missing."""
        name = self._name()
        path = Path(name).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                gguf = (
                    " (it holds .gguf files: use model=gguf model.path=FILE.gguf)"
                    if any(path.glob("*.gguf"))
                    else " (for a .gguf file use model=gguf model.path=FILE.gguf)"
                )
                raise ModelUnavailableError(
                    f"model folder {str(path)!r} has no config.json (write it with save_pretrained){gguf}"
                )
            return path.resolve()
        if path.exists():
            raise ModelUnavailableError(
                f"model.name_or_path {name!r} is a file, not a folder "
                "(for a .gguf file use model=gguf model.path=FILE.gguf)"
            )
        if _looks_like_path(name):
            raise ModelUnavailableError(f"model folder not found: {str(path)!r}")
        return None

    def _check_folder(self, folder: Path, *, for_load: bool) -> None:
        """One-line errors for a local folder transformers would misreport (or prompt about)."""
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise ModelUnavailableError(
                f"model folder {str(folder)!r}: config.json is unreadable or not valid JSON "
                f"({one_line(err, 120)}); write it again with save_pretrained"
            ) from None
        model_type = config.get("model_type") if isinstance(config, dict) else None
        known = isinstance(model_type, str) and _known_model_type(model_type)
        if not known and not self.trust_remote_code:
            if isinstance(config, dict) and config.get("auto_map"):
                raise ModelUnavailableError(_remote_code_line(str(folder), model_type))
            raise ModelUnavailableError(_unknown_type_line(str(folder), model_type))
        if not for_load:
            return
        if not _has_any(folder, _WEIGHT_GLOBS):
            gguf = (
                "; for a .gguf file use model=gguf model.path=FILE.gguf" if any(folder.glob("*.gguf")) else ""
            )
            raise ModelUnavailableError(
                f"model folder {str(folder)!r} has config.json but no weights (model.safetensors or "
                f"pytorch_model.bin): write them with model.save_pretrained{gguf}"
            )
        if not _has_any(folder, _TOKENIZER_GLOBS):
            raise ModelUnavailableError(
                f"model folder {str(folder)!r} has no tokenizer files (tokenizer.json, tokenizer.model, "
                "...): write them with tokenizer.save_pretrained"
            )

    def _source(self, *, for_load: bool = False) -> str:
        folder = self._local_folder()
        if folder is None:
            return self._name()
        self._check_folder(folder, for_load=for_load)
        return str(folder)

    def _kwargs(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "trust_remote_code": self.trust_remote_code,
            "local_files_only": self.local_files_only,
        }

    def _explain(self, err: BaseException) -> str:
        """The one line for an exception raised by a ``from_pretrained`` call."""
        name = self._name()
        text = str(err)
        if "trust_remote_code" in text and not self.trust_remote_code:
            return _remote_code_line(name, None)
        if "does not recognize this architecture" in text:
            found = re.search(r"model type `([^`]*)`", text)
            return _unknown_type_line(name, found.group(1) if found else None)
        try:
            local = self._local_folder() is not None
        except ModelUnavailableError:
            local = False
        if local:
            what = f"{type(err).__name__}: {one_line(err, 200, first_line=False)}"
            fix = "check the folder's files; write them again with save_pretrained"
            if "safetensor" in type(err).__name__.lower() or "deserializ" in text:
                fix = "a weight file is truncated or corrupt; write it again with save_pretrained"
            return f"cannot load model folder {name!r}: {what} ({fix})"
        if isinstance(err, (OSError, *_hub_errors())):  # transformers wraps hub errors in OSError
            if _hub_offline() or self.local_files_only:
                return (
                    f"model {name!r} is not available offline (not in the HF cache); "
                    f"run with network access once, {OFFLINE_HINT}"
                )
            return (
                f"model {name!r} could not be loaded from the hub or the HF cache "
                f"({one_line(err, 160, first_line=False)}); {OFFLINE_HINT}"
            )
        return f"model {name!r} could not be loaded: {type(err).__name__}: {one_line(err, 200, first_line=False)}"

    def _call(self, fn: Callable[[], T]) -> T:
        """Run a ``from_pretrained`` call, turning its failures into one-line errors."""
        try:
            return fn()
        except ModelUnavailableError:
            raise
        except Exception as err:  # noqa: BLE001 -- every failure becomes one line naming the fix
            raise ModelUnavailableError(self._explain(err)) from None

    def _snapshot_commit(self) -> str | None:
        """The commit of the HF-cache snapshot this hub id resolves to offline, None if unknown."""
        if self.revision is not None and _COMMIT.match(self.revision):
            return self.revision
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(self._name(), "config.json", revision=self.revision)
        except Exception:  # noqa: BLE001 -- e.g. an invalid repo id: no snapshot
            return None
        if isinstance(found, (str, os.PathLike)):
            commit = Path(found).parent.name
            return commit if _COMMIT.match(commit) else None
        return None

    # -- API ----------------------------------------------------------------------------------

    def meta(self) -> ModelMeta:
        """Read the architecture from the config only (no weights are loaded).

        Returns:
            The model's :class:`~kvq.models.ModelMeta`.

        Raises:
            ModelUnavailableError: The model cannot be found (offline, missing folder, ...).
        """
        from transformers import AutoConfig

        source = self._source()
        config = self._call(lambda: AutoConfig.from_pretrained(source, **self._kwargs()))
        return meta_from_config(self._name(), config)

    def load(self, device: str | torch.device = "cpu", attn_implementation: str | None = None) -> LoadedModel:
        """Load model and tokenizer.

        Args:
            device: Where to put the model.
            attn_implementation: transformers attention backend (``"eager"``, ``"sdpa"``, a
                registered custom one); None = the library default.

        Returns:
            The loaded model (eval mode), its tokenizer and meta.

        Raises:
            ModelUnavailableError: The model cannot be found or read (offline, broken folder, ...).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = self._source(for_load=True)
        dtype = resolve_dtype(self.dtype, device)
        kwargs = self._kwargs()
        extra: dict[str, Any] = {}
        if attn_implementation is not None:
            extra["attn_implementation"] = attn_implementation
        tokenizer = self._call(lambda: AutoTokenizer.from_pretrained(source, **kwargs))
        model = self._call(
            lambda: AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs, **extra)
        )
        model = finish(model, device, dtype, attn_implementation)
        return LoadedModel(
            model=model, tokenizer=tokenizer, meta=meta_from_config(self._name(), model.config)
        )

    def cache_key(self) -> str:
        """A stable key for the loaded weights: source, revision and dtype (not the device)."""
        folder = self._local_folder()
        source = str(folder) if folder is not None else self._name()
        return f"hub:{source}@{self.revision or 'default'}:{self.dtype}"

    def fingerprint(self) -> str:
        """What the weights and tokenizer *are*: changes when they change.

        A local folder: ``folder:sha256:...`` over its model files (see
        :func:`~kvq.models.digest.folder_digest`). A hub id: ``hub:<id>@<commit>`` with the
        snapshot commit found in the local HF cache, else ``hub:<id>@<revision or default>``.
        """
        folder = self._local_folder()
        if folder is not None:
            return f"folder:{folder_digest(folder)}"
        return f"hub:{self._name()}@{self._snapshot_commit() or self.revision or 'default'}"
