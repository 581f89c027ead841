"""The ledger's money transitions, in process, with an injected clock, on each backend:
a real SQLite file and a real PostgreSQL database (``ledger_target``).

Each test walks one submit through the states a user's credits depend on and
reads back what the budget and ``status`` would see.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from reconciler.ledger import (
    LOST_ANSWER_PARK,
    MIGRATIONS,
    ClipRecord,
    Ledger,
    PlanRead,
    TaskUpdate,
    read_plan,
)
from reconciler.outcomes import Done, Outcome, Park, Poll, Requeue
from reconciler.planning import desired_state
from reconciler.specs import YOUNG, scan_specs
from tests.clock import NOW, Clock


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(tmp_path: Path, ledger_target: Path | str, clock: Clock) -> Iterator[Ledger]:
    specs = tmp_path / "specs"
    specs.mkdir()
    lines = ["defaults:", "  mv: sonic-v5", "tracks:"]
    for name in "abcd":
        lines += [f"  - name: {name}", f"    gpt_description_prompt: prompt {name}"]
    (specs / "mix.yaml").write_text("\n".join(lines) + "\n")
    scan = scan_specs(specs)
    ledger = Ledger.open(ledger_target, clock=clock)
    ledger.apply_desired(desired_state(scan.files, (), scan.root_state, {}))
    yield ledger
    ledger.close()


def fps(ledger: Ledger) -> list[str]:
    rows = ledger.query("SELECT name, fingerprint FROM tracks ORDER BY name")
    return [r["fingerprint"] for r in rows]


def state(ledger: Ledger, fp: str) -> str:
    return ledger.generations()[fp].state


def test_every_item_counts_as_spent_from_intent_until_the_answer_settles_it(
    ledger: Ledger,
) -> None:
    a, b, c, d = fps(ledger)
    sid = ledger.begin_submit([a, b, c, d], "batch")
    assert ledger.spent_since(0) == 4, "in flight: all may be charged"
    ledger.submit_answered(
        sid,
        "batch-1",
        {a: ("t-a", 0)},
        {},
        {b: "rejected (forbidden): copyrighted"},
        unconfirmed={c: "left out", d: "left out"},
        poll_at=NOW,
    )
    # a is a task; b was refused; c and d may exist.
    assert ledger.spent_since(0) == 3
    assert [state(ledger, f) for f in (a, b, c, d)] == ["running", "parked", "unknown", "unknown"]


def test_the_services_count_bounds_what_unknown_items_may_have_cost(ledger: Ledger) -> None:
    a, b, c, d = fps(ledger)
    sid = ledger.begin_submit([a, b, c, d], "batch")
    ledger.submit_answered(
        sid,
        "batch-1",
        {},
        {},
        {},
        unconfirmed={f: "unattributed" for f in (a, b, c, d)},
        orphans=["t-1", "t-2", "t-3"],
        submitted=3,
        poll_at=NOW,
    )
    assert ledger.spent_since(0) == 3
    # Claiming the three orphans accounts for every task: the fourth item
    # cannot have been created, so it goes out again at no risk.
    for fp, task in ((a, "t-1"), (b, "t-2"), (c, "t-3")):
        assert ledger.claim(fp, task, NOW, "batch-1")
    assert ledger.spent_since(0) == 3
    assert state(ledger, d) == "queued"
    assert ledger.generations()[d].reason is not None
    assert "not created" in (ledger.generations()[d].reason or "")
    assert ledger.query("SELECT count(*) AS n FROM orphans")[0]["n"] == 0


def test_lost_answers_are_resent_within_the_allowance_then_parked(
    ledger: Ledger, clock: Clock
) -> None:
    a, *_ = fps(ledger)
    for expected_doubles in (1, 1):
        sid = ledger.begin_submit([a], "batch")
        ledger.submit_ambiguous(sid, "read timeout")
        assert state(ledger, a) == "unknown"
        assert ledger.expire_unknown(900, max_resubmits=1) == ([], [])
        clock.now += 901
        ledger.expire_unknown(900, max_resubmits=1)
        assert (
            ledger.query("SELECT possible_double FROM generations WHERE fingerprint = ?", [a])[0][
                "possible_double"
            ]
            == expected_doubles
        )
    assert state(ledger, a) == "parked"
    assert ledger.generations()[a].reason == LOST_ANSWER_PARK
    # Both lost submits stay counted: either may have been charged.
    assert ledger.spent_since(0) == 2
    # The person's retry sends it again, and that is counted too.
    assert ledger.retry([a]) == 1
    assert (
        ledger.query("SELECT possible_double FROM generations WHERE fingerprint = ?", [a])[0][
            "possible_double"
        ]
        == 2
    )


def test_no_resubmit_allowance_parks_at_once(ledger: Ledger, clock: Clock) -> None:
    a, *_ = fps(ledger)
    sid = ledger.begin_submit([a], "batch")
    ledger.submit_ambiguous(sid, "connection reset")
    clock.now += 901
    assert ledger.expire_unknown(900, max_resubmits=0) == ([], [a])
    assert state(ledger, a) == "parked"


def test_a_callback_without_a_task_id_stops_any_resend(ledger: Ledger, clock: Clock) -> None:
    a, *_ = fps(ledger)
    sid = ledger.begin_submit([a], "batch")
    ledger.submit_ambiguous(sid, "connection reset")
    assert ledger.paid_hint(a)
    clock.now += 10_000
    assert ledger.expire_unknown(900, max_resubmits=5) == ([], [])
    assert state(ledger, a) == "unknown"
    # The other tracks wait to be submitted; this one gives nothing to wake up for.
    assert ledger.next_due(900, submit_from=None) is None


def test_known_ids_are_never_attached_to_another_generation(ledger: Ledger) -> None:
    a, b, c, _ = fps(ledger)
    first = ledger.begin_submit([a], "batch")
    ledger.submit_answered(first, "batch-1", {a: ("task-1", 0)}, {}, {}, poll_at=NOW)
    # A restarted service hands out the same ids again.
    second = ledger.begin_submit([b, c], "batch")
    collisions = ledger.submit_answered(
        second, "batch-1", {b: ("task-1", 0), c: ("task-2", 1)}, {}, {}, poll_at=NOW
    )
    assert collisions == ["batch batch-1", "task task-1"]
    ref = ledger.task_ref("task-1")
    assert ref is not None
    assert ref.fingerprint == a
    assert state(ledger, b) == "unknown"
    # c's task is new: tracked, but polled on its own, not as part of the old batch.
    ref = ledger.task_ref("task-2")
    assert ref is not None
    assert ref.batch_id is None
    assert [t.task_id for t in ledger.due_single_tasks(NOW)] == ["task-2"]


def test_a_paused_pass_is_not_due_again_until_submitting_may_resume(ledger: Ledger) -> None:
    # Every generation is queued and due now; polls are the only other work.
    assert ledger.next_due(900, submit_from=NOW) == NOW
    assert ledger.next_due(900, submit_from=NOW + 600) == NOW + 600
    assert ledger.next_due(900, submit_from=None) is None


def test_a_task_the_service_forgets_is_resent_once_and_counted(ledger: Ledger) -> None:
    a, *_ = fps(ledger)
    for _ in range(2):
        sid = ledger.begin_submit([a], "batch")
        task = f"task-{sid}"
        ledger.submit_answered(sid, None, {a: (task, 0)}, {}, {}, poll_at=NOW)
        ledger.task_lost(task, NOW, "task not found.", max_resubmits=1)
    # Once sent again (counted), then held: a 404 may be wrong and the task charged.
    assert state(ledger, a) == "parked"
    doubles = ledger.query("SELECT possible_double FROM generations WHERE fingerprint = ?", [a])
    assert doubles[0]["possible_double"] == 1


# -- every transition of one generation, table-driven ------------------------------------
#
# Each case starts from the fixture's ledger (four queued generations a-d, the
# clock at NOW), walks generation ``a`` through the ledger calls a pass makes,
# and reads back the row a pass, the budget and ``status`` will see next.


class Walk:
    """One generation's walk: the ledger, the clock, the fingerprints and the last submit."""

    def __init__(self, ledger: Ledger, clock: Clock) -> None:
        self.ledger = ledger
        self.clock = clock
        self.a, self.b, self.c, self.d = fps(ledger)
        self.submit_id = 0

    def submit(self, *names: str) -> None:
        self.submit_id = self.ledger.begin_submit([getattr(self, n) for n in names or "a"], "batch")

    def accepted(self, task: str = "task-a", batch: str | None = "batch-1") -> None:
        self.ledger.submit_answered(
            self.submit_id, batch, {self.a: (task, 0)}, {}, {}, poll_at=self.clock.now + 5
        )

    def poll(self, status: str, task: str = "task-a", outcome: Outcome | None = None) -> None:
        """A poll of ``task`` saying ``status``, applied as ``outcome`` (what
        ``outcomes.task_outcome`` decided; by default keep polling or done)."""
        clips = [
            ClipRecord(
                clip_id=f"{task}-clip",
                task_id=task,
                fingerprint=self.a,
                position=0,
                state=status,
                audio_url="http://127.0.0.1/a.mp3" if status == "succeeded" else None,
                duration=None,
                title=None,
                lyrics=None,
                tags=None,
                sha256=None,
            )
        ]
        error = "upstream error" if status == "failed" else None
        if outcome is None:
            outcome = Done() if status == "succeeded" else Poll()
        self.ledger.record_task(TaskUpdate(task, status, clips, error=error), outcome)

    def later(self, seconds: float) -> None:
        self.clock.now += seconds


