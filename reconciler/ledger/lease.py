"""The leader's lease and its fencing token, the replicas' heartbeats, and the
webhook hints replicas hand to the leader.

Where it sits: in the ``ledger`` package, on ``store.Store``. Several
``reconciler run`` processes may share one ledger (a PostgreSQL database, or
on one host one SQLite file); exactly one of them, the holder of the lease,
spends. ``daemon`` takes and renews the lease (:class:`Lease`), and while it
leads it sets :meth:`Lease.fence` as the store's fence, which every write
transaction of its ``Ledger`` runs first. ``status`` reads who leads through
:func:`read_leadership`.

The lease is one row. Taking it is one conditional ``UPDATE``: it succeeds
when the row is ours or has expired, and a change of holder adds one to its
``token``, the fencing token. The fence is the same kind of statement inside
the write's transaction: it matches only while the row still carries our
holder and token and has not expired. Being a write, it takes SQLite's one
write lock, and on PostgreSQL the row's lock, so a takeover and the old
leader's transaction are serialised: either the write commits before the
takeover, or it is refused and rolled back. A paused or partitioned old
leader therefore never records a submit intent, and since an intent is
recorded before every submit (and the fence is checked again right before
sending), it never submits.

Time is the database's: PostgreSQL's ``clock_timestamp()``, so replicas on
hosts whose clocks disagree compare expiry against one clock; a SQLite file
is shared only on one host, whose clock the store's (injectable) clock is.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from reconciler.errors import LeaseLostError
from reconciler.ledger.facts import Hint
from reconciler.ledger.store import Store

#: The lease row's key: there is one lease, the leader's.
_LEASE = "leader"
#: Seconds since the epoch on PostgreSQL's own clock, read at the moment asked.
PG_NOW = "SELECT extract(epoch FROM clock_timestamp())::double precision"
#: A replica not seen for this many lease periods is dropped from the table:
#: a killed process cannot remove its own row.
_FORGET_AFTER = 100


@dataclass(frozen=True)
class Identity:
    """One process among the replicas: ``holder`` is ``host:pid:random``, so a
    process that restarts with the same pid is still someone else."""

    holder: str
    host: str
    pid: int

    @classmethod
    def of_this_process(cls) -> Identity:
        host = socket.gethostname()
        pid = os.getpid()
        return cls(f"{host}:{pid}:{secrets.token_hex(4)}", host, pid)


@dataclass(frozen=True)
class Leadership:
    """The lease row as ``status`` shows it, with the database's ``now``."""

    holder: str
    host: str
    pid: int
    since: float
    renewed_at: float
    expires_at: float
    token: int
    now: float

    @property
    def age(self) -> float:
        """Seconds since the holder last renewed."""
        return max(0.0, self.now - self.renewed_at)

    @property
    def expired(self) -> bool:
        return self.expires_at <= self.now

    @property
    def released(self) -> bool:
        """Handed back by a clean stop (:meth:`Lease.release` ends it where it was
        last renewed), not left to run out."""
        return self.expires_at <= self.renewed_at


@dataclass(frozen=True)
class Replica:
    """One process's heartbeat row."""

    holder: str
    host: str
    pid: int
    role: str
    started: float
    seen: float


def db_now(store: Store) -> float:
    """Now, on the clock every replica compares the lease against."""
    if store.backend == "postgresql":
        return float(store.db.execute(PG_NOW).fetchone()[0])
    return store.clock()


