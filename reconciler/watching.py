"""Watching the specs and output folders: hints that a pass is worth running now.

Where it sits: beside the daemon loop (``daemon``), which it wakes. Events are
hints, never facts: every pass rescans for the truth, so a missed event costs
at most a delay until the periodic rescan. This is the one module that uses
watchfiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from watchfiles import Change, awatch

from reconciler.specs import is_spec_candidate

if TYPE_CHECKING:
    from reconciler.ledger import Ledger

# The watcher. watchfiles hands over changes once they have been quiet for
# STEP ms (at most DEBOUNCE ms after the first); the batching window is ours.
WATCH_STEP_MS = 100
WATCH_DEBOUNCE_MS = 300
#: Without events, the watcher still checks every so often that the folder it
#: watches is the one at the path (it may have been replaced wholesale).
WATCH_TIMEOUT_MS = 5_000
#: While the specs folder is missing, its nearest ancestor is watched; checked more often.
ANCESTOR_TIMEOUT_MS = 1_000
WATCH_RETRY_CAP = 60.0


class SpecWatcher:
    """Watches the specs folder with watchfiles and calls ``on_change`` for relevant events.

    Events are hints; the pass rescans for the truth. Temp, swap, backup and hidden files are not
    relevant (``is_spec_candidate``); folders are, since a folder moved in or
    out carries its files without an event for each. While the specs folder is
    missing, its nearest existing ancestor is watched (not recursively) until
    it appears; when it is replaced wholesale (deleted and recreated, or
    renamed over), the watch moves to the new folder. Every restart of the
    watch is itself a hint, since something may have changed unseen.
    """

    def __init__(self, root: Path, on_change: Callable[[], None]) -> None:
        # Absolute, because watchfiles reports absolute paths.
        self.root = root.absolute()
        self.on_change = on_change
        self.log = structlog.get_logger("reconciler")
        self._stop = asyncio.Event()
        self._established = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._restart = False

    async def start(self) -> None:
        """Start watching; returns once the first watch is in place (or has failed)."""
        self._task = asyncio.create_task(self._run())
        await self._established.wait()

    async def stop(self) -> None:
        # watchfiles checks the event every WATCH_STEP_MS from its thread and returns.
        self._stop.set()
        if self._task is not None:
            task, self._task = self._task, None
            with contextlib.suppress(Exception):
                await task

    def retarget(self, root: Path) -> None:
        """Watch another folder from now on (SIGHUP changed ``specs``)."""
        self.root = root.absolute()
        self._restart = True

    async def _run(self) -> None:
        retry = 1.0
        first = True
        while not self._stop.is_set():
            self._restart = False
            try:
                if self.root.is_dir():
                    await self._watch_root(hint=not first)
                else:
                    await self._watch_ancestor(hint=not first)
                retry = 1.0
            except Exception as exc:
                # Any failure (the inotify watch limit, a vanished folder, a bug):
                # log, back off, watch again; the periodic rescan runs meanwhile.
                self.log.error("watch.failed", path=str(self.root), error=str(exc), retry=retry)
                self._established.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), retry)
                retry = min(retry * 2, WATCH_RETRY_CAP)
            first = False

    def _mark_started(self, mode: str, path: Path, *, hint: bool) -> None:
        # awatch sets up its inotify watches synchronously on the first step
        # of the loop that iterates it, before it first yields to the event
        # loop; whoever awaits _established resumes only after that step.
        self._established.set()
        self.log.info("watch.started", mode=mode, path=str(path))
        if hint:
            self.on_change()

    async def _watch_root(self, *, hint: bool) -> None:
        root = self.root
        identity = _identity(root)
        dirs = _subdirs(root)
        events = self._events(root, timeout_ms=WATCH_TIMEOUT_MS, recursive=True)
        self._mark_started("folder", root, hint=hint)
        async with contextlib.aclosing(events):
            async for changes in events:
                if self._restart or _identity(root) != identity:
                    return
                if self._relevant(root, changes, dirs):
                    self.on_change()

    async def _watch_ancestor(self, *, hint: bool) -> None:
        root = self.root
        ancestor = _nearest_dir(root)
        self.log.warning("watch.folder_missing", path=str(root), watching=str(ancestor))
        events = self._events(ancestor, timeout_ms=ANCESTOR_TIMEOUT_MS, recursive=False)
        self._mark_started("ancestor", ancestor, hint=hint)
        async with contextlib.aclosing(events):
            async for _ in events:
                if self._restart or root.is_dir() or _nearest_dir(root) != ancestor:
                    return

    def _events(
        self, path: Path, *, timeout_ms: int, recursive: bool
    ) -> AsyncGenerator[set[tuple[Change, str]], None]:
        # yield_on_timeout: an empty set every timeout_ms, to re-check the folder.
        return awatch(
            path,
            watch_filter=None,
            debounce=WATCH_DEBOUNCE_MS,
            step=WATCH_STEP_MS,
            stop_event=self._stop,
            rust_timeout=timeout_ms,
            yield_on_timeout=True,
            recursive=recursive,
        )

    def _relevant(self, root: Path, changes: set[tuple[Change, str]], dirs: set[Path]) -> bool:
        relevant = False
        for change, name in changes:
            path = Path(name)
            if path == root:
                relevant = True
                continue
            try:
                rel = path.relative_to(root)
            except ValueError:
                continue
            if any(part.startswith(".") for part in rel.parts):
                continue
            if change != Change.deleted and path.is_dir():
                dirs.add(rel)
                relevant = True
            elif change == Change.deleted and rel in dirs:
                dirs.discard(rel)
                relevant = True
            elif is_spec_candidate(rel):
                relevant = True
        return relevant


class OutputWatcher(SpecWatcher):
    """Watches the output folder so a deleted or replaced output comes back within seconds.

    Only a file the ledger says reconciler wrote, and whose size or mtime no
    longer match that record, is relevant (``drifted``): the reconciler's own
    writes (hidden temp files, then a rename to a file whose state the ledger
    records) and a person's other files wake nothing. Without this, a deleted
    output would wait for the periodic rescan.
    """

    def __init__(
        self, root: Path, on_change: Callable[[], None], drifted: Callable[[str], bool]
    ) -> None:
        super().__init__(root, on_change)
        self.drifted = drifted

    def _relevant(self, root: Path, changes: set[tuple[Change, str]], dirs: set[Path]) -> bool:
        for _, name in changes:
            path = Path(name)
            if path == root:
                return True
            try:
                rel = path.relative_to(root)
            except ValueError:
                continue
            if self.drifted(rel.as_posix()):
                return True
        return False


def output_drifted(ledger: Ledger, out_dir: Path, rel: str) -> bool:
    """Whether an output the ledger recorded at ``rel`` (or under it) is gone or changed."""
    for rec in ledger.outputs_at(rel):
        try:
            st = (out_dir / rec.path).stat()
        except OSError:
            return True
        if (st.st_size, st.st_mtime_ns) != (rec.size, rec.mtime_ns):
            return True
    return False


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _subdirs(root: Path) -> set[Path]:
    """Visible folders under ``root``, relative: a deleted one is a relevant event."""
    found: set[Path] = set()
    for top, names, _ in os.walk(root):
        names[:] = [n for n in names if not n.startswith(".")]
        found.update(Path(top, n).relative_to(root) for n in names)
    return found


def _nearest_dir(path: Path) -> Path:
    for candidate in path.absolute().parents:
        if candidate.is_dir():
            return candidate
    return Path("/")
