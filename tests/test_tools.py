"""The operator commands end to end: describe, events, status --watch, suspend/resume, trash.

Real CLI subprocesses against the real sandbox and a real ledger; the
followers (``status --watch``, ``events --follow``) and the suspension run
against a real ``reconciler run`` daemon. Waits are on output lines, log
events and files, with deadlines.
"""

from __future__ import annotations

import itertools
import json
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from reconciler.sandbox import SandboxControl
from tests.daemonproc import DaemonProc, daemon_project
from tests.project import Project, track, wait_until


def tool_args(project: Project, command: str) -> list[str]:
    """The command line of an operator command: folders and config, no API options."""
    return [
        sys.executable, "-m", "reconciler", *command.split(),
        "--specs", str(project.specs), "--out", str(project.out),
        "--state", str(project.state), "--config", str(project.config),
    ]  # fmt: skip


def tool(project: Project, command: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*tool_args(project, command), *extra],
        env=project.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


class Follower:
    """A long-running CLI subprocess whose stdout lines are collected as they come."""

    def __init__(self, project: Project, command: str, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [*tool_args(project, command), *extra],
            env=project.env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, what: str, predicate: Any, timeout: float = 30) -> Any:
        def check() -> Any:
            if self.proc.poll() is not None:
                assert self.proc.stderr is not None
                raise AssertionError(f"exited {self.proc.returncode}: {self.proc.stderr.read()}")
            return predicate(list(self.lines))

        return wait_until(check, timeout, what)

    def stop(self, sig: int) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def project(tmp_path: Path, sandbox: SandboxControl) -> Project:
    return Project(tmp_path, sandbox)


def test_describe_tells_where_a_track_comes_from_and_what_it_cost(project: Project) -> None:
    project.write_spec("study.yaml", [track("intro", "piano"), track("focus", "lofi beats")])
    project.sync()
    proc = tool(project, "describe", "study/focus", "--json")
    assert proc.returncode == 0, proc.stderr
    d = json.loads(proc.stdout)
    assert d["spec"]["file"] == str(project.specs / "study.yaml")
    # The second track's `- name:` line in the YAML that write_spec produced.
    lines = (project.specs / "study.yaml").read_text().splitlines()
    assert lines[d["spec"]["line"] - 1].strip() == "- name: focus"
    assert d["request"] == {
        "custom_mode": False,
        "gpt_description_prompt": "lofi beats",
        "mv": "sonic-v5",
    }
    [row] = [t for t in project.status()["tracks"] if t["track"] == "focus"]
    assert d["fingerprint"] == row["fingerprint"]
    [attempt] = d["attempts"]
    assert attempt["credits"] == 15
    assert attempt["outcome"] == "succeeded"
    assert attempt["batch_id"]
    assert attempt["task_id"]
    current = [c for c in d["clips"] if c["current"]]
    assert current
    assert all(c["state"] == "succeeded" for c in current)
    [output] = d["outputs"]
    assert output["path"] == str(project.out / "study" / "focus.mp3")
    assert output["exists"]
    assert output["checksum_ok"]
    assert output["verdict"] == "ok"
    names = [e["event"] for e in d["events"]]
    assert names[0] == "track.desired"
    assert names[-1] == "output.written"
    assert [e["id"] for e in d["events"]] == sorted(e["id"] for e in d["events"])

    # A deleted output says so; the text form names the file and line.
    (project.out / "study" / "focus.mp3").unlink()
    d = json.loads(tool(project, "describe", "study/focus", "--json").stdout)
    assert d["outputs"][0]["exists"] is False
    assert d["outputs"][0]["verdict"].startswith("missing")
    text = tool(project, "describe", "study/focus")
    assert text.returncode == 0
    assert f"study.yaml:{d['spec']['line']}" in text.stdout
    assert "credits 15" in text.stdout

    typo = tool(project, "describe", "study/focsu")
    assert typo.returncode == 1
    assert "did you mean 'study/focus'?" in typo.stderr


def test_events_filters_by_track_and_time(project: Project) -> None:
    project.write_spec("study.yaml", [track("focus", "lofi beats")])
    project.write_spec("road.yaml", [track("drive", "synthwave")])
    project.sync()
    proc = tool(project, "events", "--json", "study/focus")
    assert proc.returncode == 0, proc.stderr
    found = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {"track.desired", "task.accepted", "task.succeeded", "output.written"} <= {
        e["event"] for e in found
    }
    assert all(e["soundtrack"] in ("study", None) for e in found)
    assert "road" not in proc.stdout
    every = tool(project, "events").stdout.splitlines()
    assert len(every) > len(found)
    assert any("road/drive" in line for line in every)
    assert tool(project, "events", "--since", "1h").stdout.splitlines() == every
    assert tool(project, "events", "--since", "bogus").returncode == 2
    unknown = tool(project, "events", "stduy")
    assert unknown.returncode == 1
    assert "did you mean 'study'?" in unknown.stderr


