"""One reconcile pass, and the loop that repeats it until converged.

Where it sits: this module composes the stages (``reconciler.stages``) into
one pass: scanning (spec folder → recorded specs → desired state),
submitting (plan → batches), tracking (polls), then per part of the
desired state downloading (clips into the cache) and materialising
(outputs, lists), the prune, and one summary line. Each stage records its
steps in the ledger before and after they happen (rule 2); what one stage
leaves for another is in :class:`~reconciler.stages.shared.Shared`.

Every pass is level-triggered (rule 1): it recomputes what it looks at from
the folder, the ledger and the output files, so a missed event or a crash
costs nothing but a pass. The daemon and ``sync`` run the same pass.

A pass may be given a :class:`Focus`: the spec files and output folders the
daemon's watchers saw change. It then reads only those files and looks only
at the soundtracks they touch plus every soundtrack with work left (anything
not ready at its last look: queued, in flight, failed, short, invalid), each
by indexed queries; every other soundtrack was ready and nothing about it
changed. Such a pass does for its soundtracks exactly what a full pass does,
and the daemon's periodic full pass catches whatever a watcher missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from reconciler import outputs as out
from reconciler.audio import AudioCache
from reconciler.config import Settings
from reconciler.ledger import Ledger
from reconciler.musicapi import MusicAPI
from reconciler.planning import IN_FLIGHT, Desired
from reconciler.stages.downloading import Downloading, needed
from reconciler.stages.materialising import Materialising
from reconciler.stages.scanning import Scanning
from reconciler.stages.shared import Context, PassResult, Shared, generations
from reconciler.stages.submitting import Submitting
from reconciler.stages.tracking import Tracking

__all__ = ["Focus", "PassResult", "Reconciler", "converge", "wait_for_due"]

#: Tracks whose clips and output records are read and written together: the
#: pass's memory is that of one part, not of the whole folder.
PART_TRACKS = 1_000


@dataclass(frozen=True)
class Focus:
    """What changed since the last pass, as the daemon's watchers saw it."""

    #: Spec files changed, created or deleted: paths relative to the specs folder.
    specs: frozenset[str] = frozenset()
    #: Soundtracks with an output file deleted or changed.
    soundtracks: frozenset[str] = frozenset()


