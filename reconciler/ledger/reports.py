"""The ledger's reports: what ``status``, ``plan``, ``describe``, ``events`` and ``retry`` read.

Where it sits: beside ``work`` in the ``ledger`` package, read by ``status``,
``running`` (``plan``) and ``inspection``. ``status`` and ``plan`` are short
commands a person waits for, so :func:`read_status` and :func:`read_plan`
read over a plain read-only connection (``sqlite3``, or psycopg for a
PostgreSQL ledger) in one transaction while a daemon may write; the other
reads go through an open ledger (read-only for ``describe`` and ``events``).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from reconciler.errors import LedgerError
from reconciler.ledger.facts import FileState, PlanRead, StatusRead
from reconciler.ledger.lease import PG_NOW
from reconciler.ledger.store import Store, check_version, connect_readonly, describe, is_postgres
from reconciler.ledger.work import (
    EXPIRED_UNKNOWN_SQL,
    GENERATIONS_SQL,
    LAST_GOOD_SQL,
    SPENT_SQL,
    USABLE_CLIPS_SQL,
    last_good_from_row,
    rows_in,
    usable_clips,
)
from reconciler.planning import Generation, Suspension
from reconciler.specs import YOUNG

#: Runs one statement of the portable dialect (``?`` placeholders) in a snapshot.
Execute = Callable[..., Any]


@contextmanager
def _snapshot(target: Path | str, *, missing_ok: bool = False) -> Iterator[tuple[Execute, int]]:
    """One read-only snapshot of the ledger, while a daemon may write: a way to
    run statements in it, and the schema version. When nothing has been
    synced yet that is an error, or with ``missing_ok`` the way is ``_nothing``.

    On SQLite a plain ``sqlite3`` connection: no sqlite-utils (and the numpy
    it imports) and no row dicts of ``query``. ``target`` is the SQLite file
    or a PostgreSQL URL.
    """
    if is_postgres(target):
        from reconciler.ledger import postgres

        pg = postgres.connect(str(target), readonly=True)
        try:
            with pg.transaction():
                # One snapshot for every read below: the leader may write meanwhile.
                pg.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                if pg.execute("SELECT to_regclass('reconciler_schema') IS NULL").fetchone() != (
                    False,
                ):
                    if missing_ok:
                        yield _nothing, 0
                        return
                    raise LedgerError(
                        f"{describe(target)}: no ledger yet (nothing has been synced)"
                    )
                (version,) = pg.execute(
                    "SELECT coalesce(max(version), 0) FROM reconciler_schema"
                ).fetchone() or (0,)
                yield (
                    (lambda sql, params=(): pg.execute(postgres.translate(sql), list(params))),
                    int(version),
                )
                return
        except postgres.Error as exc:
            raise LedgerError(f"{describe(target)}: cannot read ledger: {exc}") from exc
        finally:
            pg.close()
    path = Path(target)
    if not path.exists():
        if missing_ok:
            yield _nothing, 0
            return
        raise LedgerError(f"{path}: no ledger yet (nothing has been synced)")
    try:
        conn = connect_readonly(path)
    except sqlite3.DatabaseError as exc:
        raise LedgerError(f"{path}: cannot open ledger: {exc}") from exc
    try:
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("BEGIN")  # one snapshot: the daemon may write meanwhile
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        yield conn.execute, version
    except sqlite3.DatabaseError as exc:
        raise LedgerError(f"{path}: cannot read ledger: {exc}") from exc
    finally:
        conn.close()


def _nothing(sql: str, params: Sequence[Any] = ()) -> Any:
    """``_snapshot``'s way to read a ledger not there yet: callers check for it first."""
    raise LedgerError("no ledger yet (nothing has been synced)")


