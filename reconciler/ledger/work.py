"""The ledger's transitions: every change of state, each in one transaction.

Where it sits: plan → submit → track → download → outputs → **ledger** → status.
``Ledger`` builds on the store (``store.Store``: connection, schema, events)
and applies what the pure code decided (``planning``, ``outcomes``). It
records what was asked for (last good spec files, desired tracks), what was
paid for (submit intents, batches, tasks), what came back (clips, cached
audio) and what was written (output files with checksums), plus an
append-only event log. Every state transition is one transaction
(``Database.atomic``), so a crash leaves either the old or the new state,
never half of each.

Writers hold the state folder's lock (``statelock``); ``status`` opens the
database read-only in WAL mode and never waits for it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

from reconciler.errors import LedgerError
from reconciler.ledger.facts import (
    ClipRecord,
    OutputRecord,
    TaskRef,
    TaskUpdate,
)
from reconciler.ledger.store import Store, _dumps
from reconciler.outcomes import Done, Outcome, Park, Requeue, lost_task
from reconciler.planning import (
    IN_FLIGHT,
    Desired,
    DesiredTrack,
    FileTracks,
    Generation,
    GenState,
    OpenBatch,
    Suspension,
    file_tracks,
    fingerprint,
)
from reconciler.specs import SpecFile, TrackSpec, same_file

#: Values per ``IN (...)`` query: well under SQLite's oldest limit of 999 parameters.
_IN_CHUNK = 500
#: An unknown generation none of whose submit's orphan tasks is still being read.
_NOT_MATCHING = (
    "(submit_id IS NULL OR submit_id NOT IN (SELECT submit_id FROM orphans WHERE state = 'open'))"
)

#: Unclaimed ``unknown`` items whose grace period ended at ``?`` or before,
#: with their resubmits so far: what the pass's first step sends again or parks
#: (``Ledger.expire_unknown``), and so what ``plan`` shows it doing. While
#: tasks of its submit are still being matched, an item may be one of them:
#: its grace period has not begun to matter.
EXPIRED_UNKNOWN_SQL = (
    "SELECT fingerprint, resubmits FROM generations WHERE state = 'unknown' "  # noqa: S608
    f"AND paid_hint = 0 AND updated_at <= ? AND {_NOT_MATCHING}"
)


def split_expired(
    rows: Iterable[tuple[str, int]], max_resubmits: int
) -> tuple[list[str], list[str]]:
    """``EXPIRED_UNKNOWN_SQL``'s rows as (sent again, parked): each goes out
    again while its resubmits stay within ``max_resubmits``."""
    rows = list(rows)
    return [fp for fp, n in rows if n < max_resubmits], [fp for fp, n in rows if n >= max_resubmits]


#: The reads a pass and ``plan`` (``reports.read_plan``) share, in the
#: field order of the records they build.
LAST_GOOD_SQL = (
    "SELECT path, soundtrack, digest, tracks, body, stamp FROM spec_files WHERE body IS NOT NULL"
)
GENERATIONS_SQL = "SELECT fingerprint, state, attempts, next_attempt, reason FROM generations"
USABLE_CLIPS_SQL = (
    "SELECT c.clip_id, c.task_id, c.fingerprint, c.position, c.state, c.audio_url, "
    "c.duration, c.title, c.lyrics, c.tags, c.sha256, c.image_url, c.cover "
    # Joined on both columns: a clip is stored under its task's
    # fingerprint, and so the indexes on both sides apply.
    "FROM generations g JOIN clips c "
    "ON c.fingerprint = g.fingerprint AND c.task_id = g.task_id "
    "WHERE c.state = 'succeeded' AND c.audio_url IS NOT NULL AND c.audio_url != '' "
    "AND g.fingerprint"
)
#: Tasks that may have been charged since a time (given twice): see ``Ledger.spent_since``.
SPENT_SQL = (
    "SELECT (SELECT count(*) FROM tasks WHERE at >= ?) + "
    "(SELECT coalesce(sum(unsettled), 0) FROM submits WHERE at >= ?)"
)


def rows_in(
    execute: Callable[[str, list[Any]], Iterable[tuple[Any, ...]]],
    select: str,
    values: Iterable[Any],
) -> list[tuple[Any, ...]]:
    """``select`` (ending in a column) ``IN`` the values, in chunks under
    SQLite's limit on parameters; ``execute`` runs one query."""
    values = list(values)
    rows: list[tuple[Any, ...]] = []
    for i in range(0, len(values), _IN_CHUNK):
        chunk = values[i : i + _IN_CHUNK]
        marks = ", ".join("?" * len(chunk))
        rows.extend(execute(f"{select} IN ({marks})", chunk))
    return rows


def usable_clips(rows: Iterable[tuple[Any, ...]]) -> dict[str, list[ClipRecord]]:
    """Rows of ``USABLE_CLIPS_SQL`` by fingerprint, in position order."""
    out: dict[str, list[ClipRecord]] = {}
    for r in sorted(rows, key=lambda r: (r[2], r[3])):
        out.setdefault(r[2], []).append(ClipRecord(*r))
    return out


#: Why a generation whose submit answers were lost waits for a person.
LOST_ANSWER_PARK = (
    "submit answer lost; the service may already have created (and charged) this "
    "generation, so it is not sent again on its own: `reconciler retry` sends it "
    "again at the risk of paying twice"
)
#: Why a generation whose submit answers were lost is queued again.
RESUBMIT_REASON = "resubmitted after an ambiguous submit"
#: A reason that contains LOST_ANSWER_PARK, as a LIKE pattern both backends read
#: (SQLite's instr() does not exist in PostgreSQL). The text has no wildcard, and
#: one added later would only widen the match around it.
_LOST_ANSWER_LIKE = f"%{LOST_ANSWER_PARK}%"


def spec_columns(spec: SpecFile) -> tuple[str, str]:
    """A last good version as ``spec_files`` stores it: its ``body`` (every
    field, to decode the spec again) and its ``tracks`` (each track's name,
    fingerprint, clips, album and artist: what the desired state is built from).

    The fingerprints are stored so a new process need not hash every track
    again (most of a cold start); the compact ``tracks`` so a cold ``plan``
    decodes no create requests (``last_good_from_row``).
    """
    fingerprints = [fingerprint(t.request, t.variant) for t in spec.tracks]
    body = _dumps(
        {
            "soundtrack": spec.soundtrack,
            "digest": spec.digest,
            "tracks": [
                {
                    "name": t.name,
                    "request": dict(t.request),
                    "variant": t.variant,
                    "clips": t.clips,
                    "line": t.line,
                    "album": t.album,
                    "artist": t.artist,
                    "fingerprint": fp,
                }
                for t, fp in zip(spec.tracks, fingerprints, strict=True)
            ],
        }
    )
    tracks = _dumps(
        [
            [t.name, fp, t.clips, t.album, t.artist]
            for t, fp in zip(spec.tracks, fingerprints, strict=True)
        ]
    )
    return body, tracks


