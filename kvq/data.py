"""Evaluation text sources and non-overlapping token windows.

Text sources are small ``@dataclass`` es (Hydra ``_target_`` s) with ``load_text() -> str`` and
``cache_key() -> str``:

- :class:`WikiText2`, :class:`PTB`, :class:`C4` read Hugging Face hub datasets through
  ``datasets`` (from the local HF cache when offline) and join them as the GPTQ/KVQuant
  perplexity code does.
- :class:`LocalText` reads local text file(s) through ``datasets``' ``text`` builder.
- :class:`PyDoc` is the embedded default: the Python reference text shipped with CPython.

:class:`TokenWindowDataModule` tokenises a source once (token ids cached on disk), cuts
non-overlapping windows and serves them one per batch.

Every failure a user can fix (missing file, dataset not available offline, text too short)
raises :class:`DataError` with a one-line message.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
import platform
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kvq.errors import one_line
from kvq.models.digest import file_digest
from kvq.models.meta import tokenizer_adds_bos
from kvq.textfile import TextFileError, check_text_file

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "C4",
    "PTB",
    "DataError",
    "LocalText",
    "PyDoc",
    "TextSource",
    "TokenWindowDataModule",
    "WikiText2",
    "Windowed",
    "kvq_cache_dir",
    "tokenize_text",
    "tokenizer_fingerprint",
]

log = logging.getLogger(__name__)

_OFFLINE_ALTERNATIVES = "data=pydoc (embedded) or data=local data.path=/path/to/file.txt"
_TOKEN_CACHE_VERSION = 1


class DataError(ValueError):
    """Evaluation data cannot be found, loaded or cut into windows; the message is one line."""


@runtime_checkable
class TextSource(Protocol):
    """What :class:`TokenWindowDataModule` needs from a text source."""

    def load_text(self) -> str:
        """The full evaluation text."""
        ...

    def cache_key(self) -> str:
        """A stable string naming the text (used in the token cache key)."""
        ...


def kvq_cache_dir() -> Path:
    """Root of kvq's on-disk caches: ``$KVQ_CACHE_DIR`` or ``~/.cache/kvq``."""
    root = os.environ.get("KVQ_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "kvq"


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence ``datasets``' progress bars and info logs for the duration of a load."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if was_enabled:
            datasets.enable_progress_bars()


def _load_hub_dataset(name: str, *args: Any, **kwargs: Any) -> Any:
    """``datasets.load_dataset`` for a hub dataset, with failures turned into one-line DataErrors."""
    try:
        import datasets
    except ImportError as err:  # e.g. a pyarrow/numpy mismatch in the environment
        raise DataError(
            f"cannot import datasets ({one_line(err, 120, first_line=False)}); use {_OFFLINE_ALTERNATIVES}"
        ) from None
    try:
        with _quiet_datasets():
            return datasets.load_dataset(name, *args, **kwargs)
    except (OSError, datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as err:
        # ConnectionError (offline: "OfflineModeIsEnabled") and hub HTTP errors are OSErrors.
        offline = any(
            os.environ.get(v, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
            for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
        )
        where = (
            "is not available offline (not in the HF datasets cache)" if offline else "could not be loaded"
        )
        raise DataError(
            f"dataset {name!r} {where}: {one_line(err, 120, first_line=False)}; offline alternatives: {_OFFLINE_ALTERNATIVES}"
        ) from None


# --------------------------------------------------------------------------------------------
# text sources
# --------------------------------------------------------------------------------------------


@dataclass
class Windowed:
    """Window settings shared by every text source (the ``data`` config node's common knobs).

    Attributes:
        seq_len: tokens per window.
        max_windows: keep the first this many windows (``None`` = all).
        add_bos: prepend the tokenizer's BOS token to every window; ``None`` (the default) =
            as the tokenizer does (Gemma's tokenizers add one, SmolLM2's and the tiny Llama's none).
    """

    seq_len: int = 512
    max_windows: int | None = 16
    add_bos: bool | None = None

    def fingerprint(self) -> str:
        """What the text *is* (a result's identity): a hub dataset's name, config, split, revision."""
        return f"{self.cache_key()}@default"  # type: ignore[attr-defined]

    def datamodule(
        self, tokenizer: PreTrainedTokenizerBase, cache_dir: str | None = None
    ) -> TokenWindowDataModule:
        """The :class:`TokenWindowDataModule` of this source for ``tokenizer``."""
        return TokenWindowDataModule(
            self,  # type: ignore[arg-type]
            tokenizer,
            seq_len=self.seq_len,
            max_windows=self.max_windows,
            add_bos=self.add_bos,
            cache_dir=cache_dir,
        )


@dataclass
class WikiText2(Windowed):
    """WikiText-2 (raw, v1) from the hub: ``load_dataset("wikitext", "wikitext-2-raw-v1")``.

    Rows (including the empty ones) are joined with ``"\\n\\n"``, the GPTQ/KVQuant perplexity
    convention (``tokenizer("\\n\\n".join(test["text"]))``).

    Attributes:
        split: ``"test"``, ``"validation"`` or ``"train"``.
    """

    split: str = "test"

    def __post_init__(self) -> None:
        if self.split not in ("test", "validation", "train"):
            raise ValueError(f"data.split must be test, validation or train (got {self.split!r})")

    def load_text(self) -> str:
        """The joined split text. Raises :class:`DataError` if the dataset is unavailable."""
        ds = _load_hub_dataset("wikitext", "wikitext-2-raw-v1", split=self.split)
        return "\n\n".join(ds["text"])

    def cache_key(self) -> str:
        """``wikitext2:<split>``."""
        return f"wikitext2:wikitext-2-raw-v1:{self.split}"


@dataclass
class PTB(Windowed):
    """Penn Treebank from the hub: ``load_dataset("ptb_text_only", "penn_treebank")``, field ``sentence``.

    Convention: sentences joined with ``" "`` on the test split, as in the LLaMA-era GPTQ code
    (``ptb-new`` in GPTQ / GPTQ-for-LLaMa / KVQuant's ``datautils.get_ptb_new``). The older GPTQ
    ``ptb`` loader instead joined the *validation* split with ``"\\n\\n"``; reproduce it with
    ``split="validation", sep="\\n\\n"``.

    Attributes:
        split: ``"test"``, ``"validation"`` or ``"train"``.
        sep: String placed between sentences.
    """

    split: str = "test"
    sep: str = " "

    def __post_init__(self) -> None:
        if self.split not in ("test", "validation", "train"):
            raise ValueError(f"data.split must be test, validation or train (got {self.split!r})")

    def load_text(self) -> str:
        """The joined split text. Raises :class:`DataError` if the dataset is unavailable."""
        ds = _load_hub_dataset("ptb_text_only", "penn_treebank", split=self.split)
        return self.sep.join(ds["sentence"])

    def cache_key(self) -> str:
        """``ptb:<split>:<sep>``."""
        return f"ptb:penn_treebank:{self.split}:sep={self.sep!r}"


@dataclass
class C4(Windowed):
    """C4 (English) from the hub: one shard of ``allenai/c4`` via ``data_files``.

    Convention (GPTQ's ``c4-new`` evaluation, also GPTQ-for-LLaMa / KVQuant ``get_c4_new``): the
    first ``n_docs=1100`` documents of validation shard 0 joined with ``" "``; GPTQ then keeps the
    first ``256 * seq_len`` tokens, i.e. ``TokenWindowDataModule(max_windows=256)``. (The older
    GPTQ ``c4`` loader sampled 256 random windows from random long documents; not provided.)

    Attributes:
        split: Split name given to ``data_files`` (``"validation"`` or ``"train"``).
        shard: Path of the shard inside the ``allenai/c4`` repository.
        n_docs: Number of leading documents kept (None-like values not allowed; must be >= 1).
    """

    split: str = "validation"
    shard: str = "en/c4-validation.00000-of-00008.json.gz"
    n_docs: int = 1100

    def __post_init__(self) -> None:
        if self.split not in ("validation", "train"):
            raise ValueError(f"data.split must be validation or train (got {self.split!r})")
        if not self.shard:
            raise ValueError(
                "data.shard must name a shard of allenai/c4, e.g. en/c4-validation.00000-of-00008.json.gz"
            )
        if int(self.n_docs) < 1:
            raise ValueError(f"data.n_docs must be >= 1 (got {self.n_docs})")

    def load_text(self) -> str:
        """The first ``n_docs`` documents joined with spaces. Raises :class:`DataError` if unavailable."""
        ds = _load_hub_dataset("allenai/c4", data_files={self.split: self.shard}, split=self.split)
        n = min(int(self.n_docs), len(ds))
        return " ".join(ds[:n]["text"])

    def cache_key(self) -> str:
        """``c4:<shard>:<n_docs>``."""
        return f"c4:{self.shard}:{self.split}:n_docs={self.n_docs}"


def _expand_local(path: str) -> list[Path]:
    """A file, a folder (its regular, non-hidden files, sorted) or a glob pattern → sorted files."""
    if any(ch in path for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(path), recursive=True))
        files = [f for f in files if f.is_file()]
        if not files:
            raise DataError(f"data file not found: no file matches {path!r}")
        return [f.resolve() for f in files]
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
        if not files:
            raise DataError(f"data folder has no files: {str(p)!r}")
        return [f.resolve() for f in files]
    if not p.is_file():
        raise DataError(f"data file not found: {str(p)!r}")
    return [p.resolve()]


@dataclass
class LocalText(Windowed):
    """Local text file(s), read line by line with ``datasets``' ``text`` builder.

    Lines are joined with ``"\\n"`` (CRLF endings become ``"\\n"``; a trailing newline is
    dropped). ``datasets``' Arrow cache goes under ``<kvq cache>/datasets``, never the repo.

    Attributes:
        path: A text file, a folder of text files (sorted by name), or a glob pattern.
    """

    path: str | None = None

    def _files(self) -> list[Path]:
        if self.path is None or not str(self.path).strip():
            raise DataError("data.path is required for data=local: pass data.path=/path/to/file.txt")
        return _expand_local(str(self.path))

    def load_text(self) -> str:
        """The joined lines of all files.

        Raises:
            DataError: ``path`` missing or not found.
        """
        files = self._files()
        try:
            for f in files:
                check_text_file(f)
        except TextFileError as err:
            raise DataError(str(err)) from None
        try:
            import datasets
        except ImportError as err:
            raise DataError(f"cannot import datasets ({one_line(err, 120, first_line=False)})") from None
        cache = kvq_cache_dir() / "datasets"
        try:
            with _quiet_datasets():
                ds = datasets.load_dataset(
                    "text", data_files=[str(f) for f in files], split="train", cache_dir=str(cache)
                )
        except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:
            raise DataError(
                f"cannot read data file(s) {self.path!r}: {one_line(err, 160, root_cause=True)}"
            ) from None
        return "\n".join(ds["text"])

    def cache_key(self) -> str:
        """``local:<resolved files>``; raises :class:`DataError` if ``path`` is missing."""
        return "local:" + ",".join(str(f) for f in self._files())

    def fingerprint(self) -> str:
        """``local:`` + each file's name and content hash: editing a file changes it."""
        return "local:" + ",".join(f"{f.name}={file_digest(f)}" for f in self._files())


@dataclass
class PyDoc(Windowed):
    """The embedded default text: CPython's reference topics (``pydoc_data.topics.topics``).

    Topics are joined in sorted-key order with ``"\\n\\n"``; needs no network and no files.
    About 0.5 MB of English technical prose (the Python language reference).
    """

    def load_text(self) -> str:
        """The joined topics text."""
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics))

    def cache_key(self) -> str:
        """``pydoc:<python version>``."""
        return f"pydoc:python-{platform.python_version()}"

    def fingerprint(self) -> str:
        """The Python version and the content hash of ``pydoc_data/topics.py``."""
        return f"{self.cache_key()}:{file_digest(importlib.util.find_spec('pydoc_data.topics').origin)}"