def read_plan(
    target: Path | str,
    since: float,
    changed_of: Callable[[Iterable[tuple[str, int, int]]], Mapping[str, FileState]],
    expired_by: float,
) -> PlanRead | None:
    """What ``plan`` reads of the ledger, in one read-only snapshot; None
    when nothing has been synced into it yet.

    ``since`` is the start of the budget's day; ``changed_of`` names, of the
    outputs' ``(path, size, mtime_ns)`` as recorded, those that are not that
    on disk any more, with their state now: only theirs are read in full, with
    the usable clips that could restore them. Lost-answer items whose grace
    period ended by ``expired_by`` are read too.
    """
    with _snapshot(target, missing_ok=True) as (execute, version):
        if execute is _nothing:
            return None
        check_version(version, readonly=True)
        last_good = {}
        stamps = {}
        for row in execute(LAST_GOOD_SQL):
            p, stamp = row[0], row[5]
            last_good[p] = last_good_from_row(*row[:5])
            if stamp is not None and not stamp.endswith(YOUNG):
                stamps[p] = stamp
        generations = {g[0]: g for g in map(Generation._make, execute(GENERATIONS_SQL))}
        # The clip and checksum only where the file changed: a third less to read.
        outputs = {
            r[0]: r for r in execute("SELECT path, fingerprint, size, mtime_ns FROM outputs")
        }
        states = changed_of((r[0], r[2], r[3]) for r in outputs.values())
        changed = {
            p: (states[p], clip, sha256)
            for p, clip, sha256 in rows_in(
                execute, "SELECT path, clip, sha256 FROM outputs WHERE path", sorted(states)
            )
        }
        wanted = sorted({fp for p in changed if (fp := outputs[p][1])})
        clips = usable_clips(rows_in(execute, USABLE_CLIPS_SQL, wanted)) if wanted else {}
        suspended = execute("SELECT value FROM kv WHERE key = 'suspended'").fetchone()
        spent = int(execute(SPENT_SQL, [since, since]).fetchone()[0])
        expired = [(fp, int(n)) for fp, n in execute(EXPIRED_UNKNOWN_SQL, [expired_by])]
    return PlanRead(
        last_good=last_good,
        stamps=stamps,
        generations=generations,
        outputs=outputs,
        changed=changed,
        clips=clips,
        suspension=Suspension.from_json(None if suspended is None else json.loads(suspended[0])),
        spent=spent,
        expired=expired,
    )


def read_status(
    target: Path | str, since: float, selector: tuple[str, str] = ("", "")
) -> StatusRead:
    """What ``status`` shows, in one read-only snapshot, while a daemon may write.

    ``status`` is a short command a person waits for: it reads each table
    once. ``selector`` is (soundtrack, track); an empty part matches all.
    """
    # The lease's age is judged by the clock the lease is kept by (``lease``).
    now_sql = PG_NOW if is_postgres(target) else None
    with _snapshot(target) as (execute, version):
        return _read_status(execute, version, since, selector, now_sql=now_sql)


