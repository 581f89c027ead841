"""Tests for reconciler.outputs: real files in tmp_path, real MP3s from lameenc."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import lameenc
import numpy as np
import pytest

from reconciler.errors import InvalidAudioError, OutputError
from reconciler.outputs import (
    AudioCache,
    file_state,
    probe_audio,
    sha256_file,
)

RATE = 24_000
# MPEG-2 layer III at 64 kbps and 24 kHz: 72 * 64000 / 24000 = 192 bytes per
# frame, never padded, 576 samples each; lameenc writes no Xing header.
FRAME = 192


def make_mp3(seconds: float = 1.0, freq: float = 440.0) -> bytes:
    """A mono sine tone encoded at 64 kbps."""
    t = np.arange(int(seconds * RATE)) / RATE
    pcm = (np.sin(2 * np.pi * freq * t) * 0.3 * 32767).astype("<i2").tobytes()
    encoder = lameenc.Encoder()
    encoder.set_bit_rate(64)
    encoder.set_in_sample_rate(RATE)
    encoder.set_channels(1)
    encoder.set_quality(7)
    data = bytes(encoder.encode(pcm) + encoder.flush())
    assert len(data) % FRAME == 0
    return data


def with_info_tag(mp3: bytes) -> bytes:
    """Prepend a LAME-style "Info" frame announcing the stream's frame count."""
    frame = bytearray(FRAME)
    frame[:4] = mp3[:4]
    # MPEG-2 mono: 4-byte header + 9 bytes side info, then the tag.
    frame[13:17] = b"Info"
    frame[17:21] = (1).to_bytes(4, "big")  # flags: frame count present
    frame[21:25] = (len(mp3) // FRAME).to_bytes(4, "big")
    return bytes(frame) + mp3


def id3v2(padding: int = 100) -> bytes:
    size = bytes((padding >> shift) & 0x7F for shift in (21, 14, 7, 0))
    return b"ID3\x04\x00\x00" + size + bytes(padding)


ID3V1 = b"TAG" + b"Title".ljust(30, b"\0") + bytes(95)

MP3 = make_mp3()
HALF = len(MP3) // 2 // FRAME * FRAME  # a frame boundary near the middle


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------
# probe_audio


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(MP3, len(MP3) // FRAME * 576 / RATE, id="plain"),
        pytest.param(with_info_tag(MP3), len(MP3) // FRAME * 576 / RATE, id="info-tag"),
        pytest.param(id3v2() + MP3 + ID3V1, len(MP3) // FRAME * 576 / RATE, id="id3-tags"),
    ],
)
def test_probe_accepts_complete_mp3(tmp_path: Path, data: bytes, expected: float) -> None:
    duration = probe_audio(write(tmp_path / "a.mp3", data))
    # Without a Xing header mutagen estimates from file size, tags included.
    assert duration == pytest.approx(expected, abs=0.02)
    assert 1.0 <= duration < 1.2


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        pytest.param(b"", "not MPEG audio", id="zero-bytes"),
        pytest.param(np.random.default_rng(7).bytes(8192), "not MPEG audio", id="random"),
        pytest.param(b"<html>404 not found</html>\n" * 40, "not MPEG audio", id="text"),
        pytest.param(MP3[: HALF + 100], "truncated", id="cut-in-half-mid-frame"),
        pytest.param(MP3[: HALF + 2], "truncated", id="cut-inside-header"),
        pytest.param(with_info_tag(MP3)[: HALF + FRAME], "truncated", id="info-tag-cut-on-frame"),
        pytest.param(MP3[:HALF] + bytes(len(MP3) - HALF), "not audio", id="zero-filled-tail"),
    ],
)
def test_probe_rejects_what_is_not_complete_audio(tmp_path: Path, data: bytes, reason: str) -> None:
    path = write(tmp_path / "bad.mp3", data)
    with pytest.raises(InvalidAudioError, match=reason) as raised:
        probe_audio(path)
    assert str(path) in str(raised.value)


