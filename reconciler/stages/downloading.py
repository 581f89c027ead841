"""Downloading: finished clips (and their covers) into the content-addressed cache.

Where it sits: between tracking, which records the clips a finished task
returned, and materialising, which writes them out. It reads the clips a
part of the desired state keeps that have no checksum yet, fetches them a
few at a time (``musicapi``), checks and adopts the audio into the cache
(``audio``) and records each checksum in the ledger. An expired or failed
download makes the task due for a poll, which brings a fresh URL.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from reconciler import tags as tagging
from reconciler.audio import AudioCache
from reconciler.errors import APIError, AudioExpiredError, OutputError
from reconciler.ledger import ClipRecord
from reconciler.planning import Desired
from reconciler.stages.shared import Context, PassResult

#: Downloads in parallel: enough to stream results, few enough to be polite.
DOWNLOAD_CONCURRENCY = 4


def needed(desired: Desired) -> dict[str, int]:
    """Clips each desired fingerprint must provide (the most any track keeps)."""
    need: dict[str, int] = {}
    for t in desired.tracks:
        need[t.fingerprint] = max(need.get(t.fingerprint, 0), t.clips)
    return need


class Downloading:
    """Fetches clips into the cache; holds no state between passes."""

    def __init__(self, ctx: Context, cache: AudioCache) -> None:
        self.ctx = ctx
        self.cache = cache

    async def download(
        self, usable: dict[str, list[ClipRecord]], desired: Desired, result: PassResult
    ) -> dict[str, list[ClipRecord]]:
        """Fetch the kept clips not yet in the cache; returns ``usable`` with their checksums.

        A clip whose cached file went missing is found by ``_ensure_output``
        (``clip_lost``) when it is needed, so no pass stats the cache here.
        """
        need = needed(desired)
        todo = [
            c
            for fp, clips in usable.items()
            for c in clips[: need[fp]]
            if not c.sha256 or (c.image_url and c.cover is None)
        ]
        if not todo:
            return usable
        # A few workers share one iterator rather than one task per clip: the
        # memory stays flat however many clips a pass finds (50,000 at once
        # after a restore).
        queue = iter(todo)
        fetched: dict[str, ClipRecord] = {}

        async def worker() -> None:
            for clip in queue:
                got = await self._fetch(clip, result)
                if got is not None:
                    fetched[got.clip_id] = got

        await asyncio.gather(*(worker() for _ in range(min(DOWNLOAD_CONCURRENCY, len(todo)))))
        return {fp: [fetched.get(c.clip_id, c) for c in clips] for fp, clips in usable.items()}

    async def _fetch(self, clip: ClipRecord, result: PassResult) -> ClipRecord | None:
        """Download one clip (and its cover) into the cache; the clip with its checksum, or None."""
        if clip.sha256:
            return await self._with_cover(clip)
        tmp = self.cache.new_temp()
        try:
            await self.ctx.api.download(clip.audio_url or "", tmp)
            sha, duration = await asyncio.to_thread(self.cache.adopt, tmp)
        except AudioExpiredError:
            # Only a fresh poll gives a new URL: make the task due now.
            ref = self.ctx.ledger.task_ref(clip.task_id)
            self.ctx.ledger.wake(ref.batch_id if ref else None, clip.task_id)
            self.ctx.log.info("audio.expired", clip_id=clip.clip_id)
            return None
        except (APIError, OutputError) as exc:
            self.ctx.log.warning("audio.download_failed", clip_id=clip.clip_id, error=str(exc))
            ref = self.ctx.ledger.task_ref(clip.task_id)
            self.ctx.ledger.wake(ref.batch_id if ref else None, clip.task_id)
            return None
        finally:
            tmp.unlink(missing_ok=True)
        self.ctx.ledger.clip_downloaded(clip.clip_id, sha, duration)
        result.downloads += 1
        self.ctx.log.info("clip.downloaded", clip_id=clip.clip_id, fingerprint=clip.fingerprint)
        return await self._with_cover(
            replace(
                clip, sha256=sha, duration=clip.duration if clip.duration is not None else duration
            )
        )

    async def _with_cover(self, clip: ClipRecord) -> ClipRecord:
        """Fetch the clip's cover image once; a missing one is recorded as none."""
        if not clip.image_url or clip.cover is not None:
            return clip
        cover = await tagging.fetch_cover(self.ctx.api, self.cache, clip.image_url)
        if not cover:
            self.ctx.log.info("cover.unavailable", clip_id=clip.clip_id)
        self.ctx.ledger.clip_cover(clip.clip_id, cover)
        return replace(clip, cover=cover)