def test_watch_and_follow_see_a_track_become_ready_under_a_running_daemon(
    tmp_path: Path, sandbox: SandboxControl
) -> None:
    project = daemon_project(tmp_path, sandbox)
    # Slow enough that the followers see the track generating before it is ready.
    sandbox.configure(latency=2.0)
    project.write_spec("study.yaml", [track("intro", "piano")])
    with DaemonProc(project) as daemon:
        daemon.converged()
        watcher = Follower(project, "status", "--watch", "--interval", "0.2")
        events = Follower(project, "events", "--follow")
        try:
            watcher.wait_for("a first table", lambda ls: any("study" in x for x in ls))
            events.wait_for(
                "the first track's events",
                lambda ls: any("output.written  study/intro" in x for x in ls),
            )
            project.write_spec("study.yaml", [track("intro", "piano"), track("focus", "lofi")])

            def focus_states(lines: list[str]) -> list[str]:
                return [x.split()[2] for x in lines if x.startswith("study") and " focus " in x]

            watcher.wait_for(
                "focus generating, then ready",
                lambda ls: (
                    "ready" in focus_states(ls)
                    and focus_states(ls).index("ready") > 0
                    and set(focus_states(ls)[: focus_states(ls).index("ready")])
                    <= {"queued", "generating"}
                ),
            )
            events.wait_for(
                "focus accepted, then written",
                lambda ls: (
                    sum("task.accepted" in x for x in ls) == 2
                    and any("output.written  study/focus" in x for x in ls)
                ),
            )
            # Into a pipe, a table is printed only when something changed
            # (the time it was printed and the ages aside).
            tables = [
                re.sub(r"\b\d+[smhd]\b", "", t.split("\n", 1)[1])
                for t in "\n".join(watcher.lines).split("--- ")[1:]
            ]
            assert all(a != b for a, b in itertools.pairwise(tables))
            assert watcher.stop(signal.SIGINT) == 0
            assert events.stop(signal.SIGTERM) == 0
        finally:
            watcher.kill()
            events.kill()
        accepted = [x for x in events.lines if "task.accepted" in x]
        written = [x for x in events.lines if "output.written  study/focus" in x]
        assert events.lines.index(accepted[-1]) < events.lines.index(written[0])


def test_suspend_holds_new_submissions_of_a_running_daemon_until_resume(
    tmp_path: Path, sandbox: SandboxControl
) -> None:
    project = daemon_project(tmp_path, sandbox)
    project.write_spec("a.yaml", [track("one", "piano")])
    project.write_spec("b.yaml", [track("two", "lofi")])
    daemon = DaemonProc(project)
    try:
        daemon.start()
        daemon.converged()
        assert tool(project, "suspend", "aa").returncode == 1
        proc = tool(project, "suspend", "a")
        assert proc.returncode == 0, proc.stderr
        before = project.stats()["tasks_created"]
        mark = daemon.mark()
        project.write_spec("a.yaml", [track("one", "piano"), track("new", "harp")])
        project.write_spec("b.yaml", [track("two", "lofi"), track("more", "drums")])
        # b goes on; the pass after that reports a's track held back.
        wait_until((project.out / "b" / "more.mp3").exists, 30, "b's new track written")
        daemon.wait_event(
            "pass.completed", lambda e: "suspended" in (e.get("blocked") or ""), after=mark
        )
        assert project.stats()["tasks_created"] == before + 1
        status = project.status()
        assert status["suspended"] == {"all": False, "soundtracks": ["a"]}
        [held] = [t for t in status["tracks"] if t["track"] == "new"]
        assert (held["state"], held["reason"]) == ("queued", "suspended")
        plan = project.cli("plan", "--json")
        assert json.loads(plan.stdout)["suspended"]["held"][0]["tracks"] == ["a/new"]

        # It survives a restart: the new daemon holds it back too.
        code, _ = daemon.stop()
        assert code == 0
        daemon = DaemonProc(project, name="daemon2").start()
        daemon.wait_event("pass.completed", lambda e: "suspended" in (e.get("blocked") or ""))
        assert project.stats()["tasks_created"] == before + 1

        proc = tool(project, "resume", "a")
        assert proc.returncode == 0, proc.stderr
        daemon.converged()
        assert project.stats()["tasks_created"] == before + 2
        assert project.status()["suspended"] == {"all": False, "soundtracks": []}
        code, _ = daemon.stop()
        assert code == 0
    finally:
        daemon.__exit__()


