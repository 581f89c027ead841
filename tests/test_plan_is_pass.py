"""``plan`` is the pass, proven against the sandbox's books.

What ``reconciler plan`` lists as submitted now is what the next ``sync``
submits first, call by call (the sandbox books every submit call's charged
items in order), and what it holds back is not sent for the reasons it gives.
Saved plans: ``apply`` carries out exactly the saved plan, or refuses and
spends nothing. Real CLI subprocesses, the real sandbox, real files; the
reading of plan files and the comparison ``apply`` makes are tables.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from reconciler.applying import VERSION, load_plan, what_changed
from reconciler.errors import PlanFileError
from reconciler.ledger import Ledger
from reconciler.sandbox import SandboxControl
from reconciler.sandbox.state import fingerprint as books_key
from tests.daemonproc import DaemonProc, daemon_project
from tests.project import Project, track


@pytest.fixture
def project(tmp_path: Path, sandbox: SandboxControl) -> Project:
    return Project(tmp_path, sandbox)


def tracks(prefix: str, n: int) -> list[dict[str, str]]:
    return [track(f"{prefix}{i}", f"{prefix} glass harmonica {i}") for i in range(n)]


def set_in_section(project: Project, section: str, line: str) -> None:
    text = project.config.read_text()
    assert f"[{section}]\n" in text
    project.config.write_text(text.replace(f"[{section}]\n", f"[{section}]\n{line}\n", 1))


def plan(project: Project, *extra: str) -> dict[str, Any]:
    proc = project.cli("plan", "--json", *extra)
    assert proc.returncode in (0, 2), proc.stderr[-3000:]
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def keys(project: Project, fingerprints: list[str]) -> list[str]:
    """The sandbox's book keys of the requests the ledger holds for these fingerprints."""
    ledger = Ledger.open(project.state / "ledger.sqlite3", readonly=True)
    try:
        return [books_key(ledger.request(fp)) for fp in fingerprints]
    finally:
        ledger.close()


def held(report: dict[str, Any], reason: str | None = None) -> list[str]:
    return [h["fingerprint"] for h in report["held"] if reason in (None, h["reason"])]


def submitted(report: dict[str, Any]) -> list[str]:
    return [item["fingerprint"] for item in report["submit"]]


class Books:
    """The sandbox's submit calls and charges since the last look."""

    def __init__(self, sandbox: SandboxControl) -> None:
        self.sandbox = sandbox
        self.calls, self.charged = 0, 0
        self.since()

    def since(self) -> tuple[list[list[str]], int]:
        stats = self.sandbox.stats()
        calls = stats["submits"][self.calls :]
        charged = stats["credits_charged"] - self.charged
        self.calls, self.charged = len(stats["submits"]), stats["credits_charged"]
        return calls, charged


def next_sync(project: Project, books: Books, *, expect: int) -> tuple[dict[str, Any], Any]:
    """Plan, then sync; check the sync's first submit calls are the plan's batches."""
    report = plan(project)
    project.sync(expect=expect)
    calls, charged = books.since()
    planned = [keys(project, batch) for batch in report["batches"]]
    assert calls[: len(planned)] == planned, "the pass submits what plan listed, batch by batch"
    return report, (calls[len(planned) :], charged)


