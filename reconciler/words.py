"""Counts in plain English for the messages people read ("1 track", "2 tracks").

Where it sits: beside the CLI and the reports; no I/O. Also the one
did-you-mean every message about a mistyped name uses.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def plural(n: int, word: str, many: str | None = None) -> str:
    """``n`` and ``word``, with ``many`` (default ``word + "s"``) unless ``n`` is 1."""
    return f"{n} {word}" if n == 1 else f"{n} {many or word + 's'}"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or '' when none is close."""
    close = difflib.get_close_matches(word, sorted(set(choices)), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
