"""Spec files: find the candidates, wait until each has stopped changing, read it safely.

Where it sits: the first step of every pass::

    spec files → validated specs → desired state → plan → submit → track
    → download → outputs → ledger → status

This module owns the first arrow's reading half. It finds the candidate files
under the specs folder and reads each one defensively (no symlinks out of the
folder, no special or oversized files, no half-written files, and for a pass
none that is still changing: see ``observe``), then hands the bytes to
``rules`` (through ``formats``) and gathers the folder into one :class:`SpecScan`.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from reconciler.errors import SpecError, SpecProblem
from reconciler.limits import DEFAULT_MODELS, FIELD_LIMITS, FieldLimits
from reconciler.specs.formats import SPEC_SUFFIXES
from reconciler.specs.rules import SpecFile, _parse

MAX_SPEC_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class SpecScan:
    """The whole specs folder as one pass sees it.

    ``root_state`` tells the planner whether pruning is safe: only ``"ok"``
    means the folder was read completely. A folder with a subfolder that
    cannot be listed is ``"unreadable"``, because the tracks in it are unknown,
    not gone, and a bad spec must remove nothing.
    """

    root_state: Literal["ok", "missing", "unreadable", "empty"]
    files: Mapping[str, SpecFile]
    errors: Mapping[str, SpecError]
    #: Files still changing (see :class:`Settling`), with the note to show for each.
    settling: Mapping[str, str] = field(default_factory=dict)
    #: When the first of them may be read: the end of its window, on the scan's clock.
    settled_by: float | None = None
    #: How every file read looked, to pass as ``Settling.previous`` next time.
    observed: Mapping[str, Observation] = field(default_factory=dict)
    #: The :func:`stamp` of each file in ``files`` as it was read, to be
    #: trusted unread next time (see ``scan_specs``'s ``stamps``); it ends in
    #: ``YOUNG`` when the file was too young when read to be sure of it.
    stamps: Mapping[str, str] = field(default_factory=dict)


#: A file changed within this long of being read may change again within the
#: same timestamp (2 s is the coarsest granularity, FAT's): its stamp is not
#: trusted, so it is read again (git's "racy" files).
RACY_NS = 2_000_000_000
#: The end of the stamp of a file read within ``RACY_NS`` of its last change:
#: it never equals a :func:`stamp`, so the file is always read. It is kept
#: rather than dropped so that the same file found older later is not a
#: change to record (a converged reconciler writes nothing).
YOUNG = " young"


def stamp(st: os.stat_result) -> str:
    """What tells that a file was not written since: size, mtime, inode and
    ctime (which no tool can set back, unlike mtime)."""
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}"


def same_file(recorded: str, read: str) -> bool:
    """Whether two stamps (either maybe ``YOUNG``) are of one unchanged file."""
    return recorded.removesuffix(YOUNG) == read.removesuffix(YOUNG)


# ---------------------------------------------------------------------------
# Waiting for a file to stop changing


@dataclass(frozen=True, slots=True)
class Look:
    """What one read of a spec file shows: enough to tell that it changed."""

    size: int
    mtime_ns: int
    digest: str


@dataclass(frozen=True, slots=True)
class Observation:
    """A spec file's look, since when it has looked so, and when it was last read.

    Times are on the clock of the scans; the file is stable once
    ``since + window <= now``.
    """

    look: Look
    since: float
    seen: float


def observe(previous: Observation | None, look: Look, now: float, window: float) -> Observation:
    """The file's observation after reading ``look`` at ``now``.

    A file that looks as it did keeps its ``since``. Otherwise its mtime is
    believed when it is already ``window`` old and later than the last read
    (or there was none): the file has not changed since, so a folder nobody
    is writing to is read at once, and so is a file saved once, found by the
    pass its save scheduled. The tools that set an old mtime on purpose
    (``cp -p``, ``tar``, ``rsync -t``) set it after the last byte, so at
    worst they make a changed file look older than our last read: then, as
    for a young or future mtime, the window starts now.
    """
    if previous is not None and previous.look == look:
        return replace(previous, seen=now)
    modified = look.mtime_ns / 1e9
    after_last_read = previous is None or modified > previous.seen
    if after_last_read and now - modified >= window:
        return Observation(look, modified, now)
    return Observation(look, now, now)


@dataclass(frozen=True)
class Settling:
    """Read a file only once it has stopped changing (paying for a half-written
    prompt is paying twice): ``scan_specs`` holds back a file until it has
    looked the same (size, mtime, content digest) for ``window`` seconds.

    ``previous`` is the last scan's ``observed``; ``now`` the scan's time.
    With ``hold`` False the settling files are read all the same and only
    reported (``plan`` shows what the folder says now).
    """

    previous: Mapping[str, Observation]
    now: float
    window: float
    hold: bool = True


# ---------------------------------------------------------------------------
# Finding and reading files

# Editors and sync tools write these next to the real file; the suffix test
# already excludes "x.yaml~", "#x.yaml#", "x.yaml.swp" and vim's "4913" probe.
_TEMP_SUFFIXES = frozenset({".swp", ".swx", ".tmp", ".bak", ".orig", ".part"})


def is_spec_candidate(path: Path | str) -> bool:
    """Whether ``path`` (relative to the specs root; a string is a POSIX path)
    should be read as a spec.

    Hidden files and folders, editor swap/backup files and partial downloads
    are not candidates, so saving a file in an editor never shows a
    half-written neighbour to the reconciler. On strings, as ``pathlib``
    reads suffixes: a scan asks for every file (5,000 ``Path`` objects were a
    third of reading an unchanged folder).
    """
    parts = (path if isinstance(path, str) else path.as_posix()).split("/")
    if any(part.startswith(".") for part in parts):
        return False
    name = parts[-1]
    suffixes = [] if name.endswith(".") else name.split(".")[1:]
    if not suffixes or f".{suffixes[-1]}".lower() not in SPEC_SUFFIXES:
        return False
    if name.startswith("#"):  # emacs auto-save "#x.yaml" variants
        return False
    return not any(f".{s}".lower() in _TEMP_SUFFIXES for s in suffixes[:-1])


def load_spec_file(
    root: Path,
    path: Path,
    *,
    models: Sequence[str] = DEFAULT_MODELS,
    limits: FieldLimits = FIELD_LIMITS,
    label_root: str | None = None,
) -> SpecFile:
    """Read and validate one spec file under ``root``.

    ``path`` is either inside ``root`` (``root / "a.yaml"``) or relative to it
    (``"a.yaml"``). Errors are labelled ``f"{label_root or root.name}/{rel}"``.
    Raises :class:`SpecError` for anything wrong, reading included.
    """
    rel = _relative(root, path)
    label = _label(root.name if label_root is None else label_root, rel)
    data, _ = _read_spec_bytes(root, rel, label)
    assert data is not None
    return _parse(label, data, rel, models, limits)[0]


def scan_specs(
    root: Path,
    *,
    models: Sequence[str] = DEFAULT_MODELS,
    limits: FieldLimits = FIELD_LIMITS,
    reuse: Mapping[str, SpecFile] | None = None,
    settle: Settling | None = None,
    changed: Collection[str] | None = None,
    last_scan: SpecScan | None = None,
    stamps: Mapping[str, str] | None = None,
    wall_ns: Callable[[], int] = time.time_ns,
) -> SpecScan:
    """Read every candidate file under ``root``, sorted by relative path.

    With ``changed`` (relative paths a watcher saw change) and ``last_scan``
    (the last scan, of a completely read folder), only those paths are read
    again, with the files that were invalid or still changing: every other
    file keeps its ``last_scan`` result unread, without a walk of the folder.
    The caller vouches that nothing else changed (a folder event means a
    full scan); a full scan now and then catches anything missed.

    With ``settle``, a file that has not yet looked the same for the settle
    window is held back (neither in ``files`` nor in ``errors``, but in
    ``settling``): the caller keeps its last good version in force.

    A file whose bytes hash to ``reuse[rel].digest`` is not parsed again: the
    earlier object is returned, which keeps a pass over an unchanged folder
    cheap. Pass ``reuse`` only from scans made with the same ``models`` and ``limits``.
    ``reuse`` also settles two files naming one soundtrack: the file whose
    earlier version named it keeps it; otherwise the first by path does.
    Symlinked folders are not followed (they could leave the root or loop);
    symlinked files are read when they resolve inside the root.

    ``stamps`` (a cold ``plan``: what the ledger recorded of the last good
    versions in ``reuse``, from an earlier scan's ``stamps``) spares reading
    a file whose :func:`stamp` is unchanged: ``reuse[rel]`` is taken as it
    is. Only the stamp of a file already ``RACY_NS`` old when it was read
    (by ``wall_ns``, the clock file times are on) can match, so a write in
    the same tick as that read still changes the ctime.
    """
    try:
        root_stat = root.stat()
    except FileNotFoundError:
        return SpecScan("missing", {}, {})
    except OSError:
        return SpecScan("unreadable", {}, {})
    if not stat.S_ISDIR(root_stat.st_mode):
        return SpecScan("unreadable", {}, {})
    kept: Mapping[str, SpecFile] = {}
    if changed is not None and last_scan is not None and last_scan.root_state == "ok":
        rels, kept = _changed_paths(root, last_scan, changed)
        complete = True
    else:
        rels, complete = _walk(root)
    if not rels:
        return SpecScan("empty" if complete else "unreadable", {}, {})

    prefix = root.name
    parsed: list[tuple[str, bytes | None, SpecFile]] = []
    errors: dict[str, SpecError] = {}
    settling: dict[str, str] = {}
    settled_by: float | None = None
    observed: dict[str, Observation] = {}
    # Before any read: a file changed after this may have been read changing.
    young = wall_ns() - RACY_NS
    new_stamps: dict[str, str] = {}
    try:
        real_root: Path | None = root.resolve(strict=True)
    except OSError:
        real_root = None  # each read says why

    for rel in rels if not kept else [r for r in rels if r not in kept]:
        label = _label(prefix, rel)
        previous = reuse.get(rel) if reuse else None
        try:
            known = stamps.get(rel) if stamps and previous is not None else None
            data, st = _read_spec_bytes(root, rel, label, unless=known, real_root=real_root)
            if data is None:
                # Not written since the read its stamp records: the last good
                # version is what it holds.
                assert previous is not None
                digest = previous.digest
                new_stamps[rel] = stamp(st)
            else:
                digest = hashlib.sha256(data).hexdigest()
                racy = max(st.st_mtime_ns, st.st_ctime_ns) >= young
                new_stamps[rel] = stamp(st) + (YOUNG if racy else "")
            if settle is not None:
                look = Look(st.st_size, st.st_mtime_ns, digest)
                seen = observe(settle.previous.get(rel), look, settle.now, settle.window)
                observed[rel] = seen
                ready_at = seen.since + settle.window
                if ready_at > settle.now:
                    settling[rel] = (
                        f"{label}: is still changing; it is read once it has been "
                        f"unchanged for {settle.window:g} s"
                    )
                    settled_by = ready_at if settled_by is None else min(settled_by, ready_at)
                    if settle.hold:
                        continue
            if previous is not None and previous.digest == digest:
                spec = previous
            else:
                assert data is not None
                spec = _parse(label, data, rel, models, limits)[0]
        except SpecError as exc:
            errors[rel] = exc
            continue
        parsed.append((rel, data, spec))
    if last_scan is not None and kept:
        for rel in kept:
            if rel in last_scan.stamps:
                new_stamps[rel] = last_scan.stamps[rel]
        if _as_before(last_scan, len(kept), parsed, errors, settling):
            # The files read again are what they were: so is the whole scan.
            return replace(
                last_scan, observed={**last_scan.observed, **observed}, stamps=new_stamps
            )
        for rel, unread in kept.items():
            # Not read (its bytes are None): unchanged since the previous scan.
            parsed.append((rel, None, unread))
            if rel in last_scan.observed:
                observed[rel] = last_scan.observed[rel]

    def incumbent_first(entry: tuple[str, bytes | None, SpecFile]) -> tuple[bool, str]:
        # A soundtrack stays with the file whose last good version defined it:
        # a file dropped in later that names it (even one sorting first) is
        # the duplicate, so it can never take over another file's outputs.
        rel, _, spec = entry
        previous = reuse.get(rel) if reuse else None
        return (previous is None or previous.soundtrack != spec.soundtrack, rel)

    files: dict[str, SpecFile] = {}
    owners: dict[str, str] = {}  # soundtrack name -> label of the file that defines it
    # An invalid file keeps its last good version in force, and with it its
    # soundtrack: another file naming it is the duplicate (and is reported),
    # unless that file defined it itself last time.
    incumbents = {
        spec.soundtrack for rel, _, spec in parsed if not incumbent_first((rel, b"", spec))[0]
    }
    for rel in errors:
        previous = reuse.get(rel) if reuse else None
        if previous is not None and previous.soundtrack not in incumbents:
            owners.setdefault(previous.soundtrack, _label(prefix, rel))
    for rel, body, spec in sorted(parsed, key=incumbent_first):
        label = _label(prefix, rel)
        owner = owners.get(spec.soundtrack)
        if owner is not None:
            # Only now is the line needed; parsing again is cheaper than
            # carrying it on every SpecFile for this rare case.
            text = body if body is not None else _read_spec_bytes(root, rel, label)[0]
            assert text is not None
            line = _parse(label, text, rel, models, limits)[1]
            message = (
                f"soundtrack '{spec.soundtrack}' is already defined by {owner}; "
                "give this file another `soundtrack:` name"
            )
            errors[rel] = SpecError([SpecProblem(label, line, "soundtrack", message)])
            continue
        owners[spec.soundtrack] = label
        files[rel] = spec
    files = {rel: files[rel] for rel in sorted(files)}
    errors = {rel: errors[rel] for rel in sorted(errors)}
    root_state: Literal["ok", "unreadable"] = "ok" if complete else "unreadable"
    kept_stamps = {rel: new_stamps[rel] for rel in files if rel in new_stamps}
    return SpecScan(root_state, files, errors, settling, settled_by, observed, kept_stamps)


def _changed_paths(
    root: Path, previous: SpecScan, changed: Collection[str]
) -> tuple[list[str], dict[str, SpecFile]]:
    """The candidate files after ``changed`` changed, and the previous results kept.

    Files that were invalid or still changing are read again too: a file
    is reported invalid once its neighbour claims its soundtrack, and a
    settling file is read when its window ends, with no event of its own.
    """
    again = {*changed, *previous.errors, *previous.settling}
    kept = {rel: spec for rel, spec in previous.files.items() if rel not in again}
    listed = [rel for rel in again if _is_listed(root, rel)]
    return sorted({*kept, *listed}), kept


def _as_before(
    last_scan: SpecScan,
    kept: int,
    parsed: Sequence[tuple[str, bytes | None, SpecFile]],
    errors: Mapping[str, SpecError],
    settling: Mapping[str, str],
) -> bool:
    """Whether the files read again (``parsed``, ``errors``, ``settling``; the
    other ``kept`` files were not read) are exactly what ``last_scan`` had."""
    if errors or settling or last_scan.errors or last_scan.settling:
        return False
    if len(parsed) != len(last_scan.files) - kept:
        return False
    return all(last_scan.files.get(rel) is spec for rel, _, spec in parsed)


def _is_listed(root: Path, rel: str) -> bool:
    """Whether the walk of ``root`` (``_walk``) would list ``rel``."""
    if not is_spec_candidate(rel):
        return False
    path = root
    for part in rel.split("/")[:-1]:
        path = path / part
        # The walk does not enter symlinked folders.
        if path.is_symlink() or not path.is_dir():
            return False
    try:
        st = (root / rel).lstat()
    except OSError:
        return False
    if stat.S_ISDIR(st.st_mode):
        return False
    return not (stat.S_ISLNK(st.st_mode) and (root / rel).is_dir())


def _walk(root: Path) -> tuple[list[str], bool]:
    """Candidate files under ``root`` as sorted POSIX relative paths.

    The flag is False when some folder could not be listed.
    """
    found: list[str] = []
    complete = True
    pending: list[tuple[str, str]] = [(os.fspath(root), "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    rel = prefix + entry.name
                    if entry.is_dir(follow_symlinks=False):
                        if not entry.name.startswith("."):
                            pending.append((entry.path, rel + "/"))
                    elif is_spec_candidate(rel) and not (entry.is_symlink() and entry.is_dir()):
                        found.append(rel)
        except OSError:
            complete = False
    found.sort()
    return found, complete


def _relative(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _label(prefix: str, rel: str) -> str:
    label = f"{prefix}/{rel}" if prefix else rel
    # A file name may hold a newline: escaped, the report stays one line per problem.
    return label if label.isprintable() else repr(label)


def _read_spec_bytes(
    root: Path, rel: str, label: str, unless: str | None = None, real_root: Path | None = None
) -> tuple[bytes | None, os.stat_result]:
    """The file's bytes and its ``stat`` after the read, read only if it is a
    regular file inside ``root``; no bytes (None) when its :func:`stamp` is ``unless``.

    ``real_root`` is ``root`` resolved, when the caller resolved it once for many files.
    """

    def refuse(message: str) -> SpecError:
        return SpecError([SpecProblem(label, None, None, message)])

    try:
        if real_root is None:
            real_root = root.resolve(strict=True)
        real, before = _resolve_under(real_root, root, rel, refuse)
        if not stat.S_ISREG(before.st_mode):
            raise refuse("is not a regular file")
        if before.st_size > MAX_SPEC_BYTES:
            raise refuse(_too_large(before.st_size))
        if unless is not None and stamp(before) == unless:
            return None, before
        # O_NOFOLLOW: the path was resolved above, so a symlink here means it
        # was swapped in since; O_NONBLOCK: a FIFO swapped in cannot hang us.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(real, flags)
        try:
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (before.st_dev, before.st_ino):
                raise refuse(_CHANGING)
            chunks: list[bytes] = []
            size = 0
            while chunk := os.read(fd, 1 << 20):
                size += len(chunk)
                if size > MAX_SPEC_BYTES:
                    raise refuse(_too_large(size))
                chunks.append(chunk)
            after = os.fstat(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise refuse(f"cannot be read: {exc.strerror or exc}") from None
    if (opened.st_size, opened.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or (
        size != after.st_size
    ):
        raise refuse(_CHANGING)
    return b"".join(chunks), after


def _resolve_under(
    real_root: Path, root: Path, rel: str, refuse: Callable[[str], SpecError]
) -> tuple[str, os.stat_result]:
    """``(root / rel).resolve(strict=True)`` and its ``stat``, where ``real_root``
    is ``root`` resolved; raises ``refuse(why)`` if that is not inside ``real_root``.

    When no component of ``rel`` is a symlink or a dot, that is ``real_root /
    rel``, and the last component's ``lstat`` is its ``stat``: an lstat per
    component, on strings, instead of a realpath walk of the whole path and
    ``Path`` objects (most of reading 5,000 spec files in a cold plan).
    """
    parts = rel.split("/")
    if {"", ".", ".."}.isdisjoint(parts):
        path = str(real_root)
        for part in parts:
            path = f"{path}/{part}"
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                break
        else:
            return path, st
    real = (root / rel).resolve(strict=True)
    if not real.is_relative_to(real_root):
        raise refuse(f"points to {real}, outside the specs folder")
    return str(real), real.stat()


_CHANGING = "is changing while being read; it will be read again on the next pass"


def _too_large(size: int) -> str:
    return f"is too large ({size} bytes; spec files may be at most {MAX_SPEC_BYTES} bytes)"
