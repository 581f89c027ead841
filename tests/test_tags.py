"""ID3 tags on the outputs: what a player shows, and what a tag-only change costs.

The integration tests run real ``sync`` subprocesses against the sandbox and
read the files back with mutagen; the sandbox's counters prove that a change
to a tag-only field costs no generation and no download.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from mutagen.id3 import ID3

from reconciler.audio import AudioCache, probe_audio
from reconciler.ledger import ClipRecord
from reconciler.musicapi import MusicAPI
from reconciler.outputs import sha256_file
from reconciler.planning import DesiredTrack, fingerprint
from reconciler.sandbox import SandboxControl
from reconciler.sandbox.audio import cover_png
from reconciler.specs import parse_spec
from reconciler.tags import TrackTags, fetch_cover, image_mime, tags_for
from tests.project import Project, strip_id3v2, track


@pytest.fixture
def project(tmp_path: Path, sandbox: SandboxControl) -> Project:
    return Project(tmp_path, sandbox)


LYRICS = "[Verse]\nCity lights on the water"


def write_album(project: Project, **defaults: Any) -> None:
    project.write_spec(
        "drive.yaml",
        [
            track("intro", "ambient synth pads", tags="ambient, chill"),
            {"name": "night-drive", "title": "Night Drive", "prompt": LYRICS, "tags": "synthwave"},
        ],
        soundtrack="drive",
        defaults=defaults,
    )


def frames(path: Path) -> dict[str, Any]:
    tag = ID3(path)
    assert tag.version == (2, 4, 0)
    found: dict[str, Any] = {
        "title": str(tag["TIT2"]),
        "album": str(tag["TALB"]),
        "artist": str(tag["TPE1"]) if "TPE1" in tag else None,
        "track": str(tag["TRCK"]),
        "genre": list(tag["TCON"].text) if "TCON" in tag else [],
        "lyrics": tag.getall("USLT")[0].text if tag.getall("USLT") else None,
        "fingerprint": str(tag["TXXX:reconciler_fingerprint"]),
        "clip_id": str(tag["TXXX:reconciler_clip_id"]),
    }
    covers = tag.getall("APIC")
    found["cover"] = (covers[0].mime, covers[0].data) if covers else None
    return found


def test_outputs_carry_id3v24_tags_with_cover_and_lyrics(project: Project) -> None:
    write_album(project, artist="The Reconcilers")
    project.sync()
    report = {(t["track"]): t for t in project.status()["tracks"]}
    intro = frames(project.out / "drive" / "intro.mp3")
    song = frames(project.out / "drive" / "night-drive.mp3")

    assert intro["album"] == song["album"] == "drive"
    assert intro["artist"] == song["artist"] == "The Reconcilers"
    assert (intro["track"], song["track"]) == ("1/2", "2/2")
    assert intro["genre"] == ["ambient", "chill"]
    assert song["genre"] == ["synthwave"]
    assert song["title"] == "Night Drive"
    assert song["lyrics"] == LYRICS
    assert intro["fingerprint"] == report["intro"]["fingerprint"]
    for name, got in (("intro", intro), ("night-drive", song)):
        path = project.out / "drive" / f"{name}.mp3"
        assert got["cover"] == ("image/png", cover_png(got["clip_id"]))
        # The tagged file still decodes, and its audio is the cache's, byte for byte.
        assert probe_audio(path) > 0
        raw = AudioCache(project.state / "cache").path(project.audio_sha256(f"drive/{name}.mp3"))
        assert strip_id3v2(path.read_bytes()) == raw.read_bytes()
    # One download per cover, like the audio.
    covers = list((project.state / "cache").rglob("*.img"))
    assert len(covers) == 2


def test_changing_tag_only_fields_rewrites_tags_without_generation_or_download(
    project: Project,
) -> None:
    write_album(project)
    project.sync()
    before = project.stats()
    fp = frames(project.out / "drive" / "intro.mp3")["fingerprint"]
    assert frames(project.out / "drive" / "intro.mp3")["artist"] is None

    # New album and artist, and the two tracks swapped: tags only.
    project.write_spec(
        "drive.yaml",
        [
            {"name": "night-drive", "title": "Night Drive", "prompt": LYRICS, "tags": "synthwave"},
            track("intro", "ambient synth pads", tags="ambient, chill", artist="Solo"),
        ],
        soundtrack="drive",
        defaults={"album": "Night Moves", "artist": "Duo"},
    )
    assert project.cli("plan").returncode == 0, "nothing to submit, restore or prune"
    project.sync()
    after = project.stats()
    assert after["tasks_created"] == before["tasks_created"]
    assert after["downloads"] == before["downloads"]
    intro = frames(project.out / "drive" / "intro.mp3")
    song = frames(project.out / "drive" / "night-drive.mp3")
    assert (intro["album"], intro["artist"], intro["track"]) == ("Night Moves", "Solo", "2/2")
    assert (song["artist"], song["track"]) == ("Duo", "1/2")
    assert intro["fingerprint"] == fp
    # The ledger's checksum is the tagged file's: a further pass finds nothing to do.
    files = project.files()
    project.sync()
    assert project.files() == files


def test_an_edited_tagged_output_is_restored_from_the_cache(project: Project) -> None:
    write_album(project)
    project.sync()
    path = project.out / "drive" / "intro.mp3"
    good = sha256_file(path)
    tag = ID3(path)
    tag.delall("TALB")
    tag.save(path)
    assert sha256_file(path) != good
    downloads = project.stats()["downloads"]
    project.sync()
    assert sha256_file(path) == good
    assert project.stats()["downloads"] == downloads


def test_album_and_artist_do_not_change_the_fingerprint() -> None:
    body = "tracks:\n  - name: a\n    mv: sonic-v5\n    gpt_description_prompt: x\n"
    plain = parse_spec("a.yaml", body.encode(), path="a.yaml")
    tagged = parse_spec(
        "a.yaml",
        ("defaults:\n  album: Z\n  artist: Y\n" + body + "    album: W\n").encode(),
        path="a.yaml",
    )
    a, b = plain.tracks[0], tagged.tracks[0]
    assert (b.album, b.artist) == ("W", "Y")
    assert fingerprint(a.request, a.variant) == fingerprint(b.request, b.variant)


def _clip(**fields: Any) -> ClipRecord:
    base: dict[str, Any] = {
        "clip_id": "c1",
        "task_id": "t1",
        "fingerprint": "f" * 64,
        "position": 1,
        "state": "succeeded",
        "audio_url": "http://x/a.mp3",
        "duration": 3.0,
        "title": None,
        "lyrics": None,
        "tags": None,
        "sha256": "a" * 64,
    }
    return ClipRecord(**{**base, **fields})


TRACK = DesiredTrack("study", "focus", "f" * 64, 1, "study.yaml", 2, of=5)


@pytest.mark.parametrize(
    ("track", "clip", "expected"),
    [
        (
            TRACK,
            _clip(),
            TrackTags("focus", "study", None, 3, 5, (), None, "f" * 64, "c1", None),
        ),
        (
            DesiredTrack("s", "n", "f" * 64, 1, "s.yaml", 0, album="Alb", artist="Art", of=1),
            _clip(title=" Song ", lyrics="la la\n", tags="rock, , pop ", cover=""),
            TrackTags("Song", "Alb", "Art", 1, 1, ("rock", "pop"), "la la", "f" * 64, "c1", None),
        ),
        (
            TRACK,
            _clip(lyrics="  ", cover="b" * 64),
            TrackTags("focus", "study", None, 3, 5, (), None, "f" * 64, "c1", "b" * 64),
        ),
    ],
)
def test_tags_for(track: DesiredTrack, clip: ClipRecord, expected: TrackTags) -> None:
    assert tags_for(track, clip) == expected


def test_tag_key_changes_with_any_tag_and_with_the_audio() -> None:
    tags = tags_for(TRACK, _clip())
    keys = {
        tags.key("a" * 64),
        tags.key("b" * 64),
        tags_for(TRACK, _clip(title="Other")).key("a" * 64),
        tags_for(DesiredTrack("study", "focus", "f" * 64, 1, "x", 3, of=5), _clip()).key("a" * 64),
        tags_for(TRACK, _clip(cover="c" * 64)).key("a" * 64),
    }
    assert len(keys) == 5
    assert tags.key("a" * 64) == tags_for(TRACK, _clip()).key("a" * 64)


@pytest.mark.parametrize(
    ("data", "mime"),
    [
        (cover_png("x"), "image/png"),
        (b"\xff\xd8\xff\xe0rest", "image/jpeg"),
        (b"<html>not found</html>", None),
        (b"", None),
    ],
)
def test_image_mime(data: bytes, mime: str | None) -> None:
    assert image_mime(data) == mime


def test_a_missing_cover_is_none_not_an_error(tmp_path: Path, sandbox: SandboxControl) -> None:
    cache = AudioCache(tmp_path / "cache")
    missing = sandbox.base_url.removesuffix("/api/v1") + "/_sandbox/image/nope.png"

    async def fetch() -> list[str]:
        async with MusicAPI(sandbox.base_url, sandbox.key) as api:
            return [await fetch_cover(api, cache, url) for url in (missing, "")]

    assert asyncio.run(fetch()) == ["", ""]
    assert list((tmp_path / "cache").iterdir()) == []
