"""The ledger's reports: what ``status``, ``plan``, ``describe``, ``events`` and ``retry`` read.

Where it sits: beside ``work`` in the ``ledger`` package, read by ``status``,
``running`` (``plan``) and ``inspection``. ``status`` and ``plan`` are short
commands a person waits for, so :func:`read_status` and :func:`read_plan`
read over a plain read-only ``sqlite3`` connection in one transaction while
a daemon may write; the other reads go through an open ledger (read-only for
``describe`` and ``events``)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from reconciler.errors import LedgerError
from reconciler.ledger.facts import PlanOutput, PlanRead, StatusRead
from reconciler.ledger.store import MIGRATIONS, Store, connect_readonly
from reconciler.ledger.work import (
    GENERATIONS_SQL,
    LAST_GOOD_SQL,
    SPENT_SQL,
    USABLE_CLIPS_SQL,
    file_tracks_from_json,
    rows_in,
    usable_clips,
)
from reconciler.planning import Generation, Suspension


def _open_current(path: Path) -> sqlite3.Connection:
    """A plain read-only connection in a transaction, on a ledger at this schema."""
    if not path.exists():
        raise LedgerError(f"{path}: no ledger yet (nothing has been synced)")
    try:
        conn = connect_readonly(path)
    except sqlite3.DatabaseError as exc:
        raise LedgerError(f"{path}: cannot open ledger: {exc}") from exc
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("BEGIN")  # one snapshot: the daemon may write meanwhile
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise LedgerError(f"{path}: cannot read ledger: {exc}") from exc
    if version > len(MIGRATIONS):
        conn.close()
        raise LedgerError(
            f"ledger schema version {version} is newer than this reconciler "
            f"({len(MIGRATIONS)}); upgrade reconciler"
        )
    if version < len(MIGRATIONS):
        conn.close()
        raise LedgerError("ledger needs a migration; run `reconciler sync` once")
    return conn


def read_plan(
    path: Path,
    since: float,
    clips_for: Callable[[Mapping[str, PlanOutput]], Collection[str]],
) -> PlanRead:
    """What ``plan`` reads, over a plain read-only connection, in one transaction.

    Like ``read_status``, a cold ``plan`` skips sqlite-utils (and the numpy
    it imports) and the row dicts of ``query``. ``since`` is the start of the
    budget's day; ``clips_for`` names, from the output records, the
    fingerprints whose usable clips to read too (those of files to restore).
    """
    conn = _open_current(path)
    try:

        def execute(sql: str, params: list[Any]) -> list[tuple[Any, ...]]:
            return conn.execute(sql, params).fetchall()

        last_good = {}
        stamps = {}
        for p, body, stamp in conn.execute(LAST_GOOD_SQL):
            last_good[p] = file_tracks_from_json(p, body)
            if stamp is not None:
                stamps[p] = stamp
        generations = {r[0]: Generation(*r) for r in conn.execute(GENERATIONS_SQL)}
        outputs = {
            r[0]: r
            for r in conn.execute(
                "SELECT path, fingerprint, clip, sha256, size, mtime_ns FROM outputs"
            )
        }
        wanted = clips_for(outputs)
        clips = usable_clips(rows_in(execute, USABLE_CLIPS_SQL, sorted(wanted))) if wanted else {}
        suspended = conn.execute("SELECT value FROM kv WHERE key = 'suspended'").fetchone()
        spent = int(conn.execute(SPENT_SQL, [since, since]).fetchone()[0])
    except sqlite3.DatabaseError as exc:
        raise LedgerError(f"{path}: cannot read ledger: {exc}") from exc
    finally:
        conn.close()
    return PlanRead(
        last_good=last_good,
        stamps=stamps,
        generations=generations,
        outputs=outputs,
        clips=clips,
        suspension=Suspension.from_json(None if suspended is None else json.loads(suspended[0])),
        spent=spent,
    )


def read_status(path: Path, since: float, selector: tuple[str, str] = ("", "")) -> StatusRead:
    """What ``status`` shows, over a plain read-only connection, in one transaction.

    ``status`` is a short command a person waits for: it skips sqlite-utils
    (and the numpy it imports) and the row dicts of ``query``, and reads
    each table once. ``selector`` is (soundtrack, track); an empty part
    matches all.
    """
    conn = _open_current(path)
    try:
        # Only the conditions asked for: an "?1 = '' OR ..." form would
        # double the cost of reading every track.
        asked = [
            (c, v) for c, v in zip(("t.soundtrack = ?", "t.name = ?"), selector, strict=True) if v
        ]
        where = ("WHERE " + " AND ".join(c for c, _ in asked)) if asked else ""
        tracks = conn.execute(
            "SELECT t.soundtrack, t.name, t.fingerprint, t.clips, t.source, "
            "max(t.updated_at, coalesce(g.updated_at, 0)), g.state, g.reason, g.attempts, "
            "g.next_attempt, g.paid_hint "
            "FROM tracks t LEFT JOIN generations g ON g.fingerprint = t.fingerprint "
            + where
            + " ORDER BY t.soundtrack, t.position",
            [v for _, v in asked],
        ).fetchall()
        spec_errors = dict(
            conn.execute("SELECT path, error FROM spec_files WHERE error IS NOT NULL")
        )
        outputs = {
            path: (fingerprint, size, mtime_ns)
            for path, fingerprint, size, mtime_ns in conn.execute(
                "SELECT path, fingerprint, size, mtime_ns FROM outputs"
            )
        }
        facts = {
            key: json.loads(value)
            for key, value in conn.execute(
                "SELECT key, value FROM kv WHERE key IN ('output_errors', 'submit_block', "
                "'last_pass_at', 'api_health', 'batch_unsupported', 'short_generations', "
                "'unexpected_shapes', 'suspended', 'out_dir')"
            )
        }
        batches, ambiguous, doubles, spent, in_flight, orphans = conn.execute(
            "SELECT (SELECT count(*) FROM batches WHERE open = 1), "
            "(SELECT count(*) FROM submits WHERE state = 'ambiguous'), "
            "(SELECT coalesce(sum(possible_double), 0) FROM generations), "
            # The same count as spent_since: what the budget sees.
            "(SELECT count(*) FROM tasks WHERE at >= ?1) + "
            "(SELECT coalesce(sum(unsettled), 0) FROM submits WHERE at >= ?1), "
            "(SELECT count(*) FROM generations "
            "WHERE state IN ('submitting', 'unknown', 'running')), "
            "(SELECT count(*) FROM orphans WHERE state IN ('open', 'unmatched'))",
            [since],
        ).fetchone()
        names = (
            conn.execute("SELECT soundtrack, name FROM tracks").fetchall()
            if asked and not tracks
            else []
        )
    except sqlite3.DatabaseError as exc:
        raise LedgerError(f"{path}: cannot read ledger: {exc}") from exc
    finally:
        conn.close()
    return StatusRead(
        tracks=tracks,
        spec_errors=spec_errors,
        outputs=outputs,
        facts=facts,
        open_batches=batches,
        ambiguous_submits=ambiguous,
        possible_double_spend=doubles,
        spent=spent,
        in_flight=in_flight,
        orphans=orphans,
        names=names,
    )


# -- the reads behind ``describe``, ``events`` and ``retry`` -----------------------------
#
# Rows as dicts over the ledger's own connection (these commands open it
# read-only, or hold it for a write right after): the SQL stays in this package.


def soundtracks(store: Store) -> set[str]:
    """Every soundtrack the ledger knows: with tracks, or named by a spec file."""
    rows = store.query(
        "SELECT soundtrack FROM tracks "
        "UNION SELECT soundtrack FROM spec_files WHERE soundtrack != ''"
    )
    return {r["soundtrack"] for r in rows}


def track_names(store: Store, soundtrack: str | None = None) -> list[tuple[str, str]]:
    """(soundtrack, track) of every track, or of one soundtrack's."""
    if soundtrack is None:
        rows = store.query("SELECT soundtrack, name FROM tracks")
    else:
        rows = store.query("SELECT soundtrack, name FROM tracks WHERE soundtrack = ?", [soundtrack])
    return [(r["soundtrack"], r["name"]) for r in rows]