class Lease:
    """This process's claim on the lease; ``token`` is the fencing token while it holds it."""

    def __init__(self, store: Store, me: Identity, duration: float) -> None:
        self.store = store
        self.me = me
        self.duration = duration
        #: The token of the term this process holds; None while it does not lead.
        self.token: int | None = None
        #: When this process's term began (the database's clock).
        self.since: float | None = None
        #: The lease as found when this process's term began, when it took it
        #: from another process that neither released nor renewed it (a crash,
        #: a pause, a lost connection); None after a first start or a handover.
        self.taken_from: Leadership | None = None

    def acquire(self) -> bool:
        """Take the lease when it is free or expired, or renew it when it is ours.

        One transaction, not fenced (a lapsed lease is what it may renew).
        True when this process holds it now; a token other than the one held
        before means a new term, which the caller starts with a recovery.
        """
        me = self.me
        with self.store.transaction(fenced=False):
            now = db_now(self.store)
            expires = now + self.duration
            before = _lease_row(self.store, now)
            # The first process ever: the row is created for it with token 1.
            self.store.db.execute(
                "INSERT INTO lease (name, holder, host, pid, since, renewed_at, expires_at, token) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 1) ON CONFLICT (name) DO NOTHING",
                [_LEASE, me.holder, me.host, me.pid, now, now, expires],
            )
            # One statement decides: two followers racing for an expired lease
            # cannot both match it, the second finds the first's fresh expiry.
            self.store.db.execute(
                "UPDATE lease SET "
                "token = CASE WHEN holder = ? THEN token ELSE token + 1 END, "
                "since = CASE WHEN holder = ? THEN since ELSE ? END, "
                "holder = ?, host = ?, pid = ?, renewed_at = ?, expires_at = ? "
                "WHERE name = ? AND (holder = ? OR expires_at <= ?)",
                [
                    *(me.holder, me.holder, now),
                    *(me.holder, me.host, me.pid, now, expires),
                    *(_LEASE, me.holder, now),
                ],
            )
            rows = self.store.query(
                "SELECT token, since FROM lease WHERE name = ? AND holder = ?",
                [_LEASE, me.holder],
            )
        if not rows:
            self.token = self.since = None
            return False
        if self.token is None:
            taken = before is not None and before.holder != me.holder and not before.released
            self.taken_from = before if taken else None
        self.token = int(rows[0]["token"])
        self.since = float(rows[0]["since"])
        return True

    def fence(self) -> None:
        """Run first in every write transaction of the leader: refuse it unless the
        lease still carries our token and has not expired. Locks the row for the
        rest of the transaction, so a takeover waits for this write or refuses it."""
        if self.token is None:
            raise LeaseLostError("this process does not hold the ledger's lease")
        # On PostgreSQL the database's clock is read inside this statement: the
        # fence runs first in every write transaction, so it costs one round trip.
        now, at = (
            ("extract(epoch FROM clock_timestamp())", [])
            if self.store.backend == "postgresql"
            else ("?", [self.store.clock()])
        )
        cur = self.store.db.execute(
            "UPDATE lease SET token = token "  # noqa: S608 (a constant or a placeholder)
            f"WHERE name = ? AND holder = ? AND token = ? AND expires_at > {now}",
            [_LEASE, self.me.holder, self.token, *at],
        )
        if cur.rowcount != 1:
            lost = self.token
            self.token = self.since = None
            raise LeaseLostError(
                f"the ledger's lease (token {lost}) expired or was taken over; "
                "this process no longer leads and its write was refused"
            )

    def release(self) -> None:
        """A clean stop: let a follower take over at once rather than after expiry.

        The lease ends where it was last renewed, at this moment: that is how
        ``status`` tells a lease handed back from one that ran out."""
        if self.token is None:
            return
        with self.store.transaction(fenced=False):
            now = db_now(self.store)
            self.store.db.execute(
                "UPDATE lease SET expires_at = ?, renewed_at = ? "
                "WHERE name = ? AND holder = ? AND token = ?",
                [now, now, _LEASE, self.me.holder, self.token],
            )
        self.token = self.since = None


def _lease_row(store: Store, now: float) -> Leadership | None:
    rows = store.query(
        "SELECT holder, host, pid, since, renewed_at, expires_at, token FROM lease WHERE name = ?",
        [_LEASE],
    )
    if not rows:
        return None
    row = rows[0]
    return Leadership(
        holder=row["holder"],
        host=row["host"],
        pid=int(row["pid"]),
        since=float(row["since"]),
        renewed_at=float(row["renewed_at"]),
        expires_at=float(row["expires_at"]),
        token=int(row["token"]),
        now=now,
    )


def read_leadership(store: Store) -> tuple[Leadership | None, list[Replica]]:
    """The lease row (None when no process ever took it) and every replica's
    heartbeat, newest first."""
    lead = _lease_row(store, db_now(store))
    replicas = [
        Replica(
            holder=r["holder"],
            host=r["host"],
            pid=int(r["pid"]),
            role=r["role"],
            started=float(r["started"]),
            seen=float(r["seen"]),
        )
        for r in store.query(
            "SELECT holder, host, pid, role, started, seen FROM replicas ORDER BY seen DESC"
        )
    ]
    return lead, replicas


def heartbeat(store: Store, me: Identity, role: str, started: float, lease: float) -> None:
    """Record that this process is alive and in which role (not fenced: it spends
    nothing); forget replicas silent for a long time."""
    with store.transaction(fenced=False):
        now = db_now(store)
        store.db.execute(
            "INSERT INTO replicas (holder, host, pid, role, started, seen) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (holder) DO UPDATE SET "
            "role = excluded.role, seen = excluded.seen",
            [me.holder, me.host, me.pid, role, started, now],
        )
        store.db.execute("DELETE FROM replicas WHERE seen < ?", [now - _FORGET_AFTER * lease])


def leave(store: Store, me: Identity) -> None:
    """A clean stop: this process is no replica any more."""
    with store.transaction(fenced=False):
        store.db.execute("DELETE FROM replicas WHERE holder = ?", [me.holder])


# -- webhook hints handed from any replica to the leader -----------------------------


def queue_hints(store: Store, hints: Iterable[Hint]) -> None:
    """Verified callbacks a replica received, for the leader's next pass (not
    fenced: a hint is never a fact, it only makes a poll come sooner)."""
    rows = [[store.clock(), h.fingerprint, h.task_id, json.dumps(list(h.clip_ids))] for h in hints]
    if not rows:
        return
    with store.transaction(fenced=False):
        for row in rows:
            store.db.execute(
                "INSERT INTO hints (at, fingerprint, task_id, clip_ids) VALUES (?, ?, ?, ?)", row
            )


def hints_waiting(store: Store) -> bool:
    return bool(store.query("SELECT id FROM hints LIMIT 1"))


def take_hints(store: Store) -> list[Hint]:
    """The queued hints, oldest first, removed in the same (fenced) transaction:
    only the leader applies them."""
    with store.transaction():
        rows = store.query("SELECT id, fingerprint, task_id, clip_ids FROM hints ORDER BY id")
        # By id, not by range: on PostgreSQL a hint with a lower id may commit later.
        for row in rows:
            store.db.execute("DELETE FROM hints WHERE id = ?", [row["id"]])
    return [Hint(r["fingerprint"], r["task_id"], tuple(json.loads(r["clip_ids"]))) for r in rows]