def test_suspend_everything_then_sync_stops_and_says_why(project: Project) -> None:
    project.write_spec("a.yaml", [track("one", "piano")])
    assert tool(project, "suspend").returncode == 0
    proc = project.sync(expect=1)
    assert "suspended" in proc.stdout + proc.stderr
    assert project.stats()["tasks_created"] == 0
    assert tool(project, "resume").returncode == 0
    project.sync()
    assert project.stats()["tasks_created"] == 1


def test_trash_list_and_restore_after_a_prune(project: Project) -> None:
    project.write_spec("keep.yaml", [track("stay", "piano")])
    project.write_spec("drop.yaml", [track("one", "lofi"), track("two", "harp")])
    project.sync()
    one = (project.out / "drop" / "one.mp3").read_bytes()
    (project.specs / "drop.yaml").unlink()
    project.sync("--prune")
    assert not (project.out / "drop" / "one.mp3").exists()

    listing = tool(project, "trash list", "--json")
    assert listing.returncode == 0, listing.stderr
    entries = {e["path"]: e for e in json.loads(listing.stdout)["trash"]}
    one_path = str(project.out / "drop" / "one.mp3")
    two_path = str(project.out / "drop" / "two.mp3")
    assert {one_path, two_path} <= set(entries)
    assert entries[one_path]["size"] == len(one)
    assert entries[one_path]["emptied_after"] > entries[one_path]["moved_at"]
    assert one_path in tool(project, "trash list").stdout

    proc = tool(project, "trash restore", one_path)
    assert proc.returncode == 0, proc.stderr
    assert (project.out / "drop" / "one.mp3").read_bytes() == one
    again = tool(project, "trash restore", one_path)
    assert again.returncode == 1
    assert "in the trash" in again.stderr

    # Never overwrites: a file now at the original path stays as it is.
    (project.out / "drop" / "two.mp3").write_bytes(b"mine")
    refused = tool(project, "trash restore", "drop/two.mp3")
    assert refused.returncode == 1
    assert "exists" in refused.stderr
    assert (project.out / "drop" / "two.mp3").read_bytes() == b"mine"
    left = [e["path"] for e in json.loads(tool(project, "trash list", "--json").stdout)["trash"]]
    assert two_path in left
    assert one_path not in left


def test_describe_prints_a_request_as_written(project: Project) -> None:
    """Not as rich markup: lyrics hold section tags, and "[/x]" crashed rich."""
    prompt = "[verse] [/x] la la"
    project.write_spec("study.yaml", [track("intro", prompt)])
    project.sync()
    proc = tool(project, "describe", "study/intro")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert prompt in proc.stdout


def test_describe_counts_no_credits_for_a_rejected_attempt(project: Project) -> None:
    project.sandbox.configure(
        faults=[{"kind": "reject", "every": 1, "type": "forbidden", "error": "copyrighted"}]
    )
    project.write_spec("study.yaml", [track("focus", "lofi beats")])
    project.sync(expect=1)
    d = json.loads(tool(project, "describe", "study/focus", "--json").stdout)
    [attempt] = d["attempts"]
    assert attempt["credits"] == 0
    assert attempt["task_id"] is None
    assert attempt["outcome"].startswith("rejected: ")
    assert "copyrighted" in attempt["outcome"]
    assert d["generation"]["state"] == "parked"
    assert d["outputs"][0]["verdict"] == "not written yet"


def test_a_shared_generation_shows_under_both_tracks_but_not_their_files(project: Project) -> None:
    project.write_spec("a.yaml", [track("x", "same prompt")])
    project.write_spec("b.yaml", [track("y", "same prompt")])
    project.sync()
    assert project.stats()["tasks_created"] == 1
    for mine, other in (("a/x", "b/y"), ("b/y", "a/x")):
        lines = tool(project, "events", mine).stdout.splitlines()
        assert any("task.accepted" in line for line in lines)
        assert any(f"output.written  {mine}" in line for line in lines)
        assert not any(other in line for line in lines)
        d = json.loads(tool(project, "describe", mine, "--json").stdout)
        assert len(d["attempts"]) == 1
        assert {(e["soundtrack"], e["track"]) for e in d["events"]} <= {
            (None, None),
            tuple(mine.split("/")),
        }
