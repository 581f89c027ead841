"""Scanning: the spec folder → recorded specs → the desired state.

Where it sits: the first stage of a pass. It reads the spec files (all of
them, or in a focused pass those that changed and those that were invalid
or settling), on a thread (``specs``); records each file's state in the
ledger; and has ``planning.desired_state`` compute what the folder asks
for, with the last good version of an invalid or still-changing file kept
in force. Each file's tracks are fingerprinted once per version.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from reconciler.planning import Desired, FileTracks, desired_state
from reconciler.specs import Observation, Settling, SpecFile, SpecScan, scan_specs
from reconciler.stages.shared import Context, Shared


class Scanning:
    """Holds what survives between scans: last good specs, fingerprints, reports."""

    def __init__(self, ctx: Context, shared: Shared) -> None:
        self.ctx = ctx
        self.shared = shared
        #: Each spec file's desired tracks, fingerprinted once per version
        #: (the ledger stores the fingerprints of the last good versions).
        self._file_tracks: dict[str, FileTracks] = ctx.ledger.last_good_tracks()
        self._last_good: dict[str, SpecFile] = {p: f.spec for p, f in self._file_tracks.items()}
        #: How each spec file looked at the last scan, to tell when it stops changing.
        self._observed: Mapping[str, Observation] = {}
        #: Problems logged last pass (spec files), so each is logged once.
        self._reported: dict[str, str] = {}
        self.desired: Desired | None = None

    def store_compact_tracks(self) -> None:
        # Once, after an upgrade: later processes then read the compact tracks.
        self.ctx.ledger.store_compact_tracks(self._file_tracks)

    async def read(self, reread: set[str] | None, now: float) -> SpecScan:
        """Read the spec folder: every file, or only ``reread`` (the last scan's
        other files are reused as they were)."""
        settings = self.ctx.settings
        # Reading and parsing files is the slow part; SQLite stays on this thread.
        return await asyncio.to_thread(
            scan_specs,
            settings.specs_dir,
            models=settings.models,
            limits=settings.field_limits,
            reuse=self._last_good,
            settle=Settling(self._observed, now, settings.batch_window),
            changed=reread,
            last_scan=self.shared.scan,
        )

    def soundtracks_of(self, paths: set[str] | None) -> set[str]:
        """The soundtracks the last good versions of ``paths`` belong to."""
        return {self._last_good[p].soundtrack for p in paths or () if p in self._last_good}

    def apply(self, scan: SpecScan, reread: set[str] | None = None) -> Desired:
        """Record ``scan`` in the ledger and return the desired state it asks for."""
        previous, self.shared.scan = self.shared.scan, scan
        self._observed = scan.observed
        errors = {p: str(e) for p, e in scan.errors.items()}
        # A settling file is held like an invalid one (its last good version
        # stays in force, nothing is pruned), and status shows why.
        removed = self.ctx.ledger.record_specs(
            scan.files,
            {**errors, **scan.settling},
            complete=scan.root_state == "ok",
            only=reread,
            stamps=scan.stamps,
        )
        for path, err in scan.errors.items():
            # Report each problem once, not on every pass (rule 12).
            if self._reported.get(path) != str(err):
                for problem in err.problems:
                    self.ctx.log.warning("spec.invalid", problem=str(problem))
        for path, note in scan.settling.items():
            if self._reported.get(path) != note:
                self.ctx.log.info("spec.settling", path=path, window=self.ctx.settings.batch_window)
        self._reported = {**errors, **scan.settling}
        if previous is not None and scan.files is previous.files and self.desired is not None:
            # The scan found the files read again as they were (``scan_specs``
            # then returns the last scan's files): so is what they ask for.
            return self.desired
        last_good = dict(self._last_good)
        for p in removed:
            last_good.pop(p, None)
        held = [*scan.errors, *scan.settling]
        desired = desired_state(scan.files, held, scan.root_state, last_good, self._file_tracks)
        last_good.update(scan.files)
        self._last_good = last_good
        self.desired = desired
        return desired
