"""Load: 10,000 tracks in flight at once against the sandbox.

The daemon gets 10,000 tracks in 100 files with the in-flight cap at 10,000
and a generation time long enough that all of them are submitted before the
first finishes. While it submits and polls, the test samples the daemon's
resident memory from ``/proc`` and times ``reconciler status`` (the whole
command, as a person runs it, JSON and text) every few seconds, up to a
fixed time after the generations finish.

What must hold: memory stays bounded (peak RSS under ``RSS_LIMIT_MIB``), and
every fingerprint is paid for once, in ceil(N/10) submit calls. The status
times are recorded here; that they stay under a second is the business of
``test_status_answers_within_a_second_at_ten_thousand_tracks``, and how
fast 10,000 running tasks are polled that of the last test (both xfail,
see their reasons).
"""

from __future__ import annotations

import math
import statistics
import subprocess
import threading
import time
from pathlib import Path

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
#: Generation time: submitting the 1,000 batches must take less than this.
#: It takes 40 to 100 s on two cores, most of it in ledger.generations(),
#: which reads all 10,000 rows once per batch (see the suite's report).
LATENCY = 180.0
RSS_LIMIT_MIB = 200
STATUS_LIMIT = 1.0
STATUS_EVERY = 3.0
#: How long the test watches the daemon work once the generations finish.
WORK_WINDOW = 30.0


class Sampler(threading.Thread):
    """Samples the daemon's RSS every 0.2 s; every few seconds times ``status``, both forms."""

    def __init__(self, project: Project, reconciler: DaemonProc) -> None:
        super().__init__(daemon=True)
        self.project = project
        self.reconciler = reconciler
        self.stop = threading.Event()
        self.rss: list[int] = []
        self.json: list[float] = []
        self.text: list[float] = []

    def timed(self, *extra: str) -> float:
        """Seconds one ``status`` command takes (bytecode cached: see the conftest)."""
        begin = time.monotonic()
        proc = subprocess.run(
            [*self.project.args("status"), *extra],
            env=self.project.env(),
            capture_output=True,
            timeout=60,
            check=False,
        )
        took = time.monotonic() - begin
        assert proc.returncode in (0, 1), proc.stderr
        return took

    def run(self) -> None:
        self.timed("--json")  # fills the bytecode cache
        next_status = time.monotonic()
        while not self.stop.wait(0.2):
            self.rss.append(rss_kib(self.reconciler.pid))
            if time.monotonic() >= next_status:
                self.json.append(self.timed("--json"))
                self.text.append(self.timed())
                next_status = time.monotonic() + STATUS_EVERY


def _all_ready(p: Project) -> bool:
    return bool(p.status()["summary"]["ready"] == N_TRACKS)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ten_thousand_in_flight_bounded_memory_and_a_quick_status(
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
            deadline = started + LATENCY + WORK_WINDOW
            wait_until(lambda: time.monotonic() > deadline or _all_ready(p), LATENCY + WORK_WINDOW)
            took = time.monotonic() - started
        finally:
            sampler.stop.set()
            sampler.join()
        peak = int(
            next(
                line.split()[1]
                for line in Path(f"/proc/{d.pid}/status").read_text().splitlines()
                if line.startswith("VmHWM:")
            )
        )
        rss_end = rss_kib(d.pid)
        code, _ = d.stop()
        assert code == 0

    stats = p.stats()
    assert stats["tasks_created"] == N_TRACKS
    assert max(stats["tasks_by_fingerprint"].values()) == 1
    assert stats["batch_submit_calls"] == math.ceil(N_TRACKS / 10)
    report = p.status()
    ready = report["summary"]["ready"]
    assert assert_outputs_whole(p.out) == ready
    assert integrity(p.state) == "ok"

    figures.record(
        "load",
        "load",
        tracks=N_TRACKS,
        files=N_TRACKS // PER_FILE,
        latency=LATENCY,
        all_in_flight_after=round(all_in_flight, 1),
        watched=round(took, 1),
        ready_when_done=ready,
        peak_rss_mib=round(peak / 1024, 1),
        rss_in_flight_mib=round(rss_in_flight / 1024, 1),
        rss_end_mib=round(rss_end / 1024, 1),
        rss_samples=len(sampler.rss),
        status_calls=len(sampler.json),
        status_max=round(max(sampler.json), 2),
        status_median=round(statistics.median(sampler.json), 2),
        status_text_max=round(max(sampler.text), 2),
        status_text_median=round(statistics.median(sampler.text), 2),
        api_calls=api_calls(stats),
        batch_polls=stats["batch_polls"],
        downloads=stats["downloads"],
    )
    assert peak / 1024 < RSS_LIMIT_MIB, f"peak RSS {peak / 1024:.0f} MiB"
    assert len(sampler.json) >= 10


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="the text status takes 3.9 s at 10,000 tracks on an idle machine (12 s beside the "
    "load test's daemon): status.render draws a rich Table of every row; the JSON form, "
    "0.65 s idle and 2 s under load, spends 0.31 s in json.dumps(indent=2) (see the report)",
)
def test_status_answers_within_a_second_at_ten_thousand_tracks(
    tmp_path: Path, sandbox: SandboxControl, figures: Figures
) -> None:
    # A zero budget: the daemon runs a pass over the 10,000 every poll
    # interval (blocked, it keeps checking), and submits nothing.
    p = daemon_project(tmp_path, sandbox, poll=1.0)
    p.config.write_text(p.config.read_text().replace("[submit]\n", "[submit]\ndaily_budget = 0\n"))
    (p.specs / "big.yaml").write_text(big_spec(N_TRACKS))
    with DaemonProc(p) as d:
        d.wait_event("pass.completed", lambda e: e["total"] == N_TRACKS, timeout=60)
        sampler = Sampler(p, d)
        sampler.timed("--json")  # fills the bytecode cache
        json_times = [sampler.timed("--json") for _ in range(5)]
        text_times = [sampler.timed() for _ in range(5)]
        d.assert_running()
        code, _ = d.stop()
        assert code == 0
    figures.record(
        "load",
        "status",
        tracks=N_TRACKS,
        json_max=round(max(json_times), 2),
        text_max=round(max(text_times), 2),
    )
    assert max(json_times) < STATUS_LIMIT, json_times
    assert max(text_times) < STATUS_LIMIT, text_times


POLL_TRACKS = 2_000
POLL_INTERVAL = 2.0


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.xfail(
    strict=True,
    reason="reconciling.py _record reads every generation (ledger.generations(), ~3 ms per "
    "1,000 rows) for each polled task that is not done: a pass over N running tasks costs "
    "O(N^2), about 15 s at 2,000 and 300 s at 10,000 (see the suite's report)",
)
def test_a_poll_pass_over_two_thousand_running_tasks_is_quick(
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
        mark = d.mark()
        d.wait_event("pass.completed", after=mark, timeout=120)
        d.wait_event("pass.completed", after=d.mark(), timeout=120)
        passes = [e for e in d.named("pass.completed") if e["polls"]][-2:]
        code, _ = d.stop()
        assert code == 0
    # Two passes that polled, back to back: the gap is the wait plus one pass.
    gap = log_time(passes[1]) - log_time(passes[0])
    figures.record(
        "load", "poll_pass", tasks=POLL_TRACKS, polls=passes[1]["polls"], gap=round(gap, 2)
    )
    assert first["in_flight"] == POLL_TRACKS
    assert gap - POLL_INTERVAL < 3.0, f"a poll pass over {POLL_TRACKS} tasks took {gap:.1f} s"
