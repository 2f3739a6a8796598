"""The one-line error type and helpers every kvq module uses.

kvq promises one clear line for every failure a user can fix: the option to change, the file
that is missing, the value that is wrong. Errors raised for that purpose are :class:`KVQError`
(or a subclass that is also a ``ValueError`` where callers already catch that); the entry point
prints ``kvq: error: <line>`` and the run's ``result.json`` records the same line.

:func:`one_line` turns any exception (following ``__cause__``, which Hydra and other libraries
use to wrap the real error) or text into such a line.
"""

from __future__ import annotations

import re

__all__ = ["ConfigError", "KVQError", "MalformedConfig", "flat", "one_line"]


class KVQError(RuntimeError):
    """A failure the user can fix, reported as one line (no stack trace)."""


class ConfigError(KVQError, ValueError):
    """A configuration value is impossible (a ``ValueError`` too, as config classes raise)."""


class MalformedConfig(KVQError):
    """The configuration itself is malformed (an unknown key): exit code 2, like Hydra's own
    composition errors, never a skipped run."""


def flat(text: object) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return re.sub(r"\s+", " ", str(text)).strip()


def one_line(
    err: BaseException | object,
    limit: int | None = None,
    *,
    root_cause: bool = False,
    first_line: bool = True,
    chain: bool = False,
) -> str:
    """One line describing ``err``.

    Args:
        err: an exception or any text.
        limit: shorten to at most this many characters (``...`` appended); ``None`` = no limit.
        root_cause: for an exception, describe the innermost ``__cause__`` (the error a wrapper
            such as Hydra's instantiate re-raised) instead of the exception itself.
        first_line: keep only the first line of an exception's message (else all of it, joined).
        chain: describe the exception and each of its ``__cause__``s, first lines joined with
            ``": "`` (repeats dropped): a composition error and the error it wraps.

    Returns:
        The first line of the message with whitespace collapsed, or the exception's type name
        when it has no message.
    """
    if isinstance(err, BaseException) and chain:
        parts: list[str] = []
        cause: BaseException | None = err
        while cause is not None:
            text = one_line(cause)
            if text not in parts:
                parts.append(text)
            cause = cause.__cause__
        line = ": ".join(parts)
    elif isinstance(err, BaseException):
        if root_cause:
            while err.__cause__ is not None:
                err = err.__cause__
        lines = str(err).strip().splitlines()
        line = flat(lines[0] if first_line else " ".join(lines)) if lines else type(err).__name__
    else:
        line = flat(err)
    if limit is not None and len(line) > limit:
        line = line[: limit - 3] + "..."
    return line