class Reconciler:
    """Holds what survives between passes: the stages (each with its own
    memory: parsed specs, the balance read, the outputs written) and what
    they share (the pauses, the last scan)."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        api: MusicAPI,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        only: frozenset[str] | None = None,
    ) -> None:
        self.ctx = Context(
            settings=settings,
            ledger=ledger,
            api=api,
            clock=clock,
            rng=rng or random.Random(),
            log=structlog.get_logger("reconciler"),
        )
        self.shared = Shared()
        self.ledger = ledger
        self.api = api
        self.clock = clock
        self.log = self.ctx.log
        self.cache = AudioCache(settings.state_dir / "cache")
        self.trash = out.Trash(settings.state_dir / "trash")
        self.scanning = Scanning(self.ctx, self.shared)
        self.submitting = Submitting(self.ctx, self.shared, only)
        self.tracking = Tracking(self.ctx, self.shared)
        self.downloading = Downloading(self.ctx, self.cache)
        self.materialising = Materialising(self.ctx, self.shared, self.cache, self.trash)
        #: Unexpected answer shapes already added to the ledger's counts.
        self._shapes_recorded: Counter[str] = Counter()
        self._started = False
        #: Soundtracks with a track that was not ready at their last look; None
        #: before the first pass. A focused pass looks at these whatever changed.
        self._unsettled: set[str] | None = None

    @property
    def settings(self) -> Settings:
        return self.ctx.settings

    @settings.setter
    def settings(self, settings: Settings) -> None:
        """A reload (the daemon's ``SIGHUP``): every stage reads the new settings."""
        self.ctx.settings = settings

    def reconsider(self) -> None:
        """The settings changed (a reload): a ceiling reached under the old ones may
        have lifted, so the next pass asks again instead of waiting out the pause."""
        self.submitting.reconsider()

    # -- the pass -------------------------------------------------------------------

    def startup(self) -> None:
        """Once per process: settle what a crash may have left behind."""
        interrupted = self.ledger.recover_interrupted()
        if interrupted:
            self.log.warning("submit.interrupted", submits=interrupted)
        self.cache.sweep_temps()
        if self.settings.out_dir.exists():
            out.sweep_output_temps(self.settings.out_dir)
        self.scanning.store_compact_tracks()
        self._started = True

    async def run_pass(self, focus: Focus | None = None) -> PassResult:
        """One pass; with ``focus``, over what changed and what has work left (see above)."""
        if not self._started:
            self.startup()
        # status checks the recorded outputs where they were written, whatever
        # --out the person running it gives (an operator often gives none).
        self.ledger.put("out_dir", str(self.settings.out_dir.absolute()))
        started = time.perf_counter()
        result = PassResult()
        now = self.clock()
        previous = self.shared.scan
        if focus is not None and (
            previous is None or previous.root_state != "ok" or self._unsettled is None
        ):
            focus = None  # nothing to start from: this pass reads everything
        reread: set[str] | None = None
        if focus is not None and previous is not None:
            reread = {*focus.specs, *previous.errors, *previous.settling}
            result.scope = "changed"
        scan = await self.scanning.read(reread, now)
        result.specs_read = len(scan.observed) if reread is None else len(reread)
        # Before the scan is applied: a file read again may have left its soundtrack.
        was = self.scanning.soundtracks_of(reread)
        whole = self.scanning.apply(scan, reread)
        desired = whole
        self.shared.focus = None
        if focus is not None and self._unsettled is not None:
            self.shared.focus = frozenset(
                {
                    *self._unsettled,
                    *focus.soundtracks,
                    *was,
                    *(scan.files[p].soundtrack for p in reread or () if p in scan.files),
                }
            )
            desired = whole.only(self.shared.focus)
            self.ledger.apply_desired(desired, self.shared.focus)
        else:
            self.ledger.apply_desired(whole)
        result.tracks_checked = len(desired.tracks)
        result.invalid_files = len(scan.errors)
        result.settling = len(scan.settling)
        result.settle_at = scan.settled_by
        self.submitting.expire_unknown()
        await self.submitting.submit(desired, result, now)
        await self.tracking.poll(result)
        await self._write_outputs(desired, result)
        self.materialising.prune(whole, desired, result)
        result.seconds = time.perf_counter() - started
        self._summarise(whole, desired, result)
        return result

    async def _write_outputs(self, desired: Desired, result: PassResult) -> None:
        """Download and write the outputs of ``desired``, whole soundtracks at a
        time (``PART_TRACKS``), each part's ledger rows read by index."""
        self.materialising.begin()
        short: dict[str, str] = {}
        #: Soundtracks with a track not ready after this pass: looked at again next time.
        unsettled: set[str] = set()
        for part in desired.parts(PART_TRACKS):
            # Read once: the downloads fill in checksums, materialising uses them.
            usable = self.ledger.usable_clips_of(needed(part))
            usable = await self.downloading.download(usable, part, result)
            unsettled |= await self.materialising.materialise(part, usable, result, short)
        if self.shared.focus is None or self._unsettled is None:
            self._unsettled = unsettled
        else:
            self._unsettled = (self._unsettled - self.shared.focus) | unsettled
        self.materialising.finish(desired, short)

    # -- summary ------------------------------------------------------------------------

    def _record_shapes(self) -> None:
        """Add the answers read in an unexpected shape since the last pass to the
        ledger's counts, which ``status`` shows."""
        fresh = self.api.unexpected - self._shapes_recorded
        if not fresh:
            return
        counts = Counter(self.ledger.get("unexpected_shapes") or {})
        counts.update(fresh)
        self.ledger.put("unexpected_shapes", dict(counts))
        self._shapes_recorded = Counter(self.api.unexpected)

    def _summarise(self, whole: Desired, desired: Desired, result: PassResult) -> None:
        gens = generations(self.ctx, self.shared, desired)
        result.total = len(whole.tracks)
        states: Counter[str] = Counter(
            gens[t.fingerprint].state for t in desired.tracks if t.fingerprint in gens
        )
        # The tracks a focused pass did not look at were ready when last looked
        # at, and nothing about them changed since.
        settled = result.total - len(desired.tracks)
        if settled:
            states["succeeded"] += settled
            result.ready += settled
        result.states = states
        result.in_flight = sum(n for s, n in states.items() if s in IN_FLIGHT)
        result.queued = states.get("queued", 0)
        result.retrying = sum(
            1
            for t in desired.tracks
            if t.fingerprint in gens
            and gens[t.fingerprint].state == "queued"
            and (gens[t.fingerprint].attempts or gens[t.fingerprint].next_attempt)
        )
        result.parked = states.get("parked", 0)
        # Succeeded generations whose files are not there yet are still work,
        # unless writing them failed for a reason only a person can fix.
        result.in_flight += max(
            0,
            states.get("succeeded", 0)
            - result.ready
            - result.invalid_tracks
            - result.output_failures
            - result.short,
        )
        submit_from = (
            max(self.clock(), self.shared.pause_until)
            if self.shared.submit_waits_for_time and math.isfinite(self.shared.pause_until)
            else None
        )
        due = [self.ledger.next_due(self.settings.ambiguous_grace, submit_from), result.settle_at]
        result.next_due = min((t for t in due if t is not None), default=None)
        self._record_shapes()
        if result.blocked is None and self.shared.block_reason and result.queued:
            result.blocked = self.shared.block_reason
        summary = {
            "total": result.total,
            "ready": result.ready,
            "in_flight": result.in_flight,
            "queued": result.queued - result.retrying,
            "retrying": result.retrying,
            "parked": result.parked,
            "invalid_files": result.invalid_files,
            "blocked": result.blocked,
        }
        if result.changed or self.ledger.get("last_pass_summary") != summary:
            self.ledger.put("last_pass_summary", summary)
            self.ledger.put("last_pass_at", self.clock())
        self.log.info(
            "pass.completed",
            submitted=result.submitted,
            polls=result.polls,
            downloads=result.downloads,
            written=result.written,
            restored=result.restored,
            pruned=result.pruned,
            seconds=round(result.seconds, 3),
            scope=result.scope,
            specs_read=result.specs_read,
            tracks_checked=result.tracks_checked,
            **summary,
        )


ProgressFn = Callable[[PassResult], None]


async def converge(
    reconciler: Reconciler,
    *,
    wake: asyncio.Event | None = None,
    progress: ProgressFn | None = None,
    max_wait: float | None = None,
) -> PassResult:
    """Run passes until every track is ready or nothing can progress (``sync``)."""
    wake = wake or asyncio.Event()
    while True:
        result = await reconciler.run_pass()
        if progress is not None:
            progress(result)
        if result.converged or result.stuck:
            return result
        await wait_for_due(reconciler, result, wake, max_wait=max_wait)


async def wait_for_due(
    reconciler: Reconciler, result: PassResult, wake: asyncio.Event, *, max_wait: float | None
) -> None:
    """Sleep until the next poll or retry is due, or until something wakes us."""
    now = reconciler.clock()
    due = (
        result.next_due if result.next_due is not None else now + reconciler.settings.poll_interval
    )
    delay = max(0.0, due - now)
    if max_wait is not None:
        delay = min(delay, max_wait)
    if delay <= 0:
        return
    wake.clear()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), timeout=delay)
