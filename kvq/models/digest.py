"""Content fingerprints of local model files and folders (what a run's weights *are*).

A file up to :data:`FULL_HASH_LIMIT` bytes is hashed whole (sha256); a larger one by its size,
mtime and the sha256 of its first and last :data:`EDGE_BYTES`. Results are cached in-process per
``(path, size, mtime_ns)``, so asking again is free until the file changes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["EDGE_BYTES", "FULL_HASH_LIMIT", "file_digest", "folder_digest"]

FULL_HASH_LIMIT = 256 * 2**20
EDGE_BYTES = 4 * 2**20
#: files of a model folder that do not change what a run computes
_IGNORED_SUFFIXES = frozenset({".md", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".lock"})

_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path) -> str:
    """``sha256:<hex>`` of a file (``sha256-edges:<hex>`` for files over 256 MiB).

    Args:
        path: The file (symlinks are followed).

    Returns:
        The fingerprint string; equal contents give equal strings (for large files, equal size,
        mtime and first/last 4 MiB).
    """
    full = Path(path).expanduser().resolve()
    stat = full.stat()
    key = (str(full), stat.st_size, stat.st_mtime_ns)
    hit = _DIGESTS.get(key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    with full.open("rb") as fh:
        if stat.st_size <= FULL_HASH_LIMIT:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
            digest = f"sha256:{h.hexdigest()}"
        else:
            h.update(f"{stat.st_size}:{stat.st_mtime_ns}:".encode())
            h.update(fh.read(EDGE_BYTES))
            fh.seek(stat.st_size - EDGE_BYTES)
            h.update(fh.read(EDGE_BYTES))
            digest = f"sha256-edges:{h.hexdigest()}"
    _DIGESTS[key] = digest
    return digest


def _model_files(folder: Path) -> list[Path]:
    """Regular files under ``folder`` that can change a run (no hidden entries, no docs/images)."""
    files = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or p.suffix.lower() in _IGNORED_SUFFIXES:
            continue
        if p.is_file():
            files.append(p)
    return files


def folder_digest(folder: str | Path) -> str:
    """``sha256:<hex>`` over the relative names and :func:`file_digest` of a folder's model files.

    Hidden files and folders and documentation/images (``*.md``, ``*.png``, ...) are left out;
    config, weights, tokenizer and code files are in.
    """
    root = Path(folder).expanduser().resolve()
    h = hashlib.sha256()
    for f in _model_files(root):
        h.update(f"{f.relative_to(root).as_posix()}\t{file_digest(f)}\n".encode())
    return f"sha256:{h.hexdigest()}"
