"""Tracking: polls of open batches, single tasks and orphans → outcomes → the ledger.

Where it sits: after submitting in a pass. It reads what is due for a poll
from the ledger (batches in cohorts sent together, tasks submitted one by
one, orphans: charged tasks no item was attributed to), asks the service,
has ``outcomes.task_outcome`` decide what each task's state means for its
generation, and has the ledger apply that. Webhook hints only make a poll
due sooner; the poll is what is believed.
"""

from __future__ import annotations

import asyncio

from reconciler.errors import APIError, NotFoundError, TemporaryAPIError
from reconciler.ledger import ClipRecord, TaskUpdate
from reconciler.musicapi import TaskStatus
from reconciler.outcomes import Abandon, Park, Poll, Requeue, failure_reason, task_outcome
from reconciler.planning import OpenBatch, match_orphan, poll_cohorts
from reconciler.stages.shared import Context, PassResult, Shared, api_health

POLL_CONCURRENCY = 8


class Tracking:
    """Polls what is in flight; remembers which batch cohorts have shown progress."""

    def __init__(self, ctx: Context, shared: Shared) -> None:
        self.ctx = ctx
        self.shared = shared
        #: Open batches that have shown a finished task: their cohort is polled whole.
        self._progressed: set[str] = set()

    async def poll(self, result: PassResult) -> None:
        now = self.ctx.clock()
        sem = asyncio.Semaphore(POLL_CONCURRENCY)

        async def one_batch(batch_id: str) -> bool:
            async with sem:
                return await self._poll_batch(batch_id, result)

        async def one_task(task_id: str) -> None:
            async with sem:
                await self._poll_task(task_id, result)

        async def cohort(batches: list[OpenBatch]) -> None:
            due = [b.batch_id for b in batches if b.next_poll <= now]
            if not any(b.batch_id in self._progressed for b in batches):
                probe, *due = due
                if not await one_batch(probe):
                    # Its siblings were sent with it, so they are not done either:
                    # they wait for the next probe, due ones and soon due alike.
                    siblings = [b.batch_id for b in batches if b.batch_id != probe]
                    self.ctx.ledger.defer_batches(siblings, now + interval)
                    return
            await asyncio.gather(*(one_batch(b) for b in due))

        async def one_orphan(task_id: str, submit_id: int, batch_id: str | None) -> None:
            async with sem:
                await self._poll_orphan(task_id, submit_id, batch_id, result)

        interval = self.ctx.settings.poll_interval
        soon = self.ctx.ledger.batches_due_by(now + interval)
        cohorts = poll_cohorts(soon, interval, now)
        singles = self.ctx.ledger.due_single_tasks(now)
        orphans = self.ctx.ledger.due_orphans(now)
        self.ctx.log.debug(
            "poll.due",
            batches=len(soon),
            cohorts=len(cohorts),
            tasks=len(singles),
            orphans=len(orphans),
        )
        jobs = [cohort(c) for c in cohorts]
        jobs += [one_task(t.task_id) for t in singles]
        jobs += [one_orphan(*o) for o in orphans]
        await asyncio.gather(*jobs)

    async def _poll_batch(self, batch_id: str, result: PassResult) -> bool:
        """Poll one batch; True when the answer says the rest of its cohort is
        worth polling (a task in it has finished, or the batch is gone)."""
        result.polls += 1
        try:
            answer = await self.ctx.api.poll_batch(
                batch_id, self.ctx.ledger.batch_task_indexes(batch_id)
            )
        except NotFoundError:
            # The service forgot the batch; its tasks can still be polled one by one.
            self.ctx.ledger.batch_polled(batch_id, 0.0, still_open=False)
            self.ctx.log.warning("batch.unknown", batch_id=batch_id)
            self._progressed.discard(batch_id)
            return True
        except APIError as exc:
            self._poll_failed(exc)
            self.ctx.ledger.batch_polled(
                batch_id, self.ctx.retry_at(1, _retry_after(exc)), still_open=True
            )
            return False
        api_health(self.ctx, self.shared, None)
        tasks = self.ctx.ledger.batch_tasks(batch_id)
        seen: set[str] = set()
        waiting = False
        progressed = False
        strangers: list[str] = []
        for status in answer.statuses:
            if status.task_id in tasks:
                seen.add(status.task_id)
                waiting = self._record(status) or waiting
                progressed = progressed or _has_progress(status)
            else:
                strangers.append(status.task_id)
                waiting = waiting or status.status not in ("succeeded", "failed")
        if strangers:
            # Tasks of this batch that its submit answer did not attribute:
            # charged, so they are read until their clips say whose they are.
            submit_id = self.ctx.ledger.batch_submit(batch_id)
            if submit_id is not None:
                self.ctx.ledger.add_orphans(submit_id, batch_id, strangers)
        for task_id in answer.unread:
            if task_id in tasks:
                # What the batch answer did not say readably, the task endpoint does.
                waiting = await self._poll_task(task_id, result, schedule=False) or waiting
                seen.add(task_id)
        # A task missing from the answer is not finished as far as we know.
        still_open = waiting or bool(set(tasks) - seen)
        self.ctx.ledger.batch_polled(
            batch_id, self.ctx.clock() + self.ctx.settings.poll_interval, still_open=still_open
        )
        if progressed and still_open:
            self._progressed.add(batch_id)
        else:
            self._progressed.discard(batch_id)
        return progressed

    async def _poll_task(self, task_id: str, result: PassResult, *, schedule: bool = True) -> bool:
        """Poll one task; True while it is worth polling again. ``schedule`` sets
        its next poll (off when its batch's poll asked: the batch schedules)."""
        result.polls += 1
        try:
            status = await self.ctx.api.poll_task(task_id)
        except NotFoundError as exc:
            ref = self.ctx.ledger.task_ref(task_id)
            attempts = self.ctx.ledger.attempts([ref.fingerprint])[ref.fingerprint] if ref else 0
            self.ctx.ledger.task_lost(
                task_id,
                self.ctx.retry_at(attempts),
                exc.message,
                max_resubmits=self.ctx.settings.max_resubmits,
            )
            self.ctx.log.warning("task.unknown", task_id=task_id)
            return False
        except APIError as exc:
            self._poll_failed(exc)
            self.ctx.ledger.task_polled(task_id, self.ctx.retry_at(1, _retry_after(exc)))
            return True
        api_health(self.ctx, self.shared, None)
        waiting = self._record(status)
        if schedule:
            self.ctx.ledger.task_polled(task_id, self.ctx.clock() + self.ctx.settings.poll_interval)
        return waiting

    async def _poll_orphan(
        self, task_id: str, submit_id: int, batch_id: str | None, result: PassResult
    ) -> None:
        """Read an orphan task until its clips say which unclaimed item it is."""
        result.polls += 1
        next_poll = self.ctx.clock() + self.ctx.settings.poll_interval
        try:
            status = await self.ctx.api.poll_task(task_id)
        except NotFoundError:
            self.ctx.ledger.orphan_polled(task_id, None, "gone")
            return
        except APIError as exc:
            self._poll_failed(exc)
            self.ctx.ledger.orphan_polled(task_id, self.ctx.retry_at(1, _retry_after(exc)))
            return
        candidates = self.ctx.ledger.unknown_requests(submit_id)
        owners = {
            match_orphan(
                candidates,
                {
                    "mv": c.mv,
                    "gpt_description_prompt": c.gpt_description_prompt,
                    "lyrics": c.lyrics,
                },
            )
            for c in status.clips
        }
        owners.discard(None)
        if len(owners) == 1:
            (fp,) = owners
            assert fp is not None
            if self.ctx.ledger.claim(fp, task_id, next_poll, batch_id):
                self.ctx.log.warning("task.orphan_claimed", task_id=task_id, fingerprint=fp)
                self._record(status)
                return
        if status.status == "failed":
            self.ctx.ledger.orphan_polled(task_id, None, "failed")
        elif status.status == "succeeded":
            # Finished, and still nobody's: a person must look (it is counted).
            self.ctx.log.error("task.orphan_unmatched", task_id=task_id, submit_id=submit_id)
            self.ctx.ledger.orphan_polled(task_id, None, "unmatched")
        else:
            self.ctx.ledger.orphan_polled(task_id, next_poll)

    def _poll_failed(self, exc: APIError) -> None:
        api_health(self.ctx, self.shared, exc)
        self.ctx.log.warning("poll.failed", error=exc.message, status=exc.status)

    def _record(self, status: TaskStatus) -> bool:
        """Store a task's status; True while it is worth polling again."""
        clips = [
            ClipRecord(
                clip_id=c.clip_id,
                task_id=status.task_id,
                fingerprint="",
                position=i,
                state=c.state if c.state != "succeeded" or c.audio_url else "streaming",
                audio_url=c.audio_url,
                duration=c.duration,
                title=c.title,
                lyrics=c.lyrics,
                tags=c.tags,
                sha256=None,
                image_url=c.image_url,
            )
            for i, c in enumerate(status.clips, start=1)
        ]
        update = TaskUpdate(
            task_id=status.task_id,
            status=status.status,
            clips=clips,
            error=status.error,
            failure_type=status.failure_type,
        )
        ref = self.ctx.ledger.task_ref(status.task_id)
        if ref is None:
            return False
        attempts = self.ctx.ledger.attempts([ref.fingerprint])[ref.fingerprint]
        outcome = task_outcome(
            status.status,
            error=status.error,
            failure_type=status.failure_type,
            age=self.ctx.clock() - ref.created_at,
            timeout=self.ctx.settings.task_timeout,
            attempts=attempts,
            retry_at=self.ctx.retry_at(attempts),
        )
        if isinstance(outcome, Abandon):
            self.ctx.ledger.abandon_task(
                status.task_id, requeue_at=outcome.requeue_at, reason=outcome.reason
            )
            self.ctx.log.warning("task.abandoned", task_id=status.task_id, reason=outcome.reason)
            return False
        self.ctx.ledger.record_task(update, outcome)
        if isinstance(outcome, Park | Requeue):
            reason = failure_reason(status.error, status.failure_type)
            self.ctx.log.warning("task.failed", task_id=status.task_id, reason=reason)
        return isinstance(outcome, Poll)


def _has_progress(status: TaskStatus) -> bool:
    """Whether a task has got anywhere: finished, failed, or one clip ready."""
    return status.status in ("succeeded", "failed") or any(c.audio_url for c in status.clips)


def _retry_after(exc: APIError) -> float | None:
    return exc.retry_after if isinstance(exc, TemporaryAPIError) else None
