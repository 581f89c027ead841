"""Files on disk: the output folder and the trash.

Where this sits in the flow: download → audio cache → **materialise outputs**
→ ledger. :func:`prepare` copies a cached clip (see ``audio``) beside
``<out>/<soundtrack>/<track>.mp3`` (tagged by the caller, see ``tags.py``),
:func:`commit` renames it into place, and the playlist and ``tracks.json`` are
rendered and written with :func:`write_text_if_changed`. The ledger records
what was written (sha256, size, mtime_ns) so a later pass checks drift with
:func:`file_state` (a stat) and re-hashes only on mismatch. Pruned files go to
the :class:`Trash`, never straight to deletion.

Every write is atomic (see ``durable``): a hidden temp file in the
destination's directory, fsync, ``os.replace``, fsync of the directory. A
crash leaves either the old file or the new one under the real name, plus at
worst a temp that the ``sweep_*`` functions remove at start-up. OSError is
translated here into :class:`OutputError`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from stat import S_ISLNK

from reconciler.audio import probe_audio
from reconciler.durable import atomic_write, fsync_dir, make_dirs, sweep_temps, temp_in
from reconciler.errors import OutputError

_TRASH_BATCH_RE = re.compile(r"(\d{8}T\d{6}Z)-(\d+)")
_TRASH_TS_FORMAT = "%Y%m%dT%H%M%SZ"


# ---------------------------------------------------------------------------
# Hashing


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise OutputError(f"cannot read {path} to hash it: {e.strerror or e}") from e


# ---------------------------------------------------------------------------
# The output folder


def output_path(out_root: Path, soundtrack: str, filename: str) -> Path:
    """``<out_root>/<soundtrack>/<filename>``, refused unless it stays inside out_root.

    Both names must be single, non-hidden path components (hidden names are
    reserved for temp files). A soundtrack directory that is a symlink may
    point anywhere inside out_root but not outside it. The file itself may be
    a symlink: writes replace the link, they never follow it.
    """
    return OutputFolder(out_root).path(soundtrack, filename)


class OutputFolder:
    """``output_path`` for many files at once: each soundtrack folder is resolved once.

    Resolving costs two ``realpath`` walks; a pass over 10,000 tracks would
    spend most of its time there. Make a new one per pass, so a symlink
    planted between passes is still caught.
    """

    def __init__(self, out_root: Path) -> None:
        self.root = Path(os.path.abspath(out_root))
        self._resolved_root = self.root.resolve()
        self._parents: dict[str, str] = {}

    def path(self, soundtrack: str, filename: str) -> Path:
        return Path(f"{self._parent(soundtrack, filename)}/{filename}")

    def state(self, soundtrack: str, filename: str) -> tuple[int, int] | None:
        """:func:`file_state` of :meth:`path`, without building a ``Path``
        (a plan stats every output; 60,000 ``Path`` objects cost 0.4 s)."""
        return file_state(f"{self._parent(soundtrack, filename)}/{filename}")

    def changed(
        self, recorded: Iterable[tuple[str, int, int]]
    ) -> dict[str, tuple[int, int] | None]:
        """Of the ``(soundtrack/file, size, mtime_ns)`` recorded, the outputs
        whose :func:`file_state` is not that any more, with their state now.

        A plan stats every output (60,000 at 50,000 tracks): one loop, in
        which a file as recorded costs its ``stat`` and a comparison.
        """
        found: dict[str, tuple[int, int] | None] = {}
        parents: dict[str, str] = {}
        stat = os.stat
        for rel, size, mtime_ns in recorded:
            soundtrack, _, filename = rel.partition("/")
            parent = parents.get(soundtrack)
            if parent is None:
                parent = parents[soundtrack] = self._parent(soundtrack, filename)
            else:
                _plain("file name", filename, self.root)
            try:
                st = stat(f"{parent}/{filename}")
            except (FileNotFoundError, NotADirectoryError):
                found[rel] = None
                continue
            except OSError as e:
                raise OutputError(f"cannot stat {parent}/{filename}: {e.strerror or e}") from e
            if st.st_size != size or st.st_mtime_ns != mtime_ns:
                found[rel] = (st.st_size, st.st_mtime_ns)
        return found

    def _parent(self, soundtrack: str, filename: str) -> str:
        known = self._parents.get(soundtrack)
        if known is None:
            # Checked once per soundtrack: only a plain name gets here a second time.
            _plain("soundtrack", soundtrack, self.root)
            parent = f"{self.root}/{soundtrack}"
            # A plain name that is not a symlink (or not there yet) resolves
            # beneath the resolved root: one lstat instead of a realpath walk
            # of every component, which cost a cold plan 0.6 s at 5,000
            # soundtracks. Strings, not ``Path``: a plan looks at every soundtrack.
            if _may_escape(parent):
                real = Path(parent).resolve()
                if not real.is_relative_to(self._resolved_root):
                    raise OutputError(f"{parent} resolves to {real}, outside {self.root}")
            known = self._parents[soundtrack] = parent
        _plain("file name", filename, self.root)
        return known


def _plain(what: str, name: str, root: Path) -> None:
    if not name or "/" in name or "\0" in name or name[0] == ".":
        raise OutputError(
            f"{what} {name!r} is not a plain name: output paths must stay inside {root}"
        )


def _may_escape(path: str) -> bool:
    """Whether ``path`` must be resolved to know where it leads: a symlink, or unknown."""
    try:
        return S_ISLNK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False
    except OSError:
        return True


def prepare(src: Path, dest: Path, finish: Callable[[Path], None]) -> Path:
    """A copy of ``src`` beside ``dest``, changed by ``finish`` and verified, not yet in place.

    The caller commits it (:func:`commit`) or unlinks it. ``finish`` (tagging) must
    leave audio that still decodes with a positive duration: that is checked
    here, so a bad edit never reaches the output folder.
    """
    dest = Path(os.path.abspath(dest))
    try:
        make_dirs(dest.parent)
    except OSError as e:
        raise OutputError(f"cannot create {dest.parent}: {e.strerror or e}") from e
    tmp = temp_in(dest.parent)
    try:
        shutil.copyfile(src, tmp)
        finish(tmp)
        probe_audio(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {dest} from {src}: {e.strerror or e}") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def commit(tmp: Path, dest: Path) -> tuple[int, int]:
    """Rename a file from :func:`prepare` onto ``dest``; return dest's (size, mtime_ns)."""
    dest = Path(os.path.abspath(dest))
    try:
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
        stat = dest.stat()
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {dest}: {e.strerror or e}") from e
    return stat.st_size, stat.st_mtime_ns


