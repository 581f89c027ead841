"""Table-driven tests of the pure planning core: plain values in, plain values out."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from reconciler.planning import (
    CREDITS_PER_TASK,
    Allowance,
    Generation,
    Held,
    Limits,
    OpenBatch,
    OutputFact,
    Snapshot,
    Suspension,
    affordable_tasks,
    backoff,
    batches,
    desired_state,
    due_submissions,
    fingerprint,
    match_orphan,
    plan,
    poll_cohorts,
)
from reconciler.specs import SpecFile, TrackSpec

LOFI = {"custom_mode": False, "mv": "sonic-v5", "gpt_description_prompt": "lofi beats"}
JAZZ = {"custom_mode": False, "mv": "sonic-v5", "gpt_description_prompt": "late night jazz"}


def track(name: str, request: dict[str, Any], variant: int = 1, clips: int = 1) -> TrackSpec:
    return TrackSpec(name=name, request=request, variant=variant, clips=clips, line=1)


def spec(path: str, soundtrack: str, *tracks: TrackSpec, digest: str = "d") -> SpecFile:
    return SpecFile(path=path, soundtrack=soundtrack, tracks=tuple(tracks), digest=digest)


def test_fingerprint_ignores_key_order_but_not_variant_or_content() -> None:
    reordered = dict(reversed(list(LOFI.items())))
    assert fingerprint(LOFI, 1) == fingerprint(reordered, 1)
    assert fingerprint(LOFI, 1) != fingerprint(LOFI, 2)
    assert fingerprint(LOFI, 1) != fingerprint(JAZZ, 1)
    assert fingerprint({**LOFI, "make_instrumental": True}, 1) != fingerprint(LOFI, 1)


# Each case: the ledger's last good files, the scan now, and the expected
# (soundtrack, track, fingerprint source) rows plus whether pruning is allowed.
A = spec("a.yaml", "study", track("focus", LOFI), track("deep", JAZZ))
CASES = {
    "new file": (
        {},
        {"a.yaml": A},
        [],
        "ok",
        [("study", "focus", LOFI), ("study", "deep", JAZZ)],
        True,
    ),
    "renamed file keeps fingerprints": (
        {"a.yaml": A},
        {"b.yaml": spec("b.yaml", "study", *A.tracks)},
        [],
        "ok",
        [("study", "focus", LOFI), ("study", "deep", JAZZ)],
        True,
    ),
    "renamed track keeps fingerprint": (
        {"a.yaml": A},
        {"a.yaml": spec("a.yaml", "study", track("focus-2", LOFI), track("deep", JAZZ))},
        [],
        "ok",
        [("study", "focus-2", LOFI), ("study", "deep", JAZZ)],
        True,
    ),
    "removed track": (
        {"a.yaml": A},
        {"a.yaml": spec("a.yaml", "study", track("focus", LOFI))},
        [],
        "ok",
        [("study", "focus", LOFI)],
        True,
    ),
    "invalid file keeps last good version, no prune": (
        {"a.yaml": A},
        {},
        ["a.yaml"],
        "ok",
        [("study", "focus", LOFI), ("study", "deep", JAZZ)],
        False,
    ),
    "invalid new file has nothing in force": ({}, {}, ["a.yaml"], "ok", [], False),
    "missing folder keeps everything, no prune": (
        {"a.yaml": A},
        {},
        [],
        "missing",
        [("study", "focus", LOFI), ("study", "deep", JAZZ)],
        False,
    ),
    "empty folder keeps everything, no prune": (
        {"a.yaml": A},
        {},
        [],
        "empty",
        [("study", "focus", LOFI), ("study", "deep", JAZZ)],
        False,
    ),
    "deleted file removes its tracks": (
        {"a.yaml": A},
        {"z.yaml": spec("z.yaml", "z")},
        [],
        "ok",
        [],
        True,
    ),
}


@pytest.mark.parametrize(
    ("last_good", "files", "invalid", "root", "expected", "prune_ok"),
    list(CASES.values()),
    ids=list(CASES),
)
def test_desired_state(
    last_good: dict[str, SpecFile],
    files: dict[str, SpecFile],
    invalid: list[str],
    root: Any,
    expected: list[tuple[str, str, dict[str, Any]]],
    prune_ok: bool,
) -> None:
    d = desired_state(files, invalid, root, last_good)
    assert [(t.soundtrack, t.name, t.fingerprint) for t in d.tracks] == [
        (s, n, fingerprint(r, 1)) for s, n, r in expected
    ]
    assert d.prune_allowed is prune_ok


def test_same_spec_in_two_soundtracks_is_one_fingerprint() -> None:
    d = desired_state(
        {"a.yaml": A, "b.yaml": spec("b.yaml", "gym", track("warmup", LOFI))}, [], "ok", {}
    )
    assert len(d.tracks) == 3
    assert d.fingerprints() == (fingerprint(LOFI, 1), fingerprint(JAZZ, 1))


def test_variant_and_clips() -> None:
    d = desired_state(
        {"a.yaml": spec("a.yaml", "s", track("one", LOFI), track("two", LOFI, variant=2, clips=2))},
        [],
        "ok",
        {},
    )
    one, two = d.tracks
    assert one.fingerprint != two.fingerprint
    assert two.outputs == ("s/two.mp3", "s/two-2.mp3")
    assert one.outputs == ("s/one.mp3",)


FP_L, FP_J = fingerprint(LOFI, 1), fingerprint(JAZZ, 1)
DESIRED = desired_state({"a.yaml": A}, [], "ok", {})


def gen(fp: str, state: Any, **kw: Any) -> Generation:
    return Generation(fingerprint=fp, state=state, **kw)


def fact(path: str, fp: str, disk: str = "ok", *, cached: bool = True) -> OutputFact:
    return OutputFact(path, fp, disk, cached=cached)  # type: ignore[arg-type]


DONE = {FP_L: gen(FP_L, "succeeded"), FP_J: gen(FP_J, "succeeded")}
BOTH_OK = {
    "study/focus.mp3": fact("study/focus.mp3", FP_L),
    "study/deep.mp3": fact("study/deep.mp3", FP_J),
}
DIFF_CASES = {
    "all new": ({}, {}, (FP_L, FP_J), 0, (), ()),
    "unchanged and ready": (DONE, BOTH_OK, (), 0, (), ()),
    "one changed prompt": (
        {FP_L: gen(FP_L, "succeeded")},
        {**BOTH_OK, "study/deep.mp3": fact("study/deep.mp3", "old")},
        (FP_J,),
        0,
        (),
        (),
    ),
    "deleted and drifted outputs come back from the cache": (
        DONE,
        {
            "study/focus.mp3": fact("study/focus.mp3", FP_L, "missing"),
            "study/deep.mp3": fact("study/deep.mp3", FP_J, "drifted"),
        },
        (),
        0,
        ("study/focus.mp3", "study/deep.mp3"),
        (),
    ),
    "nothing to restore from without a cached copy": (
        DONE,
        {**BOTH_OK, "study/focus.mp3": fact("study/focus.mp3", FP_L, "missing", cached=False)},
        (),
        0,
        (),
        (),
    ),
    "renamed track reuses audio": (
        DONE,
        {
            "study/old-name.mp3": fact("study/old-name.mp3", FP_L),
            "study/deep.mp3": fact("study/deep.mp3", FP_J),
        },
        (),
        1,
        (),
        ("study/old-name.mp3",),
    ),
    "in flight is never resubmitted": (
        {FP_L: gen(FP_L, "running"), FP_J: gen(FP_J, "unknown")},
        {},
        (),
        2,
        (),
        (),
    ),
    "parked is not resubmitted": (
        {FP_L: gen(FP_L, "parked"), FP_J: gen(FP_J, "queued")},
        {},
        (FP_J,),
        0,
        (),
        (),
    ),
}


@pytest.mark.parametrize(
    ("gens", "facts", "submit", "reuse", "restore", "prune"),
    list(DIFF_CASES.values()),
    ids=list(DIFF_CASES),
)
def test_diff(
    gens: dict[str, Generation],
    facts: dict[str, OutputFact],
    submit: tuple[str, ...],
    reuse: int,
    restore: tuple[str, ...],
    prune: tuple[str, ...],
) -> None:
    d = plan(DESIRED, Snapshot(gens, outputs=facts), 0.0, Limits(200, prune=True))
    assert d.submit == submit
    assert len(d.reuse) == reuse
    assert d.restore == restore
    assert d.prune == prune
    assert d.cost == CREDITS_PER_TASK * len(submit)


def test_prune_needs_opt_in_and_a_healthy_folder() -> None:
    facts = {"study/gone.mp3": fact("study/gone.mp3", "x")}

    def pruned(desired: Any, prune: bool) -> tuple[str, ...]:
        return plan(desired, Snapshot({}, outputs=facts), 0.0, Limits(200, prune=prune)).prune

    assert pruned(DESIRED, False) == ()
    broken = desired_state({}, ["a.yaml"], "ok", {"a.yaml": A})
    assert pruned(broken, True) == ()
    assert pruned(DESIRED, True) == ("study/gone.mp3",)


def test_a_pass_that_reads_no_output_facts_plans_submissions_only() -> None:
    d = plan(DESIRED, Snapshot(DONE), 0.0, Limits(200, prune=True))
    assert (d.submit, d.reuse, d.restore, d.prune) == ((), (), (), ())


#: Twelve queued tracks in one soundtrack, f00..f11 in spec order.
TWELVE = desired_state(
    {"m.yaml": spec("m.yaml", "m", *(track(f"t{i:02}", {**LOFI, "n": i}) for i in range(12)))},
    [],
    "ok",
    {},
)
F = TWELVE.fingerprints()
BUDGET = Allowance(3, "daily budget reached (0/45 credits)", "budget")
#: Each case: the snapshot, then what is submitted and each held one's reason, by index.
HOLD_CASES: dict[str, tuple[Snapshot, range, dict[int, str]]] = {
    "everything fits": (Snapshot({}), range(12), {}),
    "the daily budget admits three": (
        Snapshot({}, allowance=BUDGET),
        range(3),
        {i: "budget" for i in range(3, 12)},
    ),
    "the balance admits none": (
        Snapshot({}, allowance=Allowance(0, "account balance too low (10 credits)", "balance")),
        range(0),
        {i: "balance" for i in range(12)},
    ),
    "the run's ceiling (--max-credits) admits one": (
        Snapshot(
            {}, allowance=Allowance(1, "--max-credits reached (0/15 credits this run)", "run")
        ),
        range(1),
        {i: "run" for i in range(1, 12)},
    ),
    "the in-flight cap keeps whole batches": (
        Snapshot({}, in_flight=9),
        range(10),
        {10: "in_flight", 11: "in_flight"},
    ),
    "cap first, then budget": (
        Snapshot({}, in_flight=9, allowance=BUDGET),
        range(3),
        {**{i: "budget" for i in range(3, 10)}, 10: "in_flight", 11: "in_flight"},
    ),
    "a backoff holds one until its time": (
        Snapshot({F[0]: Generation(F[0], "queued", 1, 50.0, "rate limited")}),
        range(1, 12),
        {0: "backoff"},
    ),
    "a pause holds everything queued": (
        Snapshot({}, paused_until=99.0, pause_reason="API key rejected (401): no"),
        range(0),
        {i: "paused" for i in range(12)},
    ),
    "suspended comes first, also over a pause": (
        Snapshot({}, suspension=Suspension(True), paused_until=99.0),
        range(0),
        {i: "suspended" for i in range(12)},
    ),
    "a saved plan being applied sends only its own": (
        Snapshot({}, only=frozenset(F[:2])),
        range(2),
        {i: "unplanned" for i in range(2, 12)},
    ),
    "in flight, parked and done are neither submitted nor held": (
        Snapshot(
            {
                F[0]: Generation(F[0], "running"),
                F[1]: Generation(F[1], "parked"),
                F[2]: Generation(F[2], "succeeded"),
            }
        ),
        range(3, 12),
        {},
    ),
}


@pytest.mark.parametrize(
    ("snapshot", "sent", "held"), list(HOLD_CASES.values()), ids=list(HOLD_CASES)
)
def test_plan_says_what_is_submitted_and_why_the_rest_waits(
    snapshot: Snapshot, sent: range, held: dict[int, str]
) -> None:
    d = plan(TWELVE, snapshot, 10.0, Limits(max_in_flight=20))
    assert d.submit == tuple(F[i] for i in sent)
    assert {F.index(h.fingerprint): h.reason for h in d.held} == held
    assert d.cost == CREDITS_PER_TASK * len(sent)
    assert [fp for b in d.batches for fp in b] == list(d.submit)


def test_held_ones_say_until_when() -> None:
    d = plan(TWELVE, HOLD_CASES["a backoff holds one until its time"][0], 10.0, Limits(20))
    assert d.held == (Held(F[0], "backoff", "retry after: rate limited", 50.0),)
    budget = plan(TWELVE, Snapshot({}, allowance=BUDGET), 10.0, Limits(20)).held[0]
    assert (budget.detail, budget.until) == ("daily budget reached (0/45 credits)", 86_400.0)


@pytest.mark.parametrize("g", [0, 1, 9, 10, 11, 25, 100, 1001])
def test_batches_cost_ceil_g_over_10(g: int) -> None:
    fps = [f"fp{i}" for i in range(g)]
    groups = batches(fps)
    assert len(groups) == math.ceil(g / 10)
    assert [fp for group in groups for fp in group] == fps
    assert all(1 <= len(group) <= 10 for group in groups)


SUBMIT_CASES = {
    "all due": (["a", "b", "c"], {}, 0, 10, None, ("a", "b", "c")),
    "in-flight cap holds a part batch back": (["a", "b", "c"], {}, 9, 10, None, ()),
    "budget": (["a", "b", "c"], {}, 0, 10, 2, ("a", "b")),
    "backoff not passed": (
        ["a", "b"],
        {"a": gen("a", "queued", next_attempt=50.0)},
        0,
        10,
        None,
        ("b",),
    ),
    "running never resubmitted": (["a", "b"], {"a": gen("a", "running")}, 0, 10, None, ("b",)),
    "nothing affordable": (["a"], {}, 0, 10, 0, ()),
    "cap rounds down to full batches": (
        [f"f{i}" for i in range(30)],
        {},
        5,
        20,
        None,
        tuple(f"f{i}" for i in range(10)),
    ),
    "cap sends whole batches": (
        [f"f{i}" for i in range(30)],
        {},
        0,
        25,
        None,
        tuple(f"f{i}" for i in range(20)),
    ),
    "a cap below ten with nothing in flight does not wait": (
        [f"f{i}" for i in range(5)],
        {},
        0,
        2,
        None,
        ("f0", "f1"),
    ),
    "the rest fits: no waiting": (
        [f"f{i}" for i in range(7)],
        {},
        5,
        20,
        None,
        tuple(f"f{i}" for i in range(7)),
    ),
    "budget does not wait for a full batch": (
        [f"f{i}" for i in range(30)],
        {},
        0,
        100,
        3,
        ("f0", "f1", "f2"),
    ),
}


@pytest.mark.parametrize(
    ("order", "gens", "in_flight", "cap", "affordable", "expected"),
    list(SUBMIT_CASES.values()),
    ids=list(SUBMIT_CASES),
)
def test_due_submissions(
    order: list[str],
    gens: dict[str, Generation],
    in_flight: int,
    cap: int,
    affordable: int | None,
    expected: tuple[str, ...],
) -> None:
    got = due_submissions(
        order, gens, 10.0, in_flight=in_flight, max_in_flight=cap, affordable=affordable
    )
    assert got == expected


@pytest.mark.parametrize(
    ("attempts", "retry_after", "low", "high"),
    [
        (1, None, 2.5, 5.0),
        (3, None, 10.0, 20.0),
        (20, None, 30.0, 60.0),
        (1, 40.0, 40.0, 40.0),
        (1, 1000.0, 60.0, 60.0),
    ],
)
def test_backoff_is_capped_exponential_with_jitter_and_honours_retry_after(
    attempts: int, retry_after: float | None, low: float, high: float
) -> None:
    rng = random.Random(7)
    for _ in range(50):
        d = backoff(attempts, initial=5.0, cap=60.0, retry_after=retry_after, rng=rng)
        assert low <= d <= high


@pytest.mark.parametrize(
    ("spent", "budget", "balance", "run", "max_credits", "n", "limit"),
    [
        (0, None, None, 0, None, None, None),
        (0, 150, None, 0, None, 10, "budget"),
        (150, 150, None, 0, None, 0, "budget"),
        (0, None, 44, 0, None, 2, "balance"),
        (0, 3000, 30, 0, None, 2, "balance"),
        (2990, 3000, 1000, 0, None, 0, "budget"),
        # --max-credits counts this run only; the tightest ceiling binds.
        (900, 3000, 1000, 30, 60, 2, "run"),
        (900, 3000, 1000, 60, 60, 0, "run"),
        (0, None, None, 0, 14, 0, "run"),
        (0, 45, None, 0, 1000, 3, "budget"),
    ],
)
def test_affordable_tasks(
    spent: int,
    budget: int | None,
    balance: int | None,
    run: int,
    max_credits: int | None,
    n: int | None,
    limit: str | None,
) -> None:
    got = affordable_tasks(
        spent_today=spent,
        daily_budget=budget,
        balance=balance,
        spent_in_run=run,
        max_credits=max_credits,
    )
    assert got.tasks == n
    assert got.limit == limit
    assert (got.reason is None) == (limit is None)


ECHO_CANDIDATES = {
    "a": {"custom_mode": False, "mv": "sonic-v5", "gpt_description_prompt": "lofi rain"},
    "b": {"custom_mode": False, "mv": "sonic-v5", "gpt_description_prompt": "lofi sun"},
    # A variant of "a": the same request, so either item may take the task.
    "c": {"custom_mode": False, "mv": "sonic-v5", "gpt_description_prompt": "lofi rain"},
    "d": {"custom_mode": True, "mv": "sonic-v4", "prompt": "[Verse]\nla la", "title": "La"},
}


@pytest.mark.parametrize(
    ("echo", "owner"),
    [
        ({"mv": "sonic-v5", "gpt_description_prompt": "lofi sun"}, "b"),
        ({"mv": "sonic-v5", "gpt_description_prompt": "lofi rain "}, "a"),
        ({"mv": "sonic-v4", "lyrics": "[Verse]\nla la", "gpt_description_prompt": ""}, "d"),
        # Nothing echoed, a model that differs, or a prompt no item has: no owner.
        ({}, None),
        ({"mv": "sonic-v4", "gpt_description_prompt": "lofi sun"}, None),
        ({"mv": "sonic-v5", "gpt_description_prompt": "jazz"}, None),
    ],
)
def test_match_orphan_only_when_certain(echo: dict[str, str], owner: str | None) -> None:
    assert match_orphan(ECHO_CANDIDATES, echo) == owner


def test_match_orphan_refuses_two_distinct_requests() -> None:
    twins = {
        "x": {"custom_mode": True, "mv": "sonic-v4", "prompt": "la", "title": "One"},
        "y": {"custom_mode": True, "mv": "sonic-v4", "prompt": "la", "title": "Two"},
    }
    assert match_orphan(twins, {"mv": "sonic-v4", "lyrics": "la"}) is None


def batch(
    batch_id: str, submitted_at: float, last_poll: float | None = None, next_poll: float = 10.0
) -> OpenBatch:
    return OpenBatch(batch_id, submitted_at, last_poll, next_poll)


NOW = 10.0


@pytest.mark.parametrize(
    ("open_batches", "expected"),
    [
        ([], []),
        ([batch("a", 0.0)], [["a"]]),
        # One burst of submits is one cohort; a later burst is its own.
        (
            [batch("c", 0.4), batch("a", 0.0), batch("b", 0.2), batch("d", 7.0)],
            [["a", "b", "c"], ["d"]],
        ),
        # The window runs from a cohort's first batch, so a slow trickle splits.
        ([batch("a", 0.0), batch("b", 4.0), batch("c", 8.0)], [["a", "b"], ["c"]]),
        # Probe first: a due batch never polled, then the least recently polled.
        (
            [batch("a", 0.0, 3.0), batch("b", 0.1, 2.0), batch("c", 0.2)],
            [["c", "b", "a"]],
        ),
        ([batch("a", 0.0, 3.0), batch("b", 0.1, 3.0)], [["a", "b"]]),
        # A batch due soon joins its cohort but is never the probe.
        (
            [batch("a", 0.0, next_poll=10.2), batch("b", 0.1, 3.0)],
            [["b", "a"]],
        ),
        # A cohort with nothing due yet is left alone.
        ([batch("a", 0.0, next_poll=10.2), batch("b", 8.0)], [["b"]]),
    ],
)
def test_poll_cohorts(open_batches: list[OpenBatch], expected: list[list[str]]) -> None:
    cohorts = poll_cohorts(open_batches, 5.0, NOW)
    assert [[b.batch_id for b in c] for c in cohorts] == expected


def test_work_held_back_is_still_a_change_but_a_suspension_is_not() -> None:
    spent = plan(TWELVE, Snapshot({}, allowance=Allowance(0, "spent", "budget")), 10.0, Limits(20))
    assert (spent.submit, spent.changes) == ((), True)
    suspended = plan(TWELVE, Snapshot({}, suspension=Suspension(True)), 10.0, Limits(20))
    assert (suspended.submit, suspended.changes) == ((), False)
