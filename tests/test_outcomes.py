"""The outcome table: what each task state, refusal and lost task means for a generation.

Plain values in, one outcome out: no ledger, no service, no clock.
"""

from __future__ import annotations

import pytest

from reconciler.outcomes import (
    MAX_UPSTREAM_ATTEMPTS,
    Abandon,
    Done,
    Outcome,
    Park,
    Poll,
    RejectionKind,
    Requeue,
    lost_task,
    rejected_item,
    rejection_kind,
    task_outcome,
)

AT = 1_000.0  # when a retry would be due
TIMEOUT = 600.0
LAST = MAX_UPSTREAM_ATTEMPTS - 1  # attempts before the last allowed one


@pytest.mark.parametrize(
    ("status", "error", "failure_type", "age", "attempts", "expected"),
    [
        ("succeeded", None, None, 10.0, 0, Done()),
        # Done whatever its age or history: the clips are there.
        ("succeeded", None, None, TIMEOUT * 10, LAST, Done()),
        ("queued", None, None, 10.0, 0, Poll()),
        ("running", None, None, TIMEOUT, 0, Poll()),
        ("streaming", None, None, TIMEOUT, LAST, Poll()),
        # Past the timeout: charged, so sent again only while attempts remain.
        ("running", None, None, TIMEOUT + 1, 0, Abandon("did not finish within 600 s", AT)),
        ("running", None, None, TIMEOUT + 1, LAST, Abandon("did not finish within 600 s", None)),
        # An upstream failure is refunded: tried again until the last attempt.
        ("failed", "GPU fell over", "internal", 10.0, 0, Requeue(AT, "GPU fell over")),
        ("failed", None, "timeout", 10.0, LAST - 1, Requeue(AT, "timeout")),
        ("failed", None, None, 10.0, 0, Requeue(AT, "failed upstream")),
        (
            "failed",
            "GPU fell over",
            "internal",
            10.0,
            LAST,
            Park(f"failed upstream {MAX_UPSTREAM_ATTEMPTS} times: GPU fell over"),
        ),
        # A verdict on the content is parked at the first failure.
        ("failed", "lyrics refused", "forbidden", 10.0, 0, Park("forbidden: lyrics refused")),
        ("failed", None, "forbidden", 10.0, 0, Park("forbidden: forbidden")),
    ],
)
def test_task_outcome(
    status: str,
    error: str | None,
    failure_type: str | None,
    age: float,
    attempts: int,
    expected: Outcome,
) -> None:
    got = task_outcome(
        status,
        error=error,
        failure_type=failure_type,
        age=age,
        timeout=TIMEOUT,
        attempts=attempts,
        retry_at=AT,
    )
    assert got == expected


@pytest.mark.parametrize(
    ("type_", "message", "kind"),
    [
        ("insufficient_credits", "", "credits"),
        ("payment_required", "whatever", "credits"),
        ("moderation", "balance too low", "content"),  # a known type wins over words
        ("forbidden", "", "content"),
        ("invalid_request", "", "content"),
        (None, "Insufficient credits to run this job", "credits"),
        (None, "subscription expired", "credits"),
        (None, "prompt violates the content policy", "content"),
        (None, "title must be at most 80 characters", "content"),
        (None, "something odd happened", "unknown"),
        ("weird_new_type", "", "unknown"),
    ],
)
def test_rejection_kind(type_: str | None, message: str, kind: RejectionKind) -> None:
    assert rejection_kind(type_, message) == kind


@pytest.mark.parametrize(
    ("kind", "attempts", "expected"),
    [
        ("content", 0, Park("no")),
        ("credits", 0, Requeue(AT, "no")),  # waits for the account (the caller pauses)
        ("credits", LAST, Requeue(AT, "no")),  # money is never a verdict on the item
        ("unknown", 0, Requeue(AT, "no")),
        ("unknown", LAST, Park("no")),
    ],
)
def test_rejected_item(kind: RejectionKind, attempts: int, expected: Outcome) -> None:
    assert rejected_item(kind, "no", attempts=attempts, retry_at=AT) == expected


@pytest.mark.parametrize(
    ("resubmits", "max_resubmits", "expected"),
    [
        (0, 1, Requeue(AT, "task not found")),
        (1, 1, Park("task t-1 unknown to the service; ask a person")),
        (0, 0, Park("task t-1 unknown to the service; ask a person")),
        (2, 3, Requeue(AT, "task not found")),
    ],
)
def test_lost_task(resubmits: int, max_resubmits: int, expected: Outcome) -> None:
    got = lost_task(
        "t-1",
        "task not found",
        resubmits=resubmits,
        max_resubmits=max_resubmits,
        retry_at=AT,
        park="ask a person",
    )
    assert got == expected
