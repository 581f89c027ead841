"""`reconciler status` and `retry` as a person reads them: files checked, names checked, reasons.

Real CLI subprocesses against the real sandbox, a real ledger and real
files; the pure parts (selectors, queued reasons) are table-driven.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from reconciler.errors import UnknownNameError
from reconciler.sandbox import SandboxControl
from reconciler.status import _queued_reason, check_selector, replication, replication_line
from tests.project import Project, track


@pytest.fixture
def project(tmp_path: Path, sandbox: SandboxControl) -> Project:
    return Project(tmp_path, sandbox)


def state_of(report: dict[str, Any], name: str) -> tuple[str, str | None]:
    row = next(t for t in report["tracks"] if t["track"] == name)
    return row["state"], row["reason"]


def test_deleted_or_changed_output_is_not_ready(project: Project) -> None:
    project.write_spec(
        "road-trip.yaml", [track("open-road", "surf rock"), track("dusk", "ambient")]
    )
    project.sync()
    (project.out / "road-trip" / "open-road.mp3").unlink()
    proc = project.cli("status", "--json")
    assert proc.returncode == 0, "a file to restore is work in flight, not a failure"
    report = json.loads(proc.stdout)
    state, reason = state_of(report, "open-road")
    assert state == "restoring"
    assert reason is not None
    assert "deleted" in reason
    assert state_of(report, "dusk") == ("ready", None)
    assert report["summary"]["ready"] == 1
    assert report["summary"]["restoring"] == 1
    # Files are checked where the writer put them, whatever --out status is given.
    elsewhere = project.cli("status", "--json", "--out", str(project.root / "elsewhere"))
    assert json.loads(elsewhere.stdout)["summary"] == report["summary"]
    (project.out / "road-trip" / "dusk.mp3").write_bytes(b"someone else's bytes")
    assert "changed" in (state_of(project.status(), "dusk")[1] or "")
    project.sync()
    assert project.status()["summary"]["ready"] == 2


@pytest.mark.parametrize(
    ("selector", "words"),
    [
        ("nosuch", ["no soundtrack 'nosuch'"]),
        ("studdy", ["no soundtrack 'studdy'", "did you mean 'study'?"]),
        ("study/nope", ["no track 'nope' in soundtrack 'study'"]),
        ("study/focus-x", ["did you mean 'study/focus-"]),
    ],
)
def test_check_selector_names_what_is_unknown(selector: str, words: list[str]) -> None:
    known = {"study": {"focus-1", "focus-2"}, "gym": {"run"}}
    with pytest.raises(UnknownNameError) as err:
        check_selector(known, selector)
    for w in words:
        assert w in str(err.value)


def test_check_selector_accepts_known_names() -> None:
    known = {"study": {"focus-1"}}
    check_selector(known, "study")
    check_selector(known, "study/focus-1")


def test_unknown_names_are_errors_with_exit_1(project: Project) -> None:
    project.write_spec("study.yaml", [track("focus-1", "lofi"), track("focus-2", "lofi 2")])
    project.sync()
    for args in (["nosuch"], ["study/nope"], ["--json", "study/nope"]):
        proc = project.cli("status", *args)
        assert proc.returncode == 1, args
        assert proc.stdout == ""
        assert proc.stderr.startswith("reconciler: no "), proc.stderr
    assert "did you mean 'study/focus-" in project.cli("status", "study/focus-3").stderr
    retry = project.cli("retry", "study/nope")
    assert retry.returncode == 1
    assert "no track 'nope' in soundtrack 'study'" in retry.stderr
    assert project.cli("status", "study/focus-1").returncode == 0


def test_status_and_retry_take_no_api_options(project: Project) -> None:
    for command in ("status", "retry"):
        for flag in ("--sandbox", "--api-url=http://127.0.0.1:1"):
            proc = project.cli(command, flag)
            assert proc.returncode == 2
            assert "No such option" in proc.stderr


def test_status_says_when_the_specs_folder_is_missing(project: Project) -> None:
    project.write_spec("study.yaml", [track("focus", "lofi")])
    project.sync()
    project.specs.rename(project.root / "specs-moved")
    report = project.status()
    assert report["specs_folder"] == "missing"
    assert f"specs folder {project.specs} is missing" in project.cli("status").stdout


def test_queued_rows_say_why(project: Project) -> None:
    project.config.write_text(
        project.config.read_text().replace("[submit]\n", "[submit]\ndaily_budget = 15\n")
    )
    project.write_spec("study.yaml", [track(f"focus-{i}", f"lofi beats {i}") for i in range(3)])
    project.sync(expect=1)
    queued = [t for t in project.status()["tracks"] if t["state"] == "queued"]
    assert len(queued) == 2
    assert all(t["reason"].startswith("held: ") and "budget" in t["reason"] for t in queued)


@pytest.mark.parametrize(
    ("row", "hold", "expected"),
    [
        ({"next_attempt": 0, "attempts": 0, "reason": None}, None, "waiting for the next batch"),
        (
            {"next_attempt": 0, "attempts": 0, "reason": None},
            "held: in-flight cap (200 tasks at once)",
            "held: in-flight cap (200 tasks at once)",
        ),
        (
            {"next_attempt": 0, "attempts": 2, "reason": "HTTP 503"},
            None,
            "retrying now after: HTTP 503",
        ),
    ],
)
def test_queued_reason(row: dict[str, Any], hold: str | None, expected: str) -> None:
    assert _queued_reason(row["reason"], row["attempts"], row["next_attempt"], 1000.0, hold) == (
        expected
    )


def test_queued_reason_names_the_retry_time() -> None:
    row = {"next_attempt": 1060.0, "attempts": 1, "reason": "rate limited"}
    reason = _queued_reason(
        row["reason"], row["attempts"], row["next_attempt"], 1000.0, "held: in-flight cap"
    )
    assert reason.startswith("retry at ")
    assert reason.endswith(" after: rate limited")


def test_spent_today_matches_what_the_sandbox_charged(project: Project) -> None:
    """The first-day report: status said 165 credits where the sandbox charged 180."""
    project.sandbox.configure(faults=[{"kind": "task_failed", "at": [2], "type": "failed"}])
    project.write_spec("a.yaml", [track(f"a-{i}", f"lofi {i}") for i in range(6)])
    project.write_spec("b.yaml", [track("x", "jazz"), track("y", "jazz", variant=2)])
    project.sync()
    charged = project.stats()["credits_charged"]
    assert project.status()["credits"]["spent_today"] == charged


def pass_summaries(stderr: str) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in stderr.splitlines() if x.startswith("{")]
    return [e for e in lines if e["event"] == "pass.completed"]


def test_the_pass_summary_agrees_with_status_on_invalid_tracks(project: Project) -> None:
    project.write_spec("a.yaml", [track("a1", "lofi 1"), track("a2", "lofi 2")])
    project.write_spec("b.yaml", [track("b1", "jazz")])
    project.sync()
    (project.specs / "a.yaml").write_text("tracks: [\n")
    proc = project.sync(expect=1)
    last = pass_summaries(proc.stderr)[-1]
    report = project.status()
    assert report["summary"]["invalid"] == 2
    assert last["ready"] == report["summary"]["ready"] == 1
    assert last["in_flight"] == 0
    assert "1/3 tracks ready" in proc.stderr


def test_the_summary_splits_queued_and_retrying_like_status(project: Project) -> None:
    project.sandbox.configure(faults=[{"kind": "insufficient_credits", "at": [2]}])
    project.write_spec("a.yaml", [track(f"a{i}", f"lofi {i}") for i in range(4)])
    proc = project.sync(expect=1)
    report = project.status()
    assert report["summary"]["retrying"] == 1
    assert report["summary"]["queued"] == 0
    last = pass_summaries(proc.stderr)[-1]
    assert (last["queued"], last["retrying"]) == (0, 1)
    assert "1 retrying" in proc.stderr.splitlines()[-1]
    assert "queued" not in proc.stderr.splitlines()[-1]


def test_spent_today_counts_every_charge_across_sandbox_restarts(tmp_path: Path) -> None:
    """The first-day report: status said 165 credits where the sandbox charged 180."""
    from reconciler.sandbox import SandboxConfig, SandboxControl, SandboxServer

    charged = 0
    project: Project | None = None
    for prompt in ("lofi beats", "lofi beats with rain"):
        with SandboxServer(SandboxConfig(latency=0.2)) as server:
            control = SandboxControl(server.base_url, server.key)
            project = Project(tmp_path, control)
            project.write_spec("study.yaml", [track("a", prompt), track("b", "jazz")])
            # Each start hands out fresh ids: the edited track converges too.
            project.sync()
            charged += control.stats()["credits_charged"]
    assert project is not None
    assert project.status()["credits"]["spent_today"] == charged


# -- who leads, as status shows it (pure: the lease row and heartbeats as read) --------

LEASE = 15.0
AT = 1_000_000.0
A, B, C = "node-a:10:aa", "node-b:20:bb", "node-c:30:cc"


def lease_row(holder: str, renewed_ago: float, expires_in: float) -> tuple[object, ...]:
    host, pid, _ = holder.split(":")
    return (holder, host, int(pid), AT - 100, AT - renewed_ago, AT + expires_in, 3)


def beat(holder: str, role: str, seen_ago: float) -> tuple[object, ...]:
    host, pid, _ = holder.split(":")
    return (holder, host, int(pid), role, AT - 200, AT - seen_ago)


@pytest.mark.parametrize(
    ("lease", "beats", "leader_pid", "last", "roles", "line"),
    [
        # One daemon on its own ledger: no lease, no replicas, nothing to say.
        (None, [], None, None, {}, None),
        # A live lease and a follower.
        (
            lease_row(A, 2, 13),
            [beat(A, "leader", 2), beat(B, "follower", 1)],
            10,
            None,
            {10: ("leader", False), 20: ("follower", False)},
            "leader: node-a pid 10 since 1970-01-12T13:45:00+00:00, lease renewed 2s ago; "
            "1 other replica seen, node-b pid 20 (follower)",
        ),
        # A SIGKILL takeover: B leads; A's last heartbeat said leader, 20 s ago.
        (
            lease_row(B, 1, 14),
            [beat(B, "leader", 1), beat(C, "follower", 1), beat(A, "leader", 20)],
            20,
            None,
            {20: ("leader", False), 30: ("follower", False), 10: ("unknown", True)},
            "; node-a pid 10 not seen for 20s",
        ),
        # Killed a moment ago: its heartbeat is fresh, but the lease it reports ran out.
        (
            lease_row(A, 16, -1),
            [beat(B, "follower", 0), beat(A, "leader", 16)],
            None,
            (10, False, 1.0),
            {20: ("follower", False), 10: ("unknown", True)},
            "no leader: node-a pid 10 held the lease until 1970-01-12T13:46:39+00:00 "
            "(expired 1s ago); 1 replica seen, node-b pid 20 (follower); "
            "node-a pid 10 not seen for 16s",
        ),
        # The last replica stopped with SIGTERM: released, its heartbeat removed.
        (
            (A, "node-a", 10, AT - 100, AT - 5, AT - 5, 3),
            [],
            None,
            (10, True, 5.0),
            {},
            "no leader: node-a pid 10 held the lease until 1970-01-12T13:46:35+00:00 "
            "(released 5s ago); 0 replicas seen",
        ),
        # A replica silent for three leases is left out.
        (lease_row(B, 1, 14), [beat(B, "leader", 1), beat(A, "follower", 46)], 20, None,
         {20: ("leader", False)}, "0 other replicas seen"),
        # A heartbeat claiming the lead from a process that does not hold it.
        (lease_row(B, 1, 14), [beat(A, "leader", 1), beat(B, "leader", 1)], 20, None,
         {10: ("unknown", False), 20: ("leader", False)}, "node-a pid 10 (unknown)"),
    ],
)  # fmt: skip
def test_only_an_unexpired_lease_leads_and_silent_replicas_are_stale(
    lease: tuple[object, ...] | None,
    beats: list[tuple[object, ...]],
    leader_pid: int | None,
    last: tuple[int, bool, float] | None,
    roles: dict[int, tuple[str, bool]],
    line: str | None,
) -> None:
    leader, last_leader, replicas = replication(lease, beats, LEASE, AT)
    assert (leader and leader["pid"]) == leader_pid
    if last is None:
        assert last_leader is None
    else:
        assert last_leader is not None
        got = (last_leader["pid"], last_leader["released"], last_leader["ended_seconds_ago"])
        assert got == last
    assert {r["pid"]: (r["role"], r["stale"]) for r in replicas} == roles
    assert [r["role"] for r in replicas].count("leader") == (leader_pid is not None)
    said = replication_line({"leader": leader, "last_leader": last_leader, "replicas": replicas})
    if line is None:
        assert said is None
    else:
        assert said is not None
        assert line in said[0]
        assert said[1] == (None if leader else "yellow")