def last_good_from_row(
    path: str, soundtrack: str, digest: str, tracks: str | None, body: str
) -> FileTracks:
    """A last good version read back (``LAST_GOOD_SQL``) with its desired tracks.

    They come from the compact ``tracks`` column; the spec's own tracks (with
    their create requests, most of the body) are decoded from ``body`` only
    when something asks for them. A row an older reconciler wrote has no
    ``tracks`` and is decoded whole (``Ledger.store_compact_tracks`` adds them).
    """
    if tracks is None:
        return file_tracks_from_json(path, body)
    rows = json.loads(tracks)
    of = len(rows)
    return FileTracks(
        SpecFile(path, soundtrack, lambda: _tracks_from_data(json.loads(body)), digest),
        # A list first: a generator's frame switches cost more than the tuples.
        tuple(
            [
                DesiredTrack(soundtrack, name, fp, clips, path, pos, album, artist, of)
                for pos, (name, fp, clips, album, artist) in enumerate(rows)
            ]
        ),
    )


def file_tracks_from_json(path: str, body: str) -> FileTracks:
    """A last good version with its desired tracks, from its body alone: by
    the fingerprints stored with it (a body written before they were is
    hashed now)."""
    data = json.loads(body)
    spec = SpecFile(path, data["soundtrack"], _tracks_from_data(data), data["digest"])
    stored = data["tracks"]
    if any(t.get("fingerprint") is None for t in stored):
        return file_tracks(path, spec)
    of = len(stored)
    return FileTracks(
        spec,
        tuple(
            DesiredTrack(
                spec.soundtrack, t.name, d["fingerprint"], t.clips, path, pos, t.album, t.artist, of
            )
            for pos, (t, d) in enumerate(zip(spec.tracks, stored, strict=True))
        ),
    )


def _tracks_from_data(data: dict[str, Any]) -> tuple[TrackSpec, ...]:
    return tuple(
        TrackSpec(
            name=t["name"],
            request=t["request"],
            variant=t["variant"],
            clips=t["clips"],
            line=t["line"],
            album=t.get("album"),
            artist=t.get("artist"),
        )
        for t in data["tracks"]
    )


