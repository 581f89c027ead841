"""Faults: every fault kind of the protocol doc, alone and mixed, against real processes.

Each kind alone runs ``reconciler sync`` on 20 tracks (two full batches)
with the sandbox injecting that one fault; the webhook kinds and a 401 in
the middle of a run need the daemon. Every run must end with each track
ready, or, for a permanent refusal, parked with the API's own reason in
``status``. Every run is then audited from the sandbox's books: credits are
charged only for accepted tasks and refunded for every upstream failure, and
no fingerprint is paid for twice unless ``status`` counts it as possible
double spend. The API calls spent per converged track are recorded for the
results table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from reconciler.sandbox import SandboxControl, SandboxServer
from tests.daemonproc import DaemonProc, daemon_project, free_port
from tests.project import FAST_CONFIG, Project, track, wait_until
from tests.reliability.support import (
    Figures,
    accounting,
    api_calls,
    assert_outputs_whole,
    integrity,
)

N_TRACKS = 20
#: The last two tracks keep both clips of their task, so a failed second clip shows.
TWO_CLIPS = ("t18", "t19")
#: Short everything; the client gives up on an answer after 1 s so that the
#: ``slow`` fault (1.5 s) is a timeout, as the protocol doc means it.
SYNC_CONFIG = FAST_CONFIG.replace("request_timeout = 5.0", "request_timeout = 1.0")
SLOW_DELAY = 1.5


def tracks() -> list[dict[str, Any]]:
    return [
        track(f"t{i:02d}", f"fault study {i}", **({"clips": 2} if f"t{i:02d}" in TWO_CLIPS else {}))
        for i in range(N_TRACKS)
    ]


def expected_mp3s(ready: set[str]) -> int:
    return sum(2 if name in TWO_CLIPS else 1 for name in ready)


@dataclass(frozen=True)
class Case:
    """One fault profile and what it must end in.

    ``parked`` maps a track to a piece of the reason ``status`` must show
    for it; tracks are submitted in spec order, ten per batch, so the item
    and task ordinals of an ``at`` schedule name tracks (ordinal n is t{n-1}).
    """

    id: str
    faults: list[dict[str, Any]]
    parked: dict[str, str] = field(default_factory=dict)
    kind: str = ""
    #: Files a failed track still writes: what was paid for and arrived.
    partial: int = 0

    @property
    def fault_kind(self) -> str:
        return self.kind or self.faults[0]["kind"]


ALONE = [
    Case("rate_limited+retry_after", [{"kind": "rate_limited", "rate": 0.3, "retry_after": 0.2}]),
    Case("rate_limited", [{"kind": "rate_limited", "rate": 0.3}]),
    Case("server_error-html", [{"kind": "server_error", "rate": 0.3, "status": 503}]),
    Case(
        "server_error-empty",
        [{"kind": "server_error", "rate": 0.3, "status": 500, "body": "empty"}],
    ),
    Case("connection_reset", [{"kind": "connection_reset", "rate": 0.3}]),
    Case("slow", [{"kind": "slow", "rate": 0.2, "delay": SLOW_DELAY}]),
    Case("drop_response", [{"kind": "drop_response", "rate": 0.5}]),
    Case(
        "reject-forbidden",
        [{"kind": "reject", "at": [3], "type": "forbidden", "error": "copyrighted"}],
        parked={"t02": "copyrighted"},
    ),
    Case(
        "reject-bad_request",
        [{"kind": "reject", "at": [12], "type": "bad_request", "error": "tags: too long"}],
        parked={"t11": "tags: too long"},
    ),
    Case("task_failed", [{"kind": "task_failed", "at": [2, 5, 13]}]),
    Case("task_failed-timeout", [{"kind": "task_failed", "at": [4], "type": "timeout"}]),
    Case("task_failed-api_error", [{"kind": "task_failed", "at": [7], "type": "api_error"}]),
    Case(
        "task_failed-forbidden",
        [{"kind": "task_failed", "at": [5], "type": "forbidden", "error": "inappropriate"}],
        parked={"t04": "inappropriate"},
    ),
    Case(
        "clip_failed",
        [{"kind": "clip_failed", "at": [1, 19]}],
        parked={"t18": "returned 1 of the 2 clips"},
        partial=1,
    ),
    Case("unfinished_clips", [{"kind": "unfinished_clips", "rate": 0.5}]),
    Case("duration_string", [{"kind": "duration_string", "rate": 0.5}]),
    Case("audio_expired-403", [{"kind": "audio_expired", "rate": 0.3}]),
    Case("audio_expired-404", [{"kind": "audio_expired", "rate": 0.3, "status": 404}]),
    Case("audio_truncated-hang_up", [{"kind": "audio_truncated", "rate": 0.3}]),
    Case("audio_truncated-short", [{"kind": "audio_truncated", "rate": 0.3, "mode": "short"}]),
]


@pytest.fixture
def project(tmp_path: Path, sandbox: SandboxControl) -> Project:
    p = Project(tmp_path, sandbox)
    p.config.write_text(SYNC_CONFIG)
    p.write_spec("faults.yaml", tracks())
    return p


def audit(
    p: Project,
    server: SandboxServer,
    figures: Figures,
    case_id: str,
    kind: str,
    parked: dict[str, str],
    partial: int = 0,
) -> None:
    """Every track ready or parked as expected, outputs whole, the books balanced."""
    report = p.status()
    states = {t["track"]: t for t in report["tracks"]}
    assert len(states) == N_TRACKS
    failed = {name: t["reason"] or "" for name, t in states.items() if t["state"] == "failed"}
    ready = {name for name, t in states.items() if t["state"] == "ready"}
    assert set(failed) == set(parked), failed
    for name, reason in parked.items():
        assert reason in failed[name], (name, failed[name])
    assert ready == set(states) - set(parked), {n: t["state"] for n, t in states.items()}
    assert assert_outputs_whole(p.out) == expected_mp3s(ready) + partial
    assert integrity(p.state) == "ok"

    books = accounting(server, p.state)
    assert books.faults[kind] > 0, f"the {kind} fault never fired: {books.faults}"
    books.check_credits()
    assert not books.unexplained, books.unexplained
    assert books.extra_tasks <= report["possible_double_spend"]
    stats = p.stats()
    figures.record(
        "faults",
        case_id,
        kind=kind,
        fired=books.faults[kind],
        ready=len(ready),
        parked=len(parked),
        api_calls=api_calls(stats),
        calls_per_ready_track=round(api_calls(stats) / max(1, len(ready)), 2),
        submit_calls=stats["batch_submit_calls"] + stats["create_calls"],
        polls=stats["batch_polls"] + stats["task_polls"],
        downloads=stats["downloads"],
        tasks=books.tasks_created,
        refunded_tasks=books.failed_tasks,
        paid_twice=books.paid_twice,
        possible_double_spend=report["possible_double_spend"],
    )


@pytest.mark.parametrize("case", ALONE, ids=[c.id for c in ALONE])
def test_each_fault_alone_converges_or_parks_with_the_reason(
    case: Case,
    project: Project,
    sandbox: SandboxControl,
    sandbox_server: SandboxServer,
    figures: Figures,
) -> None:
    sandbox.configure(faults=case.faults)
    proc = project.cli("sync", timeout=90)
    assert proc.returncode == (1 if case.parked else 0), proc.stderr[-3000:]
    audit(project, sandbox_server, figures, case.id, case.fault_kind, case.parked, case.partial)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("unauthorized", "API key rejected (401)"), ("insufficient_credits", "insufficient credits")],
)
def test_a_submit_block_stops_sync_and_the_next_sync_converges(
    kind: str,
    reason: str,
    project: Project,
    sandbox: SandboxControl,
    sandbox_server: SandboxServer,
    figures: Figures,
) -> None:
    # The second batch is refused (as a whole, or its first item): the first
    # batch is in flight, the rest waits. sync stops there, saying why: only
    # a person can add credits or fix a key.
    at = 2 if kind == "unauthorized" else 11
    sandbox.configure(faults=[{"kind": kind, "at": [at], "endpoints": ["batch_submit"]}])
    # The pause lasts backoff_cap; at 1 s it could lapse while the first
    # batch is still being fetched on a busy machine, and sync would rightly
    # submit again. A minute outlasts the run; sync stops at once regardless.
    project.config.write_text(SYNC_CONFIG.replace("backoff_cap = 1.0", "backoff_cap = 60.0"))
    first = project.cli("sync", timeout=60)
    assert first.returncode == 1, first.stderr[-3000:]
    # The summary is the last thing on stderr (rich wraps it at 80 columns).
    summary = " ".join(first.stderr.split()).rsplit("not converged:", 1)[-1]
    assert f"submissions paused: {reason}" in summary
    report = project.status()
    assert reason in (report["submit_block"] or "")
    # A refused batch leaves all ten items waiting; a refused item only itself.
    assert report["summary"]["ready"] == (10 if kind == "unauthorized" else 19)
    project.sync()
    audit(project, sandbox_server, figures, f"{kind}-sync", kind, {})


def test_insufficient_credits_pause_the_daemon_and_it_converges(
    tmp_path: Path, sandbox: SandboxControl, sandbox_server: SandboxServer, figures: Figures
) -> None:
    # The daemon waits out the pause (backoff_cap, 1 s here) and submits again.
    p = daemon_project(tmp_path, sandbox)
    p.write_spec("faults.yaml", tracks())
    sandbox.configure(faults=[{"kind": "insufficient_credits", "rate": 0.3}])
    with DaemonProc(p) as d:
        d.converged(timeout=60)
        code, _ = d.stop()
        assert code == 0
    audit(p, sandbox_server, figures, "insufficient_credits-daemon", "insufficient_credits", {})


def test_a_401_mid_run_does_not_stop_the_daemon_for_good(
    tmp_path: Path, sandbox: SandboxControl, sandbox_server: SandboxServer, figures: Figures
) -> None:
    p = daemon_project(tmp_path, sandbox)
    p.write_spec("faults.yaml", tracks())
    sandbox.configure(faults=[{"kind": "unauthorized", "at": [2], "endpoints": ["batch_submit"]}])
    with DaemonProc(p) as d:
        d.wait_event("pass.completed", lambda e: bool(e.get("blocked")))
        d.converged(timeout=30)
        d.stop()
    audit(p, sandbox_server, figures, "unauthorized-daemon", "unauthorized", {})


def test_a_lost_answer_goes_out_again_soon_after_the_grace(
    tmp_path: Path, sandbox: SandboxControl, sandbox_server: SandboxServer, figures: Figures
) -> None:
    # No webhooks: nothing can claim the lost answer, the grace (1 s) must run out.
    p = daemon_project(tmp_path, sandbox, grace=1.0, rescan=600)
    p.write_spec("faults.yaml", [track("only", "a lost answer")])
    sandbox.configure(faults=[{"kind": "drop_response", "at": [1]}])
    with DaemonProc(p) as d:
        d.wait_event("submit.ambiguous")
        # The grace (1 s) and a poll; not the rescan, 600 s away.
        d.converged(timeout=8)
        d.stop()
    audit_one = accounting(sandbox_server, p.state)
    assert audit_one.tasks_created == 2
    assert not audit_one.unexplained


def test_a_stuck_task_is_given_up_on_after_a_deadline(
    project: Project, sandbox: SandboxControl, sandbox_server: SandboxServer, figures: Figures
) -> None:
    project.config.write_text(SYNC_CONFIG.replace("[submit]", "task_timeout = 3\n\n[submit]"))
    sandbox.configure(faults=[{"kind": "stuck", "at": [6]}])
    project.sync()
    # The stuck task was charged and is never refunded: sending t05 again is
    # a second payment, which status owns up to as possible double spend.
    report = project.status()
    assert report["possible_double_spend"] == 1
    audit(project, sandbox_server, figures, "stuck", "stuck", {})
    books = accounting(sandbox_server, project.state)
    assert books.paid_twice == 1
    assert books.stuck_tasks == 1


# -- webhook delivery faults: the daemon with its receiver ---------------------------------

SECRET = "whsec-faults-7d1e"

WEBHOOK_CASES = [
    Case("webhook_duplicate", [{"kind": "webhook_duplicate", "rate": 1.0}]),
    Case("webhook_out_of_order", [{"kind": "webhook_out_of_order", "rate": 1.0}]),
    Case("webhook_bad_signature", [{"kind": "webhook_bad_signature", "rate": 0.5}]),
]


def hooked_project(
    root: Path, sandbox: SandboxControl, *, poll: float, grace: float = 600
) -> Project:
    port = free_port()
    hook = (
        f'\n[webhook]\nlisten = "127.0.0.1:{port}"\npublic_url = "http://127.0.0.1:{port}"\n'
        f'secret = "{SECRET}"\n'
    )
    p = daemon_project(root, sandbox, poll=poll, grace=grace, extra=hook)
    # As for sync above: a slow answer is a timeout.
    p.config.write_text(
        p.config.read_text().replace("request_timeout = 5.0", "request_timeout = 1.0")
    )
    return p


@pytest.mark.parametrize("case", WEBHOOK_CASES, ids=[c.id for c in WEBHOOK_CASES])
def test_webhook_faults_alone_converge(
    case: Case,
    tmp_path: Path,
    sandbox: SandboxControl,
    sandbox_server: SandboxServer,
    figures: Figures,
) -> None:
    # Polls every 3 s: a rejected delivery leaves the poll to find the result.
    p = hooked_project(tmp_path, sandbox, poll=3.0)
    p.write_spec("faults.yaml", tracks())
    sandbox.configure(faults=case.faults)
    with DaemonProc(p) as d:
        d.converged(timeout=30)
        assert d.named("webhook.received")
        if case.id == "webhook_bad_signature":
            assert [e for e in d.named("webhook.rejected") if e["reason"] == "bad_signature"]
        if case.id == "webhook_duplicate":
            assert d.named("webhook.duplicate")
        code, _ = d.stop()
        assert code == 0
    audit(p, sandbox_server, figures, case.id, case.fault_kind, {})


# -- all of them at once ---------------------------------------------------------------

MIXED_TRACKS = 100
#: Reasons a track may end parked with under the mix: the API's own words.
PERMANENT_REASONS = (
    # A generation whose submit answers were lost twice: sent again once
    # (counted), then held for a person rather than paid a third time.
    "submit answer lost",
    "copyrighted",
    "prompt: rejected upstream",
    "failed upstream 3 times",
    "did not finish within",
)


def mixed_faults() -> list[dict[str, Any]]:
    """Every kind at once, at rates that leave most requests alone.

    The kinds whose events are few (submits) or that cost a timeout each
    (``slow``) fire on an ``every`` schedule, so that each kind surely fires.
    Which items ``reject`` refuses depends
    on the order in which the other faults let batches through, so the
    parked tracks are found from ``status`` and matched with the count.
    """
    return [
        {"kind": "rate_limited", "rate": 0.03, "retry_after": 0.2},
        {"kind": "rate_limited", "rate": 0.03},
        {"kind": "server_error", "rate": 0.03, "status": 502},
        {"kind": "server_error", "rate": 0.03, "status": 500, "body": "empty"},
        {"kind": "connection_reset", "every": 29},
        {"kind": "slow", "every": 41, "delay": SLOW_DELAY},
        {"kind": "drop_response", "every": 4},
        {"kind": "unauthorized", "every": 37},
        {"kind": "reject", "at": [7], "type": "forbidden", "error": "copyrighted"},
        {"kind": "reject", "at": [33], "type": "bad_request", "error": "prompt: rejected upstream"},
        {"kind": "insufficient_credits", "rate": 0.05},
        {"kind": "task_failed", "rate": 0.1},
        {"kind": "clip_failed", "rate": 0.05},
        {"kind": "unfinished_clips", "rate": 0.2},
        {"kind": "duration_string", "rate": 0.2},
        {"kind": "stuck", "rate": 0.03},
        {"kind": "audio_expired", "rate": 0.1},
        {"kind": "audio_truncated", "rate": 0.05},
        {"kind": "audio_truncated", "rate": 0.05, "mode": "short"},
        {"kind": "webhook_duplicate", "rate": 0.2},
        {"kind": "webhook_out_of_order", "rate": 0.2},
        {"kind": "webhook_bad_signature", "rate": 0.2},
    ]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_all_faults_mixed_converge_and_spend_once(
    tmp_path: Path, sandbox: SandboxControl, sandbox_server: SandboxServer, figures: Figures
) -> None:
    p = hooked_project(tmp_path, sandbox, poll=0.5, grace=2)
    # Stuck tasks are given up on after 4 s (the sandbox generates in 0.5 s).
    p.config.write_text(p.config.read_text().replace("[submit]", "task_timeout = 4\n\n[submit]"))
    # Single-clip tracks only: with clip_failed at a rate, which two-clip
    # track would lose its second clip is not known in advance.
    p.write_spec(
        "mixed.yaml", [track(f"m{i:02d}", f"mixed fault study {i}") for i in range(MIXED_TRACKS)]
    )
    sandbox.configure(faults=mixed_faults())
    started = time.monotonic()
    with DaemonProc(p) as d:

        def settled() -> bool:
            d.assert_running()
            summary = p.status()["summary"]
            return bool(summary["ready"] + summary["failed"] == MIXED_TRACKS)

        wait_until(settled, 240, "every track ready or parked")
        took = time.monotonic() - started
        code, _ = d.stop()
        assert code == 0
    report = p.status()
    failed = {t["track"]: t["reason"] or "" for t in report["tracks"] if t["state"] == "failed"}
    for name, reason in failed.items():
        assert any(words in reason for words in PERMANENT_REASONS), (name, reason)
    books = accounting(sandbox_server, p.state)
    assert set(books.faults) == {rule["kind"] for rule in mixed_faults()}, books.faults
    # A refusal inside a batch whose answer was then dropped is never seen:
    # that item is sent again after the grace and accepted. So at most every
    # refusal parks a track, and the first batch's item 7 (m06) surely does.
    rejected = sum(reason.startswith("rejected") for reason in failed.values())
    assert "m06" in failed
    assert rejected <= books.faults["reject"], (failed, books.faults)
    ready = MIXED_TRACKS - len(failed)
    assert assert_outputs_whole(p.out) == ready
    assert integrity(p.state) == "ok"
    books.check_credits()
    assert not books.unexplained, books.unexplained
    stats = p.stats()
    figures.record(
        "faults",
        "mixed",
        kind="mixed",
        fired=sum(books.faults.values()),
        fired_by_kind=dict(books.faults),
        ready=ready,
        parked=len(failed),
        api_calls=api_calls(stats),
        calls_per_ready_track=round(api_calls(stats) / ready, 2),
        submit_calls=stats["batch_submit_calls"] + stats["create_calls"],
        polls=stats["batch_polls"] + stats["task_polls"],
        downloads=stats["downloads"],
        tasks=books.tasks_created,
        refunded_tasks=books.failed_tasks,
        paid_twice=books.paid_twice,
        possible_double_spend=report["possible_double_spend"],
        seconds=round(took, 1),
    )
