"""One reconcile pass, and the loop that repeats it until converged.

Where it sits: this module wires the flow together. A pass reads the spec
folder (specs), records it (ledger), computes the desired state and what is
due (planning), submits in full batches (musicapi), polls what is in flight,
downloads finished clips into the cache and materialises outputs (outputs),
recording every step in the ledger before and after it happens (rule 2).

Every pass is level-triggered (rule 1): it recomputes everything from the
folder, the ledger and the output files, so a missed event or a crash costs
nothing but a pass. The daemon and ``sync`` run the same pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import structlog

from reconciler import outputs as out
from reconciler import tags as tagging
from reconciler.audio import AudioCache
from reconciler.config import Settings
from reconciler.errors import (
    AmbiguousSubmitError,
    APIError,
    AudioExpiredError,
    AuthError,
    BatchUnsupportedError,
    InsufficientCreditsError,
    NotFoundError,
    OutputError,
    RejectedError,
    TemporaryAPIError,
)
from reconciler.layout import check_layout
from reconciler.ledger import ClipRecord, Ledger, OutputRecord, TaskUpdate
from reconciler.musicapi import (
    Accepted,
    MusicAPI,
    Rejected,
    TaskStatus,
    Unconfirmed,
)
from reconciler.outcomes import (
    Abandon,
    Park,
    Poll,
    Requeue,
    failure_reason,
    rejected_item,
    rejection_kind,
    task_outcome,
)
from reconciler.planning import (
    CREDITS_PER_TASK,
    IN_FLIGHT,
    LIST_FILES,
    Allowance,
    Desired,
    DesiredTrack,
    Limits,
    OpenBatch,
    Snapshot,
    affordable_tasks,
    backoff,
    desired_state,
    match_orphan,
    plan,
    poll_cohorts,
    utc_day_start,
)
from reconciler.specs import Observation, Settling, SpecFile, SpecScan, scan_specs

#: Downloads in parallel: enough to stream results, few enough to be polite.
DOWNLOAD_CONCURRENCY = 4
POLL_CONCURRENCY = 8
#: Tracks materialised between two yields to the event loop.
YIELD_EVERY = 100


@dataclass
class PassResult:
    """What one pass saw and did; the daemon and ``sync`` decide what comes next."""

    total: int = 0
    ready: int = 0
    submitted: int = 0
    submit_calls: int = 0
    polls: int = 0
    downloads: int = 0
    written: int = 0
    restored: int = 0
    pruned: int = 0
    in_flight: int = 0
    queued: int = 0
    #: Of ``queued``, those waiting to try again after a failure (status: "retrying").
    retrying: int = 0
    parked: int = 0
    #: Tracks whose files are in place but whose spec file is now invalid:
    #: not ``ready`` (status shows them "invalid"), and not work in flight either.
    invalid_tracks: int = 0
    invalid_files: int = 0
    #: Spec files still changing: their last good version stays in force meanwhile.
    settling: int = 0
    #: When the first of them may be read (the clock's time); also in ``next_due``.
    settle_at: float | None = None
    output_failures: int = 0
    #: Tracks whose task returned fewer clips than they keep (written as far as they go).
    short: int = 0
    blocked: str | None = None
    next_due: float | None = None
    states: Counter[str] = field(default_factory=Counter)
    #: How long the pass took (a monotonic measurement, for the log).
    seconds: float = 0.0

    @property
    def converged(self) -> bool:
        return (
            self.total > 0
            and self.ready == self.total
            and self.invalid_files == 0
            and not self.settling
        )

    @property
    def changed(self) -> bool:
        return bool(
            self.submitted or self.downloads or self.written or self.restored or self.pruned
        )

    @property
    def stuck(self) -> bool:
        """Nothing can move without a person: no work in flight or scheduled."""
        if self.converged or self.in_flight or self.settling:
            return False
        return not (self.queued and not self.blocked)


class Reconciler:
    """Holds what survives between passes: parsed specs, the API client, pauses."""

    def __init__(
        self,
        settings: Settings,
        ledger: Ledger,
        api: MusicAPI,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        only: frozenset[str] | None = None,
    ) -> None:
        self.settings = settings
        #: Applying a saved plan: nothing else is submitted (``reconciler apply``).
        self.only = only
        self.ledger = ledger
        self.api = api
        self.clock = clock
        self.rng = rng or random.Random()
        self.log = structlog.get_logger("reconciler")
        self.cache = AudioCache(settings.state_dir / "cache")
        self.trash = out.Trash(settings.state_dir / "trash")
        self._last_good: dict[str, SpecFile] = ledger.last_good()
        #: How each spec file looked at the last scan, to tell when it stops changing.
        self._observed: Mapping[str, Observation] = {}
        self._batch_unsupported = bool(ledger.get("batch_unsupported"))
        self._submit_pause_until = 0.0
        self._block_reason: str | None = None
        #: When this process started spending: ``--max-credits`` counts from here.
        self._run_started = clock()
        #: The last balance read and when, and tasks submitted since: the
        #: balance is asked at most once per poll interval.
        self._balance: tuple[float, int] | None = None
        self._submitted_since_balance = 0
        #: False while queued work waits for room in flight, not for a time.
        self._submit_waits_for_time = True
        #: Unexpected answer shapes already added to the ledger's counts.
        self._shapes_recorded: Counter[str] = Counter()
        self._started = False
        #: Problems logged last pass (spec files, outputs), so each is logged once.
        self._reported: dict[str, str] = {}
        self._reported_short: dict[str, str] = {}
        self._layout_reported: str | None = None
        self._failed_outputs: dict[str, str] = {}
        self._logged_outputs: dict[str, str] = {}
        #: Open batches that have shown a finished task: their cohort is polled whole.
        self._progressed: set[str] = set()
        self._outdir = out.OutputFolder(settings.out_dir)
        #: soundtrack → the list entries and file states last written, to skip re-rendering.
        self._lists: dict[
            str, tuple[tuple[out.TrackOutput, ...], list[tuple[int, int] | None]]
        ] = {}
        self.desired: Desired | None = None
        self.scan: SpecScan | None = None
        #: Output path → ``TrackTags.key`` of the file written there (tags.py).
        self._tagged: dict[str, str] = ledger.get("output_tags") or {}
        #: Output path → the track and clip its tags were last computed from, and
        #: those tags and key: comparing is cheaper than recomputing every pass.
        self._tag_memo: dict[str, tuple[DesiredTrack, ClipRecord, tagging.TrackTags, str]] = {}

    # -- the pass -------------------------------------------------------------------

    def startup(self) -> None:
        """Once per process: settle what a crash may have left behind."""
        interrupted = self.ledger.recover_interrupted()
        if interrupted:
            self.log.warning("submit.interrupted", submits=interrupted)
        self.cache.sweep_temps()
        if self.settings.out_dir.exists():
            out.sweep_output_temps(self.settings.out_dir)
        self._started = True

    async def run_pass(self) -> PassResult:
        if not self._started:
            self.startup()
        # status checks the recorded outputs where they were written, whatever
        # --out the person running it gives (an operator often gives none).
        self.ledger.put("out_dir", str(self.settings.out_dir.absolute()))
        started = time.perf_counter()
        result = PassResult()
        now = self.clock()
        # Reading and parsing files is the slow part; SQLite stays on this thread.
        scan = await asyncio.to_thread(
            scan_specs,
            self.settings.specs_dir,
            models=self.settings.models,
            limits=self.settings.field_limits,
            reuse=self._last_good,
            settle=Settling(self._observed, now, self.settings.batch_window),
        )
        desired = self._apply_scan(scan)
        result.invalid_files = len(scan.errors)
        result.settling = len(scan.settling)
        result.settle_at = scan.settled_by
        again, parked = self.ledger.expire_unknown(
            self.settings.ambiguous_grace, self.settings.max_resubmits
        )
        if again:
            self.log.warning("submit.resubmitting_ambiguous", items=len(again))
        for fp in parked:
            self.log.error("generation.parked", fingerprint=fp, reason="submit answer lost")
        await self._submit(desired, result, now)
        await self._poll(result)
        # Read once: the downloads fill in checksums, materialising uses them.
        usable = self.ledger.usable_clips(self._needed(desired))
        usable = await self._download(usable, desired, result)
        await self._materialise(desired, usable, result)
        self._prune(desired, result)
        result.seconds = time.perf_counter() - started
        self._summarise(desired, result)
        return result

    def _apply_scan(self, scan: SpecScan) -> Desired:
        self.scan = scan
        self._observed = scan.observed
        errors = {p: str(e) for p, e in scan.errors.items()}
        # A settling file is held like an invalid one (its last good version
        # stays in force, nothing is pruned), and status shows why.
        removed = self.ledger.record_specs(
            scan.files, {**errors, **scan.settling}, complete=scan.root_state == "ok"
        )
        for path, err in scan.errors.items():
            # Report each problem once, not on every pass (rule 12).
            if self._reported.get(path) != str(err):
                for problem in err.problems:
                    self.log.warning("spec.invalid", problem=str(problem))
        for path, note in scan.settling.items():
            if self._reported.get(path) != note:
                self.log.info("spec.settling", path=path, window=self.settings.batch_window)
        self._reported = {**errors, **scan.settling}
        last_good = dict(self._last_good)
        for p in removed:
            last_good.pop(p, None)
        held = [*scan.errors, *scan.settling]
        desired = desired_state(scan.files, held, scan.root_state, last_good)
        last_good.update(scan.files)
        self._last_good = last_good
        self.ledger.apply_desired(desired)
        self.desired = desired
        return desired

    # -- submit -------------------------------------------------------------------------

    def _item(self, fp: str) -> dict[str, Any]:
        item = self.ledger.request(fp)
        hook = self.settings.webhook
        if hook is not None:
            # Each item carries its own URL so a callback names its generation
            # even when the submit's answer (and so the task id) was lost.
            item["webhook_url"] = f"{hook.public_url}/hook/{fp}"
            item["webhook_secret"] = hook.secret.get_secret_value()
        return item

    def _batch_hook(self) -> dict[str, str]:
        """The batch-level webhook the service's batch page describes; per-item
        URLs win where the service honours them."""
        hook = self.settings.webhook
        if hook is None:
            return {}
        return {
            "webhook_url": f"{hook.public_url}/hook",
            "webhook_secret": hook.secret.get_secret_value(),
        }

    async def _read_balance(self, now: float) -> int | None:
        """The account balance, asked at most once per poll interval: in between,
        what this process submitted since is taken off the last answer."""
        if self._balance is not None and now - self._balance[0] < self.settings.poll_interval:
            return max(0, self._balance[1] - CREDITS_PER_TASK * self._submitted_since_balance)
        try:
            balance = (await self.api.get_credits()).total
        except AuthError as exc:
            self._api_health(exc)
            return 0
        except APIError as exc:
            # Without a balance the budgets still hold; the service refuses
            # what the account cannot pay for, per item.
            self._api_health(exc)
            self.log.warning("credits.unavailable", error=exc.message)
            return None
        self._balance = (now, balance)
        self._submitted_since_balance = 0
        return balance

    async def _allowance(self, now: float) -> Allowance:
        balance = await self._read_balance(now)
        allowance = affordable_tasks(
            spent_today=CREDITS_PER_TASK * self.ledger.spent_since(utc_day_start(now)),
            daily_budget=self.settings.daily_budget,
            balance=balance,
            spent_in_run=CREDITS_PER_TASK * self.ledger.spent_since(self._run_started),
            max_credits=self.settings.max_credits,
        )
        if allowance.tasks is not None and allowance.tasks <= 0:
            self._spent_out(allowance, now)
        else:
            self._block_reason = None
        return allowance

    def reconsider(self) -> None:
        """The settings changed (a reload): a ceiling reached under the old ones may
        have lifted, so the next pass asks again instead of waiting out the pause."""
        self._submit_pause_until = 0.0
        self._block_reason = None
        self._balance = None

    def _spent_out(self, allowance: Allowance, now: float) -> None:
        """A ceiling is reached: no submit until it can have lifted (rule 15: the
        pass waits for that, or for a poll, rather than asking again at once)."""
        self._block_reason = allowance.reason
        if allowance.limit == "budget":
            until = utc_day_start(now) + 86_400
        elif allowance.limit == "run":
            until = math.inf
        else:
            until = now + self.settings.backoff_cap
        self._submit_pause_until = until
        self.log.warning("submit.paused", reason=allowance.reason, until=until)

    def _snapshot(self) -> Snapshot:
        """What the submit step decides on: the ledger's generations, the
        suspension and this process's pause; the allowance is added only when
        something is due (the balance costs a request)."""
        gens = self.ledger.generations()
        return Snapshot(
            generations=gens,
            in_flight=sum(1 for g in gens.values() if g.state in IN_FLIGHT),
            suspension=self.ledger.suspension(),
            paused_until=self._submit_pause_until,
            pause_reason=self._block_reason,
            only=self.only,
        )

    async def _submit(self, desired: Desired, result: PassResult, now: float) -> None:
        """Carry out what ``planning.plan`` says the pass submits now: the same
        decision ``reconciler plan`` shows."""
        limits = Limits(self.settings.max_in_flight)
        snapshot = self._snapshot()
        draft = plan(desired, snapshot, now, limits)
        suspended = draft.held_by("suspended")
        result.queued = len(draft.submit) + len(draft.held) - len(suspended)
        if not result.queued and suspended:
            # Only held work is left: ``sync`` stops here rather than wait for a resume.
            result.blocked = "suspended (`reconciler resume` lifts it)"
        self._submit_waits_for_time = True
        if (
            not draft.submit
            and draft.held_by("unplanned")
            and not draft.held_by("paused", "backoff", "in_flight", "budget", "balance", "run")
        ):
            # Applying a saved plan, and all of it is sent: the rest waits for
            # another plan, not for a time.
            result.blocked = "not in the saved plan"
            self._submit_waits_for_time = False
        if draft.held_by("paused"):
            result.blocked = self._block_reason
            self.log.debug("submit.held", queued=result.queued, reason=self._block_reason)
            return
        if not draft.submit:
            if draft.held_by("in_flight"):
                # Held back by the in-flight cap: a finished task makes room, and
                # finished tasks are found by polls, which are scheduled anyway.
                self._submit_waits_for_time = False
            self.log.debug("submit.nothing_due", queued=result.queued)
            return
        if self._layout_blocks(result):
            return
        # The balance is asked only now that there is something to pay for.
        final = plan(desired, replace(snapshot, allowance=await self._allowance(now)), now, limits)
        self.log.debug(
            "submit.due",
            queued=result.queued,
            due=len(final.submit),
            held=dict(Counter(h.reason for h in final.held)),
            in_flight=snapshot.in_flight,
            max_in_flight=self.settings.max_in_flight,
            held_reason=self._block_reason,
        )
        if self._block_reason and not final.submit:
            result.blocked = self._block_reason
            self.ledger.put("submit_block", self._block_reason)
            return
        self.ledger.put("submit_block", None)
        for group in final.batches:
            if self._batch_unsupported:
                for fp in group:
                    if not await self._submit_single(fp, result):
                        return
            elif not await self._submit_batch(group, result):
                return

    def _layout_blocks(self, result: PassResult) -> bool:
        """Pay only for what can land: no submit while the output or state folder
        cannot take the result (a folder made read-only, or replaced by a file,
        while the daemon runs). Nothing is due again until a person fixes it: a
        file event or the rescan starts the next pass."""
        problems = check_layout(
            self.settings.specs_dir, self.settings.out_dir, self.settings.state_dir
        )
        if not problems:
            self._layout_reported = None
            return False
        reason = f"the folders cannot take new audio: {problems[0]}"
        if self._layout_reported != reason:
            self.log.error("submit.refused_layout", problems=problems)
        self._layout_reported = reason
        result.blocked = reason
        self._submit_waits_for_time = False
        return True

    def _retry_at(self, attempts: int, retry_after: float | None = None) -> float:
        delay = backoff(
            attempts + 1,
            initial=self.settings.backoff_initial,
            cap=self.settings.backoff_cap,
            retry_after=retry_after,
            rng=self.rng,
        )
        return self.clock() + delay

    async def _submit_batch(self, group: Sequence[str], result: PassResult) -> bool:
        """One batch submit. Returns False when submitting should stop for this pass."""
        submit_id = self.ledger.begin_submit(group, "batch")
        items = [self._item(fp) for fp in group]
        result.submit_calls += 1
        try:
            answer = await self.api.submit_batch(items, **self._batch_hook())
        except BatchUnsupportedError:
            self.ledger.submit_not_sent(submit_id, 0.0, "batch endpoint unavailable")
            self._batch_unsupported = True
            self.ledger.put("batch_unsupported", True)
            self.log.warning("batch.unsupported", fallback="one create per item, per-task polls")
            for fp in group:
                if not await self._submit_single(fp, result):
                    return False
            return True
        except RejectedError as exc:
            if len(group) == 1:
                return self._submit_failed(submit_id, group, exc, result)
            # One bad item can make the service refuse the whole batch: halves,
            # then singles, so only that item is parked with the service's words.
            self.ledger.submit_refused(submit_id, exc.message)
            self.log.warning("batch.refused", items=len(group), error=exc.message)
            half = len(group) // 2
            for part in (group[:half], group[half:]):
                if not await self._submit_batch(part, result):
                    return False
            return True
        except APIError as exc:
            return self._submit_failed(submit_id, group, exc, result)
        accepted: dict[str, tuple[str, int]] = {}
        requeue: dict[str, tuple[float, str]] = {}
        parked: dict[str, str] = {}
        unconfirmed: dict[str, str] = {}
        attempts = self.ledger.attempts(group)
        for fp, res in zip(group, answer.results, strict=True):
            if isinstance(res, Accepted):
                accepted[fp] = (res.task_id, res.index)
            elif isinstance(res, Unconfirmed):
                unconfirmed[fp] = res.reason
            else:
                self._item_rejected(fp, res, attempts[fp], requeue, parked)
        collisions = self.ledger.submit_answered(
            submit_id,
            answer.batch_id,
            accepted,
            requeue,
            parked,
            unconfirmed=unconfirmed,
            orphans=answer.orphans,
            submitted=answer.submitted,
            poll_at=self.clock() + self.settings.poll_interval,
        )
        for what in collisions:
            self.log.error("ledger.id_collision", known=what, submit_id=submit_id)
        result.submitted += len(accepted)
        self._submitted_since_balance += len(accepted) + len(unconfirmed)
        self.log.info(
            "batch.submitted",
            batch_id=answer.batch_id,
            accepted=len(accepted),
            rejected=len(parked) + len(requeue),
            unconfirmed=len(unconfirmed),
        )
        for fp, reason in parked.items():
            self.log.warning("generation.parked", fingerprint=fp, reason=reason)
        return not requeue or self.clock() >= self._submit_pause_until

    def _item_rejected(
        self,
        fp: str,
        res: Rejected,
        attempts: int,
        requeue: dict[str, tuple[float, str]],
        parked: dict[str, str],
    ) -> None:
        """Policy for one refused item: content is parked, money pauses, and a
        refusal nobody can classify is tried a few times, then parked."""
        reason = f"rejected ({res.type}): {res.error}"
        kind = rejection_kind(None if res.type == "rejected" else res.type, res.error)
        outcome = rejected_item(kind, reason, attempts=attempts, retry_at=self._retry_at(attempts))
        if isinstance(outcome, Park):
            parked[fp] = outcome.reason
            return
        if kind == "credits":
            self._pause_submissions("insufficient credits on the account")
        requeue[fp] = (outcome.at, outcome.reason)

    async def _submit_single(self, fp: str, result: PassResult) -> bool:
        submit_id = self.ledger.begin_submit([fp], "single")
        result.submit_calls += 1
        try:
            task_id = await self.api.create(self._item(fp))
        except APIError as exc:
            return self._submit_failed(submit_id, [fp], exc, result)
        self._submitted_since_balance += 1
        self.ledger.submit_answered(
            submit_id,
            None,
            {fp: (task_id, 0)},
            {},
            {},
            poll_at=self.clock() + self.settings.poll_interval,
        )
        result.submitted += 1
        self.log.info("task.submitted", task_id=task_id, fingerprint=fp)
        return True

    def _submit_failed(
        self, submit_id: int, group: Sequence[str], exc: APIError, result: PassResult
    ) -> bool:
        self._api_health(exc)
        if isinstance(exc, AmbiguousSubmitError):
            self.ledger.submit_ambiguous(submit_id, exc.message)
            self._submitted_since_balance += len(group)
            self.log.error("submit.ambiguous", items=len(group), error=exc.message)
            return False
        if isinstance(exc, RejectedError) and len(group) == 1:
            (fp,) = group
            self.ledger.submit_answered(
                submit_id, None, {}, {}, {fp: f"rejected: {exc.message}"}, poll_at=0.0
            )
            self.log.warning("generation.parked", fingerprint=fp, reason=exc.message)
            return True
        if isinstance(exc, AuthError):
            self.ledger.submit_not_sent(submit_id, 0.0, exc.message)
            result.blocked = self._block_reason
            return False
        if isinstance(exc, InsufficientCreditsError):
            self._pause_submissions(f"insufficient credits: {exc.message}")
            self.ledger.submit_not_sent(submit_id, 0.0, exc.message)
            result.blocked = self._block_reason
            return False
        retry_after = exc.retry_after if isinstance(exc, TemporaryAPIError) else None
        attempts = max(self.ledger.attempts(group).values())
        self.ledger.submit_not_sent(submit_id, self._retry_at(attempts, retry_after), exc.message)
        self.log.warning("submit.retrying", items=len(group), error=exc.message, status=exc.status)
        return False

    def _pause_submissions(self, reason: str) -> None:
        """Stop submitting for ``backoff_cap``: a 401 or an empty account needs a
        person, or time; ``sync`` stops here, the daemon tries again after."""
        self._submit_pause_until = self.clock() + self.settings.backoff_cap
        self._block_reason = reason
        self.ledger.put("submit_block", reason)

    def _api_health(self, exc: APIError | None) -> None:
        now = self.clock()
        health = dict(self.ledger.get("api_health") or {})
        if exc is None:
            # One write per minute at most: status shows minutes, not seconds.
            if now - float(health.get("last_success") or 0) < 60:
                return
            health["last_success"] = now
        else:
            health["last_error"] = now
            health["last_error_message"] = f"{type(exc).__name__}: {exc.message}"
        self.ledger.put("api_health", health)
        if isinstance(exc, AuthError):
            # A rejected key needs a person, whichever request found it out.
            self._pause_submissions(f"API key rejected (401): {exc.message}")

    # -- poll ---------------------------------------------------------------------------

    async def _poll(self, result: PassResult) -> None:
        now = self.clock()
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
                    self.ledger.defer_batches(siblings, now + interval)
                    return
            await asyncio.gather(*(one_batch(b) for b in due))

        async def one_orphan(task_id: str, submit_id: int, batch_id: str | None) -> None:
            async with sem:
                await self._poll_orphan(task_id, submit_id, batch_id, result)

        interval = self.settings.poll_interval
        soon = self.ledger.batches_due_by(now + interval)
        cohorts = poll_cohorts(soon, interval, now)
        singles = self.ledger.due_single_tasks(now)
        orphans = self.ledger.due_orphans(now)
        self.log.debug(
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
            answer = await self.api.poll_batch(batch_id, self.ledger.batch_task_indexes(batch_id))
        except NotFoundError:
            # The service forgot the batch; its tasks can still be polled one by one.
            self.ledger.batch_polled(batch_id, 0.0, still_open=False)
            self.log.warning("batch.unknown", batch_id=batch_id)
            self._progressed.discard(batch_id)
            return True
        except APIError as exc:
            self._poll_failed(exc)
            self.ledger.batch_polled(
                batch_id, self._retry_at(1, _retry_after(exc)), still_open=True
            )
            return False
        self._api_health(None)
        tasks = self.ledger.batch_tasks(batch_id)
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
            submit_id = self.ledger.batch_submit(batch_id)
            if submit_id is not None:
                self.ledger.add_orphans(submit_id, batch_id, strangers)
        for task_id in answer.unread:
            if task_id in tasks:
                # What the batch answer did not say readably, the task endpoint does.
                waiting = await self._poll_task(task_id, result, schedule=False) or waiting
                seen.add(task_id)
        # A task missing from the answer is not finished as far as we know.
        still_open = waiting or bool(set(tasks) - seen)
        self.ledger.batch_polled(
            batch_id, self.clock() + self.settings.poll_interval, still_open=still_open
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
            status = await self.api.poll_task(task_id)
        except NotFoundError as exc:
            ref = self.ledger.task_ref(task_id)
            attempts = self.ledger.attempts([ref.fingerprint])[ref.fingerprint] if ref else 0
            self.ledger.task_lost(
                task_id,
                self._retry_at(attempts),
                exc.message,
                max_resubmits=self.settings.max_resubmits,
            )
            self.log.warning("task.unknown", task_id=task_id)
            return False
        except APIError as exc:
            self._poll_failed(exc)
            self.ledger.task_polled(task_id, self._retry_at(1, _retry_after(exc)))
            return True
        self._api_health(None)
        waiting = self._record(status)
        if schedule:
            self.ledger.task_polled(task_id, self.clock() + self.settings.poll_interval)
        return waiting

    async def _poll_orphan(
        self, task_id: str, submit_id: int, batch_id: str | None, result: PassResult
    ) -> None:
        """Read an orphan task until its clips say which unclaimed item it is."""
        result.polls += 1
        next_poll = self.clock() + self.settings.poll_interval
        try:
            status = await self.api.poll_task(task_id)
        except NotFoundError:
            self.ledger.orphan_polled(task_id, None, "gone")
            return
        except APIError as exc:
            self._poll_failed(exc)
            self.ledger.orphan_polled(task_id, self._retry_at(1, _retry_after(exc)))
            return
        candidates = self.ledger.unknown_requests(submit_id)
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
            if self.ledger.claim(fp, task_id, next_poll, batch_id):
                self.log.warning("task.orphan_claimed", task_id=task_id, fingerprint=fp)
                self._record(status)
                return
        if status.status == "failed":
            self.ledger.orphan_polled(task_id, None, "failed")
        elif status.status == "succeeded":
            # Finished, and still nobody's: a person must look (it is counted).
            self.log.error("task.orphan_unmatched", task_id=task_id, submit_id=submit_id)
            self.ledger.orphan_polled(task_id, None, "unmatched")
        else:
            self.ledger.orphan_polled(task_id, next_poll)

    def _poll_failed(self, exc: APIError) -> None:
        self._api_health(exc)
        self.log.warning("poll.failed", error=exc.message, status=exc.status)

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
        ref = self.ledger.task_ref(status.task_id)
        if ref is None:
            return False
        attempts = self.ledger.attempts([ref.fingerprint])[ref.fingerprint]
        outcome = task_outcome(
            status.status,
            error=status.error,
            failure_type=status.failure_type,
            age=self.clock() - ref.created_at,
            timeout=self.settings.task_timeout,
            attempts=attempts,
            retry_at=self._retry_at(attempts),
        )
        if isinstance(outcome, Abandon):
            self.ledger.abandon_task(
                status.task_id, requeue_at=outcome.requeue_at, reason=outcome.reason
            )
            self.log.warning("task.abandoned", task_id=status.task_id, reason=outcome.reason)
            return False
        self.ledger.record_task(update, outcome)
        if isinstance(outcome, Park | Requeue):
            reason = failure_reason(status.error, status.failure_type)
            self.log.warning("task.failed", task_id=status.task_id, reason=reason)
        return isinstance(outcome, Poll)

    # -- download -----------------------------------------------------------------------

    def _needed(self, desired: Desired) -> dict[str, int]:
        """Clips each desired fingerprint must provide (the most any track keeps)."""
        need: dict[str, int] = {}
        for t in desired.tracks:
            need[t.fingerprint] = max(need.get(t.fingerprint, 0), t.clips)
        return need

    async def _download(
        self, usable: dict[str, list[ClipRecord]], desired: Desired, result: PassResult
    ) -> dict[str, list[ClipRecord]]:
        """Fetch the kept clips not yet in the cache; returns ``usable`` with their checksums.

        A clip whose cached file went missing is found by ``_ensure_output``
        (``clip_lost``) when it is needed, so no pass stats the cache here.
        """
        need = self._needed(desired)
        todo = [
            c
            for fp, clips in usable.items()
            for c in clips[: need[fp]]
            if not c.sha256 or (c.image_url and c.cover is None)
        ]
        if not todo:
            return usable
        # A few workers share one iterator rather than one task per clip: the
        # memory stays flat however many clips a pass finds (50,000 at once
        # after a restore).
        queue = iter(todo)
        fetched: dict[str, ClipRecord] = {}

        async def worker() -> None:
            for clip in queue:
                got = await self._fetch(clip, result)
                if got is not None:
                    fetched[got.clip_id] = got

        await asyncio.gather(*(worker() for _ in range(min(DOWNLOAD_CONCURRENCY, len(todo)))))
        return {fp: [fetched.get(c.clip_id, c) for c in clips] for fp, clips in usable.items()}

    async def _fetch(self, clip: ClipRecord, result: PassResult) -> ClipRecord | None:
        """Download one clip (and its cover) into the cache; the clip with its checksum, or None."""
        if clip.sha256:
            return await self._with_cover(clip)
        tmp = self.cache.new_temp()
        try:
            await self.api.download(clip.audio_url or "", tmp)
            sha, duration = await asyncio.to_thread(self.cache.adopt, tmp)
        except AudioExpiredError:
            # Only a fresh poll gives a new URL: make the task due now.
            ref = self.ledger.task_ref(clip.task_id)
            self.ledger.wake(ref.batch_id if ref else None, clip.task_id)
            self.log.info("audio.expired", clip_id=clip.clip_id)
            return None
        except (APIError, OutputError) as exc:
            self.log.warning("audio.download_failed", clip_id=clip.clip_id, error=str(exc))
            ref = self.ledger.task_ref(clip.task_id)
            self.ledger.wake(ref.batch_id if ref else None, clip.task_id)
            return None
        finally:
            tmp.unlink(missing_ok=True)
        self.ledger.clip_downloaded(clip.clip_id, sha, duration)
        result.downloads += 1
        self.log.info("clip.downloaded", clip_id=clip.clip_id, fingerprint=clip.fingerprint)
        return await self._with_cover(
            replace(
                clip, sha256=sha, duration=clip.duration if clip.duration is not None else duration
            )
        )

    async def _with_cover(self, clip: ClipRecord) -> ClipRecord:
        """Fetch the clip's cover image once; a missing one is recorded as none."""
        if not clip.image_url or clip.cover is not None:
            return clip
        cover = await tagging.fetch_cover(self.api, self.cache, clip.image_url)
        if not cover:
            self.log.info("cover.unavailable", clip_id=clip.clip_id)
        self.ledger.clip_cover(clip.clip_id, cover)
        return replace(clip, cover=cover)

    # -- outputs ------------------------------------------------------------------------

    async def _materialise(
        self, desired: Desired, usable: dict[str, list[ClipRecord]], result: PassResult
    ) -> None:
        self._outdir = out.OutputFolder(self.settings.out_dir)
        self._logged_outputs, self._failed_outputs = self._failed_outputs, {}
        records = self.ledger.outputs()
        gens = self.ledger.generations()
        previous = self._previous_clips(desired, records)
        entries: dict[str, list[out.TrackOutput]] = {}
        short: dict[str, str] = {}
        for done, t in enumerate(desired.tracks):
            if done % YIELD_EVERY == 0:
                # Writing thousands of files is blocking work: let the loop take
                # a signal (a stop must not wait for the whole folder) and let a
                # cancelled pass end between two tracks, each written atomically.
                await asyncio.sleep(0)
            clips = [c for c in usable.get(t.fingerprint, []) if c.sha256][: t.clips]
            gen = gens.get(t.fingerprint)
            if len(clips) < t.clips:
                arrived = usable.get(t.fingerprint, [])
                if not (gen is not None and gen.state == "succeeded" and len(arrived) < t.clips):
                    # Until the new audio replaces it, the old file stays listed.
                    entries.setdefault(t.soundtrack, []).extend(
                        self._still_listed(t, records, previous)
                    )
                    continue
                # The task is over with fewer clips than asked: what was paid
                # for is written all the same, and the track says what is missing.
                short[t.fingerprint] = self._short_of_clips(t, len(arrived))
                result.short += 1
                if len(clips) < len(arrived) or not clips:
                    continue
            ok = True
            track_entries = []
            for n, (rel, clip) in enumerate(zip(t.outputs, clips, strict=False), start=1):
                ok = self._ensure_output(t, n, rel, clip, records.get(rel), result) and ok
                track_entries.append(_list_entry(rel.split("/", 1)[1], t, n, clip, t.fingerprint))
            if ok and t.fingerprint not in short:
                if self.scan is not None and t.source in self.scan.errors:
                    result.invalid_tracks += 1
                else:
                    result.ready += 1
            if ok:
                entries.setdefault(t.soundtrack, []).extend(track_entries)
        for soundtrack in desired.soundtracks:
            self._write_lists(soundtrack, entries.get(soundtrack, []), result)
        # For status, which runs in another process; put() writes only changes.
        self.ledger.put("output_errors", self._failed_outputs)
        wanted = {p for t in desired.tracks for p in t.outputs}
        self._tagged = {p: k for p, k in self._tagged.items() if p in wanted}
        self._tag_memo = {p: m for p, m in self._tag_memo.items() if p in wanted}
        self.ledger.put("output_tags", self._tagged)
        self.ledger.put("short_generations", short)

    def _previous_clips(
        self,
        desired: Desired,
        records: dict[str, OutputRecord],
    ) -> dict[str, list[ClipRecord]]:
        """Clips of the older generations whose files still stand where a track
        waits for its new audio (a spec change being generated)."""
        older = {
            rec.fingerprint
            for t in desired.tracks
            for rel in t.outputs
            if (rec := records.get(rel)) is not None
            and rec.fingerprint is not None
            and rec.fingerprint != t.fingerprint
        }
        return self.ledger.usable_clips(older) if older else {}

    def _still_listed(
        self,
        t: DesiredTrack,
        records: dict[str, OutputRecord],
        previous: dict[str, list[ClipRecord]],
    ) -> list[out.TrackOutput]:
        """The list entries of a track's old files, while each is what the ledger wrote."""
        kept = []
        for n, rel in enumerate(t.outputs, start=1):
            rec = records.get(rel)
            if rec is None or rec.fingerprint is None or rec.fingerprint == t.fingerprint:
                return []
            # The file is the raw clip plus its tags (tags.py), so the record
            # names its clip by position, not by the cache's checksum.
            older = previous.get(rec.fingerprint, [])
            clip = older[rec.clip - 1] if rec.clip is not None and len(older) >= rec.clip else None
            soundtrack, filename = rel.split("/", 1)
            try:
                state = out.file_state(self._outdir.path(soundtrack, filename))
            except OutputError:
                return []
            if clip is None or state != (rec.size, rec.mtime_ns):
                return []
            kept.append(_list_entry(filename, t, n, clip, rec.fingerprint))
        return kept

    def _short_of_clips(self, t: DesiredTrack, have: int) -> str:
        reason = (
            f"the service returned {have} of the {t.clips} clips this track keeps; "
            f"set clips: {have} to keep what arrived, or `reconciler retry` to "
            f"generate it again ({CREDITS_PER_TASK} credits)"
        )
        if self._reported_short.get(t.fingerprint) != reason:
            self.log.warning("track.short", fingerprint=t.fingerprint, reason=reason)
        self._reported_short[t.fingerprint] = reason
        return reason

    def _ensure_output(
        self,
        t: DesiredTrack,
        n: int,
        rel: str,
        clip: ClipRecord,
        rec: OutputRecord | None,
        result: PassResult,
    ) -> bool:
        """Make ``<out>/<rel>`` hold the clip's audio with its tags; True when it does.

        The ledger holds the checksum of the tagged file and ``_tagged`` the
        key it was built from (audio checksum plus tag values): an untouched
        file with the same key needs nothing; a touched one whose bytes are
        still right is only re-recorded; anything else (a new clip, changed
        tags, a deleted or edited file) is rebuilt from the cached raw audio.
        """
        assert clip.sha256 is not None
        root = self.settings.out_dir
        soundtrack, filename = rel.split("/", 1)
        memo = self._tag_memo.get(rel)
        if memo is None or memo[0] != t or memo[1] != clip:
            tags = tagging.tags_for(t, clip)
            memo = (t, clip, tags, tags.key(clip.sha256))
            self._tag_memo[rel] = memo
        tags, key = memo[2], memo[3]
        try:
            dest = self._outdir.path(soundtrack, filename)
            state = out.file_state(dest)
            if rec is not None and self._tagged.get(rel) == key:
                if state == (rec.size, rec.mtime_ns):
                    return True
                if state is not None and out.sha256_file(dest) == rec.sha256:
                    self.ledger.output_written(
                        self._record_for(t, n, rel, rec.sha256, state), event=None
                    )
                    return True
            src = self.cache.path(clip.sha256)
            if not src.exists():
                self.ledger.clip_lost(clip.clip_id)
                return False
            cover = self._cover_bytes(clip)
            if cover is None:
                tags = replace(tags, cover=None)
            tmp = out.prepare(src, dest, lambda path: tagging.write_tags(path, tags, cover))
            try:
                sha = out.sha256_file(tmp)
                if state is not None and out.sha256_file(dest) == sha:
                    # Already what we would write (a crash after the rename): keep it.
                    self.ledger.output_written(self._record_for(t, n, rel, sha, state), event=None)
                    self._tagged[rel] = tags.key(clip.sha256)
                    return True
                if state is not None and rec is None:
                    # Not ours: keep the person's file in the trash, never overwrite it silently.
                    self.trash.move(dest, root, self.clock())
                new_state = out.commit(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
        except OutputError as exc:
            # A person has to fix this (a symlink out of the folder, a full
            # disk): it is not work in flight, and it is reported once.
            result.output_failures += 1
            if self._logged_outputs.get(rel) != str(exc):
                self.log.error("output.failed", path=rel, error=str(exc))
            self._failed_outputs[rel] = str(exc)
            return False
        self._tagged[rel] = tags.key(clip.sha256)
        event = "output.written"
        if rec is not None and rec.sha256 == sha:
            event = "output.restored"
        self.ledger.output_written(self._record_for(t, n, rel, sha, new_state), event=event)
        if event == "output.restored":
            result.restored += 1
            self.log.info(event, path=rel)
        else:
            result.written += 1
            # Same generation, other bytes: only what goes into the tags changed.
            retagged = rec is not None and rec.fingerprint == t.fingerprint
            self.log.info("output.retagged" if retagged else "track.ready", path=rel)
        return True

    def _cover_bytes(self, clip: ClipRecord) -> bytes | None:
        """The clip's cached cover; a lost one is fetched again on the next pass."""
        if not clip.cover:
            return None
        try:
            return self.cache.image_path(clip.cover).read_bytes()
        except OSError:
            self.ledger.clip_cover(clip.clip_id, None)
            return None

    @staticmethod
    def _record_for(
        t: DesiredTrack, n: int, rel: str, sha256: str, state: tuple[int, int]
    ) -> OutputRecord:
        return OutputRecord(
            path=rel,
            soundtrack=t.soundtrack,
            track=t.name,
            clip=n,
            fingerprint=t.fingerprint,
            sha256=sha256,
            size=state[0],
            mtime_ns=state[1],
        )

    def _write_lists(
        self, soundtrack: str, entries: Sequence[out.TrackOutput], result: PassResult
    ) -> None:
        if not entries:
            return
        try:
            dests = [self._outdir.path(soundtrack, name) for name in LIST_FILES]
        except OutputError as exc:
            self.log.error("output.failed", path=soundtrack, error=str(exc))
            return
        key = tuple(entries)
        states = [out.file_state(d) for d in dests]
        if self._lists.get(soundtrack) == (key, states):
            # Same tracks, files untouched since we wrote them: nothing to render.
            return
        texts = (out.render_playlist(entries), out.render_tracks_json(soundtrack, entries))
        for name, dest, text in zip(LIST_FILES, dests, texts, strict=True):
            try:
                if not out.write_text_if_changed(dest, text):
                    continue
                state = out.file_state(dest)
            except OutputError as exc:
                self.log.error("output.failed", path=f"{soundtrack}/{name}", error=str(exc))
                continue
            if state is None:
                continue
            self.ledger.output_written(
                OutputRecord(
                    path=f"{soundtrack}/{name}",
                    soundtrack=soundtrack,
                    track=None,
                    clip=None,
                    fingerprint=None,
                    sha256=out.sha256_file(dest),
                    size=state[0],
                    mtime_ns=state[1],
                ),
                event=None,
            )
            result.written += 1
        self._lists[soundtrack] = (key, [out.file_state(d) for d in dests])

    # -- prune (rule 5) ------------------------------------------------------------------

    def _prune(self, desired: Desired, result: PassResult) -> None:
        if not self.settings.prune:
            return
        now = self.clock()
        if desired.prune_allowed:
            wanted = {p for t in desired.tracks for p in t.outputs}
            wanted |= {f"{s}/{n}" for s in desired.soundtracks for n in LIST_FILES}
            root = self.settings.out_dir
            for rel, rec in self.ledger.outputs().items():
                if rel in wanted:
                    continue
                try:
                    path = self._outdir.path(rec.soundtrack, rel.split("/", 1)[1])
                    moved = self.trash.move(path, root, now) if path.exists() else None
                except OutputError as exc:
                    self.log.error("prune.failed", path=rel, error=str(exc))
                    continue
                self.ledger.output_removed(rel, str(moved) if moved else "")
                result.pruned += 1
                self.log.info("output.pruned", path=rel)
        for gone in self.trash.empty(self.settings.prune_grace, now):
            self.log.info("trash.emptied", path=str(gone))

    # -- summary ------------------------------------------------------------------------

    def _record_shapes(self) -> None:
        """Add the answers read in an unexpected shape since the last pass to the
        ledger's counts, which ``status`` shows."""
        fresh = self.api.unexpected - self._shapes_recorded
        if not fresh:
            return
        counts = Counter(self.ledger.get("unexpected_shapes") or {})
        counts.update(fresh)
        self.ledger.put("unexpected_shapes", dict(counts))
        self._shapes_recorded = Counter(self.api.unexpected)

    def _summarise(self, desired: Desired, result: PassResult) -> None:
        gens = self.ledger.generations()
        result.total = len(desired.tracks)
        states: Counter[str] = Counter(
            gens[t.fingerprint].state for t in desired.tracks if t.fingerprint in gens
        )
        result.states = states
        result.in_flight = sum(n for s, n in states.items() if s in IN_FLIGHT)
        result.queued = states.get("queued", 0)
        result.retrying = sum(
            1
            for t in desired.tracks
            if t.fingerprint in gens
            and gens[t.fingerprint].state == "queued"
            and gens[t.fingerprint].attempts
        )
        result.parked = states.get("parked", 0)
        # Succeeded generations whose files are not there yet are still work,
        # unless writing them failed for a reason only a person can fix.
        result.in_flight += max(
            0,
            states.get("succeeded", 0)
            - result.ready
            - result.invalid_tracks
            - result.output_failures
            - result.short,
        )
        submit_from = (
            max(self.clock(), self._submit_pause_until)
            if self._submit_waits_for_time and math.isfinite(self._submit_pause_until)
            else None
        )
        due = [self.ledger.next_due(self.settings.ambiguous_grace, submit_from), result.settle_at]
        result.next_due = min((t for t in due if t is not None), default=None)
        self._record_shapes()
        if result.blocked is None and self._block_reason and result.queued:
            result.blocked = self._block_reason
        summary = {
            "total": result.total,
            "ready": result.ready,
            "in_flight": result.in_flight,
            "queued": result.queued - result.retrying,
            "retrying": result.retrying,
            "parked": result.parked,
            "invalid_files": result.invalid_files,
            "blocked": result.blocked,
        }
        if result.changed or self.ledger.get("last_pass_summary") != summary:
            self.ledger.put("last_pass_summary", summary)
            self.ledger.put("last_pass_at", self.clock())
        self.log.info(
            "pass.completed",
            submitted=result.submitted,
            polls=result.polls,
            downloads=result.downloads,
            written=result.written,
            restored=result.restored,
            pruned=result.pruned,
            seconds=round(result.seconds, 3),
            **summary,
        )


def _list_entry(
    filename: str, t: DesiredTrack, n: int, clip: ClipRecord, fingerprint: str
) -> out.TrackOutput:
    """A track's line in ``playlist.m3u8`` and ``tracks.json``: clip ``n`` of its file."""
    return out.TrackOutput(
        filename=filename,
        track=t.name,
        clip_index=n,
        title=clip.title,
        lyrics=clip.lyrics,
        duration=clip.duration,
        clip_id=clip.clip_id,
        fingerprint=fingerprint,
        tags=clip.tags,
    )


def _has_progress(status: TaskStatus) -> bool:
    """Whether a task has got anywhere: finished, failed, or one clip ready."""
    return status.status in ("succeeded", "failed") or any(c.audio_url for c in status.clips)


def _retry_after(exc: APIError) -> float | None:
    return exc.retry_after if isinstance(exc, TemporaryAPIError) else None


ProgressFn = Callable[[PassResult], None]


async def converge(
    reconciler: Reconciler,
    *,
    wake: asyncio.Event | None = None,
    progress: ProgressFn | None = None,
    max_wait: float | None = None,
) -> PassResult:
    """Run passes until every track is ready or nothing can progress (``sync``)."""
    wake = wake or asyncio.Event()
    while True:
        result = await reconciler.run_pass()
        if progress is not None:
            progress(result)
        if result.converged or result.stuck:
            return result
        await wait_for_due(reconciler, result, wake, max_wait=max_wait)


async def wait_for_due(
    reconciler: Reconciler, result: PassResult, wake: asyncio.Event, *, max_wait: float | None
) -> None:
    """Sleep until the next poll or retry is due, or until something wakes us."""
    now = reconciler.clock()
    due = (
        result.next_due if result.next_due is not None else now + reconciler.settings.poll_interval
    )
    delay = max(0.0, due - now)
    if max_wait is not None:
        delay = min(delay, max_wait)
    if delay <= 0:
        return
    wake.clear()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), timeout=delay)
