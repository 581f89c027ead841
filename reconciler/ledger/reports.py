"""The ledger's reports: the reads ``status`` needs, without the writers' machinery.

Where it sits: beside ``work`` in the ``ledger`` package, read by ``status``.
``status`` is a short command a person waits for, so this reads over a plain
read-only ``sqlite3`` connection in one transaction while a daemon may write.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from reconciler.errors import LedgerError
from reconciler.ledger.facts import StatusRead
from reconciler.ledger.store import MIGRATIONS, connect_readonly


def read_status(path: Path, since: float, selector: tuple[str, str] = ("", "")) -> StatusRead:
    """What ``status`` shows, over a plain read-only connection, in one transaction.

    ``status`` is a short command a person waits for: it skips sqlite-utils
    (and the numpy it imports) and the row dicts of ``query``, and reads
    each table once. ``selector`` is (soundtrack, track); an empty part
    matches all.
    """
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
        if version > len(MIGRATIONS):
            raise LedgerError(
                f"ledger schema version {version} is newer than this reconciler "
                f"({len(MIGRATIONS)}); upgrade reconciler"
            )
        if version < len(MIGRATIONS):
            raise LedgerError("ledger needs a migration; run `reconciler sync` once")
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
