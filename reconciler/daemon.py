"""The daemon behind ``reconciler run``: watch, wait, run the same pass as ``sync``.

Where it sits: between the CLI and reconciling. It gets its reconciler from
the composition root (``app.open_app``: the state lock, the ledger and the API
client, the embedded sandbox with ``--sandbox``), and then loops: run one reconcile pass, tell
systemd how it went, wait for the next reason to run another. The reasons:

- a poll or retry falls due (``PassResult.next_due``, from the ledger);
- a file in the specs folder changed, plus the batching window, so a burst
  of saves shares batches;
- a spec file that was still changing has been unchanged for the batching
  window (``PassResult.settle_at``): it is read then, with no new file event;
- an output file reconciler wrote was deleted or replaced (the output
  folder is watched too), so it comes back from the cache within seconds;
- a verified webhook arrived (webhooks.py), plus a short window, so the ten
  callbacks of one batch cost one poll;
- the periodic full rescan (``rescan_interval``), and SIGHUP.

File events and webhooks are hints only, never trusted as facts: a pass
polls for the truth, so a forged event costs at most a delay. The watchers
name what changed (spec files, soundtracks whose outputs drifted), and the
passes between two full rescans look only at those and at the soundtracks
with work left (``Focus``): a save costs that file's tracks, not the folder.
The start-up pass, the periodic rescan, a reload, a restarted watch, a
folder event and a failed pass make the next pass a full one, so an event a
watcher missed costs at most one rescan interval. When converged nothing is
due, and the loop sleeps until the rescan interval: no requests, no writes
while converged.

Replicas: when the ledger is given (``--ledger``, ``RECONCILER_LEDGER`` or
``ledger`` in the config) other processes may share it, so the daemon runs
as one of several replicas. The holder of the ledger's lease
(``ledger.lease``) leads: it runs the passes above, renews the lease before
each pass and on a timer (every ``lease / 3``, as a full pass may outlast the
lease), and every write of its ledger is fenced by the lease's token. The
others follow: they serve the ops listener and webhooks (writing the hints
into the ledger, where the leader takes them between passes), heartbeat, and
try to take the lease on the same timer. A leader whose lease is lost
cancels its pass at once (its writes are refused anyway) and follows; a new
leader starts afresh: a new ``Reconciler``, whose start-up treats submits
left in intent as ambiguous, and a full pass. A ledger in the state folder
(the default) is this process's alone by the state lock: no lease then.

SIGTERM/SIGINT: ``STOPPING=1``, let the running pass finish for a moment, then
cancel it (every step is recorded in the ledger before and after it happens,
and an interrupted submit is treated as ambiguous on the next start), close
everything and return 0. A second signal cancels the pass at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import fields, replace

import structlog

from reconciler import logs
from reconciler.app import App, open_app
from reconciler.config import Settings, settings_summary
from reconciler.errors import LedgerError, ReconcilerError
from reconciler.ledger import Ledger, apply_hints
from reconciler.ledger.lease import (
    Identity,
    Leadership,
    Lease,
    heartbeat,
    hints_waiting,
    leave,
    queue_hints,
    read_leadership,
    take_hints,
)
from reconciler.ledger.store import describe
from reconciler.ops import Metrics, OpsApp
from reconciler.reconciling import Focus, PassResult, Reconciler
from reconciler.serving import AppServer
from reconciler.systemd import Notifier, watchdog_interval
from reconciler.watching import OutputWatcher, SpecWatcher, output_drifted
from reconciler.webhooks import WebhookReceiver, WebhookServer
from reconciler.words import plural

#: How long a pass may run on after SIGTERM before it is cancelled.
STOP_GRACE = 3.0
#: Webhooks of one batch arrive together; gathering them costs one poll, not ten.
HOOK_WINDOW = 0.1
#: Passes run back to back while results stream in, at most this many in a row.
MAX_QUICK_PASSES = 3
#: A failing pass (ledger trouble, a bug) is retried with backoff up to this.
FAILURE_BACKOFF_CAP = 60.0
#: A follower tries the lease this long after it expires (seconds): past the
#: expiry, so one attempt is enough.
EXPIRY_MARGIN = 0.01
#: Settings a running daemon cannot take over on SIGHUP: they name the state it
#: holds open (lock, ledger, API client, listening socket). Restart for these.
RESTART_FIELDS = (
    "state_dir",
    "ledger",
    "api_url",
    "api_key",
    "sandbox",
    "webhook",
    "ops_listen",
)


async def run_daemon(settings: Settings, reload: Callable[[], Settings] | None = None) -> int:
    """Run until SIGTERM/SIGINT; 0 then. ``reload`` re-reads the settings on SIGHUP.

    Raises ``ReconcilerError`` (the CLI prints it as one line, exit 1) when
    it cannot start: the state dir is locked, no key, the webhook port is taken.
    """
    daemon = Daemon(settings, reload)
    loop = asyncio.get_running_loop()
    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    # Installed first, so a SIGTERM during start-up is a clean stop too.
    for sig in handled:
        loop.add_signal_handler(sig, daemon.on_signal, sig)
    try:
        return await daemon.run()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        daemon.notifier.close()


def status_line(result: PassResult, last_pass_at: float, now: float) -> str:
    """The one-line ``STATUS=`` systemd shows in ``systemctl status``."""
    parts = [
        f"{result.ready}/{result.total} ready",
        f"{result.in_flight} in flight",
        f"{result.queued - result.retrying} queued",
        f"{result.parked} failed",
    ]
    if result.retrying:
        parts.insert(3, f"{result.retrying} retrying")
    if result.invalid_files:
        parts.append(plural(result.invalid_files, "invalid file"))
    if result.settling:
        parts.append(f"{plural(result.settling, 'file')} still changing")
    if result.blocked:
        parts.append(f"paused: {result.blocked}")
    parts.append(f"last pass {max(0, round(now - last_pass_at))}s ago")
    return ", ".join(parts)


class Daemon:
    """One ``reconciler run``: the wake-up sources, the loop, and the shutdown."""

    def __init__(self, settings: Settings, reload: Callable[[], Settings] | None) -> None:
        self.origin = settings
        self.settings = settings
        self.reload_fn = reload
        self.log = structlog.get_logger("reconciler")
        self.notifier = Notifier.from_env()
        self.watchdog = watchdog_interval()
        self.rec: Reconciler | None = None
        self.watcher: SpecWatcher | None = None
        self.out_watcher: OutputWatcher | None = None
        self.receiver: WebhookReceiver | None = None
        self._poke = asyncio.Event()
        self._stop = asyncio.Event()
        self._reload_requested = False
        self._file_hint_at: float | None = None
        #: What the watchers saw change since the last pass; ``_full`` when
        #: they cannot say (a folder event, a restarted watch).
        self._changed_specs: set[str] = set()
        self._changed_outputs: set[str] = set()
        self._full = True
        self._hook_hint_at: float | None = None
        self._pass_task: asyncio.Task[PassResult] | None = None
        self._last_ping = time.monotonic()
        self._last_pass_at: float | None = None
        self._last_result: PassResult | None = None
        #: Fed whether or not the ops listener serves them (cheap counters).
        self.metrics = Metrics()
        self.app: App | None = None
        #: This process among replicas sharing the ledger; ``lease`` is None
        #: when the ledger is the state folder's own.
        self.me = Identity.of_this_process()
        self.started_at = time.time()
        self.lease: Lease | None = None
        #: The token of the term this process leads, None while it follows.
        self._term: int | None = None
        self._lost = asyncio.Event()

    # -- wake-up sources (called on the event loop) ------------------------------------

    def on_signal(self, sig: signal.Signals) -> None:
        if sig == signal.SIGHUP:
            self._reload_requested = True
        elif self._stop.is_set():
            # A second SIGTERM/Ctrl-C: do not wait for the pass any longer.
            if self._pass_task is not None:
                self._pass_task.cancel()
        else:
            self.notifier.stopping()
            self.log.info("daemon.stopping", signal=sig.name)
            self._stop.set()
        self._poke.set()

    def on_file_event(self, paths: frozenset[str] | None = None) -> None:
        """Spec files changed (``paths``, relative to the specs folder; None: any may have)."""
        if paths is None:
            self._full = True
        else:
            self._changed_specs |= paths
        self._hint_files()

    def on_output_event(self, soundtracks: frozenset[str] | None = None) -> None:
        """Outputs of ``soundtracks`` were deleted or changed (None: any may have been)."""
        if soundtracks is None:
            self._full = True
        else:
            self._changed_outputs |= soundtracks
        self._hint_files()

    def _hint_files(self) -> None:
        if self._file_hint_at is None:
            self._file_hint_at = time.monotonic()
        self._poke.set()

    def on_webhook(self) -> None:
        if self._hook_hint_at is None:
            self._hook_hint_at = time.monotonic()
        self._poke.set()

    # -- start and stop --------------------------------------------------------------

    async def run(self) -> int:
        # The daemon takes the lease itself, as one of the replicas: lead=False.
        async with open_app(self.settings, on_request=self.metrics.api_request, lead=False) as app:
            self.settings = app.settings
            self.app = app
            self.rec = app.reconciler
            await self._serve(app.ledger)
        self.log.info("daemon.stopped")
        return 0

    async def _serve(self, ledger: Ledger) -> None:
        s = self.settings
        server: WebhookServer | None = None
        ops: AppServer | None = None
        self.watcher = SpecWatcher(s.specs_dir, self.on_file_event)
        self.out_watcher = OutputWatcher(
            s.out_dir,
            self.on_output_event,
            lambda rel: output_drifted(ledger, self.settings.out_dir, rel),
        )
        try:
            await self.watcher.start()
            # Created now rather than at the first write, so the watch is on
            # the folder itself from the start (the layout check said it can be).
            with contextlib.suppress(OSError):
                s.out_dir.mkdir(parents=True, exist_ok=True)
            await self.out_watcher.start()
            if s.webhook is not None:
                self.receiver = WebhookReceiver(
                    s.webhook, on_hint=self.on_webhook, on_outcome=self.metrics.webhook
                )
                server = WebhookServer(self.receiver, s.webhook.host, s.webhook.port)
                await server.start()
            if s.ops_listen is not None:
                app = OpsApp(self.metrics, ledger, lambda: self.settings).app
                ops = AppServer(app, *s.ops_listen, name="ops")
                await ops.start()
            self.notifier.ready(status="starting: first pass")
            self.log.info(
                "daemon.started",
                pid=os.getpid(),
                watchdog=self.watchdog,
                ledger=describe(s.ledger_target),
                **settings_summary(s),
            )
            if s.ledger is None:
                await self._loop(ledger, server)
            else:
                await self._replicate(ledger, server)
        finally:
            if ops is not None:
                await ops.stop()
            if server is not None:
                await server.stop()
            await self.watcher.stop()
            await self.out_watcher.stop()

    # -- replicas: lead or follow ------------------------------------------------------

    async def _replicate(self, ledger: Ledger, server: WebhookServer | None) -> None:
        """Follow until this process takes the lease, lead until it is lost, again."""
        self.lease = Lease(ledger, self.me, self.settings.lease)
        timer = asyncio.create_task(self._lease_timer(ledger))
        try:
            while not self._stop.is_set():
                await self._follow(ledger)
                if self._stop.is_set():
                    break
                await self._lead(ledger, server)
        finally:
            timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await timer
            # A clean stop hands over at once instead of after the lease.
            with contextlib.suppress(LedgerError):
                token = self.lease.token
                if token is not None:
                    self.lease.release()
                    self.log.info("lease.released", token=token)
                leave(ledger, self.me)

    async def _lease_timer(self, ledger: Ledger) -> None:
        """Renew (or try to take) the lease and heartbeat every ``lease / 3``,
        also while a pass runs: a full pass may take longer than the lease."""
        while True:
            self._keep(ledger)
            await asyncio.sleep(self.settings.lease / 3)

    def _keep(self, ledger: Ledger, *, beat: bool = True) -> None:
        """One renewal or attempt, and (``beat``) this process's heartbeat."""
        assert self.lease is not None
        self.lease.duration = self.settings.lease  # a reload may have changed it
        try:
            held = self.lease.acquire()
            if beat:
                role = "leader" if held else "follower"
                heartbeat(ledger, self.me, role, self.started_at, self.settings.lease)
            waiting = held and hints_waiting(ledger)
        except LedgerError as exc:
            # The database is unreachable: nothing can be written, so nothing
            # is spent either; a lease not renewed lapses on its own. The
            # ledger connects again at its next use, so the next tick retries.
            leading = self._term is not None
            self.log.error("lease.renew_failed", error=str(exc), leading=leading)
            if leading:
                # A leader that cannot renew cannot prove it still holds the
                # lease: it stops leading (its writes are refused from now on)
                # and follows until it takes the lease again.
                self.lease.token = self.lease.since = None
                self._lose("the lease could not be renewed: the ledger is unreachable")
            return
        if self._term is not None and self.lease.token != self._term:
            # Lost, or lost and taken again while this process was paused:
            # either way another replica may have led meanwhile.
            self._lose("the lease expired or another replica took it over")
        if held and self._term is None:
            self._poke.set()  # the follower's wait ends: lead
        if waiting:
            self.on_webhook()  # another replica received a webhook

    def _lose(self, reason: str) -> None:
        if self._lost.is_set():
            return
        self.log.error("lease.lost", reason=reason, token=self._term)
        self._lost.set()
        self._poke.set()

    async def _follow(self, ledger: Ledger) -> None:
        """Serve, hand webhooks to the leader, and wait for the lease."""
        assert self.lease is not None
        self.metrics.leader.set(0)
        leader = self._leadership(ledger)
        self.log.info(
            "replica.following",
            leader_host=leader.host if leader else None,
            leader_pid=leader.pid if leader else None,
            lease=self.settings.lease,
        )
        while not self._stop.is_set() and self.lease.token is None:
            self._poke.clear()
            if self._reload_requested:
                self._reload()
            if self.receiver is not None:
                try:
                    queue_hints(ledger, self.receiver.drain())
                except LedgerError as exc:
                    self.log.error("webhook.queue_failed", error=str(exc))
            # Healthy while following: no pass is due here before a takeover.
            self.metrics.next_pass_at = time.time() + self.settings.lease
            line = f"following: {self._leader_line(leader)}"
            if self.watchdog is not None:
                self.notifier.watchdog(status=line)
            else:
                self.notifier.status(line)
            # Awake when the leader's lease runs out, not only at the timer's
            # next tick: a takeover then costs the rest of the lease, no more.
            left = self.settings.lease / 3
            if leader is not None:
                left = min(left, max(0.0, leader.expires_at - leader.now))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), left + EXPIRY_MARGIN)
            leader = self._leadership(ledger)
            if leader is not None and leader.expired:
                self._keep(ledger)

    def _leadership(self, ledger: Ledger) -> Leadership | None:
        """The lease as the ledger has it; None when the ledger cannot be read
        (logged: the timer keeps trying every ``lease / 3``, no tight loop)."""
        try:
            leader, _ = read_leadership(ledger)
        except LedgerError as exc:
            self.log.error("replica.ledger_unreachable", error=str(exc))
            return None
        return leader

    @staticmethod
    def _leader_line(leader: Leadership | None) -> str:
        return "no leader yet" if leader is None else f"leader {leader.host} pid {leader.pid}"

    async def _lead(self, ledger: Ledger, server: WebhookServer | None) -> None:
        """One term: a fresh reconciler (its start-up recovers submits left in
        intent by the previous leader), fenced writes, a full pass first."""
        assert self.lease is not None
        assert self.app is not None
        self._term = self.lease.token
        self._lost.clear()
        ledger.fence = self.lease.fence
        self.rec = Reconciler(self.settings, ledger, self.app.api)
        self._full = True
        self.metrics.leader.set(1)
        before = self.lease.taken_from
        if before is None:
            # The first term, or a lease handed back by a clean stop.
            self.log.info("lease.acquired", token=self._term, since=self.lease.since)
        else:
            self.log.warning(
                "lease.acquired",
                token=self._term,
                since=self.lease.since,
                taken_from_host=before.host,
                taken_from_pid=before.pid,
                last_renewed_seconds_ago=round(before.age, 1),
            )
        try:
            await self._loop(ledger, server)
        finally:
            ledger.fence = None
            self._term = None
            if self.lease.token is not None and self._lost.is_set():
                self.lease.token = None

    # -- the loop ------------------------------------------------------------------------

    async def _loop(self, ledger: Ledger, server: WebhookServer | None) -> None:
        failures = 0
        quick = 0
        # The start-up pass is the first full rescan: events missed while stopped cost nothing.
        next_rescan = time.monotonic()
        while not self._stop.is_set() and not self._lost.is_set():
            if self._reload_requested:
                self._reload()
            if server is not None and server.failed:
                self.log.error("webhook.server_stopped")
                server = None
            if self.lease is not None:
                # Renewed before every pass too: the timer alone may fall behind.
                self._keep(ledger, beat=False)
                if self._lost.is_set():
                    break
            self._file_hint_at = self._hook_hint_at = None
            if self.receiver is not None or self.lease is not None:
                self._apply_hints(ledger)
            started = time.monotonic()
            focus = None
            if not self._full and started < next_rescan:
                focus = Focus(frozenset(self._changed_specs), frozenset(self._changed_outputs))
            self._changed_specs, self._changed_outputs, self._full = set(), set(), False
            result = await self._run_pass(focus)
            if self.lease is not None and self.lease.token != self._term:
                # The pass's own write found the lease gone (the fence refused it).
                self._lose("a write was refused: the lease expired or was taken over")
            if self._stop.is_set() or self._lost.is_set():
                break
            now = time.monotonic()
            if focus is None:
                # A failed pass was a full rescan attempt too: the backoff decides the next one.
                next_rescan = started + self.settings.rescan_interval
            if result is None:
                # What the failed pass was to look at is unknown now: read everything.
                self._full = True
                failures += 1
                pass_at = now + min(FAILURE_BACKOFF_CAP, 2.0 ** min(failures - 1, 8))
            else:
                failures = 0
                self._last_pass_at = time.time()
                self._last_result = result
                self.metrics.pass_completed(result)
                self._ping()
                quick = quick + 1 if result.changed and result.in_flight else 0
                pass_at = self._next_pass(result, now, quick <= MAX_QUICK_PASSES)
            wake = min(pass_at, next_rescan)
            self.metrics.next_pass_at = time.time() + max(0.0, wake - time.monotonic())
            await self._wait(wake, healthy=failures == 0)

    def _apply_hints(self, ledger: Ledger) -> None:
        hints = self.receiver.drain() if self.receiver is not None else []
        try:
            if self.lease is not None:
                # Those other replicas received, and those this one received as a follower.
                hints += take_hints(ledger)
            if hints:
                apply_hints(ledger, hints, time.time())
        except LedgerError as exc:
            # Hints only save time: the scheduled polls still find the truth.
            self.log.error("webhook.apply_failed", error=str(exc), hints=len(hints))

    def _next_pass(self, result: PassResult, now: float, quick_ok: bool) -> float:
        """When the next pass is due by the ledger's schedule (monotonic time)."""
        if result.changed and result.in_flight and quick_ok:
            # Something moved: look again at once, results often come in bunches.
            return now
        settled = math.inf
        if result.settle_at is not None:
            # Not held back by the floor below: the file is read the moment
            # its window ends. No busy loop: each window ends once.
            settled = now + max(0.0, result.settle_at - time.time())
        if result.next_due is None:
            return settled
        delay = result.next_due - time.time()
        if not result.changed:
            # Due now but not done by this pass: a queued generation the pass
            # could not submit (paused, budget, in-flight cap). Waiting a poll
            # interval keeps that from turning into a busy loop.
            delay = max(delay, self.settings.poll_interval)
        return min(settled, now + max(0.0, delay))

    async def _run_pass(self, focus: Focus | None) -> PassResult | None:
        """One pass as a task, so a stop can give it a grace period and then cancel it."""
        assert self.rec is not None
        task = asyncio.create_task(self.rec.run_pass(focus))
        self._pass_task = task
        stopping = asyncio.create_task(self._stop.wait())
        lost = asyncio.create_task(self._lost.wait())
        try:
            await asyncio.wait({task, stopping, lost}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done() and not self._lost.is_set():
                await asyncio.wait({task}, timeout=STOP_GRACE)
            if not task.done():
                gone = self._lost.is_set()
                self.log.warning(
                    "pass.cancelled", grace=0.0 if gone else STOP_GRACE, lease_lost=gone
                )
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        finally:
            stopping.cancel()
            lost.cancel()
            self._pass_task = None
        if task.cancelled():
            return None
        exc = task.exception()
        if exc is not None:
            self.log.error(
                "pass.failed", error=str(exc), error_type=type(exc).__name__, exc_info=exc
            )
            if isinstance(exc, LedgerError) and self.lease is not None and self.app is not None:
                # The shared ledger failed under the pass (a dropped connection):
                # a submit it left in intent may have been sent. A fresh
                # reconciler's start-up holds it as ambiguous, as a new term
                # does, rather than leaving its tracks submitting for good.
                self.rec = Reconciler(self.settings, self.rec.ledger, self.app.api)
            return None
        return task.result()

    async def _wait(self, pass_at: float, *, healthy: bool) -> None:
        """Sleep until ``pass_at`` or a hint's window ends; ping the watchdog meanwhile."""
        while True:
            self._poke.clear()
            # A lease lost while the leader waits (the timer's renewal failed or
            # was refused) ends the wait: it follows from now on.
            if self._stop.is_set() or self._lost.is_set():
                return
            if self._reload_requested and self._reload():
                return  # new settings apply at once: a lifted ceiling submits now
            target = pass_at
            if self._file_hint_at is not None:
                target = min(target, self._file_hint_at + self.settings.batch_window)
            if self._hook_hint_at is not None:
                target = min(target, self._hook_hint_at + HOOK_WINDOW)
            now = time.monotonic()
            if target <= now:
                return
            timeout = target - now
            # Only a loop whose last pass completed keeps the watchdog fed: a
            # pass that hangs or keeps failing gets the service restarted.
            if self.watchdog is not None and healthy:
                timeout = min(timeout, max(0.0, self._last_ping + self.watchdog - now))
            if timeout > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._poke.wait(), timeout)
            if (
                self.watchdog is not None
                and healthy
                and time.monotonic() - self._last_ping >= self.watchdog
            ):
                self._ping()

    def _ping(self) -> None:
        self._last_ping = time.monotonic()
        if self._last_result is None or self._last_pass_at is None:
            return
        line = status_line(self._last_result, self._last_pass_at, time.time())
        if self.watchdog is not None:
            self.notifier.watchdog(status=line)
        else:
            self.notifier.status(line)

    # -- SIGHUP ----------------------------------------------------------------------------

    def _reload(self) -> bool:
        """SIGHUP: apply the config file again; True when a setting changed."""
        self._reload_requested = False
        if self.reload_fn is None:
            self.log.warning("config.reload_unsupported")
            return False
        self.notifier.reloading()
        try:
            new = self.reload_fn()
        except ReconcilerError as exc:
            self.log.error("config.reload_failed", error=str(exc))
            self.notifier.send("READY=1")
            return False
        restart = [f for f in RESTART_FIELDS if getattr(new, f) != getattr(self.origin, f)]
        merged = replace(new, **{f: getattr(self.settings, f) for f in RESTART_FIELDS})
        changed = [
            f.name
            for f in fields(Settings)
            if getattr(merged, f.name) != getattr(self.settings, f.name)
        ]
        if merged.log_level != self.settings.log_level:
            logs.configure(merged.log_level)
        if merged.specs_dir != self.settings.specs_dir and self.watcher is not None:
            self.watcher.retarget(merged.specs_dir)
        if merged.out_dir != self.settings.out_dir and self.out_watcher is not None:
            self.out_watcher.retarget(merged.out_dir)
        self.settings = merged
        # Limits, models or folders may have changed what every file means.
        self._full = self._full or bool(changed)
        if self.rec is not None:
            self.rec.settings = merged
            if changed:
                self.rec.reconsider()
        self.log.info("config.reloaded", changed=changed)
        if restart:
            self.log.warning("config.restart_required", fields=restart)
        self.notifier.send("READY=1")
        return bool(changed)
