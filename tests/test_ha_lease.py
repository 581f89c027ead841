"""The leader's lease and its fencing, in process, on a real ledger shared by
two ``Ledger`` objects (two replicas), on SQLite with an injected clock.

What a user depends on: exactly one replica holds the lease at a time, a
change of holder gives a new fencing token, and a replica whose lease
expired or was taken over cannot write (so it cannot record a submit intent,
so it cannot submit).
"""

from __future__ import annotations

from collections.abc import Iterator
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

NOW = 1_800_000_000.0
LEASE = 15.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def pair(tmp_path: Path, clock: Clock) -> Iterator[tuple[Lease, Lease]]:
    """Two replicas' leases on one ledger file, each through its own connection."""
    path = tmp_path / "ledger.sqlite3"
    a = Ledger.open(path, clock=clock)
    b = Ledger.open(path, clock=clock)
    yield (
        Lease(a, Identity("host-a:1:aa", "host-a", 1), LEASE),
        Lease(b, Identity("host-b:2:bb", "host-b", 2), LEASE),
    )
    a.close()
    b.close()


def lead(lease: Lease) -> Lease:
    """Take the lease and fence this replica's writes with it, as the daemon does."""
    assert lease.acquire()
    lease.store.fence = lease.fence
    return lease


def test_the_first_replica_takes_the_lease_and_the_second_is_refused(
    pair: tuple[Lease, Lease],
) -> None:
    a, b = pair
    assert a.acquire()
    assert a.token == 1
    assert not b.acquire()
    assert b.token is None
    leader, _ = read_leadership(b.store)
    assert leader is not None
    assert (leader.holder, leader.host, leader.pid, leader.token) == ("host-a:1:aa", "host-a", 1, 1)
    assert leader.expires_at == NOW + LEASE
    assert not leader.expired


def test_renewing_keeps_the_token_and_the_term_and_moves_the_expiry(
    pair: tuple[Lease, Lease], clock: Clock
) -> None:
    a, b = pair
    assert a.acquire()
    clock.now += LEASE - 1
    assert a.acquire()
    assert (a.token, a.since) == (1, NOW)
    clock.now += LEASE - 1  # past the first expiry, within the renewed one
    assert not b.acquire()
    leader, _ = read_leadership(a.store)
    assert leader is not None
    assert leader.renewed_at == NOW + LEASE - 1
    assert leader.age == LEASE - 1


@pytest.mark.parametrize("past", [0.0, 0.001, 100.0])
def test_an_expired_lease_is_taken_over_with_a_new_token(
    pair: tuple[Lease, Lease], clock: Clock, past: float
) -> None:
    a, b = pair
    assert a.acquire()
    clock.now += LEASE + past
    assert b.acquire()
    assert (b.token, b.since) == (2, clock.now)
    assert not a.acquire()
    assert a.token is None
    # And back: every change of holder is a new token, never an old one again.
    clock.now += LEASE
    assert a.acquire()
    assert a.token == 3


def test_a_lease_just_short_of_expiry_is_not_taken(pair: tuple[Lease, Lease], clock: Clock) -> None:
    a, b = pair
    assert a.acquire()
    clock.now += LEASE - 0.001
    assert not b.acquire()
    assert a.acquire()
    assert a.token == 1


def test_the_leaders_writes_commit_while_it_holds_the_lease(pair: tuple[Lease, Lease]) -> None:
    a, _ = pair
    ledger = lead(a).store
    ledger.put("probe", 1)
    assert ledger.get("probe") == 1


def test_a_write_with_a_token_taken_over_is_refused_and_rolled_back(
    pair: tuple[Lease, Lease], clock: Clock
) -> None:
    a, b = pair
    old = lead(a).store
    clock.now += LEASE + 1
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


def test_an_expired_lease_refuses_writes_even_before_anyone_takes_over(
    pair: tuple[Lease, Lease], clock: Clock
) -> None:
    a, _ = pair
    ledger = lead(a).store
    clock.now += LEASE
    with pytest.raises(LeaseLostError):
        ledger.put("probe", 1)
    with pytest.raises(LeaseLostError):
        a.store.check_fence()
    assert ledger.get("probe") is None


def test_a_lease_lost_is_a_ledger_error(pair: tuple[Lease, Lease]) -> None:
    """Code that handles a failed ledger write (nothing written, stop this
    step) handles a lost lease the same way without knowing about it."""
    a, _ = pair
    a.store.fence = a.fence  # never taken
    with pytest.raises(LedgerError):
        a.store.check_fence()


def test_the_fence_right_before_a_submit_sees_a_takeover(
    pair: tuple[Lease, Lease], clock: Clock
) -> None:
    a, b = pair
    lead(a).store.check_fence()
    clock.now += LEASE + 1
    assert b.acquire()
    with pytest.raises(LeaseLostError):
        a.store.check_fence()


def test_a_released_lease_is_taken_at_once(pair: tuple[Lease, Lease], clock: Clock) -> None:
    a, b = pair
    assert a.acquire()
    a.release()
    assert a.token is None
    assert b.acquire()
    assert b.token == 2


def test_heartbeats_say_who_is_alive_in_which_role(pair: tuple[Lease, Lease], clock: Clock) -> None:
    a, b = pair
    heartbeat(a.store, a.me, "leader", NOW, LEASE)
    clock.now += 1
    heartbeat(b.store, b.me, "follower", NOW + 1, LEASE)
    _, replicas = read_leadership(a.store)
    assert [(r.host, r.pid, r.role, r.seen) for r in replicas] == [
        ("host-b", 2, "follower", NOW + 1),
        ("host-a", 1, "leader", NOW),
    ]
    leave(b.store, b.me)
    assert [r.holder for r in read_leadership(a.store)[1]] == [a.me.holder]
    # A replica silent for a long time (killed) is forgotten by the others' heartbeats.
    clock.now += 101 * LEASE
    heartbeat(b.store, b.me, "follower", clock.now, LEASE)
    assert [r.holder for r in read_leadership(a.store)[1]] == [b.me.holder]


def test_hints_a_follower_queues_are_taken_once_by_the_leader(pair: tuple[Lease, Lease]) -> None:
    a, b = pair
    lead(a)
    hints = [Hint("f" * 64, "task-1"), Hint(None, None, ("clip-1", "clip-2"))]
    queue_hints(b.store, hints)  # b follows: no lease, no fence, still written
    assert hints_waiting(a.store)
    assert take_hints(a.store) == hints
    assert not hints_waiting(a.store)
    assert take_hints(a.store) == []


def test_a_replica_that_lost_the_lease_cannot_take_the_hints(
    pair: tuple[Lease, Lease], clock: Clock
) -> None:
    a, b = pair
    lead(a)
    queue_hints(b.store, [Hint("f" * 64, "task-1")])
    clock.now += LEASE
    with pytest.raises(LeaseLostError):
        take_hints(a.store)
    assert hints_waiting(b.store)
