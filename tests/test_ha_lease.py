"""The leader's lease and its fencing, in process, on a real ledger shared by
two ``Ledger`` objects (two replicas, two connections): a SQLite file with an
injected clock, and a PostgreSQL database, whose own clock the lease is kept
by (there, time passes for real: a short lease, and waits on the expiry
itself, with a deadline).

What a user depends on: exactly one replica holds the lease at a time, a
change of holder gives a new fencing token, and a replica whose lease
expired or was taken over cannot write (so it cannot record a submit intent,
so it cannot submit).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.errors import LeaseLostError, LedgerError
from reconciler.ledger import Hint, Ledger
from reconciler.ledger.lease import (
    Identity,
    Lease,
    heartbeat,
    hints_waiting,
    leave,
    queue_hints,
    read_leadership,
    take_hints,
)
from tests.clock import NOW, Clock
from tests.project import wait_until


@dataclass
class Pair:
    """Two replicas' leases on one ledger, and how time passes for them."""

    a: Lease
    b: Lease
    clock: Clock
    backend: str

    @property
    def duration(self) -> float:
        return self.a.duration

    def expire(self, past: float = 0.0) -> None:
        """Let the lease held now run out (and ``past`` seconds more, on SQLite)."""
        if self.backend == "sqlite":
            self.clock.now += self.duration + past
            return
        wait_until(
            lambda: (lead := read_leadership(self.a.store)[0]) is not None and lead.expired,
            10 * self.duration,
            "the lease to expire on the database's clock",
        )


def open_pair(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[Pair]:
    clock = Clock()
    if backend == "sqlite":
        target: Path | str = tmp_path / "ledger.sqlite3"
        duration = 15.0
    else:
        target = str(request.getfixturevalue("pg_url"))
        duration = 0.5
    a = Ledger.open(target, clock=clock)
    b = Ledger.open(target, clock=clock)
    yield Pair(
        Lease(a, Identity("host-a:1:aa", "host-a", 1), duration),
        Lease(b, Identity("host-b:2:bb", "host-b", 2), duration),
        clock,
        backend,
    )
    a.close()
    b.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Pair]:
    yield from open_pair(request, request.param, tmp_path)


@pytest.fixture
def clocked(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Pair]:
    """SQLite only: its clock is injected, so a moment just short of expiry can be chosen."""
    yield from open_pair(request, "sqlite", tmp_path)


@pytest.fixture
def pg_pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Pair]:
    yield from open_pair(request, "postgresql", tmp_path)


def lead(lease: Lease) -> Lease:
    """Take the lease and fence this replica's writes with it, as the daemon does."""
    assert lease.acquire()
    lease.store.fence = lease.fence
    return lease


def test_the_first_replica_takes_the_lease_and_the_second_is_refused(pair: Pair) -> None:
    a, b = pair.a, pair.b
    assert a.acquire()
    assert a.token == 1
    assert not b.acquire()
    assert b.token is None
    leader, _ = read_leadership(b.store)
    assert leader is not None
    assert (leader.holder, leader.host, leader.pid, leader.token) == ("host-a:1:aa", "host-a", 1, 1)
    assert leader.expires_at == leader.renewed_at + pair.duration
    assert leader.since == leader.renewed_at


def test_renewing_keeps_the_token_and_the_term_and_moves_the_expiry(pair: Pair) -> None:
    a, b = pair.a, pair.b
    assert a.acquire()
    first = read_leadership(a.store)[0]
    assert first is not None
    pair.clock.now += pair.duration - 1
    assert a.acquire()
    assert (a.token, a.since) == (1, first.since)
    renewed = read_leadership(a.store)[0]
    assert renewed is not None
    assert renewed.expires_at > first.expires_at
    assert not b.acquire()


def test_renewal_outlasts_the_first_expiry(clocked: Pair) -> None:
    pair = clocked
    a, b = pair.a, pair.b
    assert a.acquire()
    pair.clock.now += pair.duration - 1
    assert a.acquire()
    pair.clock.now += pair.duration - 1  # past the first expiry, within the renewed one
    assert not b.acquire()
    leader, _ = read_leadership(a.store)
    assert leader is not None
    assert leader.age == pair.duration - 1


@pytest.mark.parametrize("past", [0.0, 0.001, 100.0])
def test_an_expired_lease_is_taken_over_with_a_new_token(pair: Pair, past: float) -> None:
    a, b = pair.a, pair.b
    assert a.acquire()
    pair.expire(past)
    assert b.acquire()
    assert b.token == 2
    leader = read_leadership(a.store)[0]
    assert leader is not None
    assert leader.since == leader.renewed_at  # a new term
    assert not a.acquire()
    assert a.token is None
    # And back: every change of holder is a new token, never an old one again.
    pair.expire()
    assert a.acquire()
    assert a.token == 3


def test_a_lease_just_short_of_expiry_is_not_taken(clocked: Pair) -> None:
    pair = clocked
    a, b = pair.a, pair.b
    assert a.acquire()
    pair.clock.now += pair.duration - 0.001
    assert not b.acquire()
    assert a.acquire()
    assert a.token == 1


