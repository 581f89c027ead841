"""Audio: the MPEG frame check every download passes, and the content-addressed cache.

Where it sits: download → **audio** → materialise outputs. A download lands in
a temp file of the :class:`AudioCache` (state directory), is verified as
complete MPEG audio (every frame walked, then mutagen for the duration) and
adopted under its sha256; ``outputs`` copies it from there. OSError and mutagen
errors are translated here into :class:`OutputError` / :class:`InvalidAudioError`.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import mutagen
import mutagen.mp3

from reconciler.durable import fsync_dir, make_dirs, sweep_temps, temp_in
from reconciler.errors import InvalidAudioError, OutputError

_SHA256_RE = re.compile(r"[0-9a-f]{64}")


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
            make_dirs(dest.parent)
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        except OSError as e:
            raise OutputError(f"cannot adopt {tmp} into {self.root}: {e.strerror or e}") from e
        return sha

    def new_temp(self) -> Path:
        """A fresh path in ``root`` for a download in progress (same filesystem as the cache)."""
        try:
            make_dirs(self.root)
        except OSError as e:
            raise OutputError(f"cannot create audio cache {self.root}: {e.strerror or e}") from e
        return temp_in(self.root)

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
            try:
                existing: int | None = os.stat(dest).st_size
            except (FileNotFoundError, NotADirectoryError):
                existing = None
            if existing == len(data):
                tmp.unlink()
                return sha, duration
            # A missing entry, or one whose size shows it is damaged: (re)place it.
            make_dirs(dest.parent)
            os.replace(tmp, dest)
            fsync_dir(dest.parent)
        except OSError as e:
            raise OutputError(f"cannot adopt {tmp} into {self.root}: {e.strerror or e}") from e
        return sha, duration

    def sweep_temps(self) -> int:
        """Remove downloads left by a crash; call only when none is in progress (start-up)."""
        if not self.root.is_dir():
            return 0
        try:
            return sweep_temps(self.root, recursive=False)
        except OSError as e:
            raise OutputError(f"cannot sweep temp files in {self.root}: {e.strerror or e}") from e