def sweep_output_temps(out_root: Path) -> int:
    """Remove temp files a crash left anywhere under out_root; call at start-up only."""
    if not out_root.is_dir():
        return 0
    try:
        return sweep_temps(out_root, recursive=True)
    except OSError as e:
        raise OutputError(f"cannot sweep temp files in {out_root}: {e.strerror or e}") from e


def file_state(path: str | Path) -> tuple[int, int] | None:
    """(size, mtime_ns) of a file, None when it is missing; one stat call."""
    try:
        stat = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise OutputError(f"cannot stat {path}: {e.strerror or e}") from e
    return stat.st_size, stat.st_mtime_ns


def write_text_if_changed(dest: Path, text: str) -> bool:
    """Write ``text`` (UTF-8) atomically unless dest holds exactly it; True if written.

    Rule 12: a converged pass must not even bump an mtime, or the watcher and
    any sync tool downstream would see a change that is not one.
    """
    data = text.encode("utf-8")
    try:
        state = file_state(dest)
        if state is not None and state[0] == len(data) and Path(dest).read_bytes() == data:
            return False
        atomic_write(Path(os.path.abspath(dest)), lambda out: out.write(data))
    except OSError as e:
        raise OutputError(f"cannot write {dest}: {e.strerror or e}") from e
    return True


# ---------------------------------------------------------------------------
# Playlist and tracks.json


@dataclass(frozen=True, slots=True)
class TrackOutput:
    """One audio file of a soundtrack, in spec order."""

    filename: str  # "morning-focus.mp3" or "night-drive-2.mp3"
    track: str
    clip_index: int  # 1 or 2
    title: str | None
    lyrics: str | None
    duration: float | None
    clip_id: str
    fingerprint: str
    tags: str | None


def render_playlist(entries: Sequence[TrackOutput]) -> str:
    """Extended M3U (``playlist.m3u8``) with file names relative to the soundtrack folder."""
    lines = ["#EXTM3U"]
    for entry in entries:
        # -1 is M3U's "length unknown".
        seconds = -1 if entry.duration is None else round(entry.duration)
        # A line break in a title would end the #EXTINF line early.
        label = " ".join((entry.title or "").split()) or entry.track
        lines.append(f"#EXTINF:{seconds},{label}")
        lines.append(entry.filename)
    return "\n".join(lines) + "\n"


def render_tracks_json(soundtrack: str, entries: Sequence[TrackOutput]) -> str:
    """``tracks.json``: byte-stable for equal input, so unchanged soundtracks write nothing.

    One track per line: easy to read and to diff, and each line comes from
    json's C encoder (an indented dump runs in pure Python, about five times
    slower, which a pass over 1,000 soundtracks feels).
    """
    rows = [
        json.dumps(
            {
                "track": e.track,
                "file": e.filename,
                "clip": e.clip_index,
                "title": e.title,
                "lyrics": e.lyrics,
                "duration": e.duration,
                "clip_id": e.clip_id,
                "fingerprint": e.fingerprint,
                "tags": e.tags,
            },
            sort_keys=True,
            ensure_ascii=False,
        )
        for e in entries
    ]
    tracks = "[\n    " + ",\n    ".join(rows) + "\n  ]" if rows else "[]"
    name = json.dumps(soundtrack, ensure_ascii=False)
    return f'{{\n  "soundtrack": {name},\n  "tracks": {tracks}\n}}\n'


# ---------------------------------------------------------------------------
# Trash: pruned files wait here for the grace period before deletion


