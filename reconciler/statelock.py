"""The state directory's lock: one writer per state folder.

Where it sits: taken first by the composition root (``app.open_app``), before
the ledger is opened for writing; ``status`` never takes it (it reads the
ledger in WAL mode alongside a running daemon).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import TextIO

from reconciler.errors import LockedError


class StateLock:
    """An exclusive ``flock`` on ``<state>/lock``: one writer per state dir, so two
    processes never pay for the same work twice."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "lock"
        self._file: TextIO | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise LockedError(
                f"{self.path.parent} is in use by {holder}; "
                "stop it first (status works alongside it)"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def lock_holder(state_dir: Path) -> str | None:
    """Who holds ``state_dir``'s lock now ("pid N"), or None when nobody does.

    Probed by taking it for an instant, shared, so the probe never stands in
    the way of the holder."""
    path = state_dir / "lock"
    try:
        f = path.open("r", encoding="utf-8")
    except FileNotFoundError:
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "another process"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None
