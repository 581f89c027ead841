"""The ledger's money transitions, in process, on a real SQLite file with an injected clock.

Each test walks one submit through the states a user's credits depend on and
reads back what the budget and ``status`` would see.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.ledger import LOST_ANSWER_PARK, Ledger
from reconciler.planning import desired_state
from reconciler.specs import scan_specs

NOW = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(tmp_path: Path, clock: Clock) -> Iterator[Ledger]:
    specs = tmp_path / "specs"
    specs.mkdir()
    lines = ["defaults:", "  mv: sonic-v5", "tracks:"]
    for name in "abcd":
        lines += [f"  - name: {name}", f"    gpt_description_prompt: prompt {name}"]
    (specs / "mix.yaml").write_text("\n".join(lines) + "\n")
    scan = scan_specs(specs)
    ledger = Ledger.open(tmp_path / "ledger.sqlite3", clock=clock)
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