def test_what_plan_lists_is_what_the_next_sync_submits(
    project: Project, sandbox: SandboxControl
) -> None:
    books = Books(sandbox)
    set_in_section(project, "submit", "daily_budget = 90")
    project.write_spec("mix.yaml", tracks("t", 10))

    # A daily budget: six go now, four wait for tomorrow and are never sent.
    report, (later, charged) = next_sync(project, books, expect=1)
    assert len(submitted(report)) == 6
    assert report["credits"] == 90 == charged
    assert len(held(report, "budget")) == 4
    assert later == []
    waiting = held(report)

    # A raised budget, two edits, a rename and a deleted output: the four that
    # waited and the two edits go; the rename and the restore cost nothing.
    project.config.write_text(project.config.read_text().replace("= 90\n", "= 3000\n"))
    specs = tracks("t", 10)
    specs[0]["gpt_description_prompt"] += " at dawn"
    specs[1]["gpt_description_prompt"] += " at dusk"
    specs[2]["name"] = "renamed"
    project.write_spec("mix.yaml", specs)
    (project.out / "mix" / "t3.mp3").unlink()
    report, (later, charged) = next_sync(project, books, expect=0)
    assert set(waiting) < set(submitted(report))
    assert len(submitted(report)) == 6, "the four that waited and the two edits"
    assert (report["credits"], report["held"], later, charged) == (90, [], [], 90)
    assert report["reuse"] == ["mix/renamed"]
    assert report["restore"] == ["mix/t3.mp3"]
    assert (project.out / "mix" / "t3.mp3").exists()
    assert (project.out / "mix" / "renamed.mp3").exists()

    # A task that fails upstream: plan lists its first submit; the sync's
    # retries are of that one generation only, then it is parked.
    sandbox.configure(faults=[{"kind": "task_failed", "rate": 1.0}])
    project.write_spec("bad.yaml", [track("bad", "a failing hum")])
    report, (later, _) = next_sync(project, books, expect=1)
    (bad,) = keys(project, submitted(report))
    assert later
    assert all(call == [bad] for call in later)
    sandbox.configure(faults=[])
    report, (later, charged) = next_sync(project, books, expect=1)
    assert (report["submit"], later, charged) == ([], [], 0)
    assert [f["tracks"] for f in report["failed"]] == [["bad/bad"]]
    assert project.cli("retry", "bad/bad").returncode == 0
    report, (later, charged) = next_sync(project, books, expect=0)
    assert (keys(project, submitted(report)), later, charged) == ([bad], [], 15)

    # An in-flight cap: one whole batch now, the rest as room frees up.
    set_in_section(project, "submit", "max_in_flight = 10")
    project.write_spec("cap.yaml", tracks("c", 15))
    report, (later, _) = next_sync(project, books, expect=0)
    assert len(submitted(report)) == 10
    capped = held(report, "in_flight")
    assert len(capped) == 5 == len(report["held"])
    assert sorted(k for call in later for k in call) == sorted(keys(project, capped))

    # The account's balance: three fit, two are held and never sent.
    sandbox.configure(credits=45)
    project.write_spec("poor.yaml", tracks("p", 5))
    report, (later, charged) = next_sync(project, books, expect=1)
    assert (len(submitted(report)), report["balance"], charged) == (3, 45, 45)
    assert len(held(report, "balance")) == 2
    assert later == []


def test_apply_carries_out_exactly_the_saved_plan(
    project: Project, sandbox: SandboxControl, tmp_path: Path
) -> None:
    set_in_section(project, "submit", "daily_budget = 45")
    project.write_spec("mix.yaml", tracks("t", 5))
    saved = tmp_path / "plan.json"
    report = plan(project, "--save", str(saved))
    assert len(submitted(report)) == 3
    assert len(held(report, "budget")) == 2
    books = Books(sandbox)
    # A balance that changed but still pays for the plan is no reason to refuse.
    sandbox.configure(credits=5000)

    proc = project.cli("apply", str(saved))

    assert proc.returncode == 0, proc.stderr[-3000:]
    calls, charged = books.since()
    assert calls == [keys(project, batch) for batch in report["batches"]]
    assert charged == report["credits"] == 45
    assert "applied" in proc.stderr
    assert "3/3 planned generations ready" in proc.stderr
    assert sorted(p.name for p in (project.out / "mix").glob("*.mp3")) == [
        "t0.mp3",
        "t1.mp3",
        "t2.mp3",
    ]


def refused(project: Project, saved: Path, books: Books) -> str:
    proc = project.cli("apply", str(saved))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert books.since() == ([], 0), "a refused apply spends nothing"
    return proc.stderr