@dataclass(frozen=True)
class TrashEntry:
    """One pruned file waiting in the trash."""

    #: Where it was, relative to the output folder (``soundtrack/file``).
    relative: str
    #: Where it is now.
    trashed: Path
    moved_at: float
    size: int


class Trash:
    """Pruned outputs wait at ``<root>/<UTC timestamp>-<n>/<path under out_root>``.

    A prune that was a mistake can be undone by moving files back until
    :meth:`empty` removes batches older than the grace period.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root))

    def move(self, path: Path, out_root: Path, now: float) -> Path:
        """Move ``path`` (inside out_root) into this trash; return where it went."""
        path = Path(os.path.abspath(path))
        out = Path(os.path.abspath(out_root)).resolve()
        # Resolve the parent only: a symlink being pruned is moved, not followed.
        parent = path.parent.resolve()
        if path.name in ("", ".", "..") or not parent.is_relative_to(out):
            raise OutputError(f"refusing to trash {path}: it is not inside {out_root}")
        relative = parent.relative_to(out) / path.name
        if not os.path.lexists(path):
            raise OutputError(f"cannot trash {path}: it does not exist")
        stamp = datetime.fromtimestamp(now, UTC).strftime(_TRASH_TS_FORMAT)
        n = 0
        # One batch per timestamp; a name clash (same file pruned twice within
        # a second) opens the next batch instead of overwriting.
        while os.path.lexists(self.root / f"{stamp}-{n}" / relative):
            n += 1
        target = self.root / f"{stamp}-{n}" / relative
        try:
            make_dirs(target.parent)
            try:
                os.replace(path, target)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                # Trash on another filesystem: copy then delete (a crash in
                # between leaves both copies, never neither).
                shutil.move(path, target)
            fsync_dir(target.parent)
            fsync_dir(path.parent)
        except OSError as e:
            raise OutputError(f"cannot move {path} to the trash {target}: {e.strerror or e}") from e
        return target

    def _batches(self) -> Iterator[tuple[Path, datetime]]:
        """Each batch folder and when it was moved here, oldest first (raises OSError)."""
        if not self.root.is_dir():
            return
        for batch in sorted(self.root.iterdir()):
            match = _TRASH_BATCH_RE.fullmatch(batch.name)
            # Anything not named like a batch was not put here by us: keep it.
            if match is None or batch.is_symlink() or not batch.is_dir():
                continue
            yield batch, datetime.strptime(match[1], _TRASH_TS_FORMAT).replace(tzinfo=UTC)

    def empty(self, grace_seconds: float, now: float) -> list[Path]:
        """Delete trash batches older than ``grace_seconds``; return the batch dirs removed."""
        removed: list[Path] = []
        try:
            for batch, moved_at in self._batches():
                if now - moved_at.timestamp() > grace_seconds:
                    shutil.rmtree(batch)
                    removed.append(batch)
        except OSError as e:
            raise OutputError(f"cannot empty the trash {self.root}: {e.strerror or e}") from e
        return removed

    def entries(self) -> list[TrashEntry]:
        """Every file in the trash, oldest batch first."""
        found: list[TrashEntry] = []
        try:
            for batch, moved_at in self._batches():
                for path in sorted(batch.rglob("*")):
                    if path.is_dir() and not path.is_symlink():
                        continue
                    found.append(
                        TrashEntry(
                            relative=path.relative_to(batch).as_posix(),
                            trashed=path,
                            moved_at=moved_at.timestamp(),
                            size=path.lstat().st_size,
                        )
                    )
        except OSError as e:
            raise OutputError(f"cannot read the trash {self.root}: {e.strerror or e}") from e
        return found

    def restore(self, entry: TrashEntry, out_root: Path) -> Path:
        """Put ``entry`` back where it was; never overwrite a file that is there now."""
        dest = Path(os.path.abspath(out_root)) / entry.relative
        try:
            make_dirs(dest.parent)
            try:
                # A hard link fails if dest exists, where a rename would replace it.
                os.link(entry.trashed, dest, follow_symlinks=False)
            except FileExistsError:
                raise OutputError(
                    f"{dest} exists; move it away first (restore never overwrites)"
                ) from None
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                # Trash on another filesystem: copy beside dest, then link into place.
                temp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.restore")
                shutil.copy2(entry.trashed, temp, follow_symlinks=False)
                try:
                    os.link(temp, dest, follow_symlinks=False)
                except FileExistsError:
                    raise OutputError(
                        f"{dest} exists; move it away first (restore never overwrites)"
                    ) from None
                finally:
                    os.unlink(temp)
            fsync_dir(dest.parent)
            os.unlink(entry.trashed)
            fsync_dir(entry.trashed.parent)
        except OSError as e:
            raise OutputError(
                f"cannot restore {dest} from {entry.trashed}: {e.strerror or e}"
            ) from e
        # Leave no empty folders behind in the trash.
        for folder in entry.trashed.parents:
            if folder == self.root:
                break
            with contextlib.suppress(OSError):
                folder.rmdir()
        return dest
