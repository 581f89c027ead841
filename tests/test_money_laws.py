"""The money rules, each proven against the sandbox's books.

Real CLI subprocesses, the real sandbox over loopback, real files. What the
sandbox charged is the truth; the ledger's counts and the user's ceilings must
agree with it, also when answers are lost.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from reconciler.sandbox import SandboxControl
from tests.daemonproc import DaemonProc, daemon_project
from tests.project import Project, track

DROP_FIRST_SUBMIT = {"kind": "drop_response", "at": [1], "endpoints": ["batch_submit"]}


@pytest.fixture
def project(tmp_path: Path, sandbox: SandboxControl) -> Project:
    return Project(tmp_path, sandbox)


def tracks(n: int) -> list[dict[str, str]]:
    return [track(f"t{i}", f"glass harmonica {i}") for i in range(n)]


def set_in_section(project: Project, section: str, line: str) -> None:
    """Add ``line`` to a section the test config already has (TOML allows one)."""
    text = project.config.read_text()
    assert f"[{section}]\n" in text
    project.config.write_text(text.replace(f"[{section}]\n", f"[{section}]\n{line}\n", 1))


def test_the_daily_budget_holds_when_a_submit_answer_is_lost(
    project: Project, sandbox: SandboxControl
) -> None:
    set_in_section(project, "submit", "daily_budget = 210")
    sandbox.configure(faults=[DROP_FIRST_SUBMIT])
    project.write_spec("mix.yaml", tracks(20))

    project.sync(expect=1)

    stats = sandbox.stats()
    # 10 charged whose answer was lost count as spent: only 4 more fit 210.
    assert stats["credits_charged"] <= 210
    assert stats["tasks_created"] == 14
    report = project.status()
    assert report["credits"]["spent_today"] >= stats["credits_charged"]
    assert "daily budget" in (report["submit_block"] or "")


def test_max_credits_is_a_ceiling_for_the_run(project: Project, sandbox: SandboxControl) -> None:
    sandbox.configure(faults=[DROP_FIRST_SUBMIT])
    project.write_spec("mix.yaml", tracks(20))

    proc = project.sync("--max-credits", "100", expect=1)

    assert sandbox.stats()["credits_charged"] <= 100
    assert "--max-credits reached" in proc.stderr


@pytest.mark.parametrize(("allowance", "tasks", "doubles"), [(0, 1, 0), (1, 2, 1)])
def test_resubmits_after_lost_answers_are_held_to_the_allowance(
    project: Project, sandbox: SandboxControl, allowance: int, tasks: int, doubles: int
) -> None:
    set_in_section(project, "submit", f"max_resubmits_per_fingerprint = {allowance}")
    # Every answer is lost: without a ceiling this would pay on every grace period.
    sandbox.configure(
        faults=[{"kind": "drop_response", "rate": 1.0, "endpoints": ["batch_submit"]}]
    )
    project.write_spec("mix.yaml", tracks(1))

    project.sync(expect=1)

    stats = sandbox.stats()
    assert stats["tasks_created"] == tasks
    report = project.status()
    assert report["possible_double_spend"] == doubles
    (row,) = report["tracks"]
    assert row["state"] == "failed"
    assert "not sent again on its own" in row["reason"]


def test_a_paused_sync_sends_only_the_due_polls(project: Project, sandbox: SandboxControl) -> None:
    # Two tasks' worth of credits and five tracks: submissions pause while
    # the two run for a while.
    sandbox.configure(credits=30, latency=2.0)
    project.write_spec("mix.yaml", tracks(5))

    started = time.monotonic()
    project.sync(expect=1)
    elapsed = time.monotonic() - started

    stats = sandbox.stats()
    assert stats["tasks_created"] == 2
    interval = 0.1  # FAST_CONFIG's poll interval
    polls_due = elapsed / interval + 3
    assert stats["credit_calls"] <= polls_due
    assert stats["batch_polls"] + stats["task_polls"] <= polls_due


def test_a_task_short_of_clips_writes_what_arrived_and_fewer_clips_reuse_it(
    project: Project, sandbox: SandboxControl
) -> None:
    sandbox.configure(faults=[{"kind": "clip_failed", "at": [1]}])
    project.write_spec("mix.yaml", [track("duo", "bagpipes at sea", clips=2)])

    project.sync(expect=1)

    assert (project.out / "mix" / "duo.mp3").is_file()
    assert not (project.out / "mix" / "duo-2.mp3").exists()
    (row,) = project.status()["tracks"]
    assert row["state"] == "failed"
    assert "1 of the 2 clips" in row["reason"]

    project.write_spec("mix.yaml", [track("duo", "bagpipes at sea", clips=1)])
    project.sync()
    assert sandbox.stats()["tasks_created"] == 1, "the clip paid for is reused"
    (row,) = project.status()["tracks"]
    assert row["state"] == "ready"


def test_plan_shows_the_cost_against_the_balance_and_the_budget(
    project: Project, sandbox: SandboxControl
) -> None:
    set_in_section(project, "submit", "daily_budget = 45")
    sandbox.configure(credits=60)
    project.write_spec("mix.yaml", tracks(5))

    proc = project.cli("plan", "--json")

    assert proc.returncode == 2, proc.stderr
    report = json.loads(proc.stdout)
    # The budget admits three now; the other two are held back, and say why.
    assert (report["credits"], report["credits_queued"], report["balance"]) == (45, 75, 60)
    assert [h["reason"] for h in report["held"]] == ["budget", "budget"]
    assert report["budget"] == {"daily_budget": 45, "spent_today": 0}
    budget, balance = report["warnings"]
    assert "more than the 45 left of today's budget" in budget
    assert "more than the account's balance of 60" in balance
    assert sandbox.stats()["tasks_created"] == 0, "plan spends nothing"
    # Without a key, plan still works: it cannot know the balance.
    env = {k: v for k, v in project.env().items() if k != "MUSICAPI_KEY"}
    keyless = subprocess.run(
        [*project.args("plan"), "--json"], env=env, capture_output=True, text=True, check=False
    )
    assert json.loads(keyless.stdout)["balance"] is None
    text = subprocess.run(
        project.args("plan"), env=env, capture_output=True, text=True, check=False
    ).stdout
    assert "account balance: unknown" in text


def test_the_daemon_pays_nothing_while_its_output_folder_cannot_take_audio(
    tmp_path: Path, sandbox: SandboxControl
) -> None:
    project = daemon_project(tmp_path, sandbox)
    project.write_spec("mix.yaml", tracks(1))
    with DaemonProc(project) as d:
        d.converged()
        # The output folder is replaced by a file while the daemon runs.
        shutil.rmtree(project.out)
        project.out.write_text("not a folder\n")
        mark = d.mark()
        project.write_spec("mix.yaml", tracks(3))
        refused = d.wait_event("submit.refused_layout", after=mark)
        assert str(project.out) in " ".join(refused["problems"])
        d.wait_event("pass.completed", lambda e: e["blocked"] is not None, after=mark)
        assert sandbox.stats()["tasks_created"] == 1
        # Fixed by a person: the next pass (a file event) submits.
        project.out.unlink()
        project.write_spec("mix.yaml", [*tracks(3), track("extra", "one more")])
        d.converged()
        code, _ = d.stop()
        assert code == 0
    assert sandbox.stats()["tasks_created"] == 4


def test_a_raised_budget_takes_effect_on_reload_not_tomorrow(
    tmp_path: Path, sandbox: SandboxControl
) -> None:
    project = daemon_project(tmp_path, sandbox)
    set_in_section(project, "submit", "daily_budget = 30")
    project.write_spec("mix.yaml", tracks(4))
    with DaemonProc(project) as d:
        d.wait_event("submit.paused", lambda e: "daily budget" in e["reason"])
        d.wait_event("pass.completed", lambda e: e["ready"] == 2)
        assert sandbox.stats()["tasks_created"] == 2
        project.config.write_text(
            project.config.read_text().replace("daily_budget = 30", "daily_budget = 60")
        )
        d.send(signal.SIGHUP)
        d.converged()
        code, _ = d.stop()
        assert code == 0
    assert sandbox.stats()["tasks_created"] == 4


def test_a_key_refused_when_asking_the_balance_is_reported_as_such(
    project: Project, sandbox: SandboxControl
) -> None:
    """Not as an empty account: the 401 alert, not the credits one, must fire."""
    sandbox.configure(faults=[{"kind": "unauthorized", "rate": 1.0, "endpoints": ["credits"]}])
    project.write_spec("mix.yaml", tracks(2))

    proc = project.cli("sync", timeout=15)
    assert proc.returncode == 1, proc.stderr[-3000:]

    assert sandbox.stats()["tasks_created"] == 0
    assert "API key rejected (401)" in proc.stderr
    assert "balance too low" not in proc.stderr
    assert "API key rejected (401)" in (project.status()["submit_block"] or "")
