"""What the stages of a pass share: the injected context, the pass's result, the
state one stage leaves for another.

Where it sits: under every stage (``reconciler.stages``) and ``reconciling``.
The stages do not import each other; what one of them decides that another
reads (the pause on submissions that a poll's 401 sets, the soundtracks a
focused pass looks at, the last scan) is a field here, handed to each
stage explicitly, not an attribute reached across stages.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from reconciler.config import Settings
from reconciler.errors import APIError, AuthError
from reconciler.ledger import Ledger
from reconciler.musicapi import MusicAPI
from reconciler.planning import Desired, Generation, backoff
from reconciler.specs import SpecScan


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
    #: "full", or "changed" for a pass given a :class:`~reconciler.reconciling.Focus`.
    scope: str = "full"
    #: Spec files read, and tracks looked at (the rest of a focused pass's
    #: tracks were ready, and nothing about them changed).
    specs_read: int = 0
    tracks_checked: int = 0

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


@dataclass
class Context:
    """What every stage is given rather than reaches for. ``settings`` is
    replaced in place when the daemon reloads its config, so the stages read
    it here at each use."""

    settings: Settings
    ledger: Ledger
    api: MusicAPI
    clock: Callable[[], float]
    rng: random.Random
    log: Any

    def retry_at(self, attempts: int, retry_after: float | None = None) -> float:
        delay = backoff(
            attempts + 1,
            initial=self.settings.backoff_initial,
            cap=self.settings.backoff_cap,
            retry_after=retry_after,
            rng=self.rng,
        )
        return self.clock() + delay


@dataclass
class Shared:
    """The state one stage leaves for another, across and within passes."""

    #: No submit before this (the clock's time): a ceiling, an empty account, a 401.
    pause_until: float = 0.0
    #: Why submitting is held back, while it is (status and ``sync`` show it).
    block_reason: str | None = None
    #: False while queued work waits for room in flight, not for a time.
    submit_waits_for_time: bool = True
    #: The soundtracks this pass looks at; None in a full pass.
    focus: frozenset[str] | None = None
    #: The last scan of the spec folder: its invalid files' tracks are not ready.
    scan: SpecScan | None = None


def pause_submissions(ctx: Context, shared: Shared, reason: str) -> None:
    """Stop submitting for ``backoff_cap``: a 401 or an empty account needs a
    person, or time; ``sync`` stops here, the daemon tries again after."""
    shared.pause_until = ctx.clock() + ctx.settings.backoff_cap
    shared.block_reason = reason
    ctx.ledger.put("submit_block", reason)


def api_health(ctx: Context, shared: Shared, exc: APIError | None) -> None:
    """Record the service's last success or error for status; a 401, found by
    a submit or a poll, pauses submissions."""
    now = ctx.clock()
    health = dict(ctx.ledger.get("api_health") or {})
    if exc is None:
        # One write per minute at most: status shows minutes, not seconds.
        if now - float(health.get("last_success") or 0) < 60:
            return
        health["last_success"] = now
    else:
        health["last_error"] = now
        health["last_error_message"] = f"{type(exc).__name__}: {exc.message}"
    ctx.ledger.put("api_health", health)
    if isinstance(exc, AuthError):
        # A rejected key needs a person, whichever request found it out.
        pause_submissions(ctx, shared, f"API key rejected (401): {exc.message}")


def generations(ctx: Context, shared: Shared, desired: Desired) -> dict[str, Generation]:
    """The ledger's generations a pass needs: all of them, or in a focused
    pass those of its tracks plus every one in flight."""
    if shared.focus is None:
        return ctx.ledger.generations()
    return ctx.ledger.generations_of(desired.fingerprints())
