"""Checks of local text files before ``datasets``' ``text`` builder reads them (``data=local``).

The builder reports an empty or binary file as a bare ``DatasetGenerationError`` deep in a stack
trace; :func:`check_text_file` says what is wrong with the file in one line first.
"""

from __future__ import annotations

import codecs
from pathlib import Path

__all__ = ["TextFileError", "check_text_file"]


class TextFileError(ValueError):
    """A local data file is not readable text; the message is one line."""


def check_text_file(path: str | Path) -> None:
    """Raise :class:`TextFileError` (one line) for a file that is empty or not UTF-8 text.

    Args:
        path: the file. NUL bytes count as binary (they are valid UTF-8, but no text has them).
    """
    f = Path(path)
    if f.stat().st_size == 0:
        raise TextFileError(f"data file is empty: {str(f)!r}")
    decoder = codecs.getincrementaldecoder("utf-8")()
    with f.open("rb") as fh:
        offset = 0
        while chunk := fh.read(1 << 20):
            nul = chunk.find(b"\0")
            if nul >= 0:
                raise TextFileError(
                    f"data file is binary, not text: {str(f)!r} (a NUL byte at {offset + nul})"
                )
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as err:
                raise TextFileError(
                    f"data file is not UTF-8 text: {str(f)!r} ({err.reason} at byte {offset + err.start})"
                ) from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as err:
            raise TextFileError(
                f"data file is not UTF-8 text: {str(f)!r} ({err.reason} at its end)"
            ) from None