Step = Callable[[Walk], object]


@dataclass(frozen=True)
class Transition:
    id: str
    steps: list[Step]
    #: Generation a's row afterwards: any of state, attempts, next_attempt,
    #: possible_double, resubmits; ``reason`` is a piece the reason must hold.
    expect: dict[str, object]
    #: What the budget counts as possibly charged since the start.
    spent: int


TRANSITIONS = [
    Transition("created queued", [], {"state": "queued", "attempts": 0, "reason": None}, 0),
    Transition("intent: queued -> submitting", [Walk.submit], {"state": "submitting"}, 1),
    Transition(
        "accepted: submitting -> running",
        [Walk.submit, Walk.accepted],
        {"state": "running", "attempts": 0, "reason": None},
        1,
    ),
    Transition(
        "not sent: submitting -> queued, no attempt counted, nothing spent",
        [
            Walk.submit,
            lambda w: w.ledger.submit_not_sent(w.submit_id, NOW + 30, "connection refused"),
        ],
        {"state": "queued", "attempts": 0, "next_attempt": NOW + 30, "reason": "refused"},
        0,
    ),
    Transition(
        "refused whole: submitting -> queued at once, no attempt counted",
        [Walk.submit, lambda w: w.ledger.submit_refused(w.submit_id, "HTTP 413")],
        {"state": "queued", "attempts": 0, "next_attempt": 0},
        0,
    ),
    Transition(
        "answer requeues the item: submitting -> queued with a retry time",
        [
            Walk.submit,
            lambda w: w.ledger.submit_answered(
                w.submit_id, "batch-1", {}, {w.a: (NOW + 60, "busy")}, {}, poll_at=NOW
            ),
        ],
        {"state": "queued", "attempts": 1, "next_attempt": NOW + 60, "reason": "busy"},
        0,
    ),
    Transition(
        "answer refuses the item for money: submitting -> queued, no attempt counted",
        [
            Walk.submit,
            lambda w: w.ledger.submit_answered(
                w.submit_id,
                "batch-1",
                {},
                {w.a: (NOW + 60, "insufficient credits")},
                {},
                poll_at=NOW,
                uncounted={w.a},
            ),
        ],
        {"state": "queued", "attempts": 0, "next_attempt": NOW + 60, "reason": "credits"},
        0,
    ),
    Transition(
        "answer refuses the item: submitting -> parked with the API's reason",
        [
            Walk.submit,
            lambda w: w.ledger.submit_answered(
                w.submit_id, "batch-1", {}, {}, {w.a: "rejected: copyrighted"}, poll_at=NOW
            ),
        ],
        {"state": "parked", "reason": "copyrighted"},
        0,
    ),
    Transition(
        "answer lost: submitting -> unknown, counted",
        [Walk.submit, lambda w: w.ledger.submit_ambiguous(w.submit_id, "read timeout")],
        {"state": "unknown", "reason": "read timeout"},
        1,
    ),
    Transition(
        "process died mid-submit: submitting -> unknown at start-up",
        [Walk.submit, lambda w: w.ledger.recover_interrupted()],
        {"state": "unknown", "reason": "interrupted"},
        1,
    ),
    Transition(
        "lost answer, grace not over: stays unknown",
        [
            Walk.submit,
            lambda w: w.ledger.submit_ambiguous(w.submit_id, "read timeout"),
            lambda w: w.later(899),
            lambda w: w.ledger.expire_unknown(900, max_resubmits=1),
        ],
        {"state": "unknown", "possible_double": 0, "resubmits": 0},
        1,
    ),
    Transition(
        "lost answer, grace over: unknown -> queued, counted as possible double",
        [
            Walk.submit,
            lambda w: w.ledger.submit_ambiguous(w.submit_id, "read timeout"),
            lambda w: w.later(900),
            lambda w: w.ledger.expire_unknown(900, max_resubmits=1),
        ],
        {"state": "queued", "possible_double": 1, "resubmits": 1, "next_attempt": 0},
        1,
    ),
    Transition(
        "a callback claims the lost item: unknown -> running, settled",
        [
            Walk.submit,
            lambda w: w.ledger.submit_ambiguous(w.submit_id, "read timeout"),
            lambda w: w.ledger.claim(w.a, "task-a", NOW + 5),
        ],
        {"state": "running", "reason": None},
        # The claim settles the submit's item: one task, counted once.
        1,
    ),
    Transition(
        "poll says running: stays running",
        [Walk.submit, Walk.accepted, lambda w: w.poll("running")],
        {"state": "running"},
        1,
    ),
    Transition(
        "poll says succeeded: running -> succeeded",
        [Walk.submit, Walk.accepted, lambda w: w.poll("succeeded")],
        {"state": "succeeded", "reason": None},
        1,
    ),
    Transition(
        "task failed upstream (refunded): running -> queued with a retry time",
        [
            Walk.submit,
            Walk.accepted,
            lambda w: w.poll("failed", outcome=Requeue(NOW + 20, "upstream error")),
        ],
        {"state": "queued", "attempts": 1, "next_attempt": NOW + 20, "reason": "upstream error"},
        1,
    ),
    Transition(
        "task failed for good: running -> parked with the policy's reason",
        [Walk.submit, Walk.accepted, lambda w: w.poll("failed", outcome=Park("forbidden: lyrics"))],
        {"state": "parked", "reason": "forbidden: lyrics"},
        1,
    ),
    Transition(
        "a late answer about an older task leaves the current one alone",
        [
            Walk.submit,
            Walk.accepted,
            lambda w: w.poll("failed", outcome=Requeue(NOW, "upstream error")),
            Walk.submit,
            lambda w: w.accepted(task="task-a2", batch="batch-2"),
            lambda w: w.poll("succeeded", task="task-a"),
        ],
        {"state": "running", "attempts": 1},
        2,
    ),
    Transition(
        "the service forgets the task: running -> queued, counted as possible double",
        [
            Walk.submit,
            Walk.accepted,
            lambda w: w.ledger.task_lost("task-a", NOW + 1, "task not found.", max_resubmits=1),
        ],
        {"state": "queued", "possible_double": 1, "resubmits": 1, "next_attempt": NOW + 1},
        1,
    ),
    Transition(
        "the service forgets the task, no allowance: running -> parked",
        [
            Walk.submit,
            Walk.accepted,
            lambda w: w.ledger.task_lost("task-a", NOW + 1, "task not found.", max_resubmits=0),
        ],
        {"state": "parked", "possible_double": 0, "reason": "unknown to the service"},
        1,
    ),
    Transition(
        "a task that never finishes is requeued: running -> queued, possible double",
        [
            Walk.submit,
            Walk.accepted,
            lambda w: w.later(1800),
            lambda w: w.ledger.abandon_task(
                "task-a", requeue_at=NOW + 1800, reason="did not finish within 1800 s"
            ),
        ],
        {"state": "queued", "possible_double": 1, "next_attempt": NOW + 1800},
        1,
    ),
    Transition(
        "a task that never finishes is given up on: running -> parked",
        [
            Walk.submit,
            Walk.accepted,
            lambda w: w.ledger.abandon_task(
                "task-a", requeue_at=None, reason="did not finish within 1800 s"
            ),
        ],
        {"state": "parked", "reason": "task task-a did not finish within 1800 s"},
        1,
    ),
    Transition(
        "a person parks it: queued -> parked",
        [lambda w: w.ledger.park(w.a, "held by hand")],
        {"state": "parked", "reason": "held by hand"},
        0,
    ),
    Transition(
        "retry: parked -> queued, attempts reset, nothing counted",
        [
            Walk.submit,
            lambda w: w.ledger.submit_answered(
                w.submit_id, None, {}, {}, {w.a: "rejected: copyrighted"}, poll_at=NOW
            ),
            lambda w: w.ledger.retry([w.a]),
        ],
        {"state": "queued", "attempts": 0, "next_attempt": 0, "possible_double": 0},
        0,
    ),
    Transition(
        "retry leaves a generation that is not parked alone",
        [Walk.submit, Walk.accepted, lambda w: w.ledger.retry([w.a])],
        {"state": "running"},
        1,
    ),
]