class Ledger(Store):
    """Typed transitions over the ledger (SQLite or PostgreSQL). Time comes from ``clock``."""

    def identity(self) -> str:
        """This ledger's id, made once: it names the ledger that keeps an output folder."""
        if (known := self.get("ledger_id")) is not None:
            return str(known)
        import uuid

        with self.transaction(fenced=False):
            # Two replicas starting together: the first id written stays.
            self.db.execute(
                "INSERT INTO kv (key, value) VALUES ('ledger_id', ?) ON CONFLICT DO NOTHING",
                [_dumps(uuid.uuid4().hex)],
            )
        return str(self.get("ledger_id"))

    # -- spec files and desired state --------------------------------------------

    def last_good_tracks(self) -> dict[str, FileTracks]:
        """``last_good`` with each file's desired tracks, to seed ``desired_state``."""
        return {r[0]: last_good_from_row(*r[:5]) for r in self.db.execute(LAST_GOOD_SQL)}

    def store_compact_tracks(self, built: Mapping[str, FileTracks]) -> None:
        """Store the fingerprints and compact tracks (``spec_columns``) of last
        good versions an older reconciler recorded without them, as ``built``
        (``last_good_tracks``) has them."""
        rows = self.db.execute(
            "SELECT path FROM spec_files WHERE body IS NOT NULL AND tracks IS NULL"
        ).fetchall()
        changed = [(path, *spec_columns(built[path].spec)) for (path,) in rows if path in built]
        if not changed:
            return
        with self.transaction():
            for path, body, tracks in changed:
                self.db.execute(
                    "UPDATE spec_files SET body = ?, tracks = ? WHERE path = ?",
                    [body, tracks, path],
                )

    def spec_errors(self) -> dict[str, str]:
        return {
            r["path"]: r["error"]
            for r in self.db.query("SELECT path, error FROM spec_files WHERE error IS NOT NULL")
        }

    def record_specs(
        self,
        valid: Mapping[str, SpecFile],
        errors: Mapping[str, str],
        *,
        complete: bool,
        only: Collection[str] | None = None,
        stamps: Mapping[str, str] | None = None,
    ) -> list[str]:
        """Store new last good versions and current errors; writes only what changed.

        With ``only``, just those paths are compared (and removed when they are
        in neither mapping): a pass that read only the files that changed.
        ``stamps`` are the valid files' stamps as read (``SpecScan.stamps``):
        one is written only with a new version or when the file was written
        since, not when it merely aged past ``specs.YOUNG``.
        """
        now = self.clock()
        stamps = stamps or {}
        columns = "SELECT path, digest, error, stamp FROM spec_files"
        if only is None:
            rows = self.db.execute(columns).fetchall()
        else:
            rows = self._rows_in(f"{columns} WHERE path", only)
        known = {r[0]: (r[1], r[2], r[3]) for r in rows}
        if only is not None:
            valid = {p: valid[p] for p in only if p in valid}
            errors = {p: errors[p] for p in only if p in errors}
        with self.transaction():
            for path, spec in valid.items():
                was = known.get(path)
                read = stamps.get(path)
                if was is not None and was[:2] == (spec.digest, None):
                    if read is None or (was[2] is not None and same_file(was[2], read)):
                        continue
                    # The same version, touched: its new stamp vouches for it.
                    self.db.execute("UPDATE spec_files SET stamp = ? WHERE path = ?", [read, path])
                    continue
                self.db.execute(
                    "INSERT INTO spec_files "
                    "(path, soundtrack, digest, body, tracks, error, stamp, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, NULL, ?, ?) ON CONFLICT(path) DO UPDATE SET "
                    "soundtrack = excluded.soundtrack, digest = excluded.digest, "
                    "body = excluded.body, tracks = excluded.tracks, error = NULL, "
                    "stamp = excluded.stamp, updated_at = excluded.updated_at",
                    [path, spec.soundtrack, spec.digest, *spec_columns(spec), read, now],
                )
                self._event("spec.accepted", path=path, soundtrack=spec.soundtrack)
            for path, error in errors.items():
                if path not in known:
                    # Never valid: nothing to keep in force, but status shows it.
                    self.db.execute(
                        "INSERT INTO spec_files "
                        "(path, soundtrack, digest, body, error, updated_at) "
                        "VALUES (?, '', '', NULL, ?, ?)",
                        [path, error, now],
                    )
                elif known[path][1] != error:
                    # The stamp goes: it vouches for the last good version only
                    # while that is what the file holds.
                    self.db.execute(
                        "UPDATE spec_files SET error = ?, stamp = NULL, updated_at = ? "
                        "WHERE path = ?",
                        [error, now, path],
                    )
                else:
                    continue
                self._event("spec.invalid", path=path, error=error)
            removed = [p for p in known if p not in valid and p not in errors] if complete else []
            for path in removed:
                self.db.execute("DELETE FROM spec_files WHERE path = ?", [path])
                self._event("spec.removed", path=path)
        return removed

    def apply_desired(self, desired: Desired, soundtracks: Collection[str] | None = None) -> None:
        """Make the tracks table equal the desired tracks; create queued generations.

        Creating the generation row is the first step of rule 2's intent: from
        here on every transition of that fingerprint is recorded.

        With ``soundtracks``, ``desired`` holds just their tracks and only their
        rows are compared: a pass that read only the files that changed.
        """
        now = self.clock()
        columns = "SELECT soundtrack, name, fingerprint, clips, source, position FROM tracks"
        rows: Iterable[tuple[Any, ...]]
        if soundtracks is None:
            # Row by row from the cursor: at 50,000 tracks the table read whole
            # and keyed, with every generation's fingerprint beside it, was
            # about 35 MiB at once, the daemon's peak (its start-up pass).
            rows = self.db.execute(columns)
        else:
            rows = self._rows_in(f"{columns} WHERE soundtrack", soundtracks)
        wanted = {(t.soundtrack, t.name): t for t in desired.tracks}
        unseen = set(wanted)
        #: The tracks whose row differs: their fingerprint before.
        previous: dict[tuple[str, str], str] = {}
        gone = []
        for r in rows:
            key = (r[0], r[1])
            t = wanted.get(key)
            if t is None:
                gone.append(key)
                continue
            unseen.discard(key)
            if (r[2], r[3], r[4], r[5]) != (t.fingerprint, t.clips, t.source, t.position):
                previous[key] = r[2]
        changed = [t for key, t in wanted.items() if key in unseen or key in previous]
        new_fps = self._without_generation(desired.fingerprints())
        if not (new_fps or changed or gone):
            return
        with self.transaction():
            for fp in new_fps:
                self.db.execute(
                    "INSERT INTO generations (fingerprint, request, state, created_at, updated_at) "
                    "VALUES (?, ?, 'queued', ?, ?)",
                    [fp, _dumps(dict(desired.requests[fp])), now, now],
                )
            for t in changed:
                before = previous.get((t.soundtrack, t.name))
                self.db.execute(
                    "INSERT INTO tracks (soundtrack, name, fingerprint, clips, source, position, "
                    "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(soundtrack, name) DO "
                    "UPDATE SET fingerprint = excluded.fingerprint, clips = excluded.clips, "
                    "source = excluded.source, position = excluded.position, "
                    "updated_at = excluded.updated_at",
                    [t.soundtrack, t.name, t.fingerprint, t.clips, t.source, t.position, now],
                )
                if before != t.fingerprint:
                    self._event(
                        "track.desired",
                        fingerprint=t.fingerprint,
                        soundtrack=t.soundtrack,
                        track=t.name,
                        previous=before,
                    )
            for st, name in gone:
                self.db.execute("DELETE FROM tracks WHERE soundtrack = ? AND name = ?", [st, name])
                self._event("track.removed", soundtrack=st, track=name)

    def _without_generation(self, fingerprints: Sequence[str]) -> list[str]:
        """``fingerprints`` that have no generation row yet, in their order; by
        index a chunk at a time, not a read of every generation."""
        new: list[str] = []
        for i in range(0, len(fingerprints), _IN_CHUNK):
            chunk = fingerprints[i : i + _IN_CHUNK]
            have = {
                r[0]
                for r in self._rows_in(
                    "SELECT fingerprint FROM generations WHERE fingerprint", chunk
                )
            }
            new.extend(fp for fp in chunk if fp not in have)
        return new

    def generations(self) -> dict[str, Generation]:
        # Plain tuples in the dataclass's field order: building a dict per row
        # first costs as much again at 10,000 rows, and a pass reads this thrice.
        return {g[0]: g for g in map(Generation._make, self.db.execute(GENERATIONS_SQL))}

    def generations_of(self, fingerprints: Collection[str]) -> dict[str, Generation]:
        """The generations of ``fingerprints``, and every one in flight (the
        in-flight cap counts those whatever the tracks): indexed lookups, for a
        pass that looks only at what changed."""
        columns = GENERATIONS_SQL
        marks = ", ".join("?" * len(IN_FLIGHT))
        rows = [
            *self._rows_in(f"{columns} WHERE fingerprint", fingerprints),
            *self.db.execute(f"{columns} WHERE state IN ({marks})", sorted(IN_FLIGHT)),
        ]
        return {g[0]: g for g in map(Generation._make, rows)}

    def _rows_in(self, select: str, values: Iterable[Any]) -> list[tuple[Any, ...]]:
        """``select`` (ending in a column) ``IN`` the values, in chunks under
        SQLite's limit on parameters."""
        return rows_in(self.db.execute, select, values)

    def attempts(self, fingerprints: Sequence[str]) -> dict[str, int]:
        """Attempts so far per fingerprint: one indexed lookup each, not a full read.

        An attempt is a try the service answered about the item itself: a
        task that failed upstream, was given up on or was lost, or a refusal
        of the item nobody could classify. Three of them park the generation
        (``outcomes.MAX_UPSTREAM_ATTEMPTS``). A submit the service turned
        away unread (a 429, a refused connection, a 401), a refusal for money
        and an item found not created are no verdict on the item: they
        requeue it without counting one.
        """
        return {
            fp: int(row[0]) if row else 0
            for fp in fingerprints
            for row in [
                self.db.execute(
                    "SELECT attempts FROM generations WHERE fingerprint = ?", [fp]
                ).fetchone()
            ]
        }

    def request(self, fingerprint: str) -> dict[str, Any]:
        row = self.db.execute(
            "SELECT request FROM generations WHERE fingerprint = ?", [fingerprint]
        ).fetchone()
        if row is None:
            raise LedgerError(f"unknown fingerprint {fingerprint}")
        return dict(json.loads(row[0]))

    def count_state(self, *states: GenState) -> int:
        marks = ",".join("?" * len(states))
        row = self.db.execute(
            f"SELECT count(*) FROM generations WHERE state IN ({marks})",  # noqa: S608
            list(states),
        ).fetchone()
        return int(row[0])

    # -- submits (rule 2) ----------------------------------------------------------

    def begin_submit(self, fingerprints: Sequence[str], kind: str) -> int:
        """Record the intent before a submit: the fingerprints become ``submitting``."""
        now = self.clock()
        with self.transaction():
            # Every item counts as possibly charged until the answer says otherwise.
            submit_id = int(
                self.db.execute(
                    "INSERT INTO submits (at, kind, state, fingerprints, unsettled) "
                    "VALUES (?, ?, 'intent', ?, ?) RETURNING id",
                    [now, kind, _dumps(list(fingerprints)), len(fingerprints)],
                ).fetchone()[0]
            )
            for fp in fingerprints:
                self.db.execute(
                    "UPDATE generations SET state = 'submitting', submit_id = ?, updated_at = ? "
                    "WHERE fingerprint = ?",
                    [submit_id, now, fp],
                )
        return submit_id

    def submit_answered(
        self,
        submit_id: int,
        batch_id: str | None,
        accepted: Mapping[str, tuple[str, int]],
        requeue: Mapping[str, tuple[float, str]],
        parked: Mapping[str, str],
        *,
        poll_at: float,
        uncounted: Collection[str] = (),
        unconfirmed: Mapping[str, str] | None = None,
        orphans: Sequence[str] = (),
        submitted: int | None = None,
    ) -> list[str]:
        """Record a submit's answer at once: task ids, parked and requeued items.

        ``accepted`` maps fingerprint → (task id, index in the batch);
        ``requeue`` fingerprint → (next attempt time, reason);
        ``parked`` fingerprint → the API's reason; ``uncounted`` the requeued
        items whose refusal was about money, not the item, so no attempt is
        counted for them (see ``attempts``); ``unconfirmed`` items the
        answer did not account for are treated like an ambiguous submit, and
        ``orphans`` are task ids it named without saying whose; ``submitted``
        is how many items the service says it accepted, which bounds how many
        of the unknown items can have been charged.

        Ids are not trusted blindly: a task id the ledger already holds for
        another generation, or a batch id it already knows, is never attached
        to this submit's items (a restarted service may hand out old ids).
        Returns the collisions found, for the log; an item whose task id
        collided is held as unknown.
        """
        now = self.clock()
        collisions: list[str] = []
        unknown = dict(unconfirmed or {})
        with self.transaction():
            if batch_id is not None and self._known_batch(batch_id):
                collisions.append(f"batch {batch_id}")
                self._event("ledger.id_collision", batch_id=batch_id, submit_id=submit_id)
                batch_id = None  # its tasks are polled one by one instead
            if batch_id is not None and (accepted or unknown or orphans):
                self.db.execute(
                    "INSERT INTO batches (batch_id, submit_id, at, open, next_poll) "
                    "VALUES (?, ?, ?, 1, ?)",
                    [batch_id, submit_id, now, poll_at],
                )
            for fp, (task_id, idx) in accepted.items():
                owner = self._task_owner(task_id)
                if owner is not None and owner != fp:
                    collisions.append(f"task {task_id}")
                    self._event("ledger.id_collision", fingerprint=fp, task_id=task_id, owner=owner)
                    unknown[fp] = f"the service answered with task {task_id}, already known"
                    continue
                self._task_started(fp, task_id, batch_id, idx, now, poll_at)
                self._event("task.accepted", fingerprint=fp, task_id=task_id, batch_id=batch_id)
            for fp, (when, reason) in requeue.items():
                self._requeue(fp, when, reason, now, counted=fp not in uncounted)
            for fp, reason in parked.items():
                self._park(fp, reason, now)
            for fp, reason in unknown.items():
                self._unknown(fp, reason, now)
            for task_id in orphans:
                if self._task_owner(task_id) is None:
                    self.db.execute(
                        "INSERT INTO orphans "
                        "(task_id, submit_id, batch_id, at, next_poll, state) "
                        "VALUES (?, ?, ?, ?, ?, 'open') ON CONFLICT DO NOTHING",
                        [task_id, submit_id, batch_id, now, poll_at],
                    )
                    self._event("task.orphan", task_id=task_id, submit_id=submit_id)
            attributed = len(accepted) - sum(fp in unknown for fp in accepted)
            unsettled = len(unknown)
            if submitted is not None:
                unsettled = min(unsettled, max(0, submitted - attributed))
            self.db.execute(
                "UPDATE submits SET state = 'answered', batch_id = ?, unsettled = ? WHERE id = ?",
                [batch_id, unsettled, submit_id],
            )
        return collisions

    def _known_batch(self, batch_id: str) -> bool:
        row = self.db.execute("SELECT 1 FROM batches WHERE batch_id = ?", [batch_id]).fetchone()
        return row is not None

    def _task_owner(self, task_id: str) -> str | None:
        row = self.db.execute(
            "SELECT fingerprint FROM tasks WHERE task_id = ?", [task_id]
        ).fetchone()
        return None if row is None else str(row[0])

    def _unknown(self, fp: str, reason: str, now: float) -> None:
        self.db.execute(
            "UPDATE generations SET state = 'unknown', reason = ?, updated_at = ? "
            "WHERE fingerprint = ? AND state = 'submitting'",
            [reason, now, fp],
        )

    def _task_started(
        self,
        fp: str,
        task_id: str,
        batch_id: str | None,
        idx: int | None,
        now: float,
        poll_at: float,
    ) -> None:
        self.db.execute(
            "INSERT INTO tasks "
            "(task_id, fingerprint, batch_id, idx, state, at, next_poll) "
            "VALUES (?, ?, ?, ?, 'running', ?, ?) ON CONFLICT DO NOTHING",
            [task_id, fp, batch_id, idx, now, poll_at],
        )
        self.db.execute(
            "UPDATE generations SET state = 'running', task_id = ?, batch_id = ?, reason = NULL, "
            "updated_at = ? WHERE fingerprint = ?",
            [task_id, batch_id, now, fp],
        )

    def _requeue(self, fp: str, when: float, reason: str, now: float, *, counted: bool) -> None:
        """Queue ``fp`` again from ``when``; ``counted``: the try was a verdict on
        the item and uses up one of its attempts (see ``attempts``)."""
        self.db.execute(
            "UPDATE generations SET state = 'queued', attempts = attempts + ?, next_attempt = ?, "
            "reason = ?, updated_at = ? WHERE fingerprint = ?",
            [int(counted), when, reason, now, fp],
        )
        self._event("generation.retrying", fingerprint=fp, reason=reason, at=when)

    def _park(self, fp: str, reason: str, now: float) -> None:
        self.db.execute(
            "UPDATE generations SET state = 'parked', reason = ?, updated_at = ? "
            "WHERE fingerprint = ?",
            [reason, now, fp],
        )
        self._event("generation.parked", fingerprint=fp, reason=reason)

    def submit_not_sent(self, submit_id: int, when: float, reason: str) -> None:
        """The request provably never reached the service, or was turned away
        unread: requeue without cost, and without counting an attempt."""
        now = self.clock()
        with self.transaction():
            self.db.execute(
                "UPDATE submits SET state = 'not_sent', error = ?, unsettled = 0 WHERE id = ?",
                [reason, submit_id],
            )
            for fp in self._submit_fingerprints(submit_id):
                self._requeue(fp, when, reason, now, counted=False)

    def submit_refused(self, submit_id: int, reason: str) -> list[str]:
        """The service refused the whole submit (nothing created): its items are
        queued again at once, without an attempt counted, to go out in smaller groups."""
        now = self.clock()
        fps = self._submit_fingerprints(submit_id)
        with self.transaction():
            self.db.execute(
                "UPDATE submits SET state = 'refused', error = ?, unsettled = 0 WHERE id = ?",
                [reason, submit_id],
            )
            for fp in fps:
                self.db.execute(
                    "UPDATE generations SET state = 'queued', updated_at = ? "
                    "WHERE fingerprint = ? AND state = 'submitting'",
                    [now, fp],
                )
        return fps

    def submit_ambiguous(self, submit_id: int, reason: str) -> list[str]:
        """The answer was lost: the items may be paid for. Keep them ``unknown``."""
        now = self.clock()
        fps = self._submit_fingerprints(submit_id)
        with self.transaction():
            self.db.execute(
                "UPDATE submits SET state = 'ambiguous', error = ? WHERE id = ?",
                [reason, submit_id],
            )
            for fp in fps:
                self._unknown(fp, reason, now)
            self._event("submit.ambiguous", submit_id=submit_id, items=len(fps), reason=reason)
        return fps

    def _submit_fingerprints(self, submit_id: int) -> list[str]:
        row = self.db.execute(
            "SELECT fingerprints FROM submits WHERE id = ?", [submit_id]
        ).fetchone()
        return list(json.loads(row[0])) if row else []

    def recover_interrupted(self) -> int:
        """At start-up, a submit left in ``intent`` died mid-call: it is ambiguous."""
        ids = [r["id"] for r in self.db.query("SELECT id FROM submits WHERE state = 'intent'")]
        for submit_id in ids:
            self.submit_ambiguous(submit_id, "interrupted while submitting (process stopped)")
        return len(ids)

    def claim(
        self, fingerprint: str, task_id: str, poll_at: float, batch_id: str | None = None
    ) -> bool:
        """A verified webhook named the task of an ``unknown`` item: it is paid for, track it."""
        now = self.clock()
        row = self.db.execute(
            "SELECT state FROM generations WHERE fingerprint = ?", [fingerprint]
        ).fetchone()
        if row is None or row[0] not in ("unknown", "submitting"):
            return False
        if self._task_owner(task_id) is not None:
            return False
        with self.transaction():
            self._settle(fingerprint, now)
            self._task_started(fingerprint, task_id, batch_id, None, now, poll_at)
            self.db.execute("DELETE FROM orphans WHERE task_id = ?", [task_id])
            self._event("submit.claimed", fingerprint=fingerprint, task_id=task_id)
        return True

    def _settle(self, fingerprint: str, now: float) -> None:
        """A possibly charged item of the generation's last submit is now a known task.

        When that leaves nothing of the submit unaccounted for, its other
        unknown items cannot have been created: they go out again at no risk.
        """
        row = self.db.execute(
            "SELECT submit_id FROM generations WHERE fingerprint = ?", [fingerprint]
        ).fetchone()
        if row is None or row[0] is None:
            return
        self.db.execute(
            "UPDATE submits SET unsettled = unsettled - 1 WHERE unsettled > 0 AND id = ?", [row[0]]
        )
        left = self.db.execute(
            "SELECT unsettled FROM submits WHERE id = ? AND state = 'answered'", [row[0]]
        ).fetchone()
        if left is not None and left[0] == 0:
            for (other,) in self.db.execute(
                "SELECT fingerprint FROM generations WHERE submit_id = ? AND state = 'unknown' "
                "AND fingerprint != ?",
                [row[0], fingerprint],
            ).fetchall():
                self._requeue(
                    other,
                    now,
                    "not created: every task of its submit is accounted for",
                    now,
                    counted=False,
                )

    def paid_hint(self, fingerprint: str) -> bool:
        """A signed callback proves a lost submit of ``fingerprint`` created a task
        whose id it does not name: never send it again on its own."""
        with self.transaction():
            cur = self.db.execute(
                "UPDATE generations SET paid_hint = 1, updated_at = ? "
                "WHERE fingerprint = ? AND state = 'unknown' AND paid_hint = 0",
                [self.clock(), fingerprint],
            )
            if cur.rowcount:
                self._event("submit.paid_hint", fingerprint=fingerprint)
        return bool(cur.rowcount)

    def expire_unknown(self, grace: float, max_resubmits: int) -> tuple[list[str], list[str]]:
        """Unclaimed ``unknown`` items past the grace period: (sent again, parked).

        Each goes out again, counted as possible double spend, while its
        resubmits stay within ``max_resubmits``; past that (or with 0) it is
        parked for a person. One a signed callback proved paid for stays.
        """
        now = self.clock()
        rows = self.db.execute(EXPIRED_UNKNOWN_SQL, [now - grace]).fetchall()
        again, parked = split_expired(rows, max_resubmits)
        if not rows:
            return again, parked
        with self.transaction():
            for fp in again:
                self.db.execute(
                    "UPDATE generations SET state = 'queued', next_attempt = 0, "
                    "possible_double = possible_double + 1, resubmits = resubmits + 1, "
                    "reason = ?, updated_at = ? WHERE fingerprint = ?",
                    [RESUBMIT_REASON, now, fp],
                )
                self._event("submit.resubmit_after_ambiguous", fingerprint=fp)
            for fp in parked:
                self._park(fp, LOST_ANSWER_PARK, now)
        return again, parked

    def spent_since(self, since: float) -> int:
        """Tasks that may have been charged since ``since``, for the budget: tasks
        created, and items of submits not settled (in flight, answer lost or
        unaccounted for), whatever became of their generations since."""
        return int(self.db.execute(SPENT_SQL, [since, since]).fetchone()[0])

    # -- orphans: tasks whose owner an answer did not say ----------------------------

    def due_orphans(self, now: float) -> list[tuple[str, int, str | None]]:
        """(task id, submit id, batch id) of orphan tasks to read through the task endpoint."""
        return [
            (r[0], int(r[1]), r[2])
            for r in self.db.execute(
                "SELECT task_id, submit_id, batch_id FROM orphans "
                "WHERE state = 'open' AND next_poll <= ?",
                [now],
            )
        ]

    def add_orphans(self, submit_id: int, batch_id: str | None, task_ids: Iterable[str]) -> None:
        """Task ids a batch poll named that belong to no recorded task."""
        now = self.clock()
        with self.transaction():
            for task_id in task_ids:
                if self._task_owner(task_id) is None:
                    cur = self.db.execute(
                        "INSERT INTO orphans "
                        "(task_id, submit_id, batch_id, at, next_poll, state) "
                        "VALUES (?, ?, ?, ?, ?, 'open') ON CONFLICT DO NOTHING",
                        [task_id, submit_id, batch_id, now, now],
                    )
                    if cur.rowcount:
                        self._event("task.orphan", task_id=task_id, submit_id=submit_id)

    def orphan_polled(self, task_id: str, next_poll: float | None, state: str = "open") -> None:
        with self.transaction():
            self.db.execute(
                "UPDATE orphans SET next_poll = ?, state = ? WHERE task_id = ?",
                [next_poll, state, task_id],
            )
            if state != "open":
                self._event(f"task.orphan_{state}", task_id=task_id)

    def unknown_requests(self, submit_id: int) -> dict[str, dict[str, Any]]:
        """fingerprint → request of the items of ``submit_id`` still waiting to be claimed."""
        return {
            r[0]: dict(json.loads(r[1]))
            for r in self.db.execute(
                "SELECT fingerprint, request FROM generations "
                "WHERE submit_id = ? AND state IN ('unknown', 'submitting') ORDER BY fingerprint",
                [submit_id],
            )
        }

    def batch_submit(self, batch_id: str) -> int | None:
        row = self.db.execute(
            "SELECT submit_id FROM batches WHERE batch_id = ?", [batch_id]
        ).fetchone()
        return None if row is None else int(row[0])

    # -- tracking -----------------------------------------------------------------

    def batches_due_by(self, until: float) -> list[OpenBatch]:
        """Open batches whose next poll comes at ``until`` or before."""
        return [
            OpenBatch(*r)
            for r in self.db.execute(
                "SELECT batch_id, at, last_poll, next_poll FROM batches "
                "WHERE open = 1 AND next_poll <= ?",
                [until],
            )
        ]

    def defer_batches(self, batch_ids: Sequence[str], next_poll: float) -> None:
        """Put off polls that would tell nothing new (a cohort's probe is still running)."""
        with self.transaction():
            self.db.executemany(
                "UPDATE batches SET next_poll = ? WHERE batch_id = ?",
                [(next_poll, b) for b in batch_ids],
            )

    def due_single_tasks(self, now: float) -> list[TaskRef]:
        """Tasks to poll one by one: fallback mode, claimed items, forgotten batches.

        A task is scheduled while ``next_poll`` is set; a terminal answer
        clears it, and an expired audio URL or a webhook sets it again.
        """
        return [
            TaskRef(r["task_id"], r["fingerprint"], r["batch_id"], r["at"])
            for r in self.db.query(
                "SELECT task_id, fingerprint, batch_id, at FROM tasks "
                "WHERE next_poll IS NOT NULL AND next_poll <= ? AND (batch_id IS NULL OR "
                "batch_id NOT IN (SELECT batch_id FROM batches WHERE open = 1))",
                [now],
            )
        ]

    def next_due(self, ambiguous_grace: float, submit_from: float | None) -> float | None:
        """The earliest time something is scheduled: a poll, a retry, or the end
        of an ambiguous submit's grace period.

        ``submit_from`` is when submitting may resume (None: not in this
        process), so a paused or spent-out pass is not due again at once.
        """
        rows = self.db.execute(
            "SELECT min(next_poll) FROM batches WHERE open = 1 "  # noqa: S608 (a constant)
            "UNION ALL SELECT min(next_poll) FROM tasks WHERE next_poll IS NOT NULL AND "
            "(batch_id IS NULL OR batch_id NOT IN (SELECT batch_id FROM batches WHERE open = 1)) "
            "UNION ALL SELECT min(next_poll) FROM orphans WHERE state = 'open' "
            "UNION ALL SELECT min(updated_at) + ? FROM generations "
            f"WHERE state = 'unknown' AND paid_hint = 0 AND {_NOT_MATCHING}",
            [ambiguous_grace],
        ).fetchall()
        times = [r[0] for r in rows if r[0] is not None]
        if submit_from is not None:
            queued = self.db.execute(
                "SELECT min(next_attempt) FROM generations WHERE state = 'queued'"
            ).fetchone()[0]
            if queued is not None:
                times.append(max(queued, submit_from))
        return min(times) if times else None

    def wake(self, batch_id: str | None, task_id: str | None) -> None:
        """Poll now rather than at the next interval (a webhook, an expired URL).

        A finished batch is reopened for one poll: that is how a fresh
        ``audio_url`` is fetched after the old one expired.
        """
        now = self.clock()
        with self.transaction():
            if batch_id:
                self.db.execute(
                    "UPDATE batches SET next_poll = ?, open = 1 WHERE batch_id = ?",
                    [now, batch_id],
                )
            elif task_id:
                self.db.execute("UPDATE tasks SET next_poll = ? WHERE task_id = ?", [now, task_id])

    def wake_open(self) -> int:
        """Poll every open batch and orphan now (a callback named nothing known)."""
        now = self.clock()
        with self.transaction():
            n = self.db.execute(
                "UPDATE batches SET next_poll = ? WHERE open = 1 AND next_poll > ?", [now, now]
            ).rowcount
            n += self.db.execute(
                "UPDATE orphans SET next_poll = ? WHERE state = 'open' AND next_poll > ?",
                [now, now],
            ).rowcount
        return int(n)

    def task_of_clip(self, clip_id: str) -> str | None:
        row = self.db.execute("SELECT task_id FROM clips WHERE clip_id = ?", [clip_id]).fetchone()
        return None if row is None else str(row[0])

    def task_ref(self, task_id: str) -> TaskRef | None:
        row = self.db.execute(
            "SELECT task_id, fingerprint, batch_id, at FROM tasks WHERE task_id = ?", [task_id]
        ).fetchone()
        return TaskRef(*row) if row else None

    def batch_task_indexes(self, batch_id: str) -> dict[int, str]:
        """0-based item index → task id, for the tasks of a batch whose index is known."""
        return {
            int(r[0]): r[1]
            for r in self.db.execute(
                "SELECT idx, task_id FROM tasks WHERE batch_id = ? AND idx IS NOT NULL",
                [batch_id],
            )
        }

    def batch_tasks(self, batch_id: str) -> dict[str, str]:
        """task id → fingerprint for the tasks of a batch."""
        return {
            r["task_id"]: r["fingerprint"]
            for r in self.db.query(
                "SELECT task_id, fingerprint FROM tasks WHERE batch_id = ?", [batch_id]
            )
        }

    def batch_polled(self, batch_id: str, next_poll: float, *, still_open: bool) -> None:
        now = self.clock()
        with self.transaction():
            self.db.execute(
                "UPDATE batches SET last_poll = ?, next_poll = ?, open = ? WHERE batch_id = ?",
                [now, next_poll, int(still_open), batch_id],
            )

    def task_polled(self, task_id: str, next_poll: float) -> None:
        with self.transaction():
            self.db.execute(
                "UPDATE tasks SET next_poll = ? WHERE task_id = ? AND next_poll IS NOT NULL",
                [next_poll, task_id],
            )

    def record_task(self, update: TaskUpdate, outcome: Outcome) -> None:
        """Store what a poll said about a task and apply its ``outcome`` (decided
        by ``outcomes.task_outcome``) to the generation it is current for.

        Clips are upserted as they are. Only the generation's current, running
        task moves it on: an older task's answer is kept, and changes nothing.
        """
        now = self.clock()
        ref = self.task_ref(update.task_id)
        if ref is None:
            return
        current = self.db.execute(
            "SELECT state, task_id FROM generations WHERE fingerprint = ?", [ref.fingerprint]
        ).fetchone()
        is_current = current is not None and current[1] == update.task_id
        if self._task_unchanged(update):
            # Most polls of a running task say what the last one said (rule 12).
            return
        with self.transaction():
            terminal = update.status in ("succeeded", "failed")
            self.db.execute(
                "UPDATE tasks SET state = ?, error = ?, "
                "next_poll = CASE WHEN ? THEN NULL ELSE next_poll END WHERE task_id = ?",
                [update.status, update.error, terminal, update.task_id],
            )
            for c in update.clips:
                self.db.execute(
                    "INSERT INTO clips (clip_id, task_id, fingerprint, position, state, audio_url, "
                    "duration, title, lyrics, tags, image_url, updated_at) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?) "
                    "ON CONFLICT(clip_id) DO UPDATE SET state = excluded.state, "
                    "audio_url = excluded.audio_url, duration = coalesce(excluded.duration, "
                    "clips.duration), title = coalesce(excluded.title, clips.title), "
                    "lyrics = coalesce(excluded.lyrics, clips.lyrics), "
                    "tags = coalesce(excluded.tags, clips.tags), "
                    "image_url = coalesce(excluded.image_url, clips.image_url), "
                    "updated_at = excluded.updated_at",
                    [
                        c.clip_id,
                        update.task_id,
                        ref.fingerprint,
                        c.position,
                        c.state,
                        c.audio_url,
                        c.duration,
                        c.title,
                        c.lyrics,
                        c.tags,
                        c.image_url,
                        now,
                    ],
                )
            if not is_current or current is None or current[0] != "running":
                return
            if isinstance(outcome, Done):
                self.db.execute(
                    "UPDATE generations SET state = 'succeeded', reason = NULL, updated_at = ? "
                    "WHERE fingerprint = ?",
                    [now, ref.fingerprint],
                )
                self._event("task.succeeded", fingerprint=ref.fingerprint, task_id=update.task_id)
            elif isinstance(outcome, Park):
                self._park(ref.fingerprint, outcome.reason, now)
            elif isinstance(outcome, Requeue):
                self._requeue(ref.fingerprint, outcome.at, outcome.reason, now, counted=True)

    def _task_unchanged(self, update: TaskUpdate) -> bool:
        row = self.db.execute(
            "SELECT state, error FROM tasks WHERE task_id = ?", [update.task_id]
        ).fetchone()
        if row is None or tuple(row) != (update.status, update.error):
            return False
        stored = {
            r[0]: (r[1], r[2])
            for r in self.db.execute(
                "SELECT clip_id, state, audio_url FROM clips WHERE task_id = ?", [update.task_id]
            ).fetchall()
        }
        return all(stored.get(c.clip_id) == (c.state, c.audio_url) for c in update.clips)

    def task_lost(
        self, task_id: str, requeue_at: float, reason: str, *, max_resubmits: int
    ) -> None:
        """The service says it does not know a task it handed out (404): the
        generation is requeued, counted as possible double spend, or parked, as
        ``outcomes.lost_task`` decides from its resubmits so far."""
        now = self.clock()
        ref = self.task_ref(task_id)
        if ref is None:
            return
        with self.transaction():
            self.db.execute(
                "UPDATE tasks SET state = 'lost', next_poll = NULL WHERE task_id = ?", [task_id]
            )
            row = self.db.execute(
                "SELECT resubmits, task_id FROM generations WHERE fingerprint = ?",
                [ref.fingerprint],
            ).fetchone()
            if row is None or row[1] != task_id:
                return  # an older task of a generation that has moved on
            outcome = lost_task(
                task_id,
                reason,
                resubmits=row[0],
                max_resubmits=max_resubmits,
                retry_at=requeue_at,
                park=LOST_ANSWER_PARK,
            )
            if isinstance(outcome, Park):
                self._park(ref.fingerprint, outcome.reason, now)
                return
            self._requeue(ref.fingerprint, outcome.at, outcome.reason, now, counted=True)
            self.db.execute(
                "UPDATE generations SET possible_double = possible_double + 1, "
                "resubmits = resubmits + 1 WHERE fingerprint = ?",
                [ref.fingerprint],
            )

    def abandon_task(self, task_id: str, *, requeue_at: float | None, reason: str) -> None:
        """Give up on a task that never finishes: requeue (flagged) or park its generation."""
        now = self.clock()
        ref = self.task_ref(task_id)
        if ref is None:
            return
        with self.transaction():
            self.db.execute(
                "UPDATE tasks SET state = 'abandoned', next_poll = NULL, error = ? "
                "WHERE task_id = ?",
                [reason, task_id],
            )
            current = self.db.execute(
                "SELECT task_id FROM generations WHERE fingerprint = ? AND state = 'running'",
                [ref.fingerprint],
            ).fetchone()
            if current is None or current[0] != task_id:
                return
            if requeue_at is None:
                self._park(ref.fingerprint, f"task {task_id} {reason}", now)
                return
            self._requeue(ref.fingerprint, requeue_at, reason, now, counted=True)
            self.db.execute(
                "UPDATE generations SET possible_double = possible_double + 1 "
                "WHERE fingerprint = ?",
                [ref.fingerprint],
            )

    def park(self, fingerprint: str, reason: str) -> None:
        with self.transaction():
            self._park(fingerprint, reason, self.clock())

    def retry(self, fingerprints: Iterable[str]) -> int:
        """Re-arm parked generations (``reconciler retry``), and generate again
        those whose task returned fewer clips than a track keeps."""
        now = self.clock()
        n = 0
        short = set(self.get("short_generations") or {})
        with self.transaction():
            for fp in fingerprints:
                if fp in short:
                    self.db.execute(
                        "UPDATE generations SET state = 'queued', attempts = 0, "
                        "next_attempt = 0, reason = NULL, updated_at = ? "
                        "WHERE fingerprint = ? AND state = 'succeeded'",
                        [now, fp],
                    )
                    self._event("generation.rearmed", fingerprint=fp, short=True)
                    n += 1
                    continue
                cur = self.db.execute(
                    # Sending again a lost-answer item, or one whose last task was
                    # given up on (charged, never refunded), may pay twice: counted.
                    "UPDATE generations SET state = 'queued', attempts = 0, next_attempt = 0, "
                    "possible_double = possible_double "
                    "+ CASE WHEN reason LIKE ? OR EXISTS (SELECT 1 FROM tasks "
                    "WHERE tasks.task_id = generations.task_id AND tasks.state = 'abandoned') "
                    "THEN 1 ELSE 0 END, "
                    "resubmits = 0, "
                    "reason = NULL, updated_at = ? WHERE fingerprint = ? AND state = 'parked'",
                    [_LOST_ANSWER_LIKE, now, fp],
                )
                if cur.rowcount:
                    n += 1
                    self._event("generation.rearmed", fingerprint=fp)
        return n

    def parked_fingerprints(self) -> list[str]:
        """Generations waiting for a person: parked, or short of clips."""
        parked = [
            r["fingerprint"]
            for r in self.db.query("SELECT fingerprint FROM generations WHERE state = 'parked'")
        ]
        return parked + sorted(self.get("short_generations") or {})

    def track_fingerprints(self, soundtrack: str, track: str | None) -> list[str]:
        sql = "SELECT DISTINCT fingerprint FROM tracks WHERE soundtrack = ?"
        args: list[Any] = [soundtrack]
        if track is not None:
            sql += " AND name = ?"
            args.append(track)
        return [r["fingerprint"] for r in self.db.query(sql, args)]

    # -- clips and audio ------------------------------------------------------------

    def usable_clips_of(self, fingerprints: Collection[str]) -> dict[str, list[ClipRecord]]:
        """Finished clips of each fingerprint's current task, in position order.

        By index: a pass or a plan asks only for the few it needs.
        """
        return usable_clips(self._rows_in(USABLE_CLIPS_SQL, sorted(fingerprints)))

    def clip_downloaded(self, clip_id: str, sha256: str, duration: float) -> None:
        with self.transaction():
            self.db.execute(
                "UPDATE clips SET sha256 = ?, duration = coalesce(duration, ?), updated_at = ? "
                "WHERE clip_id = ?",
                [sha256, duration, self.clock(), clip_id],
            )
            self._event("clip.downloaded", clip_id=clip_id, sha256=sha256)

    def clip_cover(self, clip_id: str, sha256: str | None) -> None:
        """The clip's cover is in the cache under ``sha256``: '' it has none, None fetch again."""
        with self.transaction():
            self.db.execute("UPDATE clips SET cover = ? WHERE clip_id = ?", [sha256, clip_id])

    def clip_lost(self, clip_id: str) -> None:
        """A cached file vanished or went bad: fetch the clip again."""
        with self.transaction():
            self.db.execute("UPDATE clips SET sha256 = NULL WHERE clip_id = ?", [clip_id])

    # -- outputs -----------------------------------------------------------------------

    def output_fingerprints(self) -> dict[str, str]:
        """Output path → the fingerprint its file holds (all ``status`` needs)."""
        return dict(self.db.execute("SELECT path, fingerprint FROM outputs").fetchall())

    def outputs(self) -> dict[str, OutputRecord]:
        rows = self.db.execute(
            "SELECT path, soundtrack, track, clip, fingerprint, sha256, size, mtime_ns FROM outputs"
        )
        return {r[0]: OutputRecord(*r) for r in rows}

    def outputs_of(self, soundtracks: Collection[str]) -> dict[str, OutputRecord]:
        """``outputs`` of a few soundtracks, with their tag keys, by index rather
        than a full read."""
        found: dict[str, OutputRecord] = {}
        for soundtrack in soundtracks:
            # A range of the primary key: every path starts "<soundtrack>/",
            # and "0" is the character after "/".
            rows = self.db.execute(
                "SELECT path, soundtrack, track, clip, fingerprint, sha256, size, mtime_ns, "
                "tags_key FROM outputs WHERE path >= ? AND path < ?",
                [f"{soundtrack}/", f"{soundtrack}0"],
            )
            found.update((r[0], OutputRecord(*r)) for r in rows)
        return found

    def outputs_at(self, rel: str) -> list[OutputRecord]:
        """The outputs recorded at ``rel`` or under it (a folder)."""
        rows = self.db.execute(
            "SELECT path, soundtrack, track, clip, fingerprint, sha256, size, mtime_ns "
            "FROM outputs WHERE path = ? OR substr(path, 1, ?) = ?",
            [rel, len(rel) + 1, rel + "/"],
        )
        return [OutputRecord(*r) for r in rows]

    def output_written(self, rec: OutputRecord, *, event: str | None) -> None:
        with self.transaction():
            self.db.execute(
                "INSERT INTO outputs (path, soundtrack, track, clip, fingerprint, sha256, size, "
                "mtime_ns, tags_key, at) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(path) DO UPDATE "
                "SET soundtrack = excluded.soundtrack, track = excluded.track, "
                "clip = excluded.clip, fingerprint = excluded.fingerprint, "
                "sha256 = excluded.sha256, size = excluded.size, mtime_ns = excluded.mtime_ns, "
                "tags_key = excluded.tags_key, at = excluded.at",
                [
                    rec.path,
                    rec.soundtrack,
                    rec.track,
                    rec.clip,
                    rec.fingerprint,
                    rec.sha256,
                    rec.size,
                    rec.mtime_ns,
                    rec.tags_key,
                    self.clock(),
                ],
            )
            if event:
                self._event(
                    event,
                    fingerprint=rec.fingerprint,
                    soundtrack=rec.soundtrack,
                    track=rec.track,
                    path=rec.path,
                )

    def adopt_output_tags(self) -> None:
        """Move the tag keys an older reconciler kept in one key/value entry
        (``output_tags``) into their outputs' rows, once, so that an upgrade
        does not rebuild every output to learn them again."""
        row = self.db.execute("SELECT value FROM kv WHERE key = 'output_tags'").fetchone()
        if row is None:
            return
        with self.transaction():
            self.db.executemany(
                "UPDATE outputs SET tags_key = ? WHERE path = ?",
                [(key, path) for path, key in json.loads(row[0]).items()],
            )
            self.db.execute("DELETE FROM kv WHERE key = 'output_tags'")

    def output_removed(self, path: str, trash: str) -> None:
        with self.transaction():
            self.db.execute("DELETE FROM outputs WHERE path = ?", [path])
            self._event("output.pruned", path=path, trash=trash)

    # -- suspension (``reconciler suspend``/``resume``) ---------------------------------

    def suspension(self) -> Suspension:
        return Suspension.from_json(self.get("suspended"))

    def set_suspension(self, suspension: Suspension, *, event: str, soundtrack: str | None) -> None:
        """Store what is suspended, with an event, in one transaction.

        Written without the state lock (like ``retry``): the daemon reads it
        at the start of each submit step, so the change applies from its next pass.
        """
        with self.transaction():
            self.db.execute(
                "INSERT INTO kv (key, value) VALUES ('suspended', ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [_dumps(suspension.to_json())],
            )
            self._event(event, soundtrack=soundtrack, all=soundtrack is None)