# --------------------------------------------------------------------------------------------
# tokenisation and windows
# --------------------------------------------------------------------------------------------


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str) -> np.ndarray:
    """Tokenise a whole text without special tokens and without the too-long-sequence warning.

    Args:
        tokenizer: A transformers tokenizer.
        text: The text.

    Returns:
        Token ids, shape ``[n_tokens]``, int64.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64).reshape(-1)


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash identifying a tokenizer's behaviour (class, name, size and full definition).

    Fast tokenizers hash their serialised ``tokenizers`` definition (vocab, merges, normaliser,
    pre-tokeniser); others hash the sorted vocabulary.
    """
    h = hashlib.sha256()
    h.update(f"{type(tokenizer).__name__}|{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()[:24]


class _Windows(Dataset):
    """Rows of a ``[n_windows, seq_len]`` tensor as ``{"input_ids": LongTensor[seq_len]}``."""

    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return int(self.windows.shape[0])

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[idx]}


class TokenWindowDataModule(L.LightningDataModule):
    """Non-overlapping token windows of one evaluation text, one window per batch.

    The full text is tokenised once, without special tokens (ids cached on disk under
    ``cache_dir``, keyed by the source's ``cache_key()``, a fingerprint of the tokenizer and a
    hash of the text), then cut into consecutive windows; the remainder is dropped and only the
    first ``max_windows`` windows are kept.

    With ``add_bos=True`` every window is ``[BOS] + (seq_len - 1)`` text tokens; with
    ``add_bos=False`` it is ``seq_len`` text tokens (GPTQ / KVQuant add a BOS only before the
    whole text). ``add_bos=None`` (the default) follows the tokenizer: BOS windows when the
    tokenizer itself starts a text with BOS (:func:`kvq.models.tokenizer_adds_bos`; Gemma), plain
    windows otherwise (the embedded SmolLM2). Either way a window has ``seq_len - 1`` next-token
    targets.

    Batches from :meth:`test_dataloader` are dicts ``{"input_ids": LongTensor[1, seq_len]}``
    (batch size 1, in text order), so ``model(**batch)`` works.

    Work happens lazily on first use (``prepare_data``/``setup`` or any of the properties).

    Args:
        source: A text source (:class:`TextSource`).
        tokenizer: The model's tokenizer.
        seq_len: Tokens per window (>= 2).
        max_windows: Keep at most this many windows; None = all.
        add_bos: Prepend the tokenizer's BOS token to every window; None = as the tokenizer does.
            The resolved choice is ``self.add_bos``; what was asked, ``self.add_bos_requested``.
        cache_dir: Token cache folder; None = ``<kvq cache>/tokens`` (``$KVQ_CACHE_DIR`` or
            ``~/.cache/kvq``).

    Raises:
        DataError: Bad arguments, no BOS token while ``add_bos``, or (on first use) a text too
            short for one window.
    """

    def __init__(
        self,
        source: TextSource,
        tokenizer: PreTrainedTokenizerBase,
        seq_len: int = 512,
        max_windows: int | None = 16,
        add_bos: bool | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if int(seq_len) < 2:
            raise DataError(f"seq_len must be >= 2 (got {seq_len})")
        if max_windows is not None and int(max_windows) < 1:
            raise DataError(f"max_windows must be >= 1 or None for all (got {max_windows})")
        self.add_bos_requested = None if add_bos is None else bool(add_bos)
        if add_bos is None:
            add_bos = tokenizer_adds_bos(tokenizer)
        if add_bos and getattr(tokenizer, "bos_token_id", None) is None:
            raise DataError(
                f"add_bos=True but tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no BOS token"
            )
        self.source = source
        self.tokenizer = tokenizer
        self.seq_len = int(seq_len)
        self.max_windows = None if max_windows is None else int(max_windows)
        self.add_bos = bool(add_bos)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else kvq_cache_dir() / "tokens"
        self._ids: torch.Tensor | None = None
        self._windows: torch.Tensor | None = None
        self.cache_hit: bool | None = None
        self.cache_path: Path | None = None

    # -- tokens -------------------------------------------------------------------------------

    def _cache_file(self, text: str) -> Path:
        key = json.dumps(
            {
                "v": _TOKEN_CACHE_VERSION,
                "source": self.source.cache_key(),
                "tokenizer": tokenizer_fingerprint(self.tokenizer),
                "text": hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest(),
            },
            sort_keys=True,
        )
        return self.cache_dir / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.npy"

    def _read_cache(self, path: Path) -> np.ndarray | None:
        try:
            arr = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as err:
            log.warning("ignoring unreadable token cache %s (%s)", path, one_line(err, 80, first_line=False))
            return None
        return arr.astype(np.int64, copy=False).reshape(-1)

    def _write_cache(self, path: Path, ids: np.ndarray) -> None:
        dtype = np.int32 if ids.size == 0 or int(ids.max()) < 2**31 else np.int64
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    np.save(fh, ids.astype(dtype), allow_pickle=False)
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as err:  # a read-only cache must not stop the evaluation
            log.warning("could not write token cache %s (%s)", path, one_line(err, 80, first_line=False))

    def _ensure_tokens(self) -> torch.Tensor:
        if self._ids is not None:
            return self._ids
        text = self.source.load_text()
        path = self._cache_file(text)
        ids = self._read_cache(path)
        self.cache_hit = ids is not None
        if ids is None:
            ids = tokenize_text(self.tokenizer, text)
            self._write_cache(path, ids)
        self.cache_path = path
        self._ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        return self._ids

    def _ensure_windows(self) -> torch.Tensor:
        if self._windows is not None:
            return self._windows
        ids = self._ensure_tokens()
        body = self.seq_len - 1 if self.add_bos else self.seq_len
        n = ids.numel() // body
        if n == 0:
            raise DataError(
                f"text from {self.source.cache_key()} has {ids.numel()} tokens, fewer than one window "
                f"of {body} text tokens (seq_len={self.seq_len}, add_bos={self.add_bos}); "
                "lower seq_len or use a longer text"
            )
        if self.max_windows is not None:
            n = min(n, self.max_windows)
        windows = ids[: n * body].view(n, body)
        if self.add_bos:
            bos = torch.full((n, 1), int(self.tokenizer.bos_token_id), dtype=torch.long)
            windows = torch.cat([bos, windows], dim=1)
        self._windows = windows.contiguous()
        return self._windows

    # -- LightningDataModule ------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Tokenise (or read the token cache) once; safe to call repeatedly."""
        self._ensure_tokens()

    def setup(self, stage: str | None = None) -> None:
        """Cut the windows (tokenising first if needed)."""
        self._ensure_windows()

    def test_dataloader(self) -> DataLoader:
        """Windows in text order, batch size 1: ``{"input_ids": LongTensor[1, seq_len]}``."""
        return DataLoader(_Windows(self._ensure_windows()), batch_size=1, shuffle=False, num_workers=0)

    # -- facts --------------------------------------------------------------------------------

    @property
    def windows(self) -> torch.Tensor:
        """All kept windows, ``LongTensor[n_windows, seq_len]``."""
        return self._ensure_windows()

    @property
    def token_ids(self) -> torch.Tensor:
        """Token ids of the whole text (no special tokens), ``LongTensor[n_text_tokens]``."""
        return self._ensure_tokens()

    @property
    def n_windows(self) -> int:
        """Number of windows served."""
        return int(self._ensure_windows().shape[0])

    @property
    def tokens(self) -> int:
        """Total scored tokens: next-token targets over all windows, ``n_windows * (seq_len - 1)``."""
        return self.n_windows * (self.seq_len - 1)

    @property
    def window_tokens(self) -> int:
        """Total input tokens over all windows, ``n_windows * seq_len`` (BOS included if added)."""
        return self.n_windows * self.seq_len