def track_row(store: Store, soundtrack: str, name: str) -> dict[str, Any] | None:
    rows = store.query(
        "SELECT fingerprint, clips, source, position, updated_at FROM tracks "
        "WHERE soundtrack = ? AND name = ?",
        [soundtrack, name],
    )
    return rows[0] if rows else None


def generation_row(store: Store, fingerprint: str) -> dict[str, Any] | None:
    rows = store.query("SELECT * FROM generations WHERE fingerprint = ?", [fingerprint])
    return rows[0] if rows else None


def task_rows(store: Store, fingerprint: str) -> list[dict[str, Any]]:
    """The fingerprint's tasks, oldest first."""
    return store.query("SELECT * FROM tasks WHERE fingerprint = ? ORDER BY at", [fingerprint])


def clip_rows(store: Store, fingerprint: str) -> list[dict[str, Any]]:
    """The fingerprint's clips, by task age then position."""
    return store.query(
        "SELECT c.clip_id, c.task_id, c.position, c.state, c.duration, c.sha256 "
        "FROM clips c JOIN tasks k ON k.task_id = c.task_id WHERE c.fingerprint = ? "
        "ORDER BY k.at, c.position",
        [fingerprint],
    )


def spec_file_row(store: Store, path: str) -> dict[str, Any] | None:
    """A spec file's last good body (JSON) and current error."""
    rows = store.query("SELECT body, error FROM spec_files WHERE path = ?", [path])
    return rows[0] if rows else None