def test_the_leaders_writes_commit_while_it_holds_the_lease(pair: Pair) -> None:
    ledger = lead(pair.a).store
    ledger.put("probe", 1)
    assert ledger.get("probe") == 1


def test_a_write_with_a_token_taken_over_is_refused_and_rolled_back(pair: Pair) -> None:
    a, b = pair.a, pair.b
    old = lead(a).store
    pair.expire(1)
    assert b.acquire()
    assert isinstance(old, Ledger)
    with pytest.raises(LeaseLostError, match="token 1"):
        old.begin_submit(["f" * 64], "batch")
    assert b.store.query("SELECT id FROM submits") == []
    assert a.token is None
    # Still refused on the next try: a lost lease is not won back by writing.
    with pytest.raises(LeaseLostError):
        old.put("probe", 1)
    assert b.store.get("probe") is None


def test_an_expired_lease_refuses_writes_even_before_anyone_takes_over(pair: Pair) -> None:
    ledger = lead(pair.a).store
    pair.expire()
    with pytest.raises(LeaseLostError):
        ledger.put("probe", 1)
    with pytest.raises(LeaseLostError):
        ledger.check_fence()
    assert ledger.get("probe") is None


def test_on_postgresql_a_takeover_waits_for_the_leaders_write_under_way(pg_pair: Pair) -> None:
    """The fence locks the lease row: a takeover that finds the lease expired
    while the leader's transaction (begun under the lease) is open waits for
    it, then takes over; the write made under the lease stands, whole. (On
    SQLite the one write lock serialises them: nothing row-level to observe.)"""
    pair = pg_pair
    a, b = pair.a, pair.b
    ledger = lead(a).store
    won: list[bool] = []
    taker = threading.Thread(target=lambda: won.append(b.acquire()))
    with ledger.transaction():
        ledger.put("probe", 1)
        pair.expire()
        taker.start()
        wait_until(
            lambda: ledger.query(
                "SELECT pid FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND datname = current_database()"
            ),
            10,
            "the takeover to wait for the lease row's lock",
        )
        assert won == []
    taker.join(10)
    assert won == [True]
    assert b.token == 2
    assert b.store.get("probe") == 1


def test_a_lease_lost_is_a_ledger_error(pair: Pair) -> None:
    """Code that handles a failed ledger write (nothing written, stop this
    step) handles a lost lease the same way without knowing about it."""
    pair.a.store.fence = pair.a.fence  # never taken
    with pytest.raises(LedgerError):
        pair.a.store.check_fence()


def test_the_fence_right_before_a_submit_sees_a_takeover(pair: Pair) -> None:
    a, b = pair.a, pair.b
    lead(a).store.check_fence()
    pair.expire(1)
    assert b.acquire()
    with pytest.raises(LeaseLostError):
        a.store.check_fence()


def test_a_released_lease_is_taken_at_once(pair: Pair) -> None:
    a, b = pair.a, pair.b
    assert a.acquire()
    a.release()
    assert a.token is None
    assert b.acquire()
    assert b.token == 2


def test_heartbeats_say_who_is_alive_in_which_role(pair: Pair) -> None:
    a, b = pair.a, pair.b
    heartbeat(a.store, a.me, "leader", NOW, pair.duration)
    pair.clock.now += 1
    heartbeat(b.store, b.me, "follower", NOW + 1, pair.duration)
    _, replicas = read_leadership(a.store)
    assert [(r.host, r.pid, r.role) for r in replicas] == [
        ("host-b", 2, "follower"),
        ("host-a", 1, "leader"),
    ]
    leave(b.store, b.me)
    assert [r.holder for r in read_leadership(a.store)[1]] == [a.me.holder]


def test_a_replica_silent_for_long_is_forgotten(clocked: Pair) -> None:
    pair = clocked
    a, b = pair.a, pair.b
    heartbeat(a.store, a.me, "leader", NOW, pair.duration)
    # A killed replica cannot remove its row: the others' heartbeats do, in time.
    pair.clock.now += 101 * pair.duration
    heartbeat(b.store, b.me, "follower", pair.clock.now, pair.duration)
    assert [r.holder for r in read_leadership(a.store)[1]] == [b.me.holder]


def test_hints_a_follower_queues_are_taken_once_by_the_leader(pair: Pair) -> None:
    a, b = pair.a, pair.b
    lead(a)
    hints = [Hint("f" * 64, "task-1"), Hint(None, None, ("clip-1", "clip-2"))]
    queue_hints(b.store, hints)  # b follows: no lease, no fence, still written
    assert hints_waiting(a.store)
    assert take_hints(a.store) == hints
    assert not hints_waiting(a.store)
    assert take_hints(a.store) == []


def test_a_replica_that_lost_the_lease_cannot_take_the_hints(pair: Pair) -> None:
    a, b = pair.a, pair.b
    lead(a)
    queue_hints(b.store, [Hint("f" * 64, "task-1")])
    pair.expire()
    with pytest.raises(LeaseLostError):
        take_hints(a.store)
    assert hints_waiting(b.store)
