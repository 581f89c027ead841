"""Load: 10,000 tracks in flight at once against the sandbox.

The daemon gets 10,000 tracks in 100 files with the in-flight cap at 10,000
and a generation time long enough that all of them are submitted before the
first finishes. Until every track is ready, the test samples the daemon's
resident memory from ``/proc`` and runs ``reconciler status`` (the whole
command, as a person runs it, JSON and text) every few seconds.

What must hold: memory stays bounded (peak RSS under ``RSS_LIMIT_MIB``, a
safety net well above what the daemon needs), ``status`` answers every time
while the daemon works, every fingerprint is paid for once in ceil(N/10)
submit calls, and every track ends ready.

How fast ``status`` is, or a poll pass, is not asserted here: on a shared
machine a time limit fails whenever the neighbours are busy. Those figures
are measured by ``bench/status_cost.py`` (and ``bench/overhead.py``) and
recorded in ``bench/RESULTS.md`` with the commit measured.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from reconciler.sandbox import SandboxControl
from tests.daemonproc import DaemonProc, daemon_project
from tests.project import Project, track, wait_until
from tests.reliability.support import (
    Figures,
    api_calls,
    assert_outputs_whole,
    big_spec,
    integrity,
    log_time,
    rss_kib,
)

N_TRACKS = 10_000
PER_FILE = 100
#: Generation time: submitting the 1,000 batches takes well under this (11 s).
LATENCY = 60.0
#: How long converging may go on without one more download or track ready:
#: the first generations finish ``LATENCY`` after their submit.
STALL_LIMIT = 3 * LATENCY
#: A safety net against unbounded growth, not a target: the daemon peaks at
#: about 110-125 MiB here, and issue 5's 150 MB target at 10,000 tracks is
#: measured by ``bench/overhead.py``.
RSS_LIMIT_MIB = 200
STATUS_EVERY = 3.0


def text_status(project: Project) -> str:
    """The text ``status``, which must answer (exit 0, or 1 when something failed)."""
    proc = project.cli("status")
    assert proc.returncode in (0, 1), proc.stderr
    return proc.stdout


class Sampler(threading.Thread):
    """Samples the daemon's RSS every 0.2 s; every few seconds runs ``status``, both forms."""

    def __init__(self, project: Project, reconciler: DaemonProc) -> None:
        super().__init__(daemon=True)
        self.project = project
        self.reconciler = reconciler
        self.stop = threading.Event()
        self.rss: list[int] = []
        #: (tracks in the JSON report, the text form's summary line), per round.
        self.answers: list[tuple[int, str]] = []
        #: What went wrong in this thread, for the test to report.
        self.failures: list[str] = []

    def run(self) -> None:
        next_status = time.monotonic()
        while not self.stop.wait(0.2):
            self.rss.append(rss_kib(self.reconciler.pid))
            if time.monotonic() >= next_status:
                json_form = self.project.cli("status", "--json")
                text_form = self.project.cli("status")
                try:
                    assert {json_form.returncode, text_form.returncode} <= {0, 1}
                    report = json.loads(json_form.stdout)
                    summary = next(x for x in text_form.stdout.splitlines() if " tracks: " in x)
                except (AssertionError, ValueError, StopIteration) as exc:
                    self.failures.append(
                        f"{exc!r}; exit codes {json_form.returncode}/{text_form.returncode}; "
                        f"stderr: {json_form.stderr[-500:]!r} / {text_form.stderr[-500:]!r}; "
                        f"text ends {text_form.stdout[-300:]!r}"
                    )
                else:
                    self.answers.append((report["summary"]["tracks"], summary))
                next_status = time.monotonic() + STATUS_EVERY


