"""Tests for reconciler.outputs: real files in tmp_path, real MP3s from lameenc."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import lameenc
import numpy as np
import pytest

from reconciler.audio import AudioCache, probe_audio
from reconciler.errors import InvalidAudioError, OutputError
from reconciler.outputs import (
    OutputFolder,
    TrackOutput,
    Trash,
    commit,
    file_state,
    output_path,
    prepare,
    render_playlist,
    render_tracks_json,
    sha256_file,
    sweep_output_temps,
    write_text_if_changed,
)


def materialise(src: Path, dest: Path) -> tuple[int, int]:
    """An untagged copy put in place, as reconciling does with its tagged ones."""
    return commit(prepare(src, dest, lambda path: None), dest)


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
# output_path


def test_output_path_joins_inside_out_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = output_path(Path("tracks"), "study-session", "morning-focus.mp3")
    assert path == tmp_path / "tracks" / "study-session" / "morning-focus.mp3"
    assert path.is_absolute()


@pytest.mark.parametrize(
    ("soundtrack", "filename"),
    [
        pytest.param("..", "x.mp3", id="dotdot-soundtrack"),
        pytest.param("st", "../x.mp3", id="dotdot-file"),
        pytest.param("/etc", "passwd", id="absolute-soundtrack"),
        pytest.param("st", "/etc/passwd", id="absolute-file"),
        pytest.param("a/../..", "x.mp3", id="nested-escape"),
        pytest.param("", "x.mp3", id="empty-soundtrack"),
        pytest.param("st", "", id="empty-file"),
        pytest.param("st", ".reconciler-tmp-x", id="hidden-file-would-be-swept"),
    ],
)
def test_output_path_refuses_escapes(tmp_path: Path, soundtrack: str, filename: str) -> None:
    with pytest.raises(OutputError):
        output_path(tmp_path / "out", soundtrack, filename)


def test_output_folder_changed_names_each_file_unlike_its_record(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write(out / "st" / "a.mp3", MP3)
    write(out / "st" / "b.mp3", b"")
    write(out / "st" / "c.mp3", b"abc")
    folder = OutputFolder(out)
    states = [file_state(out / "st" / n) for n in ("a.mp3", "b.mp3", "c.mp3")]
    a, b, c = (s for s in states if s is not None)
    recorded = [
        ("st/a.mp3", *a),  # as recorded
        ("st/b.mp3", b[0] + 1, b[1]),  # another size
        ("st/c.mp3", c[0], c[1] - 1),  # another mtime
        ("st/gone.mp3", 1, 1),
        ("other/x.mp3", 1, 1),
    ]
    assert folder.changed(recorded) == {
        "st/b.mp3": b,
        "st/c.mp3": c,
        "st/gone.mp3": None,
        "other/x.mp3": None,
    }
    # Every name is checked, not only the first of each soundtrack.
    with pytest.raises(OutputError):
        folder.changed([("st/a.mp3", *a), ("st/../x.mp3", 1, 1)])
    with pytest.raises(OutputError):
        folder.changed([("../x.mp3", 1, 1)])


def test_output_path_refuses_a_symlinked_dir_pointing_outside(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (tmp_path / "elsewhere").mkdir()
    out.mkdir()
    (out / "st").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputError, match="outside"):
        output_path(out, "st", "x.mp3")


def test_output_path_allows_a_symlinked_dir_pointing_inside(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "real").mkdir(parents=True)
    (out / "alias").symlink_to(out / "real")
    assert output_path(out, "alias", "x.mp3") == out / "alias" / "x.mp3"


def test_materialise_replaces_a_symlinked_file_instead_of_writing_through_it(
    tmp_path: Path,
) -> None:
    victim = write(tmp_path / "victim.txt", b"precious")
    out = tmp_path / "out"
    (out / "st").mkdir(parents=True)
    (out / "st" / "x.mp3").symlink_to(victim)
    dest = output_path(out, "st", "x.mp3")
    materialise(write(tmp_path / "src.mp3", MP3), dest)
    assert victim.read_bytes() == b"precious"
    assert not dest.is_symlink()
    assert dest.read_bytes() == MP3


# ---------------------------------------------------------------------------
# materialise and temp sweeping


def test_materialise_writes_dest_and_leaves_no_temp(tmp_path: Path) -> None:
    src = write(tmp_path / "cache" / "a.mp3", MP3)
    dest = tmp_path / "out" / "st" / "x.mp3"
    size, mtime_ns = materialise(src, dest)
    assert dest.read_bytes() == MP3
    assert (size, mtime_ns) == (len(MP3), dest.stat().st_mtime_ns)
    assert os.listdir(dest.parent) == ["x.mp3"]


def test_materialise_replaces_atomically(tmp_path: Path) -> None:
    dest = write(tmp_path / "out" / "x.mp3", b"old audio")
    new = make_mp3(freq=660.0)
    with open(dest, "rb") as reader:  # a player holding the old file open
        materialise(write(tmp_path / "src.mp3", new), dest)
        assert reader.read() == b"old audio"
    assert dest.read_bytes() == new


def test_materialise_failure_leaves_dest_unchanged_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = write(tmp_path / "out" / "x.mp3", b"old audio")
    src = write(tmp_path / "src.mp3", MP3)

    def failing_replace(a: object, b: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OutputError, match=r"x\.mp3"):
        materialise(src, dest)
    assert dest.read_bytes() == b"old audio"
    assert os.listdir(dest.parent) == ["x.mp3"]


CRASH_IN_REPLACE = """
import os, sys
from pathlib import Path
from reconciler import outputs
os.replace = lambda a, b: os._exit(3)  # die like SIGKILL: no cleanup runs
dest = Path(sys.argv[2])
outputs.commit(outputs.prepare(Path(sys.argv[1]), dest, lambda p: None), dest)
"""


def test_crash_before_rename_leaves_dest_intact_and_a_sweepable_temp(tmp_path: Path) -> None:
    out = tmp_path / "out"
    dest = write(out / "st" / "x.mp3", b"old audio")
    src = write(tmp_path / "src.mp3", MP3)
    child = subprocess.run(
        [sys.executable, "-c", CRASH_IN_REPLACE, str(src), str(dest)], check=False
    )
    assert child.returncode == 3
    assert dest.read_bytes() == b"old audio"
    leftovers = [n for n in os.listdir(dest.parent) if n != "x.mp3"]
    assert len(leftovers) == 1
    assert leftovers[0].startswith(".reconciler-tmp-")
    assert sweep_output_temps(out) == 1
    assert os.listdir(dest.parent) == ["x.mp3"]


def test_sweep_output_temps_removes_only_our_temps(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write(out / "a" / ".reconciler-tmp-1", b"")
    write(out / "b" / "deep" / ".reconciler-tmp-2", b"")
    keep = [
        write(out / "a" / "x.mp3", MP3),
        write(out / "a" / ".DS_Store", b""),
        write(out / "a" / "reconciler-tmp-3", b""),
    ]
    assert sweep_output_temps(out) == 2
    assert sorted(p for p in out.rglob("*") if p.is_file()) == sorted(keep)
    assert sweep_output_temps(tmp_path / "missing") == 0


def test_materialise_missing_source_is_an_output_error(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "x.mp3"
    with pytest.raises(OutputError, match=r"src\.mp3"):
        materialise(tmp_path / "src.mp3", dest)
    assert not dest.exists()


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


def test_write_text_if_changed_writes_nothing_when_equal(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "st" / "playlist.m3u8"
    assert write_text_if_changed(dest, "#EXTM3U\nCafé ☕\n") is True
    assert dest.read_bytes() == "#EXTM3U\nCafé ☕\n".encode()
    os.utime(dest, ns=(1_000_000_000, 1_000_000_000))
    inode = dest.stat().st_ino
    assert write_text_if_changed(dest, "#EXTM3U\nCafé ☕\n") is False
    assert (dest.stat().st_ino, dest.stat().st_mtime_ns) == (inode, 1_000_000_000)
    # Same length, different text: must still be rewritten.
    assert write_text_if_changed(dest, "#EXTM3U\nCafé ☔\n") is True
    assert dest.read_text(encoding="utf-8") == "#EXTM3U\nCafé ☔\n"
    assert os.listdir(dest.parent) == ["playlist.m3u8"]


# ---------------------------------------------------------------------------
# playlist and tracks.json

ENTRIES = [
    TrackOutput(
        filename="morning-focus.mp3",
        track="morning-focus",
        clip_index=1,
        title="Café del Mar ☕",
        lyrics=None,
        duration=61.6,
        clip_id="clip-a",
        fingerprint="fp-1",
        tags="lofi",
    ),
    TrackOutput(
        filename="night-drive.mp3",
        track="night-drive",
        clip_index=1,
        title=None,
        lyrics="[Verse]\nCity lights",
        duration=200.4,
        clip_id="clip-b",
        fingerprint="fp-2",
        tags=None,
    ),
    TrackOutput(
        filename="night-drive-2.mp3",
        track="night-drive",
        clip_index=2,
        title="Night\nDrive",
        lyrics="[Verse]\nCity lights",
        duration=None,
        clip_id="clip-c",
        fingerprint="fp-2",
        tags=None,
    ),
]


def test_render_playlist_exact_text() -> None:
    assert render_playlist(ENTRIES) == (
        "#EXTM3U\n"
        "#EXTINF:62,Café del Mar ☕\n"
        "morning-focus.mp3\n"
        "#EXTINF:200,night-drive\n"
        "night-drive.mp3\n"
        "#EXTINF:-1,Night Drive\n"
        "night-drive-2.mp3\n"
    )
    assert render_playlist([]) == "#EXTM3U\n"


def test_render_tracks_json_exact_text() -> None:
    text = render_tracks_json("study-session ☕", ENTRIES[:2])
    assert text == (
        "{\n"
        '  "soundtrack": "study-session ☕",\n'
        '  "tracks": [\n'
        '    {"clip": 1, "clip_id": "clip-a", "duration": 61.6, "file": "morning-focus.mp3", '
        '"fingerprint": "fp-1", "lyrics": null, "tags": "lofi", "title": "Café del Mar ☕", '
        '"track": "morning-focus"},\n'
        '    {"clip": 1, "clip_id": "clip-b", "duration": 200.4, "file": "night-drive.mp3", '
        '"fingerprint": "fp-2", "lyrics": "[Verse]\\nCity lights", "tags": null, "title": null, '
        '"track": "night-drive"}\n'
        "  ]\n"
        "}\n"
    )
    assert render_tracks_json("empty", []) == '{\n  "soundtrack": "empty",\n  "tracks": []\n}\n'
    assert json.loads(text)["tracks"][1]["lyrics"] == "[Verse]\nCity lights"


def test_render_tracks_json_keeps_spec_order() -> None:
    reordered = [ENTRIES[2], ENTRIES[0]]
    files = [t["file"] for t in json.loads(render_tracks_json("s", reordered))["tracks"]]
    assert files == ["night-drive-2.mp3", "morning-focus.mp3"]


# ---------------------------------------------------------------------------
# Trash

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def test_trash_move_keeps_the_path_under_a_timestamped_batch(tmp_path: Path) -> None:
    out = tmp_path / "out"
    victim = write(out / "st" / "x.mp3", MP3)
    trash = Trash(tmp_path / "state" / "trash")
    moved = trash.move(victim, out, NOW)
    assert moved == tmp_path / "state" / "trash" / "20231114T221320Z-0" / "st" / "x.mp3"
    assert moved.read_bytes() == MP3
    assert not victim.exists()


def test_trash_never_overwrites_an_earlier_copy(tmp_path: Path) -> None:
    out = tmp_path / "out"
    trash = Trash(tmp_path / "trash")
    first = trash.move(write(out / "st" / "x.mp3", b"first"), out, NOW)
    second = trash.move(write(out / "st" / "x.mp3", b"second"), out, NOW)
    assert first.parent.parent.name == "20231114T221320Z-0"
    assert second.parent.parent.name == "20231114T221320Z-1"
    assert (first.read_bytes(), second.read_bytes()) == (b"first", b"second")


def test_trash_refuses_paths_outside_out_root(tmp_path: Path) -> None:
    out = tmp_path / "out"
    outside = write(tmp_path / "precious.txt", b"keep")
    write(tmp_path / "elsewhere" / "y.mp3", b"keep")
    (out / "st").mkdir(parents=True)
    (out / "link").symlink_to(tmp_path / "elsewhere")
    trash = Trash(tmp_path / "trash")
    for path in [outside, out / ".." / "precious.txt", out, out / "link" / "y.mp3"]:
        with pytest.raises(OutputError, match="not inside"):
            trash.move(path, out, NOW)
    assert outside.read_bytes() == b"keep"
    assert (tmp_path / "elsewhere" / "y.mp3").exists()
    assert not (tmp_path / "trash").exists()


def test_trash_move_of_a_missing_file_is_an_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="does not exist"):
        Trash(tmp_path / "trash").move(tmp_path / "out" / "x.mp3", tmp_path / "out", NOW)


def test_trash_moves_across_filesystems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def cross_device(a: object, b: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    # Both: outputs uses os.replace, shutil.move tries os.rename before copying.
    monkeypatch.setattr(os, "replace", cross_device)
    monkeypatch.setattr(os, "rename", cross_device)
    out = tmp_path / "out"
    victim = write(out / "st" / "x.mp3", MP3)
    moved = Trash(tmp_path / "trash").move(victim, out, NOW)
    assert moved.read_bytes() == MP3
    assert not victim.exists()


def test_trash_empty_removes_only_batches_past_grace(tmp_path: Path) -> None:
    out = tmp_path / "out"
    trash = Trash(tmp_path / "trash")
    assert trash.empty(3600, NOW) == []
    old = trash.move(write(out / "a.mp3", b"a"), out, NOW)
    young = trash.move(write(out / "b.mp3", b"b"), out, NOW + 100)
    foreign = write(tmp_path / "trash" / "keep-me" / "notes.txt", b"")
    assert trash.empty(3600, NOW + 3600) == []
    assert trash.empty(3600, NOW + 3650) == [old.parent]
    assert not old.exists()
    assert young.exists()
    assert trash.empty(3600, NOW + 10_000) == [young.parent]
    assert foreign.exists()
