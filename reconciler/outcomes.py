"""Outcomes: what a task's state or a refused item means for its generation. Pure.

The one home of the per-item rejection policy: :func:`rejection_kind` reads a
refusal (the service's type, else its words) and :func:`rejected_item` says
what follows; ``musicapi`` asks the same words whether a 403 is about money.

Where it sits: between tracking (polls, submit answers) and the ledger. The
reconciler asks the service, hands the answer here with the facts it needs
(attempts so far, the task's age, when a retry would be due), gets back one
:data:`Outcome`, and the ledger applies it. The policy is decided here once;
the ledger only checks that the task is still its generation's current one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

#: How often an upstream failure is tried before the generation is parked.
MAX_UPSTREAM_ATTEMPTS = 3
#: Upstream failure types that are a verdict on the content, not a hiccup.
PERMANENT_FAILURES = frozenset({"forbidden"})

#: What a refused item means (:func:`rejection_kind`).
RejectionKind = Literal["credits", "content", "unknown"]

#: A rejection's words, when it names no type: money pauses, the rest parks.
#: (A 403 is about money when its reason says so too; anything else is moderation.)
_CREDIT_WORDS = re.compile(
    r"credit|subscri|balance|insufficient|quota|billing|payment", re.IGNORECASE
)
_CONTENT_WORDS = re.compile(
    r"moderat|copyright|inappropriate|forbidden|policy|violat|invalid|must|required|too long|"
    r"exceed|characters|unknown|not allowed|not supported|bad request|validation",
    re.IGNORECASE,
)


def rejection_kind(type_: str | None, message: str) -> RejectionKind:
    """What a refused item means for the caller: ``credits``, ``content`` or ``unknown``.

    The service's ``type`` decides when it names one we know; otherwise the
    message's words do (a rejection may carry only a message).
    """
    if type_ in ("insufficient_credits", "payment_required"):
        return "credits"
    if type_ in ("bad_request", "forbidden", "moderation", "invalid_request"):
        return "content"
    if _CREDIT_WORDS.search(message):
        return "credits"
    if _CONTENT_WORDS.search(message):
        return "content"
    return "unknown"


@dataclass(frozen=True)
class Poll:
    """Still running within its time: record what the poll said, poll again."""


@dataclass(frozen=True)
class Done:
    """Succeeded: the generation's clips are there to download."""


@dataclass(frozen=True)
class Requeue:
    """Not done, and refunded or never charged: send it again at ``at``."""

    at: float
    reason: str


@dataclass(frozen=True)
class Park:
    """Wait for a person (``reconciler retry``): sending it again would not help."""

    reason: str


@dataclass(frozen=True)
class Abandon:
    """A task that never ends: given up on, and it was charged, so sending the
    generation again (``requeue_at``) counts as possible double spend; None parks it."""

    reason: str
    requeue_at: float | None


Outcome = Poll | Done | Requeue | Park | Abandon


def failure_reason(error: str | None, failure_type: str | None) -> str:
    """The words a failed task is reported with."""
    return error or failure_type or "failed upstream"


def task_outcome(
    status: str,
    *,
    error: str | None,
    failure_type: str | None,
    age: float,
    timeout: float,
    attempts: int,
    retry_at: float,
) -> Outcome:
    """What one poll of a task means for its generation.

    ``age`` is seconds since the task was created, ``attempts`` the
    generation's upstream attempts before this one, ``retry_at`` when a retry
    would be due. A failure the service reports is refunded, so it is tried
    again until ``MAX_UPSTREAM_ATTEMPTS``; a failure type that judges the
    content is parked at once. A task past ``timeout`` is one the service
    should have timed out itself (a refunded failure); it is given up on.
    """
    last_try = attempts + 1 >= MAX_UPSTREAM_ATTEMPTS
    if status == "succeeded":
        return Done()
    if status != "failed":
        if age <= timeout:
            return Poll()
        return Abandon(f"did not finish within {timeout:.0f} s", None if last_try else retry_at)
    reason = failure_reason(error, failure_type)
    if failure_type in PERMANENT_FAILURES:
        return Park(f"{failure_type}: {reason}")
    if last_try:
        return Park(f"failed upstream {attempts + 1} times: {reason}")
    return Requeue(retry_at, reason)


def rejected_item(
    kind: RejectionKind, reason: str, *, attempts: int, retry_at: float
) -> Requeue | Park:
    """What a submit answer refusing one item means for its generation.

    Content is parked (sending it again is refused again); a refusal for
    money waits for the account (the caller pauses submissions); a refusal
    nobody can classify is tried a few times, then parked.
    """
    if kind == "content" or (kind == "unknown" and attempts + 1 >= MAX_UPSTREAM_ATTEMPTS):
        return Park(reason)
    return Requeue(retry_at, reason)


def lost_task(
    task_id: str, reason: str, *, resubmits: int, max_resubmits: int, retry_at: float, park: str
) -> Requeue | Park:
    """The service says it does not know a task it handed out (a 404).

    The task was charged and may still exist (a 404 can be wrong), so sending
    the generation again is possible double spend, held to the same allowance
    (``max_resubmits``) as a lost submit answer; past it, a person decides.
    ``park`` says why such a generation waits.
    """
    if resubmits >= max_resubmits:
        return Park(f"task {task_id} unknown to the service; {park}")
    return Requeue(retry_at, reason)