def test_apply_refuses_a_plan_that_no_longer_holds_and_spends_nothing(
    project: Project, sandbox: SandboxControl, tmp_path: Path
) -> None:
    project.write_spec("mix.yaml", tracks("t", 3))
    books = Books(sandbox)
    edited, poorer, spent = (tmp_path / f"{n}.json" for n in ("edited", "poorer", "spent"))
    for saved in (edited, poorer, spent):
        plan(project, "--save", str(saved))

    specs = tracks("t", 3)
    specs[1]["gpt_description_prompt"] = "something else"
    project.write_spec("mix.yaml", specs)
    assert "the specs changed since the plan was made" in refused(project, edited, books)

    project.write_spec("mix.yaml", tracks("t", 3))
    sandbox.configure(credits=15)
    err = refused(project, poorer, books)
    assert "mix/t1 would not be submitted now: account balance too low (15 credits)" in err
    assert "the balance is 15 credits; the plan assumed 100000 credits" in err

    sandbox.configure(credits=100000)
    project.sync()
    books.since()
    err = refused(project, spent, books)
    assert "mix/t0 would not be submitted now: already submitted" in err
    assert "the ledger changed since the plan was made" in err


def test_no_plan_is_saved_while_a_spec_file_is_invalid(project: Project, tmp_path: Path) -> None:
    project.write_spec("mix.yaml", tracks("t", 2))
    (project.specs / "broken.yaml").write_text("soundtrack: broken\ntracks: [\n")
    saved = tmp_path / "plan.json"

    proc = project.cli("plan", "--save", str(saved))

    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "broken.yaml" in proc.stdout + proc.stderr
    assert f"plan not saved to {saved}: fix the invalid spec files first" in proc.stderr
    assert not saved.exists()


def test_lost_answers_wait_in_plan_and_go_out_again_as_it_says(
    tmp_path: Path, sandbox: SandboxControl
) -> None:
    project = daemon_project(tmp_path, sandbox, grace=3600)
    sandbox.configure(faults=[{"kind": "drop_response", "at": [1], "endpoints": ["batch_submit"]}])
    project.write_spec("mix.yaml", tracks("t", 2))
    with DaemonProc(project) as daemon:
        daemon.wait_event("submit.ambiguous")
    sandbox.configure(faults=[])
    books = Books(sandbox)

    # The answer was lost, so both may be paid for: not sent again yet.
    report = plan(project)
    assert submitted(report) == []
    assert report["credits"] == 0
    assert [item["tracks"] for item in report["unknown"]] == [["mix/t0"], ["mix/t1"]]
    assert report["in_flight"] == 2
    assert report["reuse"] == [], "no audio is known to exist"
    assert "? unknown mix/t0" in project.cli("plan").stdout

    # Past the grace period the next pass sends them again and may pay twice:
    # plan lists them as submitted, and says so.
    text = project.config.read_text()
    project.config.write_text(text.replace("ambiguous_grace = 3600", "ambiguous_grace = 0"))
    assert "may pay twice" in project.cli("plan").stdout
    report, (_, charged) = next_sync(project, books, expect=0)
    assert [item["again"] for item in report["submit"]] == [True, True]
    assert report["unknown"] == []
    assert charged == report["credits"] == 30


