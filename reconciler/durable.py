"""Durable writes: temp file in the destination's folder, fsync, rename, fsync the folder.

Where it sits: under ``outputs`` (the output folder) and ``audio`` (the cache),
which both write through these helpers. A crash leaves either the old file or
the new one under the real name, plus at worst a hidden temp file that
:func:`sweep_temps` removes at start-up.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO

# Hidden (so players and people ignore them) and unmistakable (so a sweep never
# removes anything else). Output names from specs never start with ".".
TEMP_PREFIX = ".reconciler-tmp-"


def fsync_dir(directory: Path) -> None:
    """Persist a rename or create inside ``directory`` (the entry, not only the data)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(directory: Path) -> None:
    """Create ``directory`` and missing parents, fsyncing each new entry's parent.

    Without the parent fsync a crash can lose a freshly created directory, and
    with it a file that was "durably" renamed into it.
    """
    missing: list[Path] = []
    current = directory
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for new_dir in reversed(missing):
        new_dir.mkdir(exist_ok=True)
        fsync_dir(new_dir.parent)


def temp_in(directory: Path) -> Path:
    return directory / f"{TEMP_PREFIX}{uuid.uuid4().hex}"


def atomic_write(dest: Path, fill: Callable[[IO[bytes]], object]) -> None:
    """Write ``dest`` through a temp file in its directory; raises OSError.

    The temp is removed when anything fails in-process; only a hard crash
    (power loss, SIGKILL) leaves it behind for a sweep.
    """
    make_dirs(dest.parent)
    tmp = temp_in(dest.parent)
    try:
        with open(tmp, "xb") as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


def sweep_temps(directory: Path, *, recursive: bool) -> int:
    """Remove our temp files (regular files named ``TEMP_PREFIX*``) under ``directory``."""
    removed = 0
    for dirpath, dirnames, filenames in os.walk(directory):
        if not recursive:
            dirnames.clear()
        for name in filenames:
            if not name.startswith(TEMP_PREFIX):
                continue
            path = Path(dirpath, name)
            # A symlink carrying our prefix was not made by us: leave it.
            if path.is_file() and not path.is_symlink():
                path.unlink()
                removed += 1
    return removed
