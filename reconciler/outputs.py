"""Files on disk: the audio cache, the output folder, and the trash.

Where this sits in the flow: download → **materialise outputs** → ledger. A
download lands in a temp file of the :class:`AudioCache` (state directory), is
verified as MPEG audio and adopted under its sha256; :func:`prepare` then
copies it beside ``<out>/<soundtrack>/<track>.mp3`` (tagged by the caller, see
``tags.py``), :func:`commit` renames it into place, and the playlist and
``tracks.json`` are rendered and written with :func:`write_text_if_changed`.
The ledger records what was written (sha256, size, mtime_ns) so a later pass
checks drift with :func:`file_state` (a stat) and re-hashes only on mismatch.
Pruned files go to the :class:`Trash`, never straight to deletion.

Every write is atomic: a hidden temp file in the destination's
directory, fsync, ``os.replace``, fsync of the directory. A crash leaves either
the old file or the new one under the real name, plus at worst a temp that the
``sweep_*`` functions remove at start-up. OSError and mutagen errors are
translated here into :class:`OutputError` / :class:`InvalidAudioError`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, cast

import mutagen
import mutagen.mp3

from reconciler.errors import InvalidAudioError, OutputError

# Hidden (so players and people ignore them) and unmistakable (so a sweep never
# removes anything else). Output names from specs never start with ".".
TEMP_PREFIX = ".reconciler-tmp-"

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_TRASH_BATCH_RE = re.compile(r"(\d{8}T\d{6}Z)-(\d+)")
_TRASH_TS_FORMAT = "%Y%m%dT%H%M%SZ"


# ---------------------------------------------------------------------------
# Small durable-write helpers


def _fsync_dir(directory: Path) -> None:
    """Persist a rename or create inside ``directory`` (the entry, not only the data)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(directory: Path) -> None:
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
        _fsync_dir(new_dir.parent)


def _temp_in(directory: Path) -> Path:
    return directory / f"{TEMP_PREFIX}{uuid.uuid4().hex}"


def _atomic_write(dest: Path, fill: Callable[[IO[bytes]], object]) -> None:
    """Write ``dest`` through a temp file in its directory; raises OSError.

    The temp is removed when anything fails in-process; only a hard crash
    (power loss, SIGKILL) leaves it behind for a sweep.
    """
    _make_dirs(dest.parent)
    tmp = _temp_in(dest.parent)
    try:
        with open(tmp, "xb") as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(dest.parent)


def _sweep(directory: Path, *, recursive: bool) -> int:
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


# ---------------------------------------------------------------------------
# Hashing and audio verification


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:
        raise OutputError(f"cannot read {path} to hash it: {e.strerror or e}") from e


@dataclass(frozen=True)
class _Frame:
    version: int  # 3 = MPEG-1, 2 = MPEG-2, 0 = MPEG-2.5 (the header's own bits)
    layer: int  # 1, 2 or 3
    sample_rate: int
    length: int  # bytes, header included
    mono: bool