def _read_status(
    execute: Callable[..., Any],
    version: int,
    since: float,
    selector: tuple[str, str],
    *,
    now_sql: str | None = None,
) -> StatusRead:
    check_version(version, readonly=True)
    # Only the conditions asked for: an "? = '' OR ..." form would
    # double the cost of reading every track.
    asked = [(c, v) for c, v in zip(("t.soundtrack = ?", "t.name = ?"), selector, strict=True) if v]
    where = ("WHERE " + " AND ".join(c for c, _ in asked)) if asked else ""
    tracks = execute(
        "SELECT t.soundtrack, t.name, t.fingerprint, t.clips, t.source, "
        "CASE WHEN g.updated_at > t.updated_at THEN g.updated_at ELSE t.updated_at END, "
        "g.state, g.reason, g.attempts, g.next_attempt, g.paid_hint "
        "FROM tracks t LEFT JOIN generations g ON g.fingerprint = t.fingerprint "
        + where
        + " ORDER BY t.soundtrack, t.position",
        [v for _, v in asked],
    ).fetchall()
    spec_errors = dict(execute("SELECT path, error FROM spec_files WHERE error IS NOT NULL"))
    outputs = {
        path: (fingerprint, size, mtime_ns)
        for path, fingerprint, size, mtime_ns in execute(
            "SELECT path, fingerprint, size, mtime_ns FROM outputs"
        )
    }
    facts = {
        key: json.loads(value)
        for key, value in execute(
            "SELECT key, value FROM kv WHERE key IN ('output_errors', 'submit_block', "
            "'last_pass_at', 'api_health', 'batch_unsupported', 'short_generations', "
            "'unexpected_shapes', 'suspended', 'out_dir')"
        )
    }
    batches, ambiguous, doubles, spent, in_flight, orphans = execute(
        "SELECT (SELECT count(*) FROM batches WHERE open = 1), "
        "(SELECT count(*) FROM submits WHERE state = 'ambiguous'), "
        "(SELECT coalesce(sum(possible_double), 0) FROM generations), "
        # The same count as spent_since: what the budget sees.
        "(SELECT count(*) FROM tasks WHERE at >= ?) + "
        "(SELECT coalesce(sum(unsettled), 0) FROM submits WHERE at >= ?), "
        "(SELECT count(*) FROM generations "
        "WHERE state IN ('submitting', 'unknown', 'running')), "
        "(SELECT count(*) FROM orphans WHERE state IN ('open', 'unmatched'))",
        [since, since],
    ).fetchone()
    names = (
        [tuple(r) for r in execute("SELECT soundtrack, name FROM tracks").fetchall()]
        if asked and not tracks
        else []
    )
    # Who leads, and the lease's age on the clock it is kept by (``lease``).
    lease = execute(
        "SELECT holder, host, pid, since, renewed_at, expires_at, token FROM lease"
    ).fetchone()
    replicas = [
        tuple(r)
        for r in execute(
            "SELECT holder, host, pid, role, started, seen FROM replicas ORDER BY seen DESC"
        ).fetchall()
    ]
    now = float(execute(now_sql).fetchone()[0]) if now_sql else None
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
        lease=None if lease is None else tuple(lease),
        replicas=replicas,
        now=now,
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
        "WHERE fingerprints LIKE ? ESCAPE '\\' ORDER BY id",
        [f'%"{_like(fingerprint)}"%'],
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
    # The clip's download event carries its id in ``data``, written by
    # ``_dumps`` (sorted keys, no spaces), so a LIKE finds it on either backend.
    downloads = " OR ".join(["data LIKE ? ESCAPE '\\'"] * len(clip_ids)) or "0 = 1"
    return store.query(
        "SELECT id, at, event, fingerprint, soundtrack, track, data FROM events "  # noqa: S608 (placeholders only)
        "WHERE (soundtrack = ? AND track = ?) OR (fingerprint = ? AND track IS NULL) "
        f"OR (event = 'clip.downloaded' AND ({downloads})) ORDER BY id",
        [soundtrack, name, fingerprint]
        + [f'%"clip_id":{_like(json.dumps(c, ensure_ascii=False))}%' for c in clip_ids],
    )


def _like(text: str) -> str:
    """``text`` matched literally by a LIKE pattern with ``ESCAPE '\\'``."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


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
    # Only the conditions asked for: PostgreSQL cannot type a bare "? IS NULL".
    where: list[str] = ["id > ?"]
    params: list[Any] = [last_id]
    if since is not None:
        where.append("at >= ?")
        params.append(since)
    if soundtrack is not None:
        mine = "soundtrack = ?" + (" AND track = ?" if track is not None else "")
        theirs = "soundtrack = ?" + (" AND name = ?" if track is not None else "")
        where.append(
            f"(({mine}) OR (track IS NULL AND fingerprint IN "  # noqa: S608 (placeholders only)
            f"(SELECT fingerprint FROM tracks WHERE {theirs})))"
        )
        params += [soundtrack, track, soundtrack, track] if track is not None else [soundtrack] * 2
    return store.query(
        "SELECT id, at, event, fingerprint, soundtrack, track, data FROM events "  # noqa: S608 (placeholders only)
        f"WHERE {' AND '.join(where)} ORDER BY id",
        params,
    )