def test_plan_prints_names_and_messages_as_they_are(project: Project) -> None:
    """Not as rich markup: an error quoting ``[/x]`` once crashed plan."""
    project.write_spec("mix.yaml", [track("[/x]", "odd"), track("ok", "fine")])
    proc = project.cli("plan")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "invalid name '[/x]'" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_plan_says_what_is_wrong_with_the_key_it_asks_the_balance_with(
    project: Project,
) -> None:
    project.write_spec("mix.yaml", tracks("t", 1))
    env = {**project.env(), "MUSICAPI_KEY": "two words"}
    proc = subprocess.run(
        project.args("plan"), env=env, capture_output=True, text=True, timeout=90, check=False
    )
    assert proc.returncode == 1
    assert "the MusicAPI key is empty or contains whitespace" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_plan_that_fails_does_not_wait_for_the_balance(
    project: Project, sandbox: SandboxControl
) -> None:
    sandbox.configure(faults=[{"kind": "slow", "delay": 60, "rate": 1.0}])
    text = project.config.read_text()
    project.config.write_text(text.replace("request_timeout = 5.0", "request_timeout = 120"))
    project.write_spec("mix.yaml", tracks("t", 1))
    project.state.mkdir(exist_ok=True)
    (project.state / "ledger.sqlite3").write_bytes(b"not a ledger" * 100)
    # Half the answer's delay: waiting for it would time out.
    proc = project.cli("plan", timeout=30)
    assert proc.returncode == 1
    assert "ledger" in proc.stderr


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ("not json at all", "not a saved plan (not JSON"),
        ('{"submit": []}', 'not a saved plan (no "format": "reconciler-plan"'),
        ('{"format": "reconciler-plan", "version": 1}', "a saved plan of version 1"),
        (f'{{"format": "reconciler-plan", "version": {VERSION}}}', "a damaged saved plan"),
        (None, "cannot read the plan"),
    ],
)
def test_what_is_not_a_saved_plan_is_refused_by_name(
    tmp_path: Path, content: str | None, says: str
) -> None:
    path = tmp_path / "plan.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PlanFileError) as caught:
        load_plan(path)
    assert str(caught.value).startswith(f"{path}: {says}")


def test_apply_of_a_foreign_file_exits_1_and_spends_nothing(
    project: Project, sandbox: SandboxControl, tmp_path: Path
) -> None:
    project.write_spec("mix.yaml", tracks("t", 1))
    path = tmp_path / "plan.json"
    path.write_text('{"submit": []}')
    books = Books(sandbox)
    proc = project.cli("apply", str(path))
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"reconciler: {path}: not a saved plan"), proc.stderr
    assert books.since() == ([], 0)


SAVED = {
    "specs_digest": "s",
    "ledger_digest": "l",
    "balance": 100,
    "submit": [{"fingerprint": "a", "tracks": ["m/a"]}, {"fingerprint": "b", "tracks": ["m/b"]}],
    "held": [],
    "failed": [],
    "prune": [],
}
CHANGES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "nothing changed": ({}, []),
    "a ledger or balance change that keeps the plan": ({"ledger_digest": "x", "balance": 9}, []),
    "a spec edit": ({"specs_digest": "x"}, ["the specs changed since the plan was made"]),
    "the balance no longer pays": (
        {
            "submit": SAVED["submit"][:1],
            "held": [{"fingerprint": "b", "detail": "account balance too low (15 credits)"}],
            "balance": 15,
        },
        [
            "m/b would not be submitted now: account balance too low (15 credits)",
            "the balance is 15 credits; the plan assumed 100 credits",
        ],
    ),
    "submitted meanwhile": (
        {"submit": [], "ledger_digest": "x"},
        [
            "m/a would not be submitted now: already submitted, or no spec asks for it",
            "m/b would not be submitted now: already submitted, or no spec asks for it",
            "the ledger changed since the plan was made (a sync, the daemon, retry)",
        ],
    ),
    "parked meanwhile": (
        {"submit": SAVED["submit"][1:], "failed": [{"fingerprint": "a"}]},
        ["m/a would not be submitted now: failed (parked)"],
    ),
    "other files to prune": (
        {"prune": ["m/old.mp3"]},
        ["it would prune 1 file now, not the 0 planned"],
    ),
}


@pytest.mark.parametrize(("now", "found"), list(CHANGES.values()), ids=list(CHANGES))
def test_what_changed_names_what_alters_the_plan(now: dict[str, Any], found: list[str]) -> None:
    assert what_changed(SAVED, {**SAVED, **now}) == found
