"""Materialising: the clips in the cache → the output files, playlists and the prune.

Where it sits: the last stage of a pass, after downloading. For a part of
the desired state it reads the ledger's output records and generations and
the files on disk, writes each track's outputs (the cached audio plus its
ID3 tags, ``tags``) and each soundtrack's lists atomically (``outputs``),
and records every file written in the ledger. The prune moves outputs no
track wants to the trash (rule 5); nothing is ever overwritten silently.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

from reconciler import outputs as out
from reconciler import tags as tagging
from reconciler.audio import AudioCache
from reconciler.errors import OutputError
from reconciler.ledger import ClipRecord, OutputRecord
from reconciler.planning import CREDITS_PER_TASK, LIST_FILES, Desired, DesiredTrack
from reconciler.stages.shared import Context, PassResult, Shared

#: Tracks materialised between two yields to the event loop.
YIELD_EVERY = 100


class Materialising:
    """Writes outputs; remembers what it wrote and reported, to skip and log once."""

    def __init__(self, ctx: Context, shared: Shared, cache: AudioCache, trash: out.Trash) -> None:
        self.ctx = ctx
        self.shared = shared
        self.cache = cache
        self.trash = trash
        #: Problems logged last pass (outputs, short tracks), so each is logged once.
        self._reported_short: dict[str, str] = {}
        self._failed_outputs: dict[str, str] = {}
        self._logged_outputs: dict[str, str] = {}
        self._outdir = out.OutputFolder(ctx.settings.out_dir)
        #: soundtrack → a hash of the list entries and the file states last
        #: written, to skip re-rendering. A hash rather than the entries: at
        #: 50,000 tracks the entries would be kept twice over.
        self._lists: dict[str, tuple[int, list[tuple[int, int] | None]]] = {}
        #: False while pruning was held back (an invalid file): the next pass
        #: that may prune looks at every output, not only its soundtracks'.
        self._pruned_all = False
        ctx.ledger.adopt_output_tags()

    def begin(self) -> None:
        """Before a pass's first part: the output folder as the settings say now."""
        self._outdir = out.OutputFolder(self.ctx.settings.out_dir)
        self._logged_outputs, self._failed_outputs = self._failed_outputs, {}

    def finish(self, desired: Desired, short: dict[str, str]) -> None:
        """After a pass's last part: what status reads, in the ledger."""
        # For status, which runs in another process; put() writes only changes.
        # A focused pass's failures and short tracks are all there are: their
        # soundtracks are never settled, so every focused pass looks at them.
        self.ctx.ledger.put("output_errors", self._failed_outputs)
        self.ctx.ledger.put("short_generations", short)

    async def materialise(
        self,
        desired: Desired,
        usable: dict[str, list[ClipRecord]],
        result: PassResult,
        short: dict[str, str],
    ) -> set[str]:
        """Write the outputs and lists of whole soundtracks; those with a track not ready."""
        records = self.ctx.ledger.outputs_of(desired.soundtracks)
        gens = self.ctx.ledger.generations_of(desired.fingerprints())
        previous = self._previous_clips(desired, records)
        entries: dict[str, list[out.TrackOutput]] = {}
        ready: Counter[str] = Counter()
        for done, t in enumerate(desired.tracks):
            if done % YIELD_EVERY == 0:
                # Writing thousands of files is blocking work: let the loop take
                # a signal (a stop must not wait for the whole folder) and let a
                # cancelled pass end between two tracks, each written atomically.
                await asyncio.sleep(0)
            clips = [c for c in usable.get(t.fingerprint, []) if c.sha256][: t.clips]
            gen = gens.get(t.fingerprint)
            if len(clips) < t.clips:
                arrived = usable.get(t.fingerprint, [])
                if not (gen is not None and gen.state == "succeeded" and len(arrived) < t.clips):
                    # Until the new audio replaces it, the old file stays listed.
                    entries.setdefault(t.soundtrack, []).extend(
                        self._still_listed(t, records, previous)
                    )
                    continue
                # The task is over with fewer clips than asked: what was paid
                # for is written all the same, and the track says what is missing.
                short[t.fingerprint] = self._short_of_clips(t, len(arrived))
                result.short += 1
                if len(clips) < len(arrived) or not clips:
                    continue
            ok = True
            track_entries = []
            for n, (rel, clip) in enumerate(zip(t.outputs, clips, strict=False), start=1):
                ok = self._ensure_output(t, n, rel, clip, records.get(rel), result) and ok
                track_entries.append(_list_entry(rel.split("/", 1)[1], t, n, clip, t.fingerprint))
            if ok and t.fingerprint not in short:
                if self.shared.scan is not None and t.source in self.shared.scan.errors:
                    result.invalid_tracks += 1
                else:
                    result.ready += 1
                    ready[t.soundtrack] += 1
            if ok:
                entries.setdefault(t.soundtrack, []).extend(track_entries)
        for soundtrack in desired.soundtracks:
            self._write_lists(soundtrack, entries.get(soundtrack, []), result)
        per_soundtrack = Counter(t.soundtrack for t in desired.tracks)
        return {s for s, n in per_soundtrack.items() if ready[s] < n}

    def _previous_clips(
        self,
        desired: Desired,
        records: dict[str, OutputRecord],
    ) -> dict[str, list[ClipRecord]]:
        """Clips of the older generations whose files still stand where a track
        waits for its new audio (a spec change being generated)."""
        older = {
            rec.fingerprint
            for t in desired.tracks
            for rel in t.outputs
            if (rec := records.get(rel)) is not None
            and rec.fingerprint is not None
            and rec.fingerprint != t.fingerprint
        }
        return self.ctx.ledger.usable_clips_of(older) if older else {}

    def _still_listed(
        self,
        t: DesiredTrack,
        records: dict[str, OutputRecord],
        previous: dict[str, list[ClipRecord]],
    ) -> list[out.TrackOutput]:
        """The list entries of a track's old files, while each is what the ledger wrote."""
        kept = []
        for n, rel in enumerate(t.outputs, start=1):
            rec = records.get(rel)
            if rec is None or rec.fingerprint is None or rec.fingerprint == t.fingerprint:
                return []
            # The file is the raw clip plus its tags (tags.py), so the record
            # names its clip by position, not by the cache's checksum.
            older = previous.get(rec.fingerprint, [])
            clip = older[rec.clip - 1] if rec.clip is not None and len(older) >= rec.clip else None
            soundtrack, filename = rel.split("/", 1)
            try:
                state = out.file_state(self._outdir.path(soundtrack, filename))
            except OutputError:
                return []
            if clip is None or state != (rec.size, rec.mtime_ns):
                return []
            kept.append(_list_entry(filename, t, n, clip, rec.fingerprint))
        return kept

    def _short_of_clips(self, t: DesiredTrack, have: int) -> str:
        reason = (
            f"the service returned {have} of the {t.clips} clips this track keeps; "
            f"set clips: {have} to keep what arrived, or `reconciler retry` to "
            f"generate it again ({CREDITS_PER_TASK} credits)"
        )
        if self._reported_short.get(t.fingerprint) != reason:
            self.ctx.log.warning("track.short", fingerprint=t.fingerprint, reason=reason)
        self._reported_short[t.fingerprint] = reason
        return reason

    def _ensure_output(
        self,
        t: DesiredTrack,
        n: int,
        rel: str,
        clip: ClipRecord,
        rec: OutputRecord | None,
        result: PassResult,
    ) -> bool:
        """Make ``<out>/<rel>`` hold the clip's audio with its tags; True when it does.

        The ledger holds the checksum of the tagged file and the key it was
        built from (audio checksum plus tag values): an untouched
        file with the same key needs nothing; a touched one whose bytes are
        still right is only re-recorded; anything else (a new clip, changed
        tags, a deleted or edited file) is rebuilt from the cached raw audio.
        """
        assert clip.sha256 is not None
        root = self.ctx.settings.out_dir
        soundtrack, filename = rel.split("/", 1)
        # Computed afresh (a few microseconds): only a full pass, every rescan
        # interval, does this for every output, and keeping the tags of every
        # output between passes cost more memory than the time it saves.
        tags = tagging.tags_for(t, clip)
        key = tags.key(clip.sha256)
        try:
            dest = self._outdir.path(soundtrack, filename)
            state = out.file_state(dest)
            if rec is not None and rec.tags_key == key:
                if state == (rec.size, rec.mtime_ns):
                    return True
                if state is not None and out.sha256_file(dest) == rec.sha256:
                    self.ctx.ledger.output_written(
                        self._record_for(t, n, rel, rec.sha256, state, key), event=None
                    )
                    return True
            src = self.cache.path(clip.sha256)
            if not src.exists():
                self.ctx.ledger.clip_lost(clip.clip_id)
                return False
            cover = self._cover_bytes(clip)
            if cover is None:
                tags = replace(tags, cover=None)
            tmp = out.prepare(src, dest, lambda path: tagging.write_tags(path, tags, cover))
            try:
                sha = out.sha256_file(tmp)
                if state is not None and out.sha256_file(dest) == sha:
                    # Already what we would write (a crash after the rename): keep it.
                    self.ctx.ledger.output_written(
                        self._record_for(t, n, rel, sha, state, tags.key(clip.sha256)),
                        event=None,
                    )
                    return True
                if state is not None and rec is None:
                    # Not ours: keep the person's file in the trash, never overwrite it silently.
                    self.trash.move(dest, root, self.ctx.clock())
                new_state = out.commit(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
        except OutputError as exc:
            # A person has to fix this (a symlink out of the folder, a full
            # disk): it is not work in flight, and it is reported once.
            result.output_failures += 1
            if self._logged_outputs.get(rel) != str(exc):
                self.ctx.log.error("output.failed", path=rel, error=str(exc))
            self._failed_outputs[rel] = str(exc)
            return False
        event = "output.written"
        if rec is not None and rec.sha256 == sha:
            event = "output.restored"
        # The key of what was written: without its cover when that could not
        # be had, so a later pass that has it builds the file again.
        self.ctx.ledger.output_written(
            self._record_for(t, n, rel, sha, new_state, tags.key(clip.sha256)), event=event
        )
        if event == "output.restored":
            result.restored += 1
            self.ctx.log.info(event, path=rel)
        else:
            result.written += 1
            # Same generation, other bytes: only what goes into the tags changed.
            retagged = rec is not None and rec.fingerprint == t.fingerprint
            self.ctx.log.info("output.retagged" if retagged else "track.ready", path=rel)
        return True

    def _cover_bytes(self, clip: ClipRecord) -> bytes | None:
        """The clip's cached cover; a lost one is fetched again on the next pass."""
        if not clip.cover:
            return None
        try:
            return self.cache.image_path(clip.cover).read_bytes()
        except OSError:
            self.ctx.ledger.clip_cover(clip.clip_id, None)
            return None

    @staticmethod
    def _record_for(
        t: DesiredTrack, n: int, rel: str, sha256: str, state: tuple[int, int], tags_key: str
    ) -> OutputRecord:
        return OutputRecord(
            path=rel,
            soundtrack=t.soundtrack,
            track=t.name,
            clip=n,
            fingerprint=t.fingerprint,
            sha256=sha256,
            size=state[0],
            mtime_ns=state[1],
            tags_key=tags_key,
        )

    def _write_lists(
        self, soundtrack: str, entries: Sequence[out.TrackOutput], result: PassResult
    ) -> None:
        if not entries:
            return
        try:
            dests = [self._outdir.path(soundtrack, name) for name in LIST_FILES]
        except OutputError as exc:
            self.ctx.log.error("output.failed", path=soundtrack, error=str(exc))
            return
        # Equal hashes of unequal entries (odds of 2**-64) would keep a stale
        # list until that soundtrack changes again or its list files are touched.
        key = hash(tuple(entries))
        states = [out.file_state(d) for d in dests]
        if self._lists.get(soundtrack) == (key, states):
            # Same tracks, files untouched since we wrote them: nothing to render.
            return
        texts = (out.render_playlist(entries), out.render_tracks_json(soundtrack, entries))
        for name, dest, text in zip(LIST_FILES, dests, texts, strict=True):
            try:
                if not out.write_text_if_changed(dest, text):
                    continue
                state = out.file_state(dest)
            except OutputError as exc:
                self.ctx.log.error("output.failed", path=f"{soundtrack}/{name}", error=str(exc))
                continue
            if state is None:
                continue
            self.ctx.ledger.output_written(
                OutputRecord(
                    path=f"{soundtrack}/{name}",
                    soundtrack=soundtrack,
                    track=None,
                    clip=None,
                    fingerprint=None,
                    sha256=out.sha256_file(dest),
                    size=state[0],
                    mtime_ns=state[1],
                ),
                event=None,
            )
            result.written += 1
        self._lists[soundtrack] = (key, [out.file_state(d) for d in dests])

    # -- prune (rule 5) ------------------------------------------------------------------

    def prune(self, whole: Desired, desired: Desired, result: PassResult) -> None:
        """Move outputs no track wants to the trash; ``desired`` is the part of
        ``whole`` this pass looks at."""
        if not self.ctx.settings.prune:
            return
        now = self.ctx.clock()
        if not whole.prune_allowed:
            self._pruned_all = False
        else:
            if self.shared.focus is None or not self._pruned_all:
                # Held back before (an invalid file): what waited may be anywhere.
                desired, recorded = whole, list(self.ctx.ledger.output_fingerprints())
            else:
                recorded = list(self.ctx.ledger.outputs_of(self.shared.focus))
            self._pruned_all = True
            wanted = {p for t in desired.tracks for p in t.outputs}
            wanted |= {f"{s}/{n}" for s in desired.soundtracks for n in LIST_FILES}
            root = self.ctx.settings.out_dir
            for rel in recorded:
                if rel in wanted:
                    continue
                try:
                    path = self._outdir.path(*rel.split("/", 1))
                    moved = self.trash.move(path, root, now) if path.exists() else None
                except OutputError as exc:
                    self.ctx.log.error("prune.failed", path=rel, error=str(exc))
                    continue
                self.ctx.ledger.output_removed(rel, str(moved) if moved else "")
                result.pruned += 1
                self.ctx.log.info("output.pruned", path=rel)
        for gone in self.trash.empty(self.ctx.settings.prune_grace, now):
            self.ctx.log.info("trash.emptied", path=str(gone))


def _list_entry(
    filename: str, t: DesiredTrack, n: int, clip: ClipRecord, fingerprint: str
) -> out.TrackOutput:
    """A track's line in ``playlist.m3u8`` and ``tracks.json``: clip ``n`` of its file."""
    return out.TrackOutput(
        filename=filename,
        track=t.name,
        clip_index=n,
        title=clip.title,
        lyrics=clip.lyrics,
        duration=clip.duration,
        clip_id=clip.clip_id,
        fingerprint=fingerprint,
        tags=clip.tags,
    )
