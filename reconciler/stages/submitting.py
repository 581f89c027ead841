"""Submitting: the plan for this pass → batches → the ledger.

Where it sits: after scanning in a pass, before tracking. It reads a
snapshot (the ledger's generations, the suspension, this process's pause),
has ``planning.plan`` decide what is submitted now and what is held back
and why (the same decision ``reconciler plan`` shows), asks for the balance
only when something is due, and sends full batches (``musicapi``), each
recorded in the ledger before it is sent and with its answer after
(rule 2). It keeps the budgets, the balance, the service's health and the
pauses: a ceiling reached, an empty account or a rejected key stops
submitting until it can have lifted.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from typing import Any

from reconciler.errors import (
    AmbiguousSubmitError,
    APIError,
    AuthError,
    BatchUnsupportedError,
    InsufficientCreditsError,
    RejectedError,
    TemporaryAPIError,
)
from reconciler.layout import check_layout
from reconciler.musicapi import Accepted, Rejected, Unconfirmed
from reconciler.outcomes import Park, rejected_item, rejection_kind
from reconciler.planning import (
    CREDITS_PER_TASK,
    IN_FLIGHT,
    Allowance,
    Desired,
    Limits,
    Snapshot,
    affordable_tasks,
    plan,
    utc_day_start,
)
from reconciler.stages.shared import (
    Context,
    PassResult,
    Shared,
    api_health,
    generations,
    pause_submissions,
)


class Submitting:
    """Submits what the plan says; holds the balance read and the batch fallback."""

    def __init__(self, ctx: Context, shared: Shared, only: frozenset[str] | None) -> None:
        self.ctx = ctx
        self.shared = shared
        #: Applying a saved plan: nothing else is submitted (``reconciler apply``).
        self.only = only
        # Kept with the URL that answered so: a run against a mistyped URL
        # (a 404 everywhere) must not turn batching off at the right one.
        unsupported_at = ctx.ledger.get("batch_unsupported")
        self._batch_unsupported = unsupported_at == ctx.settings.api_url
        #: Another URL's verdict, forgotten once a batch is answered here.
        self._unsupported_elsewhere = unsupported_at is not None and not self._batch_unsupported
        #: When this process started spending: ``--max-credits`` counts from here.
        self._run_started = ctx.clock()
        #: The last balance read and when, and tasks submitted since: the
        #: balance is asked at most once per poll interval.
        self._balance: tuple[float, int] | None = None
        self._submitted_since_balance = 0
        self._layout_reported: str | None = None
        #: Submits turned away in a row without an answer about their items (a
        #: 429, a refused connection): the wait before the next grows with it.
        #: Kept here, not as the items' attempts: it says how the service is,
        #: not how the items fare, and three attempts park a generation.
        self._turned_away = 0

    def expire_unknown(self) -> None:
        """Submits whose answer was lost, past their grace: due again, or parked
        after too many tries."""
        again, parked = self.ctx.ledger.expire_unknown(
            self.ctx.settings.ambiguous_grace, self.ctx.settings.max_resubmits
        )
        if again:
            self.ctx.log.warning("submit.resubmitting_ambiguous", items=len(again))
        for fp in parked:
            self.ctx.log.error("generation.parked", fingerprint=fp, reason="submit answer lost")

    def _item(self, fp: str) -> dict[str, Any]:
        item = self.ctx.ledger.request(fp)
        hook = self.ctx.settings.webhook
        if hook is not None:
            # Each item carries its own URL so a callback names its generation
            # even when the submit's answer (and so the task id) was lost.
            item["webhook_url"] = f"{hook.public_url}/hook/{fp}"
            item["webhook_secret"] = hook.secret.get_secret_value()
        return item

    def _batch_hook(self) -> dict[str, str]:
        """The batch-level webhook the service's batch page describes; per-item
        URLs win where the service honours them."""
        hook = self.ctx.settings.webhook
        if hook is None:
            return {}
        return {
            "webhook_url": f"{hook.public_url}/hook",
            "webhook_secret": hook.secret.get_secret_value(),
        }

    async def _read_balance(self, now: float) -> int | None:
        """The account balance, asked at most once per poll interval: in between,
        what this process submitted since is taken off the last answer."""
        if self._balance is not None and now - self._balance[0] < self.ctx.settings.poll_interval:
            return max(0, self._balance[1] - CREDITS_PER_TASK * self._submitted_since_balance)
        try:
            balance = (await self.ctx.api.get_credits()).total
        except AuthError as exc:
            # A rejected key, not an empty account: api_health pauses
            # submissions with that reason, which the pass then shows.
            api_health(self.ctx, self.shared, exc)
            return None
        except APIError as exc:
            # Without a balance the budgets still hold; the service refuses
            # what the account cannot pay for, per item.
            api_health(self.ctx, self.shared, exc)
            self.ctx.log.warning("credits.unavailable", error=exc.message)
            return None
        self._balance = (now, balance)
        self._submitted_since_balance = 0
        return balance

    async def _allowance(self, now: float) -> Allowance:
        balance = await self._read_balance(now)
        allowance = affordable_tasks(
            spent_today=CREDITS_PER_TASK * self.ctx.ledger.spent_since(utc_day_start(now)),
            daily_budget=self.ctx.settings.daily_budget,
            balance=balance,
            spent_in_run=CREDITS_PER_TASK * self.ctx.ledger.spent_since(self._run_started),
            max_credits=self.ctx.settings.max_credits,
        )
        if allowance.tasks is not None and allowance.tasks <= 0:
            self._spent_out(allowance, now)
        elif now >= self.shared.pause_until:
            # Not when asking for the balance found the key rejected, and paused.
            self.shared.block_reason = None
        return allowance

    def reconsider(self) -> None:
        """The settings changed (a reload): a ceiling reached under the old ones may
        have lifted, so the next pass asks again instead of waiting out the pause."""
        self.shared.pause_until = 0.0
        self.shared.block_reason = None
        self._balance = None

    def _spent_out(self, allowance: Allowance, now: float) -> None:
        """A ceiling is reached: no submit until it can have lifted (rule 15: the
        pass waits for that, or for a poll, rather than asking again at once)."""
        self.shared.block_reason = allowance.reason
        if allowance.limit == "budget":
            until = utc_day_start(now) + 86_400
        elif allowance.limit == "run":
            until = math.inf
        else:
            until = now + self.ctx.settings.backoff_cap
        self.shared.pause_until = until
        self.ctx.log.warning("submit.paused", reason=allowance.reason, until=until)

    def _snapshot(self, desired: Desired) -> Snapshot:
        """What the submit step decides on: the ledger's generations (those
        ``desired`` needs), the suspension and this process's pause; the
        allowance is added only when something is due (the balance costs a request)."""
        gens = generations(self.ctx, self.shared, desired)
        return Snapshot(
            generations=gens,
            in_flight=sum(1 for g in gens.values() if g.state in IN_FLIGHT),
            suspension=self.ctx.ledger.suspension(),
            paused_until=self.shared.pause_until,
            pause_reason=self.shared.block_reason,
            only=self.only,
        )

    async def submit(self, desired: Desired, result: PassResult, now: float) -> None:
        """Carry out what ``planning.plan`` says the pass submits now: the same
        decision ``reconciler plan`` shows."""
        limits = Limits(self.ctx.settings.max_in_flight)
        snapshot = self._snapshot(desired)
        draft = plan(desired, snapshot, now, limits)
        suspended = draft.held_by("suspended")
        result.queued = len(draft.submit) + len(draft.held) - len(suspended)
        if not result.queued and suspended:
            # Only held work is left: ``sync`` stops here rather than wait for a resume.
            result.blocked = "suspended (`reconciler resume` lifts it)"
        self.shared.submit_waits_for_time = True
        if (
            not draft.submit
            and draft.held_by("unplanned")
            and not draft.held_by("paused", "backoff", "in_flight", "budget", "balance", "run")
        ):
            # Applying a saved plan, and all of it is sent: the rest waits for
            # another plan, not for a time.
            result.blocked = "not in the saved plan"
            self.shared.submit_waits_for_time = False
        if draft.held_by("paused"):
            result.blocked = self.shared.block_reason
            self.ctx.log.debug("submit.held", queued=result.queued, reason=self.shared.block_reason)
            return
        if not draft.submit:
            if draft.held_by("in_flight"):
                # Held back by the in-flight cap: a finished task makes room, and
                # finished tasks are found by polls, which are scheduled anyway.
                self.shared.submit_waits_for_time = False
            self.ctx.log.debug("submit.nothing_due", queued=result.queued)
            return
        if self._layout_blocks(result):
            return
        # The balance is asked only now that there is something to pay for.
        allowance = await self._allowance(now)
        # Asking for the balance may have found the key rejected, and paused.
        final = plan(
            desired,
            replace(
                snapshot,
                allowance=allowance,
                paused_until=self.shared.pause_until,
                pause_reason=self.shared.block_reason,
            ),
            now,
            limits,
        )
        self.ctx.log.debug(
            "submit.due",
            queued=result.queued,
            due=len(final.submit),
            held=dict(Counter(h.reason for h in final.held)),
            in_flight=snapshot.in_flight,
            max_in_flight=self.ctx.settings.max_in_flight,
            held_reason=self.shared.block_reason,
        )
        if self.shared.block_reason and not final.submit:
            result.blocked = self.shared.block_reason
            self.ctx.ledger.put("submit_block", self.shared.block_reason)
            return
        self.ctx.ledger.put("submit_block", None)
        for group in final.batches:
            if self._batch_unsupported:
                for fp in group:
                    if not await self._to_its_end(self._submit_single(fp, result)):
                        return
            elif not await self._to_its_end(self._submit_batch(group, result)):
                return

    def _layout_blocks(self, result: PassResult) -> bool:
        """Pay only for what can land: no submit while the output or state folder
        cannot take the result (a folder made read-only, or replaced by a file,
        while the daemon runs). Nothing is due again until a person fixes it: a
        file event or the rescan starts the next pass."""
        problems = check_layout(
            self.ctx.settings.specs_dir, self.ctx.settings.out_dir, self.ctx.settings.state_dir
        )
        if not problems:
            self._layout_reported = None
            return False
        reason = f"the folders cannot take new audio: {problems[0]}"
        if self._layout_reported != reason:
            self.ctx.log.error("submit.refused_layout", problems=problems)
        self._layout_reported = reason
        result.blocked = reason
        self.shared.submit_waits_for_time = False
        return True

    async def _to_its_end(self, submit: Coroutine[Any, Any, bool]) -> bool:
        """One submit call, run to its end and its answer recorded even when
        the pass is cancelled (a stop: SIGTERM, Ctrl-C). Cancelled on the wire,
        its items would be ambiguous and, without a callback, sent again after
        ``ambiguous_grace``: paid twice. It ends within the client's request
        timeout; the cancellation goes on after it."""
        call = asyncio.ensure_future(submit)
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            self.ctx.log.warning("submit.finishing_before_stop")
            await call
            raise

    async def _submit_batch(self, group: Sequence[str], result: PassResult) -> bool:
        """One batch submit. Returns False when submitting should stop for this pass."""
        submit_id = self.ctx.ledger.begin_submit(group, "batch")
        items = [self._item(fp) for fp in group]
        # A replica that lost the lease since the intent was recorded sends
        # nothing: the new leader treats the intent as ambiguous.
        self.ctx.ledger.check_fence()
        result.submit_calls += 1
        try:
            answer = await self.ctx.api.submit_batch(items, **self._batch_hook())
        except BatchUnsupportedError:
            self.ctx.ledger.submit_not_sent(submit_id, 0.0, "batch endpoint unavailable")
            self._batch_unsupported = True
            self.ctx.ledger.put("batch_unsupported", self.ctx.settings.api_url)
            self.ctx.log.warning(
                "batch.unsupported", fallback="one create per item, per-task polls"
            )
            for fp in group:
                if not await self._submit_single(fp, result):
                    return False
            return True
        except RejectedError as exc:
            if len(group) == 1:
                return self._submit_failed(submit_id, group, exc, result)
            # One bad item can make the service refuse the whole batch: halves,
            # then singles, so only that item is parked with the service's words.
            self.ctx.ledger.submit_refused(submit_id, exc.message)
            self.ctx.log.warning("batch.refused", items=len(group), error=exc.message)
            half = len(group) // 2
            for part in (group[:half], group[half:]):
                if not await self._submit_batch(part, result):
                    return False
            return True
        except APIError as exc:
            return self._submit_failed(submit_id, group, exc, result)
        self._turned_away = 0
        if self._unsupported_elsewhere:
            self.ctx.ledger.put("batch_unsupported", None)
            self._unsupported_elsewhere = False
        accepted: dict[str, tuple[str, int]] = {}
        requeue: dict[str, tuple[float, str]] = {}
        parked: dict[str, str] = {}
        unconfirmed: dict[str, str] = {}
        for_money: set[str] = set()
        attempts = self.ctx.ledger.attempts(group)
        for fp, res in zip(group, answer.results, strict=True):
            if isinstance(res, Accepted):
                accepted[fp] = (res.task_id, res.index)
            elif isinstance(res, Unconfirmed):
                unconfirmed[fp] = res.reason
            else:
                self._item_rejected(fp, res, attempts[fp], requeue, parked, for_money)
        collisions = self.ctx.ledger.submit_answered(
            submit_id,
            answer.batch_id,
            accepted,
            requeue,
            parked,
            uncounted=for_money,
            unconfirmed=unconfirmed,
            orphans=answer.orphans,
            submitted=answer.submitted,
            poll_at=self.ctx.clock() + self.ctx.settings.poll_interval,
        )
        for what in collisions:
            self.ctx.log.error("ledger.id_collision", known=what, submit_id=submit_id)
        result.submitted += len(accepted)
        self._submitted_since_balance += len(accepted) + len(unconfirmed)
        self.ctx.log.info(
            "batch.submitted",
            batch_id=answer.batch_id,
            accepted=len(accepted),
            rejected=len(parked) + len(requeue),
            unconfirmed=len(unconfirmed),
        )
        for fp, reason in parked.items():
            self.ctx.log.warning("generation.parked", fingerprint=fp, reason=reason)
        return not requeue or self.ctx.clock() >= self.shared.pause_until

    def _item_rejected(
        self,
        fp: str,
        res: Rejected,
        attempts: int,
        requeue: dict[str, tuple[float, str]],
        parked: dict[str, str],
        for_money: set[str],
    ) -> None:
        """Policy for one refused item: content is parked, money pauses (and is
        no attempt of the item: ``for_money``), and a refusal nobody can
        classify is tried a few times, then parked."""
        reason = f"rejected ({res.type}): {res.error}"
        kind = rejection_kind(None if res.type == "rejected" else res.type, res.error)
        outcome = rejected_item(
            kind, reason, attempts=attempts, retry_at=self.ctx.retry_at(attempts)
        )
        if isinstance(outcome, Park):
            parked[fp] = outcome.reason
            return
        if kind == "credits":
            pause_submissions(self.ctx, self.shared, "insufficient credits on the account")
            for_money.add(fp)
        requeue[fp] = (outcome.at, outcome.reason)

    async def _submit_single(self, fp: str, result: PassResult) -> bool:
        submit_id = self.ctx.ledger.begin_submit([fp], "single")
        self.ctx.ledger.check_fence()
        result.submit_calls += 1
        try:
            task_id = await self.ctx.api.create(self._item(fp))
        except APIError as exc:
            return self._submit_failed(submit_id, [fp], exc, result)
        self._turned_away = 0
        self._submitted_since_balance += 1
        self.ctx.ledger.submit_answered(
            submit_id,
            None,
            {fp: (task_id, 0)},
            {},
            {},
            poll_at=self.ctx.clock() + self.ctx.settings.poll_interval,
        )
        result.submitted += 1
        self.ctx.log.info("task.submitted", task_id=task_id, fingerprint=fp)
        return True

    def _submit_failed(
        self, submit_id: int, group: Sequence[str], exc: APIError, result: PassResult
    ) -> bool:
        api_health(self.ctx, self.shared, exc)
        if isinstance(exc, AmbiguousSubmitError):
            self.ctx.ledger.submit_ambiguous(submit_id, exc.message)
            self._submitted_since_balance += len(group)
            self.ctx.log.error("submit.ambiguous", items=len(group), error=exc.message)
            return False
        if isinstance(exc, RejectedError) and len(group) == 1:
            (fp,) = group
            self.ctx.ledger.submit_answered(
                submit_id, None, {}, {}, {fp: f"rejected: {exc.message}"}, poll_at=0.0
            )
            self.ctx.log.warning("generation.parked", fingerprint=fp, reason=exc.message)
            return True
        if isinstance(exc, AuthError):
            self.ctx.ledger.submit_not_sent(submit_id, 0.0, exc.message)
            result.blocked = self.shared.block_reason
            return False
        if isinstance(exc, InsufficientCreditsError):
            pause_submissions(self.ctx, self.shared, f"insufficient credits: {exc.message}")
            self.ctx.ledger.submit_not_sent(submit_id, 0.0, exc.message)
            result.blocked = self.shared.block_reason
            return False
        retry_after = exc.retry_after if isinstance(exc, TemporaryAPIError) else None
        # Turned away unread: no attempt of the items is used up (three park a
        # generation, and a rate limit says nothing about it); the wait grows
        # with the submits turned away in a row.
        attempts = max(self.ctx.ledger.attempts(group).values())
        self._turned_away += 1
        self.ctx.ledger.submit_not_sent(
            submit_id,
            self.ctx.retry_at(max(attempts, self._turned_away - 1), retry_after),
            exc.message,
        )
        self.ctx.log.warning(
            "submit.retrying", items=len(group), error=exc.message, status=exc.status
        )
        return False