def generation_row(ledger: Ledger, fp: str) -> dict[str, object]:
    rows = ledger.query(
        "SELECT state, attempts, next_attempt, reason, possible_double, resubmits "
        "FROM generations WHERE fingerprint = ?",
        [fp],
    )
    return dict(rows[0])


@pytest.mark.parametrize("case", TRANSITIONS, ids=[t.id for t in TRANSITIONS])
def test_each_transition_of_a_generation(ledger: Ledger, clock: Clock, case: Transition) -> None:
    walk = Walk(ledger, clock)
    for step in case.steps:
        step(walk)
    row = generation_row(ledger, walk.a)
    for key, want in case.expect.items():
        if key == "reason" and want is not None:
            assert want in (row["reason"] or ""), row
        else:
            assert row[key] == want, (key, row)
    assert ledger.spent_since(0) == case.spent
    # The other generations were never touched.
    assert {state(ledger, fp) for fp in (walk.b, walk.c, walk.d)} == {"queued"}


def test_an_older_ledgers_output_tag_keys_move_into_their_rows(
    tmp_path: Path, clock: Clock
) -> None:
    """A ledger from before outputs had a tag key column kept every key in one
    key/value entry: upgrading moves each into its row, so no output is rebuilt."""
    path = tmp_path / "old.sqlite3"
    before = next(i for i, sql in enumerate(MIGRATIONS) if "tags_key" in sql)
    conn = sqlite3.connect(path)
    for i in range(before):
        conn.executescript(f"BEGIN; {MIGRATIONS[i]} PRAGMA user_version = {i + 1}; COMMIT;")
    for rel in ("mix/a.mp3", "mix/b.mp3", "mix/playlist.m3u8"):
        conn.execute(
            "INSERT INTO outputs (path, soundtrack, sha256, size, mtime_ns, at) "
            "VALUES (?, 'mix', 'sha', 1, 1, 0)",
            [rel],
        )
    keys = {"mix/a.mp3": "key-a", "mix/b.mp3": "key-b", "gone/x.mp3": "key-x"}
    conn.execute("INSERT INTO kv (key, value) VALUES ('output_tags', ?)", [json.dumps(keys)])
    conn.commit()
    conn.close()

    ledger = Ledger.open(path, clock=clock)
    try:
        ledger.adopt_output_tags()
        found = {p: r.tags_key for p, r in ledger.outputs_of(["mix"]).items()}
        assert found == {"mix/a.mp3": "key-a", "mix/b.mp3": "key-b", "mix/playlist.m3u8": None}
        assert ledger.get("output_tags") is None, "the old entry is gone, not kept twice"
        ledger.adopt_output_tags()  # once moved, nothing to do
        assert ledger.outputs_of(["mix"])["mix/a.mp3"].tags_key == "key-a"
    finally:
        ledger.close()