_BITRATES_KBPS = {
    # (MPEG-1?, layer) -> bitrate index 1..14
    (True, 1): (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
    (False, 3): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_SAMPLE_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}

# Unexplained bytes tolerated after the last frame (encoder padding, odd
# trailers). More than this, e.g. the zeros of a preallocated download that
# stopped half way, means the file is not the audio it claims to be.
_MAX_JUNK_TAIL = 4096
_TAG_MAGICS = (b"TAG", b"APETAGEX", b"LYRICSBEGIN", b"ID3", b"3DI")


def _frame_at(data: bytes, pos: int) -> _Frame | None:
    """Parse the MPEG audio frame header at ``pos``; None when there is none.

    Free-format bitrate (index 0) is rejected: its frame length is not in the
    header, so the stream could not be walked.
    """
    if pos + 4 > len(data) or data[pos] != 0xFF or data[pos + 1] & 0xE0 != 0xE0:
        return None
    b1, b2, b3 = data[pos + 1], data[pos + 2], data[pos + 3]
    version, layer_bits = (b1 >> 3) & 3, (b1 >> 1) & 3
    bitrate_index, rate_index, padding = b2 >> 4, (b2 >> 2) & 3, (b2 >> 1) & 1
    if version == 1 or layer_bits == 0 or bitrate_index in (0, 15) or rate_index == 3:
        return None
    if b3 & 3 == 2:  # reserved emphasis: never written by encoders, common in noise
        return None
    layer = 4 - layer_bits
    mpeg1 = version == 3
    bitrate = _BITRATES_KBPS[(mpeg1, layer)][bitrate_index - 1] * 1000
    sample_rate = _SAMPLE_RATES[version][rate_index]
    if layer == 1:
        length = (12 * bitrate // sample_rate + padding) * 4
    elif layer == 3 and not mpeg1:
        length = 72 * bitrate // sample_rate + padding
    else:
        length = 144 * bitrate // sample_rate + padding
    return _Frame(version, layer, sample_rate, length, mono=(b3 >> 6) == 3)


def _same_stream(a: _Frame, b: _Frame) -> bool:
    return (a.version, a.layer, a.sample_rate) == (b.version, b.layer, b.sample_rate)


def _find_frame(data: bytes, start: int, like: _Frame | None) -> int | None:
    """First offset >= ``start`` holding a frame confirmed by the next one.

    A lone 0xFFEx pair is common in non-audio bytes; requiring the frame that
    follows (or the end of the file) to line up rules that out.
    """
    pos = data.find(b"\xff", start)
    while pos != -1:
        frame = _frame_at(data, pos)
        if frame is not None and (like is None or _same_stream(frame, like)):
            end = pos + frame.length
            following = _frame_at(data, end)
            if end == len(data) or (following is not None and _same_stream(following, frame)):
                return pos
        pos = data.find(b"\xff", pos + 1)
    return None


def _skip_id3v2(data: bytes) -> int:
    pos = 0
    while data[pos : pos + 3] == b"ID3" and len(data) >= pos + 10:
        size = 0
        for byte in data[pos + 6 : pos + 10]:  # syncsafe: 7 bits per byte
            size = (size << 7) | (byte & 0x7F)
        has_footer = data[pos + 5] & 0x10
        pos += 10 + size + (10 if has_footer else 0)
    return pos


def _stated_frames(data: bytes, pos: int, frame: _Frame) -> int | None:
    """Frame count from a Xing/Info or VBRI header in the first frame, if any."""
    # The Xing tag follows the side information, whose size depends on both.
    side_info = {(True, True): 17, (True, False): 32, (False, True): 9, (False, False): 17}
    xing = pos + 4 + side_info[(frame.version == 3, frame.mono)]
    if data[xing : xing + 4] in (b"Xing", b"Info"):
        flags = int.from_bytes(data[xing + 4 : xing + 8], "big")
        if flags & 1:
            return int.from_bytes(data[xing + 8 : xing + 12], "big")
        return None
    vbri = pos + 36
    if data[vbri : vbri + 4] == b"VBRI":
        return int.from_bytes(data[vbri + 14 : vbri + 18], "big")
    return None


def _check_complete(data: bytes, where: Path) -> None:
    """Walk every frame; raise InvalidAudioError when the stream is cut short.

    mutagen alone cannot tell: without a Xing header its duration is just file
    size over bitrate, so half a file is "valid" with half the duration. The
    walk catches a cut inside a frame (the last header promises more bytes than
    remain), a header's frame count that the file does not reach, and a long
    non-audio tail. A CBR stream without a Xing header cut exactly on a frame
    boundary carries no trace of the cut and cannot be caught here.
    """
    first_pos = _find_frame(data, _skip_id3v2(data), None)
    first = _frame_at(data, first_pos) if first_pos is not None else None
    if first_pos is None or first is None:
        raise InvalidAudioError(f"{where}: no MPEG audio frames found")
    frames = 0
    pos = first_pos
    while True:
        frame = _frame_at(data, pos)
        if frame is not None and _same_stream(frame, first):
            if pos + frame.length > len(data):
                raise InvalidAudioError(
                    f"{where}: truncated: the last frame at byte {pos} needs "
                    f"{frame.length} bytes but the file ends after {len(data) - pos}"
                )
            frames += 1
            pos += frame.length
            continue
        if pos >= len(data):
            break
        if len(data) - pos < 4 and data[pos] == 0xFF:
            raise InvalidAudioError(f"{where}: truncated inside a frame header at byte {pos}")
        # Tolerate junk inside the stream (decoders resync too); what matters
        # is whether audio continues after it.
        resync = _find_frame(data, pos + 1, first)
        if resync is None:
            break
        pos = resync
    tail = data[pos:]
    tagged = any(magic in tail[: _MAX_JUNK_TAIL + 16] for magic in _TAG_MAGICS)
    if len(tail) > _MAX_JUNK_TAIL and not tagged:
        raise InvalidAudioError(
            f"{where}: the audio stops at byte {pos}; the {len(tail)} bytes after it are not audio"
        )
    stated = _stated_frames(data, first_pos, first)
    if stated:
        audio_frames = frames - 1  # the Xing/VBRI frame itself holds no audio
        if stated - audio_frames > max(2, stated // 100):
            raise InvalidAudioError(
                f"{where}: truncated: its header announces {stated} frames, "
                f"the file holds {audio_frames}"
            )


def _read(path: Path, purpose: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise OutputError(f"cannot read {path} to {purpose}: {e.strerror or e}") from e


def _probe_bytes(data: bytes, where: Path) -> float:
    try:
        # mutagen's constructor is unannotated and its base class declares
        # `info` as None; for an MP3 it is an MPEGInfo.
        audio = mutagen.mp3.MP3(io.BytesIO(data))  # type: ignore[no-untyped-call]
        info = cast(mutagen.mp3.MPEGInfo, audio.info)
        length = float(info.length)
    except mutagen.MutagenError as e:
        raise InvalidAudioError(f"{where}: not MPEG audio ({e})") from e
    if not length > 0:
        raise InvalidAudioError(f"{where}: audio has no duration")
    _check_complete(data, where)
    return length


def probe_audio(path: Path) -> float:
    """Duration in seconds (mutagen) of a complete MP3; InvalidAudioError for anything else."""
    return _probe_bytes(_read(path, "check its audio"), path)


# ---------------------------------------------------------------------------
# The content-addressed cache in the state directory


class AudioCache:
    """Audio stored once by sha256 at ``<root>/<sha[:2]>/<sha>.mp3``.

    Outputs are copies of cache entries, so a deleted or edited output is
    restored without a new (paid) generation.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(root))

    def path(self, sha256: str) -> Path:
        # The digest becomes a path: a malformed one must not address other files.
        if not _SHA256_RE.fullmatch(sha256):
            raise OutputError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / f"{sha256}.mp3"

    def has(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def image_path(self, sha256: str) -> Path:
        """Where a cover image with this checksum is kept (beside the audio)."""
        return self.path(sha256).with_suffix(".img")

    def adopt_image(self, tmp: Path) -> str:
        """Move a downloaded cover image into the cache; return its sha256."""
        data = _read(tmp, "cache it")
        sha = hashlib.sha256(data).hexdigest()
        dest = self.image_path(sha)
        try:
            _make_dirs(dest.parent)
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)
        except OSError as e:
            raise OutputError(f"cannot adopt {tmp} into {self.root}: {e.strerror or e}") from e
        return sha

    def new_temp(self) -> Path:
        """A fresh path in ``root`` for a download in progress (same filesystem as the cache)."""
        try:
            _make_dirs(self.root)
        except OSError as e:
            raise OutputError(f"cannot create audio cache {self.root}: {e.strerror or e}") from e
        return _temp_in(self.root)

    def adopt(self, tmp: Path) -> tuple[str, float]:
        """Verify a finished download, move it into the cache, return (sha256, duration).

        Invalid audio is deleted and InvalidAudioError raised, so a bad
        download never sits in the cache looking like a good one.
        """
        # One read serves both the check and the hash.
        data = _read(tmp, "check its audio")
        try:
            duration = _probe_bytes(data, tmp)
        except InvalidAudioError:
            tmp.unlink(missing_ok=True)
            raise
        sha = hashlib.sha256(data).hexdigest()
        dest = self.path(sha)
        try:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            existing = file_state(dest)
            if existing is not None and existing[0] == len(data):
                tmp.unlink()
                return sha, duration
            # A missing entry, or one whose size shows it is damaged: (re)place it.
            _make_dirs(dest.parent)
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)
        except OSError as e:
            raise OutputError(f"cannot adopt {tmp} into {self.root}: {e.strerror or e}") from e
        return sha, duration

    def sweep_temps(self) -> int:
        """Remove downloads left by a crash; call only when none is in progress (start-up)."""
        if not self.root.is_dir():
            return 0
        try:
            return _sweep(self.root, recursive=False)
        except OSError as e:
            raise OutputError(f"cannot sweep temp files in {self.root}: {e.strerror or e}") from e


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
        self._parents: dict[str, Path] = {}

    def path(self, soundtrack: str, filename: str) -> Path:
        for what, name in (("soundtrack", soundtrack), ("file name", filename)):
            if not name or "/" in name or "\0" in name or name.startswith("."):
                raise OutputError(
                    f"{what} {name!r} is not a plain name: output paths must stay inside "
                    f"{self.root}"
                )
        parent = self._parents.get(soundtrack)
        if parent is None:
            parent = self.root / soundtrack
            if not parent.resolve().is_relative_to(self._resolved_root):
                raise OutputError(f"{parent} resolves to {parent.resolve()}, outside {self.root}")
            self._parents[soundtrack] = parent
        return parent / filename


def prepare(src: Path, dest: Path, finish: Callable[[Path], None]) -> Path:
    """A copy of ``src`` beside ``dest``, changed by ``finish`` and verified, not yet in place.

    The caller commits it (:func:`commit`) or unlinks it. ``finish`` (tagging) must
    leave audio that still decodes with a positive duration: that is checked
    here, so a bad edit never reaches the output folder.
    """
    dest = Path(os.path.abspath(dest))
    try:
        _make_dirs(dest.parent)
    except OSError as e:
        raise OutputError(f"cannot create {dest.parent}: {e.strerror or e}") from e
    tmp = _temp_in(dest.parent)
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
        _fsync_dir(dest.parent)
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
        return _sweep(out_root, recursive=True)
    except OSError as e:
        raise OutputError(f"cannot sweep temp files in {out_root}: {e.strerror or e}") from e


def file_state(path: Path) -> tuple[int, int] | None:
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

    Law 12: a converged pass must not even bump an mtime, or the watcher and
    any sync tool downstream would see a change that is not one.
    """
    data = text.encode("utf-8")
    try:
        state = file_state(dest)
        if state is not None and state[0] == len(data) and Path(dest).read_bytes() == data:
            return False
        _atomic_write(Path(os.path.abspath(dest)), lambda out: out.write(data))
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
            _make_dirs(target.parent)
            try:
                os.replace(path, target)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                # Trash on another filesystem: copy then delete (a crash in
                # between leaves both copies, never neither).
                shutil.move(path, target)
            _fsync_dir(target.parent)
            _fsync_dir(path.parent)
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
            _make_dirs(dest.parent)
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
            _fsync_dir(dest.parent)
            os.unlink(entry.trashed)
            _fsync_dir(entry.trashed.parent)
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
