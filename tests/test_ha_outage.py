"""Replicas through an outage of their PostgreSQL ledger: the server is shut
down (``pg_ctl stop -m fast``, every connection ended) and started again.

Real processes, the real sandbox, a real PostgreSQL server of this test's
own (the worker's shared one serves other tests meanwhile). What a user
depends on: no replica dies of it, the leader stops leading while it cannot
renew its lease, nothing is spent meanwhile, and once the database is back
one replica leads again and the work saved meanwhile converges, paid once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.sandbox import SandboxControl, SandboxServer
from tests.daemonproc import DaemonProc
from tests.ha import Replicas, converged, spends_once, write_tracks
from tests.pgserver import PgServer, throwaway_server
from tests.project import wait_until


@pytest.fixture
def own_pg() -> Iterator[PgServer]:
    """A PostgreSQL server for this test alone: it is shut down and started again."""
    with throwaway_server() as server:
        yield server


def failures_after(proc: DaemonProc, mark: int, event: str) -> list[dict[str, object]]:
    return [e for e in proc.events()[mark:] if e.get("event") == event]


def test_replicas_survive_a_database_restart_and_one_leads_again(
    tmp_path: Path, sandbox: SandboxControl, sandbox_server: SandboxServer, own_pg: PgServer
) -> None:
    # Not dropped afterwards: the server goes with the test.
    url = own_pg.url(own_pg.create_database())
    group = Replicas(tmp_path, sandbox, url)
    try:
        write_tracks(group, "before", 3)
        procs = [group.start() for _ in range(3)]
        leader = group.leader()
        converged(group)
        marks = {p.pid: p.mark() for p in procs}

        own_pg.shut_down("fast")
        # The leader cannot renew, so it cannot prove its lease: it stops leading.
        lost = leader.wait_event("lease.lost", after=marks[leader.pid], timeout=30)
        assert "could not be renewed" in lost["reason"]
        leader.wait_event("replica.following", after=marks[leader.pid], timeout=30)
        # Work saved while the database is away waits for it.
        write_tracks(group, "during", 3)
        submits = group.base.stats()["batch_submit_calls"]
        # Every replica keeps trying, tick after tick, and stays up.
        for p in procs:
            p.wait_event(
                "lease.renew_failed",
                lambda e, p=p: len(failures_after(p, marks[p.pid], "lease.renew_failed")) >= 3,
                after=marks[p.pid],
                timeout=30,
            )
        failed = [e for p in procs for e in failures_after(p, marks[p.pid], "lease.renew_failed")]
        # A ledger error naming the database, never the driver's own exception.
        assert all(url.rsplit("/", 1)[0] in str(e["error"]) for e in failed), failed[:3]
        assert group.base.stats()["batch_submit_calls"] == submits

        own_pg.start_again()
        new = group.leader(timeout=60)
        converged(group)
        assert all(p.proc is not None and p.proc.poll() is None for p in procs)
        assert new in procs
        # What failed while the database was away failed as the ledger's error.
        for p in procs:
            for e in failures_after(p, marks[p.pid], "pass.failed"):
                assert e["error_type"] in ("LedgerError", "LeaseLostError"), e
        report = group.status()
        assert report["leader"]["pid"] == new.pid
        assert sorted(r["pid"] for r in report["replicas"]) == sorted(p.pid for p in procs)
        assert group.base.stats()["tasks_created"] == 6
        spends_once(group, sandbox_server)
    finally:
        group.close()


def test_a_submit_under_way_when_the_database_goes_is_not_paid_twice_blindly(
    tmp_path: Path, sandbox: SandboxControl, sandbox_server: SandboxServer, own_pg: PgServer
) -> None:
    """The leader's batch submit is at the service when the database shuts down:
    its answer cannot be recorded. Once the database is back the submit is
    held as ambiguous (sent again only after ``ambiguous_grace``, 2 s here, and
    then counted as possible double spend), never resent as if new."""
    url = own_pg.url(own_pg.create_database())
    group = Replicas(tmp_path, sandbox, url, grace=2.0)
    try:
        # Every batch submit answers after 2 s: the shutdown lands inside one.
        slow = {"kind": "slow", "delay": 2.0, "rate": 1.0, "endpoints": ["batch_submit"]}
        sandbox.configure(latency=1.0, faults=[slow])
        procs = [group.start() for _ in range(2)]
        leader = group.leader()
        mark = leader.mark()
        write_tracks(group, "inflight", 3)
        wait_until(
            lambda: group.base.stats()["batch_submit_calls"] > 0, 30, "a batch submit under way"
        )
        own_pg.shut_down("fast")
        leader.wait_event("lease.lost", after=mark, timeout=30)
        own_pg.start_again()

        converged(group)
        assert all(p.proc is not None and p.proc.poll() is None for p in procs)
        report = group.status()
        created = group.base.stats()["tasks_created"]
        assert 3 <= created <= 3 + report["possible_double_spend"]
        spends_once(group, sandbox_server)
    finally:
        group.close()
