"""Importing a library without the optional extras reconciler never uses.

Where it sits: beside the modules that are a library's one home (the ledger
for sqlite-utils, the API client for httpx, logging for structlog). Some
libraries import another at their own import time only for an extra: numpy
for sqlite-utils' numpy column types, rich for structlog's pretty tracebacks,
pygments and rich for httpx's command line. Those imports cost start-up time
and memory in every command. ``without`` makes the named modules
unimportable for the length of one import (as when they are not installed,
which each library supports) and importable again after it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def without(*names: str) -> Iterator[None]:
    """Hide ``names`` from imports in the block, unless already imported:
    a process that has one loses nothing by sharing it."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # None: "cannot be imported"
    try:
        yield
    finally:
        for name in hidden:
            del sys.modules[name]
