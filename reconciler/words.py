"""Counts in plain English for the messages people read ("1 track", "2 tracks").

Where it sits: beside the CLI and the reports; no I/O, no imports.
"""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """``n`` and ``word``, with ``many`` (default ``word + "s"``) unless ``n`` is 1."""
    return f"{n} {word}" if n == 1 else f"{n} {many or word + 's'}"
