"""ID3v2.4 tags on the output MP3s: what a music player shows.

Where this sits in the flow: between the cache and the output folder. The
cache keeps each clip's raw audio exactly as downloaded; when reconciling
materialises an output, :func:`write_tags` tags the copy (title, album, artist,
track number in spec order, genre, lyrics, cover art, and the fingerprint and
clip id as ``TXXX`` frames) before it is renamed into place.

:meth:`TrackTags.key` names one tagged output: the raw audio's checksum plus
every tag value. Reconciling keeps the key of each output it wrote, so an
output whose key is unchanged and whose file is untouched needs no work, and a
change to a tag-only field (title, album, artist, order) rewrites the tags from
the cached audio: no generation, no download. The cover is cached by checksum
like the audio, so ``cover`` in the key is the image's sha256.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path

import mutagen
from mutagen.id3 import (
    APIC,
    ID3,
    TALB,
    TCON,
    TIT2,
    TPE1,
    TRCK,
    TXXX,
    USLT,
    Encoding,
    PictureType,
)

from reconciler.audio import AudioCache
from reconciler.errors import APIError, OutputError
from reconciler.ledger import ClipRecord
from reconciler.musicapi import MusicAPI
from reconciler.planning import DesiredTrack

#: Bumped when the way tags are written changes, so every output is rewritten once.
TAG_FORMAT = 1
#: ``TXXX`` descriptions; stable, other tools may read them.
FINGERPRINT_FRAME = "reconciler_fingerprint"
CLIP_FRAME = "reconciler_clip_id"

_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"


@dataclass(frozen=True)
class TrackTags:
    """Everything written into one output's ID3 tag."""

    title: str
    album: str
    artist: str | None
    track: int
    of: int
    genre: tuple[str, ...]
    lyrics: str | None
    fingerprint: str
    clip_id: str
    #: sha256 of the cover image in the cache; None when there is none.
    cover: str | None

    def key(self, audio_sha256: str) -> str:
        """The identity of the tagged file built from ``audio_sha256`` with these tags."""
        # Every pass computes this for every output: a flat list, not asdict().
        body = json.dumps(
            [TAG_FORMAT, audio_sha256, *(getattr(self, name) for name in _KEY_FIELDS)],
            separators=(",", ":"),
        )
        return hashlib.sha256(body.encode()).hexdigest()


_KEY_FIELDS = tuple(f.name for f in fields(TrackTags))


def tags_for(track: DesiredTrack, clip: ClipRecord) -> TrackTags:
    """The tags of one output: the spec's names, and what the service said about the clip.

    The title is the service's (it echoes the spec's ``title``, or names a
    description-mode song itself), else the track's name. ``tags`` is a
    comma-separated style list; each style becomes one genre value.
    """
    genres = tuple(g.strip() for g in (clip.tags or "").split(",") if g.strip())
    return TrackTags(
        title=(clip.title or "").strip() or track.name,
        album=track.album or track.soundtrack,
        artist=track.artist,
        track=track.position + 1,
        of=track.of,
        genre=genres,
        lyrics=(clip.lyrics or "").strip() or None,
        fingerprint=track.fingerprint,
        clip_id=clip.clip_id,
        cover=clip.cover or None,
    )


def image_mime(data: bytes) -> str | None:
    """``image/png`` or ``image/jpeg`` by the file's magic; None for anything else."""
    if data.startswith(_PNG):
        return "image/png"
    if data.startswith(_JPEG):
        return "image/jpeg"
    return None


def write_tags(path: Path, tags: TrackTags, cover: bytes | None) -> None:
    """Replace any ID3v2 tag of the MP3 at ``path`` with exactly ``tags`` (ID3v2.4, UTF-8).

    ``cover`` is the image whose sha256 is ``tags.cover``; anything not PNG or
    JPEG is left out rather than embedded with a wrong type.
    """
    id3 = ID3()
    text = Encoding.UTF8
    id3.add(TIT2(encoding=text, text=[tags.title]))
    id3.add(TALB(encoding=text, text=[tags.album]))
    if tags.artist:
        id3.add(TPE1(encoding=text, text=[tags.artist]))
    id3.add(TRCK(encoding=text, text=[f"{tags.track}/{tags.of}"]))
    if tags.genre:
        id3.add(TCON(encoding=text, text=list(tags.genre)))
    if tags.lyrics:
        id3.add(USLT(encoding=text, lang="XXX", desc="", text=tags.lyrics))
    mime = image_mime(cover) if cover else None
    if cover and mime:
        id3.add(APIC(encoding=text, mime=mime, type=PictureType.COVER_FRONT, desc="", data=cover))
    id3.add(TXXX(encoding=text, desc=FINGERPRINT_FRAME, text=[tags.fingerprint]))
    id3.add(TXXX(encoding=text, desc=CLIP_FRAME, text=[tags.clip_id]))
    try:
        # No padding: the file is written once and replaced, never edited in place,
        # and the same audio and tags then always make the same bytes.
        id3.save(path, v2_version=4, padding=lambda info: 0)
    except (OSError, mutagen.MutagenError) as exc:
        raise OutputError(f"cannot write ID3 tags to {path}: {exc}") from exc


async def fetch_cover(api: MusicAPI, cache: AudioCache, url: str) -> str:
    """Download a cover image into the cache once; its sha256, or '' when there is none.

    A cover only decorates the file: an image that cannot be fetched or is
    not PNG or JPEG is recorded as none, never retried and never an error.
    """
    tmp = cache.new_temp()
    try:
        await api.download(url, tmp)
        if image_mime(tmp.read_bytes()[:8]) is None:
            return ""
        return cache.adopt_image(tmp)
    except (APIError, OutputError, OSError):
        return ""
    finally:
        tmp.unlink(missing_ok=True)