def submit_rows(store: Store, fingerprint: str) -> list[dict[str, Any]]:
    """Every submit that carried the fingerprint, oldest first."""
    return store.query(
        "SELECT id, at, kind, state, batch_id, error FROM submits "
        "WHERE instr(fingerprints, ?) > 0 ORDER BY id",
        [f'"{fingerprint}"'],
    )


def verdict_events(store: Store, fingerprint: str) -> list[dict[str, Any]]:
    """The fingerprint's parked and retrying events, oldest first."""
    return store.query(
        "SELECT at, event, data FROM events WHERE fingerprint = ? "
        "AND event IN ('generation.parked', 'generation.retrying') ORDER BY id",
        [fingerprint],
    )


def track_events(
    store: Store, soundtrack: str, name: str, fingerprint: str, clip_ids: Sequence[str]
) -> list[dict[str, Any]]:
    """A track's events, its generation's, and its clips' downloads, oldest first."""
    return store.query(
        "SELECT id, at, event, fingerprint, soundtrack, track, data FROM events "
        "WHERE (soundtrack = ? AND track = ?) OR (fingerprint = ? AND track IS NULL) "
        "OR (event = 'clip.downloaded' "
        "AND json_extract(data, '$.clip_id') IN (SELECT value FROM json_each(?))) ORDER BY id",
        [soundtrack, name, fingerprint, json.dumps(list(clip_ids))],
    )


def events_after(
    store: Store,
    last_id: int,
    since: float | None,
    soundtrack: str | None,
    track: str | None,
) -> list[dict[str, Any]]:
    """Events after ``last_id`` (and at or after ``since``), of one soundtrack or track.

    Events of a generation name its fingerprint, not its tracks: those of the
    selected tracks' fingerprints belong to them too (but not another
    soundtrack's track events for a shared fingerprint).
    """
    return store.query(
        "SELECT id, at, event, fingerprint, soundtrack, track, data FROM events "
        "WHERE id > ? AND (? IS NULL OR at >= ?) AND (? IS NULL "
        "OR (soundtrack = ? AND (? IS NULL OR track = ?)) OR (track IS NULL AND fingerprint IN "
        "(SELECT fingerprint FROM tracks WHERE soundtrack = ? AND (? IS NULL OR name = ?)))) "
        "ORDER BY id",
        [last_id, since, since] + [soundtrack] * 2 + [track] * 2 + [soundtrack] + [track] * 2,
    )
