"""Replicas: several ``reconciler run`` processes share one ledger, one specs
folder and one output folder; one leads and spends, the others follow.

Real processes, the real sandbox, a real shared ledger (a SQLite file on this
host, and a PostgreSQL database). Who leads
is read through ``status --json``, as an operator would; what was paid is
read from the sandbox's own books.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from reconciler.sandbox import SandboxControl, SandboxServer
from tests.daemonproc import DaemonProc, expected_tracks, free_port, materialised
from tests.ha import TEST_LEASE, Replicas, shared_ledger
from tests.project import track, wait_until
from tests.reliability.support import accounting, assert_outputs_whole

BACKENDS = ["sqlite", "postgresql"]
HOOK_SECRET = "whsec-replicas-5e1f"


@pytest.fixture(params=BACKENDS)
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return shared_ledger(request, tmp_path)


@pytest.fixture
def replicas(tmp_path: Path, sandbox: SandboxControl, ledger: str) -> Iterator[Replicas]:
    group = Replicas(tmp_path, sandbox, ledger)
    yield group
    group.close()


def converged(group: Replicas, timeout: float = 60) -> None:
    """Every track the specs ask for is in the shared output folder, and a replica runs."""

    def done() -> bool:
        assert group.running(), "every replica exited"
        want = expected_tracks(group.base.specs)
        have = materialised(group.base.out)
        return all(have.get(st) == tracks for st, tracks in want.items())

    wait_until(done, timeout, "the shared outputs to match the specs")


def spends_once(group: Replicas, server: SandboxServer) -> None:
    """No fingerprint paid for more often than ``status`` admits as possible double spend."""
    report = group.status()
    books = accounting(server, group.books)
    assert not books.unexplained, books.unexplained
    assert books.extra_tasks <= report["possible_double_spend"]


def write_tracks(group: Replicas, name: str, count: int) -> None:
    group.base.write_spec(
        f"{name}.yaml", [track(f"{name}-{i}", f"{name} {i}") for i in range(count)]
    )


@pytest.mark.parametrize("count", [2, 3])
def test_replicas_converge_a_folder_with_exactly_one_leader(
    replicas: Replicas, sandbox_server: SandboxServer, count: int
) -> None:
    write_tracks(replicas, "mix", 12)
    ports = [free_port() for _ in range(count)]
    procs = [replicas.start(None, None, "--ops-listen", str(port)) for port in ports]
    leader = replicas.leader()
    converged(replicas)
    followers = [p for p in procs if p is not leader]
    assert all(p.named("replica.following") for p in followers)
    # Only the leader ever submitted; the followers spent nothing.
    assert leader.named("batch.submitted")
    assert not any(p.named("lease.acquired") or p.named("batch.submitted") for p in followers)
    assert replicas.base.stats()["tasks_created"] == 12
    spends_once(replicas, sandbox_server)

    report = replicas.status()
    assert report["leader"]["pid"] == leader.pid
    assert report["leader"]["lease_age_seconds"] <= 3 * TEST_LEASE
    assert sorted(r["pid"] for r in report["replicas"]) == sorted(p.pid for p in procs)
    assert {r["pid"]: r["role"] for r in report["replicas"]} == {
        p.pid: "leader" if p is leader else "follower" for p in procs
    }
    # Every replica's ops listener answers: healthy, and says whether it leads.
    for proc, port in zip(procs, ports, strict=True):
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz").status_code == 200
        samples = {
            s.name: s.value
            for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)
            for s in family.samples
        }
        assert samples["reconciler_leader"] == (1.0 if proc is leader else 0.0)


def test_a_follower_takes_over_from_a_killed_leader_and_finishes_its_work(
    replicas: Replicas, sandbox: SandboxControl, sandbox_server: SandboxServer
) -> None:
    sandbox.configure(latency=1.5)  # the kill lands while generations run
    first, second = replicas.start(), replicas.start()
    leader = replicas.leader()
    follower = second if leader is first else first
    write_tracks(replicas, "flight", 6)
    leader.wait_event("batch.submitted", timeout=30)
    replicas.kill(leader)

    taken = follower.wait_event("lease.acquired", timeout=30)
    assert taken["token"] >= 2  # a new holder, a new fencing token
    converged(replicas)
    assert replicas.status()["leader"]["pid"] == follower.pid
    assert assert_outputs_whole(replicas.base.out) == 6
    spends_once(replicas, sandbox_server)


def test_a_stopped_replica_hands_the_lease_over_at_once(replicas: Replicas) -> None:
    """SIGTERM releases the lease: the follower need not wait for it to expire."""
    write_tracks(replicas, "calm", 2)
    first, second = replicas.start(), replicas.start()
    leader = replicas.leader()
    converged(replicas)
    follower = second if leader is first else first
    mark = follower.mark()
    code, _ = leader.stop(signal.SIGTERM)
    assert code == 0
    follower.wait_event("lease.acquired", after=mark, timeout=TEST_LEASE * 3)
    assert [r["pid"] for r in replicas.status()["replicas"]] == [follower.pid]


def test_sync_refuses_to_spend_beside_a_leading_replica(replicas: Replicas) -> None:
    write_tracks(replicas, "solo", 2)
    replicas.start()
    leader = replicas.leader()
    other = replicas.project(9)
    proc = other.cli("sync")
    assert proc.returncode == 1
    assert f"pid {leader.pid} leads the replicas sharing this ledger" in proc.stderr
    converged(replicas)
    assert replicas.base.stats()["tasks_created"] == 2


def test_split_brain_the_resumed_old_leader_is_refused_and_submits_nothing(
    replicas: Replicas, sandbox: SandboxControl, sandbox_server: SandboxServer
) -> None:
    """The leader is stopped (SIGSTOP) with generations in flight, past its
    lease; a follower takes over and converges those and new work; the old
    leader, resumed mid-pass with a spec change queued, finds its writes
    refused and sends nothing: each generation is paid once."""
    sandbox.configure(latency=1.5)
    write_tracks(replicas, "before", 2)
    first, second = replicas.start(), replicas.start()
    old = replicas.leader()
    new = second if old is first else first
    converged(replicas)
    mark, old_mark = new.mark(), old.mark()
    write_tracks(replicas, "inflight", 3)
    old.wait_event("batch.submitted", after=old_mark, timeout=30)

    old.send(signal.SIGSTOP)
    try:
        # Work the stopped leader will see when it resumes (its watcher queues the event).
        write_tracks(replicas, "during", 3)
        taken = new.wait_event("lease.acquired", after=mark, timeout=30)
        assert taken["token"] == 2
        converged(replicas)
        submits = replicas.base.stats()["batch_submit_calls"]
        old_mark = old.mark()
    finally:
        old.send(signal.SIGCONT)

    lost = old.wait_event("lease.lost", after=old_mark, timeout=30)
    assert lost["token"] == 1
    old.wait_event("replica.following", after=old_mark, timeout=30)
    # Whatever the resumed process tried after that was refused by the ledger
    # before any submit, and the new leader still leads.
    assert not [e for e in old.events()[old_mark:] if e.get("event") == "batch.submitted"]
    assert replicas.base.stats()["batch_submit_calls"] == submits
    assert replicas.status()["leader"]["pid"] == new.pid
    write_tracks(replicas, "after", 2)
    converged(replicas)
    assert replicas.base.stats()["tasks_created"] == 10
    spends_once(replicas, sandbox_server)


def test_a_webhook_a_follower_receives_reaches_the_leader_through_the_ledger(
    replicas: Replicas, sandbox: SandboxControl
) -> None:
    """The service calls back the follower (``public_url`` names its listener);
    the follower writes the hints into the ledger, the leader takes them and
    polls. Polling alone would take 30 s: converging long before proves it."""
    leader_port, follower_port = free_port(), free_port()
    shared = replicas.base.config.read_text().replace("interval = 0.2", "interval = 30.0")

    def config(name: str, port: int) -> Path:
        path = replicas.base.root / f"{name}.toml"
        path.write_text(
            shared + f'\n[webhook]\nlisten = "127.0.0.1:{port}"\n'
            f'public_url = "http://127.0.0.1:{follower_port}"\nsecret = "{HOOK_SECRET}"\n'
        )
        return path

    leader = replicas.start(config=config("leader", leader_port))
    assert replicas.leader() is leader
    follower = replicas.start(config=config("follower", follower_port))
    follower.wait_event("replica.following")
    write_tracks(replicas, "hooked", 3)
    converged(replicas, timeout=20)
    assert follower.named("webhook.received")
    assert not leader.named("webhook.received")
    assert sandbox.stats()["batch_polls"] <= 3


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_chaos_sigkill_the_leader_ten_times_while_work_is_in_flight(
    tmp_path: Path, sandbox: SandboxControl, sandbox_server: SandboxServer, ledger: str
) -> None:
    """Three replicas; ten times: new spec work arrives and the leader is
    SIGKILLed, half the time in the middle of its batch submit (the answer
    never read), half the time once generations run; a fresh replica replaces
    it. Then the survivors converge: no track lost, no partial file, and no
    fingerprint paid twice beyond what ``status`` reports as possible double
    spend."""
    # A lost submit answer waits 2 s for a claim, then is sent again (counted
    # as possible double spend), however often: a kill can land inside a
    # resubmit too, and a track parked for a person is not converged.
    group = Replicas(tmp_path, sandbox, ledger, grace=2.0)
    config = group.base.config
    config.write_text(
        config.read_text().replace("[submit]\n", "[submit]\nmax_resubmits_per_fingerprint = 10\n")
    )
    try:
        # Every batch submit answers after 0.8 s: a kill can land inside one.
        slow = {"kind": "slow", "delay": 0.8, "rate": 1.0, "endpoints": ["batch_submit"]}
        sandbox.configure(latency=1.0, faults=[slow])
        for _ in range(3):
            group.start()
        kills: list[DaemonProc] = []
        for n in range(10):
            leader = group.leader(timeout=60)
            mark, calls = leader.mark(), group.base.stats()["batch_submit_calls"]
            write_tracks(group, f"wave{n}", 5)
            if n % 2:
                leader.wait_event("batch.submitted", after=mark, timeout=60)
            else:
                wait_until(
                    lambda c=calls: group.base.stats()["batch_submit_calls"] > c,
                    60,
                    "a batch submit to be under way",
                )
            group.kill(leader)
            kills.append(leader)
            assert_outputs_whole(group.base.out)  # whatever is there decodes in full
            group.start()
        converged(group, timeout=240)
        report = group.status()
        assert report["summary"]["ready"] == 50
        assert assert_outputs_whole(group.base.out) == 50
        assert len({p.pid for p in kills}) == 10
        spends_once(group, sandbox_server)
    finally:
        group.close()