def test_probe_of_missing_file_is_an_output_error_not_invalid_audio(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"missing\.mp3") as raised:
        probe_audio(tmp_path / "missing.mp3")
    assert not isinstance(raised.value, InvalidAudioError)


def test_sha256_file(tmp_path: Path) -> None:
    path = write(tmp_path / "a.mp3", MP3)
    assert sha256_file(path) == hashlib.sha256(MP3).hexdigest()
    with pytest.raises(OutputError, match="nope"):
        sha256_file(tmp_path / "nope")


# ---------------------------------------------------------------------------
# AudioCache


def test_adopt_moves_verified_audio_to_its_content_address(tmp_path: Path) -> None:
    cache = AudioCache(tmp_path / "cache")
    tmp = cache.new_temp()
    tmp.write_bytes(MP3)
    sha, duration = cache.adopt(tmp)
    assert sha == hashlib.sha256(MP3).hexdigest()
    assert duration > 1.0
    stored = tmp_path / "cache" / sha[:2] / f"{sha}.mp3"
    assert cache.path(sha) == stored
    assert stored.read_bytes() == MP3
    assert cache.has(sha)
    assert not tmp.exists()


def test_adopt_is_idempotent(tmp_path: Path) -> None:
    cache = AudioCache(tmp_path / "cache")
    first = cache.new_temp()
    first.write_bytes(MP3)
    sha, _ = cache.adopt(first)
    before = os.stat(cache.path(sha))
    second = cache.new_temp()
    second.write_bytes(MP3)
    assert cache.adopt(second)[0] == sha
    after = os.stat(cache.path(sha))
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not second.exists()
    assert sorted(p.name for p in cache.root.rglob("*") if p.is_file()) == [f"{sha}.mp3"]


def test_adopt_repairs_a_damaged_cache_entry(tmp_path: Path) -> None:
    cache = AudioCache(tmp_path / "cache")
    sha = hashlib.sha256(MP3).hexdigest()
    write(cache.path(sha), MP3[:HALF])
    tmp = cache.new_temp()
    tmp.write_bytes(MP3)
    cache.adopt(tmp)
    assert cache.path(sha).read_bytes() == MP3


def test_adopt_deletes_invalid_audio(tmp_path: Path) -> None:
    cache = AudioCache(tmp_path / "cache")
    tmp = cache.new_temp()
    tmp.write_bytes(MP3[: HALF + 100])
    with pytest.raises(InvalidAudioError, match="truncated"):
        cache.adopt(tmp)
    assert list(cache.root.iterdir()) == []


def test_new_temps_are_unique_hidden_and_swept(tmp_path: Path) -> None:
    cache = AudioCache(tmp_path / "cache")
    kept = cache.new_temp()
    kept.write_bytes(MP3)
    sha, _ = cache.adopt(kept)
    temps = {cache.new_temp() for _ in range(3)}
    assert len(temps) == 3
    for temp in temps:
        assert temp.is_absolute()
        assert temp.parent == cache.root
        assert temp.name.startswith(".")
        temp.write_bytes(b"partial download")
    (cache.root / "notes.txt").write_text("not ours")
    assert cache.sweep_temps() == 3
    assert not any(t.exists() for t in temps)
    assert cache.has(sha)
    assert (cache.root / "notes.txt").exists()
    assert cache.sweep_temps() == 0


@pytest.mark.parametrize("digest", ["", "../" * 10 + "etc", "A" * 64, "0" * 63])
def test_cache_path_refuses_what_is_not_a_digest(tmp_path: Path, digest: str) -> None:
    with pytest.raises(OutputError, match="sha256"):
        AudioCache(tmp_path).path(digest)


# ---------------------------------------------------------------------------
# file_state and write_text_if_changed


def test_file_state_tracks_size_and_mtime(tmp_path: Path) -> None:
    path = tmp_path / "x.mp3"
    assert file_state(path) is None
    assert file_state(write(tmp_path / "a-file", b"") / "x") is None  # parent is not a dir
    write(path, MP3)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    assert file_state(path) == (len(MP3), 1_000_000_000)
    write(path, MP3[:-1])
    assert file_state(path) != (len(MP3), 1_000_000_000)
