"""The ledger's store: the database (a SQLite file in WAL mode by default, or
PostgreSQL), the schema and its migrations, the event log and the key/value facts.

Where it sits: the bottom of the ``ledger`` package. ``work`` builds the state
transitions on ``Store``; ``reports`` reads through ``connect_readonly`` (or
PostgreSQL's read-only snapshot). Only this package touches a database; the
PostgreSQL side lives in ``postgres``, which translates this module's SQL.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, Self, cast

from reconciler.errors import LedgerError
from reconciler.hiding import without

if TYPE_CHECKING:
    import sqlite_utils

Clock = Callable[[], float]

_SCHEMA_V1 = """
CREATE TABLE spec_files (
    path TEXT PRIMARY KEY, soundtrack TEXT NOT NULL, digest TEXT NOT NULL,
    body TEXT, error TEXT, updated_at REAL NOT NULL);
CREATE TABLE tracks (
    soundtrack TEXT NOT NULL, name TEXT NOT NULL, fingerprint TEXT NOT NULL,
    clips INTEGER NOT NULL, source TEXT NOT NULL, position INTEGER NOT NULL,
    updated_at REAL NOT NULL, PRIMARY KEY (soundtrack, name));
CREATE INDEX tracks_fingerprint ON tracks (fingerprint);
CREATE TABLE generations (
    fingerprint TEXT PRIMARY KEY, request TEXT NOT NULL, state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL NOT NULL DEFAULT 0,
    reason TEXT, task_id TEXT, batch_id TEXT, submit_id INTEGER,
    possible_double INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE INDEX generations_state ON generations (state);
CREATE TABLE submits (
    id INTEGER PRIMARY KEY, at REAL NOT NULL, kind TEXT NOT NULL, state TEXT NOT NULL,
    batch_id TEXT, fingerprints TEXT NOT NULL, error TEXT);
CREATE TABLE batches (
    batch_id TEXT PRIMARY KEY, submit_id INTEGER NOT NULL, at REAL NOT NULL,
    open INTEGER NOT NULL, next_poll REAL NOT NULL, last_poll REAL);
CREATE TABLE tasks (
    task_id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, batch_id TEXT, idx INTEGER,
    state TEXT NOT NULL, at REAL NOT NULL, next_poll REAL, error TEXT);
CREATE INDEX tasks_fingerprint ON tasks (fingerprint);
CREATE TABLE clips (
    clip_id TEXT PRIMARY KEY, task_id TEXT NOT NULL, fingerprint TEXT NOT NULL,
    position INTEGER NOT NULL, state TEXT NOT NULL, audio_url TEXT, duration REAL,
    title TEXT, lyrics TEXT, tags TEXT, sha256 TEXT, updated_at REAL NOT NULL);
CREATE INDEX clips_fingerprint ON clips (fingerprint);
CREATE TABLE outputs (
    path TEXT PRIMARY KEY, soundtrack TEXT NOT NULL, track TEXT, clip INTEGER,
    fingerprint TEXT, sha256 TEXT NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, at REAL NOT NULL);
CREATE TABLE events (
    id INTEGER PRIMARY KEY, at REAL NOT NULL, event TEXT NOT NULL,
    fingerprint TEXT, soundtrack TEXT, track TEXT, data TEXT);
CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# Money safety against answers the client cannot attribute:
# - submits.unsettled: items of that submit that may have been charged but
#   belong to no recorded task (in flight, answer lost, left out of the answer);
#   the budget counts them until a claim settles them.
# - generations.resubmits: resubmits after lost answers, held to the allowance.
# - generations.paid_hint: a signed callback proved a lost submit created a
#   task, so it is never sent again on its own.
# - orphans: task ids an answer named without saying whose; polled through the
#   task endpoint until their clips say which item they are.
_SCHEMA_V2 = """
ALTER TABLE submits ADD COLUMN unsettled INTEGER NOT NULL DEFAULT 0;
ALTER TABLE generations ADD COLUMN resubmits INTEGER NOT NULL DEFAULT 0;
ALTER TABLE generations ADD COLUMN paid_hint INTEGER NOT NULL DEFAULT 0;
CREATE TABLE orphans (
    task_id TEXT PRIMARY KEY, submit_id INTEGER NOT NULL, batch_id TEXT,
    at REAL NOT NULL, next_poll REAL, state TEXT NOT NULL);
UPDATE submits SET unsettled = json_array_length(fingerprints)
    WHERE state IN ('intent', 'ambiguous');
"""

# Version 3: a clip's cover image for the output's ID3 tags. ``cover`` is the
# sha256 of the image in the cache, '' when the clip has none to fetch, NULL
# until it was tried.
_SCHEMA_V3 = """
ALTER TABLE clips ADD COLUMN image_url TEXT;
ALTER TABLE clips ADD COLUMN cover TEXT;
"""

# Version 4: every pass asks which tasks are due to be polled (``next_poll``,
# NULL once a task has ended); without an index that read every task row, the
# most of a pass that looks at one changed file among 50,000 tracks.
_SCHEMA_V4 = """
CREATE INDEX tasks_next_poll ON tasks (next_poll) WHERE next_poll IS NOT NULL;
"""

# Version 5, for the cost of a pass and of a cold plan at 50,000 tracks:
# - outputs.tags_key: each output's tag key (``tags.TrackTags.key``: the audio
#   checksum and the tag values the file was built from) beside its record,
#   read with the records of the soundtracks a pass looks at. It was one
#   key/value entry of every output (``output_tags``), held decoded for the
#   daemon's life (10 MiB); ``Ledger.adopt_output_tags`` moves an older
#   ledger's entry.
# - spec_files.stamp: the file's ``specs.stamp`` (size, mtime, inode, ctime)
#   when the last good version was read, NULL while it is invalid or was too
#   young to trust; ``plan`` takes a file whose stamp is unchanged as that
#   version without reading it.
_SCHEMA_V5 = """
ALTER TABLE outputs ADD COLUMN tags_key TEXT;
ALTER TABLE spec_files ADD COLUMN stamp TEXT;
"""

# Version 6: replicas sharing one ledger (``lease``). ``lease`` is one row,
# the leader's: who holds it, since when, until when, and the fencing token
# that changes with every holder. ``replicas`` holds each process's heartbeat;
# ``hints`` the verified webhooks any replica received, until the leader applies them.
_SCHEMA_V6 = """
CREATE TABLE lease (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
    since REAL NOT NULL, renewed_at REAL NOT NULL, expires_at REAL NOT NULL,
    token INTEGER NOT NULL);
CREATE TABLE replicas (
    holder TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL, role TEXT NOT NULL,
    started REAL NOT NULL, seen REAL NOT NULL);
CREATE TABLE hints (
    id INTEGER PRIMARY KEY, at REAL NOT NULL, fingerprint TEXT, task_id TEXT,
    clip_ids TEXT NOT NULL);
"""

# Version 7, for the cost of a cold plan and of every pass:
# - spec_files.tracks: each last good version's tracks in compact form
#   (``work.spec_columns``: name, fingerprint, clips, album, artist), so a cold
#   ``plan`` builds the desired state without decoding every create request
#   in ``body``. NULL where an older reconciler wrote the row, until
#   ``Ledger.store_compact_tracks`` fills it in.
# - tasks and submits by time: today's spending (``work.SPENT_SQL``) read
#   every task ever created, a cost that grew with the ledger's history.
_SCHEMA_V7 = """
ALTER TABLE spec_files ADD COLUMN tracks TEXT;
CREATE INDEX tasks_at ON tasks (at);
CREATE INDEX submits_at ON submits (at);
"""

#: Versioned migrations: index i brings the schema from version i to i + 1.
MIGRATIONS: tuple[str, ...] = (
    _SCHEMA_V1,
    _SCHEMA_V2,
    _SCHEMA_V3,
    _SCHEMA_V4,
    _SCHEMA_V5,
    _SCHEMA_V6,
    _SCHEMA_V7,
)


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _sqlite_utils() -> ModuleType:
    """sqlite-utils, imported without numpy unless numpy is already in.

    sqlite-utils imports numpy when it is installed (the sandbox's audio
    needs it) only to map numpy types to columns, and the ledger stores
    none: that import was 21 MiB of the daemon's resident memory and 0.2 s
    of every start. numpy is hidden for this one import (sqlite-utils then
    goes without, as when it is not installed) and importable again after
    it; a process that has numpy already (an in-process sandbox) loses
    nothing by sharing it. Imported here, not at the top, so that ``status``
    and ``plan`` (which read through ``reports``) skip sqlite-utils altogether.
    """
    with without("numpy"):
        import sqlite_utils
    return sqlite_utils


def is_postgres(target: Path | str) -> bool:
    """Whether a ledger target names a PostgreSQL database rather than a SQLite file."""
    return isinstance(target, str) and target.startswith(POSTGRES_SCHEMES)


def describe(target: Path | str) -> str:
    """A ledger target for messages: a PostgreSQL URL without its password."""
    if not is_postgres(target):
        return str(target)
    from reconciler.ledger.postgres import redact

    return redact(str(target))


#: URL schemes of a PostgreSQL ledger (libpq accepts both).
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class Cursor(Protocol):
    """What a statement returns on either backend (sqlite3 and psycopg cursors)."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Database(Protocol):
    """One open ledger database. The ledger's SQL is written once, with ``?``
    placeholders in the dialect both SQLite and PostgreSQL read (docs/ledger.md);
    each backend turns it into what its driver takes."""

    #: "sqlite" or "postgresql".
    backend: str
    #: The driver's error base classes, turned into ``LedgerError`` by ``Store``.
    errors: tuple[type[Exception], ...]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...

    def query(self, sql: str, params: Sequence[Any] = ()) -> Iterable[dict[str, Any]]: ...

    def atomic(self) -> AbstractContextManager[Any]: ...

    def schema_version(self) -> int: ...

    def migrate(self, step: int, script: str) -> None: ...

    def integrity_ok(self) -> bool: ...

    def close(self) -> None: ...


class SqliteDatabase:
    """The embedded default: one SQLite file in WAL mode, through sqlite-utils."""

    backend = "sqlite"
    errors: tuple[type[Exception], ...] = (sqlite3.DatabaseError,)

    def __init__(self, db: sqlite_utils.Database) -> None:
        self.db = db

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return cast(Cursor, self.db.execute(sql, list(params)))

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.db.conn.executemany(sql, rows)

    def query(self, sql: str, params: Sequence[Any] = ()) -> Iterable[dict[str, Any]]:
        return cast(Iterable[dict[str, Any]], self.db.query(sql, list(params)))

    def atomic(self) -> AbstractContextManager[Any]:
        return cast(AbstractContextManager[Any], self.db.atomic())

    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self, step: int, script: str) -> None:
        # One script per step, schema and version together: DDL is
        # transactional in SQLite, so a crash leaves the old version whole.
        self.db.conn.executescript(f"BEGIN; {script} PRAGMA user_version = {step}; COMMIT;")

    def integrity_ok(self) -> bool:
        return bool(self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok")

    def close(self) -> None:
        self.db.close()


def open_sqlite(path: Path, *, readonly: bool) -> SqliteDatabase:
    sqlite_utils = _sqlite_utils()

    if readonly:
        if not path.exists():
            raise LedgerError(f"{path}: no ledger yet (nothing has been synced)")
        conn = connect_readonly(path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=30.0)
    db = sqlite_utils.Database(conn)
    if not readonly:
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable across process crashes in WAL mode, which
        # is the failure rule 2 is about; FULL only adds power-loss
        # safety for the last transaction at a large cost per write.
        db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    return SqliteDatabase(db)


def connect_readonly(path: Path) -> sqlite3.Connection:
    """Open for ``status``, which must work for operators who cannot write the state folder.

    A WAL reader normally creates the ``-shm`` file; a user without write
    access cannot, and gets "attempt to write a readonly database". With no
    ``-wal`` file (the daemon stopped cleanly) the database is whole and
    unchanging, so it can be read as immutable instead.
    """
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        conn.execute("PRAGMA user_version").fetchone()
    except sqlite3.OperationalError:
        conn.close()
        if Path(f"{path}-wal").exists():
            raise
        return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    return conn


def check_version(version: int, *, readonly: bool) -> bool:
    """Whether the schema needs migrating; refuses a newer schema, or a migration when read-only."""
    if version > len(MIGRATIONS):
        raise LedgerError(
            f"ledger schema version {version} is newer than this reconciler "
            f"({len(MIGRATIONS)}); upgrade reconciler"
        )
    if version < len(MIGRATIONS) and readonly:
        raise LedgerError("ledger needs a migration; run `reconciler sync` once")
    return version < len(MIGRATIONS)


class Store:
    """The open database and the clock every write is stamped with."""

    def __init__(self, db: Database, clock: Clock = time.time) -> None:
        self.db = db
        self.clock = clock
        #: Run first in every write transaction when set: the leader's lease
        #: (``lease.Lease.fence``), which refuses the write once the lease is lost.
        self.fence: Callable[[], None] | None = None

    @classmethod
    def open(cls, target: Path | str, *, clock: Clock = time.time, readonly: bool = False) -> Self:
        """Open the ledger at ``target``: a SQLite file, or a ``postgresql://`` URL."""
        if is_postgres(target):
            from reconciler.ledger.postgres import open_postgres

            db: Database = open_postgres(str(target), readonly=readonly)
        else:
            try:
                db = open_sqlite(Path(target), readonly=readonly)
            except sqlite3.DatabaseError as exc:
                raise LedgerError(f"{target}: cannot open ledger: {exc}") from exc
        store = cls(db, clock)
        try:
            if readonly and db.backend == "postgresql" and db.schema_version() == 0:
                raise LedgerError(f"{describe(target)}: no ledger yet (nothing has been synced)")
            if check_version(db.schema_version(), readonly=readonly):
                for i in range(db.schema_version(), len(MIGRATIONS)):
                    db.migrate(i + 1, MIGRATIONS[i])
        except db.errors as exc:
            db.close()
            raise LedgerError(f"{describe(target)}: cannot open ledger: {exc}") from exc
        except LedgerError:
            db.close()
            raise
        return store

    @classmethod
    def open_existing(cls, target: Path | str, *, readonly: bool = True) -> Self | None:
        """The ledger at ``target``, or None when nothing has been synced into it yet."""
        if not is_postgres(target):
            return cls.open(target, readonly=readonly) if Path(target).exists() else None
        from reconciler.ledger.postgres import open_postgres

        db = open_postgres(str(target), readonly=True)
        try:
            empty = db.schema_version() == 0
        except db.errors as exc:
            raise LedgerError(f"{describe(target)}: cannot open ledger: {exc}") from exc
        finally:
            db.close()
        return None if empty else cls.open(target, readonly=readonly)

    @property
    def backend(self) -> str:
        return self.db.backend

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self, *, fenced: bool = True) -> Iterator[None]:
        """One transaction; ``fenced=False`` only for writes that spend nothing
        (the lease itself, heartbeats, queued hints)."""
        try:
            with self.db.atomic():
                if fenced and self.fence is not None:
                    self.fence()
                yield
        except self.db.errors as exc:
            raise LedgerError(f"ledger write failed: {exc}") from exc

    def check_fence(self) -> None:
        """The fence on its own, right before a submit leaves: raises
        ``LeaseLostError`` when this process no longer leads."""
        if self.fence is not None:
            with self.transaction():
                pass

    def _event(
        self,
        event: str,
        *,
        fingerprint: str | None = None,
        soundtrack: str | None = None,
        track: str | None = None,
        **data: Any,
    ) -> None:
        self.db.execute(
            "INSERT INTO events (at, event, fingerprint, soundtrack, track, data) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [self.clock(), event, fingerprint, soundtrack, track, _dumps(data) if data else None],
        )

    # -- key/value facts (API health, pass summaries, pauses) --------------------

    def get(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM kv WHERE key = ?", [key]).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        """Write a fact only when it changed (rule 12: quiet when converged)."""
        encoded = _dumps(value)
        row = self.db.execute("SELECT value FROM kv WHERE key = ?", [key]).fetchone()
        if row is not None and row[0] == encoded:
            return
        with self.transaction():
            self.db.execute(
                "INSERT INTO kv (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [key, encoded],
            )

    # -- reading -----------------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Read-only rows as dicts: the reports (``reports``) read through this."""
        return list(self.db.query(sql, params))

    def integrity_ok(self) -> bool:
        return self.db.integrity_ok()
