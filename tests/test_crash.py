"""Rule 2 under SIGKILL: kill `reconciler sync` before, during and after submits
and during downloads, restart it each time, and prove from the sandbox's own
counters that nothing was paid twice except what `status` reports as possible
double spend, that every track ends ready and that no partial file ever sits
under an output name.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from reconciler.audio import probe_audio
from reconciler.durable import TEMP_PREFIX
from reconciler.sandbox import SandboxControl
from tests.project import Project, track, wait_until

N_TRACKS = 40


def outputs_are_whole(p: Project) -> None:
    """Every file under an output name decodes in full; temps are hidden names."""
    for path in p.out.rglob("*.mp3"):
        assert not path.name.startswith(TEMP_PREFIX)
        assert probe_audio(path) > 0, path


def start(p: Project) -> subprocess.Popen[str]:
    return subprocess.Popen(
        p.args("sync"),
        env=p.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def test_sigkill_at_every_stage_never_pays_twice_silently(
    tmp_path: Path, sandbox: SandboxControl
) -> None:
    p = Project(tmp_path, sandbox, extra_config="")
    # One batch in flight at a time spreads the submits over the run, so kills
    # land between them; a longer generation gives downloads a window too.
    p.config.write_text(
        p.config.read_text().replace("[submit]\n", "[submit]\nmax_in_flight = 10\n")
    )
    sandbox.configure(latency=0.6)
    p.write_spec("mix.yaml", [track(f"t{i:02d}", f"ambient texture {i}") for i in range(N_TRACKS)])

    def submits() -> int:
        return int(sandbox.stats()["batch_submit_calls"])

    def downloads() -> int:
        return int(sandbox.stats()["downloads"])

    kills = 0
    for round_ in range(2):
        # Before any submit of this run: right after start-up.
        proc = start(p)
        time.sleep(0.05 * (round_ + 1))  # a kill point, not a wait for a condition
        kill(proc)
        kills += 1
        outputs_are_whole(p)

        # During a submit: the sandbox has processed it but holds the answer.
        n = submits()
        sandbox.configure(
            faults=[{"kind": "slow", "endpoints": ["batch_submit"], "at": [1], "delay": 5.0}]
        )
        proc = start(p)
        wait_until(lambda n=n: submits() > n, 30, "a submit to reach the sandbox")
        kill(proc)
        kills += 1
        sandbox.configure(faults=[])
        outputs_are_whole(p)

        # Just after a submit was answered.
        n = submits()
        proc = start(p)
        wait_until(lambda n=n: submits() > n, 30, "a submit")
        time.sleep(0.05)  # a kill point just past the answer
        kill(proc)
        kills += 1
        outputs_are_whole(p)

        # During downloads.
        d = downloads()
        proc = start(p)
        wait_until(lambda d=d: downloads() > d, 30, "a download to start")
        kill(proc)
        kills += 1
        outputs_are_whole(p)

    final = p.cli("sync", timeout=120)
    assert final.returncode == 0, final.stderr[-3000:]
    outputs_are_whole(p)
    assert kills == 8

    report = p.status()
    assert report["summary"]["ready"] == N_TRACKS
    by_fp = sandbox.stats()["tasks_by_fingerprint"]
    assert len(by_fp) == N_TRACKS
    doubles = sum(n - 1 for n in by_fp.values())
    assert report["ambiguous_submits"] >= 2
    assert doubles == report["possible_double_spend"], (doubles, report)
    assert not list(p.out.rglob(f"{TEMP_PREFIX}*"))

    db = sqlite3.connect(p.state / "ledger.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