def test_a_spec_files_stamp_is_kept_only_while_its_last_good_version_is_what_it_holds(
    tmp_path: Path, clock: Clock
) -> None:
    """``plan`` skips reading a file whose stamp is unchanged, taking the last
    good version for it: the stamp must go as soon as that version is not the file's."""
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "mix.yaml").write_text(
        "tracks: [{name: a, mv: sonic-v5, gpt_description_prompt: rain}]\n"
    )
    scan = scan_specs(specs)
    spec = scan.files["mix.yaml"]
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger.open(path, clock=clock)

    def plan_read() -> PlanRead:
        read = read_plan(path, 0.0, lambda _: {}, 0.0)
        assert read is not None
        return read

    def stamps() -> dict[str, str]:
        return plan_read().stamps

    def version_events() -> int:
        return len(ledger.query("SELECT id FROM events WHERE event = 'spec.accepted'"))

    try:
        ledger.record_specs(
            {"mix.yaml": spec}, {}, complete=True, stamps={"mix.yaml": "1:2:3:4" + YOUNG}
        )
        assert stamps() == {}, "read too young to trust: the file is read again"
        # Found again when older: the same file, so nothing is written.
        changes = ledger.db.execute("SELECT total_changes()").fetchone()[0]
        ledger.record_specs({"mix.yaml": spec}, {}, complete=True, stamps={"mix.yaml": "1:2:3:4"})
        assert ledger.db.execute("SELECT total_changes()").fetchone()[0] == changes
        assert stamps() == {}
        # Touched, same bytes: only the stamp changes, no new version.
        ledger.record_specs({"mix.yaml": spec}, {}, complete=True, stamps={"mix.yaml": "1:5:3:6"})
        assert stamps() == {"mix.yaml": "1:5:3:6"}
        assert version_events() == 1
        # Invalid now: its last good version stays in force, but is not the file.
        ledger.record_specs({}, {"mix.yaml": "mix.yaml:1 broken"}, complete=True)
        assert stamps() == {}
        assert plan_read().last_good["mix.yaml"].spec == spec
    finally:
        ledger.close()


def test_the_ledger_opens_without_numpy_and_leaves_it_importable(tmp_path: Path) -> None:
    """sqlite-utils would import numpy (tens of MiB for the daemon's life) to
    map types the ledger never stores; hidden for that import only, numpy
    stays importable for the sandbox's audio afterwards."""
    code = (
        "import sys, pathlib\n"
        "from reconciler.ledger import Ledger\n"
        f"Ledger.open(pathlib.Path({str(tmp_path / 'l.sqlite3')!r})).close()\n"
        "assert 'numpy' not in sys.modules, 'numpy imported'\n"
        "import numpy\n"
        "from reconciler.sandbox.audio import plan_clip, render\n"
        "assert len(render(plan_clip('rain', b'seed'))) > 0\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