def peak_rss_kib(pid: int) -> int:
    """The high-water mark of a process's RSS (``VmHWM``), from ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


def wait_all_ready(p: Project, daemon: DaemonProc) -> None:
    """Until every track is ready, asking ``status`` every few seconds.

    It fails when nothing has moved for ``STALL_LIMIT`` seconds (no clip
    downloaded, no track ready), not after a total time: on a busy machine
    converging takes longer, but never stands still. (A pass downloads many
    clips before it writes their files, so ``ready`` alone moves in steps.)
    """
    last, since = None, time.monotonic()
    while (summary := p.status()["summary"])["ready"] < N_TRACKS:
        daemon.assert_running()
        progress = (summary["ready"], p.stats()["downloads"])
        if progress != last:
            last, since = progress, time.monotonic()
        elif time.monotonic() - since > STALL_LIMIT:
            raise AssertionError(
                f"nothing downloaded or ready for {STALL_LIMIT:.0f} s: {summary}, "
                f"{progress[1]} downloads"
            )
        time.sleep(STATUS_EVERY)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 200 s on an idle machine; the stall limit catches a hang first
def test_ten_thousand_in_flight_bounded_memory_and_status_answers(
    tmp_path: Path, sandbox: SandboxControl, figures: Figures
) -> None:
    p = daemon_project(tmp_path, sandbox, poll=5.0, window=1.0)
    p.config.write_text(
        p.config.read_text().replace("[submit]\n", "[submit]\nmax_in_flight = 10000\n")
    )
    for f in range(N_TRACKS // PER_FILE):
        p.write_spec(
            f"load-{f:03d}.yaml",
            [track(f"t{i:03d}", f"load {f} {i}") for i in range(PER_FILE)],
        )
    # 15 credits a task: the fixture's 100,000 pay for only 6,666 of them.
    sandbox.configure(latency=LATENCY, credits=15 * N_TRACKS)
    started = time.monotonic()
    with DaemonProc(p) as d:
        sampler = Sampler(p, d)
        sampler.start()
        try:
            # All submitted before the first finishes: 10,000 in flight at once,
            # by the sandbox's count and by the ledger's.
            wait_until(lambda: p.stats()["tasks_created"] == N_TRACKS, LATENCY, "all submitted")
            assert p.status()["summary"]["generating"] == N_TRACKS
            all_in_flight = time.monotonic() - started
            rss_in_flight = rss_kib(d.pid)
            wait_all_ready(p, d)
            converged = time.monotonic() - started
        finally:
            sampler.stop.set()
            sampler.join()
        peak = peak_rss_kib(d.pid)
        rss_end = rss_kib(d.pid)
        code, _ = d.stop()
        assert code == 0

    stats = p.stats()
    assert stats["tasks_created"] == N_TRACKS
    assert max(stats["tasks_by_fingerprint"].values()) == 1
    assert stats["batch_submit_calls"] == math.ceil(N_TRACKS / 10)
    assert assert_outputs_whole(p.out) == N_TRACKS
    assert integrity(p.state) == "ok"
    figures.record(
        "load",
        "load",
        tracks=N_TRACKS,
        files=N_TRACKS // PER_FILE,
        latency=LATENCY,
        all_in_flight_after=round(all_in_flight, 1),
        converged_after=round(converged, 1),
        peak_rss_mib=round(peak / 1024, 1),
        rss_in_flight_mib=round(rss_in_flight / 1024, 1),
        rss_end_mib=round(rss_end / 1024, 1),
        rss_samples=len(sampler.rss),
        status_calls=len(sampler.answers),
        api_calls=api_calls(stats),
        batch_polls=stats["batch_polls"],
        downloads=stats["downloads"],
    )
    assert peak / 1024 < RSS_LIMIT_MIB, f"peak RSS {peak / 1024:.0f} MiB"
    # status answered all along, both forms, and at the end saw every track.
    assert not sampler.failures, sampler.failures
    assert len(sampler.answers) >= 10
    assert all(tracks <= N_TRACKS for tracks, _ in sampler.answers)
    assert sampler.answers[-1][0] == N_TRACKS


@pytest.mark.slow
def test_status_reports_ten_thousand_queued_tracks_beside_a_working_daemon(
    tmp_path: Path, sandbox: SandboxControl
) -> None:
    # A zero budget: the daemon runs a pass over the 10,000 every poll
    # interval (blocked, it keeps checking), and submits nothing.
    p = daemon_project(tmp_path, sandbox, poll=1.0)
    p.config.write_text(p.config.read_text().replace("[submit]\n", "[submit]\ndaily_budget = 0\n"))
    (p.specs / "big.yaml").write_text(big_spec(N_TRACKS))
    with DaemonProc(p) as d:
        d.wait_event("pass.completed", lambda e: e["total"] == N_TRACKS, timeout=60)
        report = p.status()
        text = text_status(p)
        selected = p.status("big/t01234")
        d.assert_running()
        code, _ = d.stop()
        assert code == 0
    assert report["summary"] == {
        "tracks": N_TRACKS,
        "ready": 0,
        "restoring": 0,
        "generating": 0,
        "queued": N_TRACKS,
        "retrying": 0,
        "failed": 0,
        "invalid": 0,
    }
    assert report["submit_block"], "status says why nothing is submitted"
    assert report["credits"]["budget_left"] == 0
    assert len(text.splitlines()) > N_TRACKS
    assert f"\n{N_TRACKS} tracks: {N_TRACKS} queued\n" in text
    assert [(t["soundtrack"], t["track"]) for t in selected["tracks"]] == [("big", "t01234")]
    assert selected["summary"]["tracks"] == 1


POLL_TRACKS = 2_000
POLL_INTERVAL = 2.0


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_daemon_keeps_polling_two_thousand_running_tasks(
    tmp_path: Path, sandbox: SandboxControl, figures: Figures
) -> None:
    p = daemon_project(tmp_path, sandbox, poll=POLL_INTERVAL, window=1.0)
    p.config.write_text(
        p.config.read_text().replace("[submit]\n", "[submit]\nmax_in_flight = 10000\n")
    )
    for f in range(POLL_TRACKS // PER_FILE):
        p.write_spec(
            f"poll-{f:03d}.yaml", [track(f"t{i:03d}", f"poll {f} {i}") for i in range(PER_FILE)]
        )
    # Long enough that every poll below finds every task still running.
    sandbox.configure(latency=240.0)
    with DaemonProc(p) as d:
        first = d.wait_event("pass.completed", lambda e: e["in_flight"] == POLL_TRACKS, timeout=120)

        def polling() -> list[dict[str, Any]]:
            return [e for e in d.named("pass.completed") if e["polls"]]

        wait_until(lambda: len(polling()) >= 2, 120, "two passes that polled")
        passes = polling()[:2]
        code, _ = d.stop()
        assert code == 0
    # Two passes that polled, back to back: the gap is the wait plus one pass.
    # Recorded for the results table, not asserted (see the module docstring).
    gap = log_time(passes[1]) - log_time(passes[0])
    figures.record(
        "load", "poll_pass", tasks=POLL_TRACKS, polls=passes[1]["polls"], gap=round(gap, 2)
    )
    assert first["in_flight"] == POLL_TRACKS
    assert all(e["in_flight"] == POLL_TRACKS for e in passes)
