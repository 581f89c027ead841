"""Pure planning: fingerprints, desired state, what a pass submits and holds back, batches.

Where it sits: spec files → validated specs → **desired state → plan** →
submit → track → download → outputs. Nothing here does I/O or reads a clock:
callers pass plain values (parsed spec files, ledger records, file facts, the
current time) and get plain values back, so every rule is tested with tables.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, Literal, NamedTuple

from reconciler.limits import MAX_BATCH_ITEMS
from reconciler.specs import SpecFile

#: Credits one accepted task costs (protocol doc); a task yields two clips.
CREDITS_PER_TASK = 15

GenState = Literal["queued", "submitting", "unknown", "running", "succeeded", "parked"]
#: States in which a fingerprint is paid for or may be: never submit these again.
IN_FLIGHT: frozenset[str] = frozenset({"submitting", "unknown", "running"})
#: The per-soundtrack lists written beside the audio.
LIST_FILES = ("playlist.m3u8", "tracks.json")
RootState = Literal["ok", "missing", "unreadable", "empty"]
DiskState = Literal["ok", "missing", "drifted"]


def fingerprint(request: Mapping[str, Any], variant: int) -> str:
    """Content address of one generation: canonical request plus variant.

    Key order, comments, whitespace, names and clips never reach here, so they
    cannot change it; ``variant`` is the one non-API field that does.
    """
    canonical = json.dumps(
        {"request": dict(request), "variant": variant},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def output_names(track: str, clips: int) -> tuple[str, ...]:
    """File names of a track's clips: ``x.mp3``, then ``x-2.mp3``."""
    first = f"{track}.mp3"
    if clips == 1:  # nearly every track; ``status`` asks once per track
        return (first,)
    return (first, *(f"{track}-{n}.mp3" for n in range(2, clips + 1)))


class DesiredTrack(NamedTuple):
    """One track the specs ask for, where its outputs go.

    A named tuple, like :class:`Generation`: a cold ``plan`` builds one per
    track (50,000), from the ledger's compact copy of each spec file's tracks.
    """

    soundtrack: str
    name: str
    fingerprint: str
    clips: int
    source: str
    position: int
    #: What only the output's tags carry (``reconciler.tags``): not in the fingerprint.
    album: str | None = None
    artist: str | None = None
    #: Tracks in the soundtrack, for the "track n of m" tag.
    of: int = 1

    @property
    def outputs(self) -> tuple[str, ...]:
        """Paths relative to the output folder, one per kept clip."""
        names = output_names(self.name, self.clips)
        if len(names) == 1:  # nearly every track: a plan asks for each
            return (f"{self.soundtrack}/{names[0]}",)
        return tuple(f"{self.soundtrack}/{n}" for n in names)


@dataclass(frozen=True)
class Desired:
    """What the spec folder asks for right now."""

    tracks: tuple[DesiredTrack, ...]
    requests: Mapping[str, Mapping[str, Any]]
    #: Invalid files whose last good version stays in force (a bad spec removes nothing).
    stale: tuple[str, ...] = ()
    #: False when the folder is missing, empty or unreadable, or a file is invalid.
    prune_allowed: bool = True

    @property
    def soundtracks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.soundtrack for t in self.tracks))

    def fingerprints(self) -> tuple[str, ...]:
        """Distinct fingerprints in spec order (the order they are submitted in)."""
        return tuple(dict.fromkeys(t.fingerprint for t in self.tracks))

    def only(self, soundtracks: Collection[str]) -> Desired:
        """The same state narrowed to the tracks of ``soundtracks``."""
        return replace(self, tracks=tuple(t for t in self.tracks if t.soundtrack in soundtracks))

    def parts(self, size: int) -> Iterator[Desired]:
        """The same state in parts of whole soundtracks, each of at least ``size``
        tracks but the last (a soundtrack's tracks are consecutive)."""
        start = 0
        tracks = self.tracks
        for i in range(1, len(tracks) + 1):
            if i == len(tracks) or (
                i - start >= size and tracks[i].soundtrack != tracks[i - 1].soundtrack
            ):
                yield replace(self, tracks=tracks[start:i])
                start = i


def desired_state(
    files: Mapping[str, SpecFile],
    invalid: Iterable[str],
    root_state: RootState,
    last_good: Mapping[str, SpecFile],
    built: dict[str, FileTracks] | None = None,
) -> Desired:
    """Merge the valid files with the last good version of the invalid ones.

    A folder that is missing, empty or unreadable keeps every last good file in
    force: it looks like an accident (unmounted disk, half-finished checkout),
    and a bad spec must remove nothing.

    ``built`` carries each file's tracks from one call to the next: a file
    whose ``SpecFile`` is the same object as last time is not fingerprinted
    again (hashing every track is most of the cost at 50,000 tracks). It is
    updated in place to hold the files in force now.
    """
    invalid = sorted(invalid)
    if root_state != "ok":
        in_force = dict(last_good)
        stale = tuple(sorted(last_good))
    else:
        in_force = dict(files)
        stale_list = [p for p in invalid if p in last_good]
        for p in stale_list:
            in_force[p] = last_good[p]
        stale = tuple(stale_list)
    tracks: list[DesiredTrack] = []
    claimed: set[str] = set()
    fresh: dict[str, FileTracks] = {}
    for path in sorted(in_force):
        spec = in_force[path]
        # The scanner already rejects a second file for one soundtrack; a last
        # good version can still collide with a newer valid file, and the
        # first by path wins so the outcome does not depend on timing.
        if spec.soundtrack in claimed:
            continue
        claimed.add(spec.soundtrack)
        done = built.get(path) if built is not None else None
        if done is None or done.spec is not spec:
            done = file_tracks(path, spec)
        fresh[path] = done
        tracks.extend(done.tracks)
    if built is not None:
        built.clear()
        built.update(fresh)
    return Desired(
        tracks=tuple(tracks),
        requests=_Requests(tuple(fresh.values())),
        stale=stale,
        prune_allowed=root_state == "ok" and not invalid,
    )


@dataclass(frozen=True)
class FileTracks:
    """One spec file's desired tracks and their requests, as ``desired_state`` built them."""

    spec: SpecFile
    tracks: tuple[DesiredTrack, ...]

    @cached_property
    def requests(self) -> Mapping[str, Mapping[str, Any]]:
        """Each fingerprint's create request: taken from the spec's tracks only
        when asked, since a dry run never asks (``SpecFile``)."""
        found: dict[str, Mapping[str, Any]] = {}
        for spec, track in zip(self.spec.tracks, self.tracks, strict=True):
            found.setdefault(track.fingerprint, spec.request)
        return found


class _Requests(Mapping[str, Mapping[str, Any]]):
    """``Desired.requests``: the files' requests, merged on first use."""

    def __init__(self, files: Sequence[FileTracks]) -> None:
        self._files = files
        self._merged: dict[str, Mapping[str, Any]] | None = None

    def _all(self) -> dict[str, Mapping[str, Any]]:
        if self._merged is None:
            merged: dict[str, Mapping[str, Any]] = {}
            for f in self._files:
                # One fingerprint is one request, so any file's copy is as good as another.
                merged.update(f.requests)
            self._merged = merged
        return self._merged

    def __getitem__(self, fingerprint: str) -> Mapping[str, Any]:
        return self._all()[fingerprint]

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


def file_tracks(path: str, spec: SpecFile) -> FileTracks:
    """The desired tracks of one spec file, each fingerprinted."""
    tracks = []
    for pos, t in enumerate(spec.tracks):
        fp = fingerprint(t.request, t.variant)
        tracks.append(
            DesiredTrack(
                spec.soundtrack,
                t.name,
                fp,
                t.clips,
                path,
                pos,
                album=t.album,
                artist=t.artist,
                of=len(spec.tracks),
            )
        )
    return FileTracks(spec, tuple(tracks))


class Generation(NamedTuple):
    """The ledger's record of one fingerprint.

    A named tuple rather than a frozen dataclass: a cold ``plan`` and every
    full pass build one per fingerprint (50,000), and a tuple is built in half
    the time.
    """

    fingerprint: str
    state: GenState
    attempts: int = 0
    next_attempt: float = 0.0
    reason: str | None = None


class OutputFact(NamedTuple):
    """One output file the ledger says reconciler wrote, and how it looks now.

    A named tuple, as ``Generation``: ``plan`` builds one per output file.
    """

    path: str
    fingerprint: str
    disk: DiskState
    #: Its audio is in the cache, so a deleted or drifted copy comes back for free.
    cached: bool = True


def due_submissions(
    order: Sequence[str],
    generations: Mapping[str, Generation],
    now: float,
    *,
    in_flight: int,
    max_in_flight: int,
    affordable: int | None,
    batch_size: int = MAX_BATCH_ITEMS,
) -> tuple[str, ...]:
    """Fingerprints to submit now, in spec order.

    Only queued ones whose backoff has passed; never more than the in-flight
    cap allows, nor more tasks than the budget and balance pay for.
    When the in-flight cap holds fingerprints back while tasks are in flight,
    room frees up a task at a time: waiting for a full batch keeps G
    fingerprints at ceil(G/10) submit calls. A budget limit, or a cap
    below ten with nothing in flight, does not free up, so it does not wait.
    """
    eligible = [
        fp
        for fp in order
        if (gen := generations.get(fp)) is None
        or (gen.state == "queued" and gen.next_attempt <= now)
    ]
    room = max(0, max_in_flight - in_flight)
    n = min(len(eligible), room)
    if n < len(eligible) and (in_flight > 0 or n >= batch_size):
        # Send whole batches and keep the rest for when room frees up; only
        # a cap below ten with nothing in flight sends a part batch, since
        # waiting would never end.
        n -= n % batch_size
    if affordable is not None:
        n = min(n, max(0, affordable))
    return tuple(eligible[:n])


def batches(fingerprints: Sequence[str], size: int = MAX_BATCH_ITEMS) -> list[tuple[str, ...]]:
    """Split into full batches: G items cost ceil(G/size) submit calls."""
    return [tuple(fingerprints[i : i + size]) for i in range(0, len(fingerprints), size)]


@dataclass(frozen=True)
class OpenBatch:
    """An open batch and when it is to be polled."""

    batch_id: str
    submitted_at: float
    last_poll: float | None
    next_poll: float


def poll_cohorts(batches: Sequence[OpenBatch], window: float, now: float) -> list[list[OpenBatch]]:
    """Group open batches into cohorts of batches submitted within ``window``
    of the cohort's first one, keeping the cohorts with a poll due at ``now``.

    Batches sent together finish together, so while no batch of a cohort has
    shown a finished task, polling one of them tells as much as polling all.
    Each cohort comes probe first: of its due batches, the one polled least
    recently (never polled before all), so a probe stuck on one slow batch
    moves to a sibling at the next poll.
    """
    cohorts: list[list[OpenBatch]] = []
    for batch in sorted(batches, key=lambda b: (b.submitted_at, b.batch_id)):
        if cohorts and batch.submitted_at - cohorts[-1][0].submitted_at < window:
            cohorts[-1].append(batch)
        else:
            cohorts.append([batch])
    never = float("-inf")

    def probe_order(b: OpenBatch) -> tuple[bool, float, float]:
        return (b.next_poll > now, never if b.last_poll is None else b.last_poll, b.submitted_at)

    return [sorted(c, key=probe_order) for c in cohorts if any(b.next_poll <= now for b in c)]


def backoff(
    attempts: int,
    *,
    initial: float,
    cap: float,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before attempt ``attempts + 1``: capped exponential, full jitter.

    A server's ``Retry-After`` is a floor, because retrying earlier only earns
    another 429; the cap still applies so one bad header cannot stall a track
    for days.
    """
    ceiling = min(cap, initial * (2 ** max(0, attempts - 1)))
    delay = (rng or random.Random()).uniform(ceiling / 2, ceiling)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, cap)


def utc_day_start(now: float) -> float:
    """The start of ``now``'s day in UTC: the daily budget resets there."""
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day.timestamp()


@dataclass(frozen=True)
class Allowance:
    """How many tasks may still be submitted (None: no limit), and why not more.

    ``limit`` names the ceiling that binds: ``budget`` lifts at the next UTC
    day, ``balance`` when the account is topped up, ``run`` never in this run.
    """

    tasks: int | None
    reason: str | None = None
    limit: Literal["budget", "balance", "run"] | None = None


def affordable_tasks(
    *,
    spent_today: int,
    daily_budget: int | None,
    balance: int | None,
    spent_in_run: int = 0,
    max_credits: int | None = None,
) -> Allowance:
    """How many tasks may still be submitted without passing any ceiling (rule 8).

    Spent figures count every credit that *may* have been spent, so a lost
    answer can never let a submit through that the ceiling would refuse.
    """
    limits: list[Allowance] = []
    if daily_budget is not None:
        left = max(0, daily_budget - spent_today)
        limits.append(
            Allowance(
                left // CREDITS_PER_TASK,
                f"daily budget reached ({spent_today}/{daily_budget} credits)",
                "budget",
            )
        )
    if max_credits is not None:
        left = max(0, max_credits - spent_in_run)
        limits.append(
            Allowance(
                left // CREDITS_PER_TASK,
                f"--max-credits reached ({spent_in_run}/{max_credits} credits this run)",
                "run",
            )
        )
    if balance is not None:
        limits.append(
            Allowance(
                balance // CREDITS_PER_TASK,
                f"account balance too low ({balance} credits)",
                "balance",
            )
        )
    if not limits:
        return Allowance(None)
    return min(limits, key=lambda a: a.tasks or 0)


#: The request fields a clip echoes back verbatim, by mode: enough to tell
#: whose task an orphan is. Titles, tags and lyrics of a description-mode
#: clip are written by the service, so they say nothing there.
_ECHO_KEYS: Mapping[bool, tuple[tuple[str, str], ...]] = {
    False: (("mv", "mv"), ("gpt_description_prompt", "gpt_description_prompt")),
    True: (("mv", "mv"), ("prompt", "lyrics")),
}


def match_orphan(
    candidates: Mapping[str, Mapping[str, Any]], echo: Mapping[str, Any]
) -> str | None:
    """The fingerprint an orphan task belongs to, judged by what its clip echoes.

    ``candidates`` are the unclaimed items of the submit that named it
    (fingerprint → request), ``echo`` one clip's fields. Only when the echo
    fits exactly one distinct request is the answer certain; items with an
    equal request (variants) are interchangeable, so the first is taken.
    """

    def fits(request: Mapping[str, Any]) -> bool:
        keys = _ECHO_KEYS[bool(request.get("custom_mode"))]
        for req_key, echo_key in keys:
            want, got = request.get(req_key), echo.get(echo_key)
            if not isinstance(want, str) or not isinstance(got, str):
                return False
            if want.strip() != got.strip():
                return False
        return True

    found = {fp: req for fp, req in sorted(candidates.items()) if fits(req)}
    distinct = {json.dumps(dict(r), sort_keys=True) for r in found.values()}
    return next(iter(found)) if len(distinct) == 1 else None


@dataclass(frozen=True)
class Suspension:
    """What ``reconciler suspend`` holds back: everything, or named soundtracks.

    Only new submissions wait; polls, downloads and outputs go on. Stored in
    the ledger as :meth:`to_json`, so it survives restarts.
    """

    all: bool = False
    soundtracks: frozenset[str] = frozenset()

    @classmethod
    def from_json(cls, value: Any) -> Suspension:
        """Read the stored form; nothing stored means nothing is suspended."""
        if not isinstance(value, Mapping):
            return cls()
        return cls(bool(value.get("all")), frozenset(value.get("soundtracks") or ()))

    def to_json(self) -> dict[str, Any]:
        return {"all": self.all, "soundtracks": sorted(self.soundtracks)}

    def suspend(self, soundtrack: str | None) -> Suspension:
        if soundtrack is None:
            return Suspension(True, self.soundtracks)
        return Suspension(self.all, self.soundtracks | {soundtrack})

    def resume(self, soundtrack: str | None) -> Suspension:
        """No name resumes everything, also soundtracks suspended one by one."""
        if soundtrack is None:
            return Suspension()
        return Suspension(self.all, self.soundtracks - {soundtrack})

    def covers(self, soundtrack: str) -> bool:
        return self.all or soundtrack in self.soundtracks


def held_by_suspension(desired: Desired, suspension: Suspension) -> frozenset[str]:
    """Fingerprints no active soundtrack asks for: these are not submitted.

    A fingerprint shared by a suspended and an active soundtrack is still
    submitted: the active one needs it, and the suspended one then reuses
    the audio at no cost.
    """
    if not (suspension.all or suspension.soundtracks):
        return frozenset()
    active = {t.fingerprint for t in desired.tracks if not suspension.covers(t.soundtrack)}
    return frozenset(t.fingerprint for t in desired.tracks if t.fingerprint not in active)


HoldReason = Literal[
    "suspended", "paused", "backoff", "in_flight", "budget", "balance", "run", "unplanned"
]


@dataclass(frozen=True)
class Held:
    """A fingerprint the next pass would submit but for one reason, and until when."""

    fingerprint: str
    reason: HoldReason
    detail: str
    #: When the reason lifts by itself (a backoff, a pause, the budget's next day).
    until: float | None = None


@dataclass(frozen=True)
class Limits:
    """The settings planning obeys (config and flags, as plain values)."""

    max_in_flight: int
    prune: bool = False
    batch_size: int = MAX_BATCH_ITEMS


@dataclass(frozen=True)
class Snapshot:
    """What the ledger, the output folder and the account say, read once.

    ``reconciler plan`` and a pass build the same value; a pass restricted to
    some tracks passes their generations only, with the global counts as read.
    """

    generations: Mapping[str, Generation]
    #: Tasks submitted and not finished, over every generation (the cap counts all).
    in_flight: int = 0
    #: What the budget, the run's ceiling and the balance still pay for.
    allowance: Allowance = field(default_factory=lambda: Allowance(None))
    suspension: Suspension = field(default_factory=Suspension)
    #: Output files the ledger records and how they look; None: not read (a pass
    #: checks each file as it materialises it, so it plans submissions only).
    outputs: Mapping[str, OutputFact] | None = None
    #: A pause after a 401 or an empty account, until then.
    paused_until: float = 0.0
    pause_reason: str | None = None
    #: Applying a saved plan: only these fingerprints may be submitted.
    only: frozenset[str] | None = None


@dataclass(frozen=True)
class Plan:
    """What the next pass does: submits now, holds back (and why), reuses, restores, prunes."""

    submit: tuple[str, ...]
    held: tuple[Held, ...]
    #: Tracks whose audio is generated or in flight, but not at this path yet.
    reuse: tuple[DesiredTrack, ...]
    #: Output paths that are deleted or drifted and come back from the cache.
    restore: tuple[str, ...]
    prune: tuple[str, ...]
    parked: tuple[str, ...]
    waiting: tuple[str, ...] = ()
    batch_size: int = MAX_BATCH_ITEMS

    @property
    def batches(self) -> list[tuple[str, ...]]:
        return batches(self.submit, self.batch_size)

    @property
    def cost(self) -> int:
        return CREDITS_PER_TASK * len(self.submit)

    @property
    def changes(self) -> bool:
        """Work the specs ask for: also what waits for the budget or a retry (a
        CI gate must not pass because today's budget is spent), not what a
        person suspended."""
        waiting = len(self.held) > len(self.held_by("suspended"))
        return bool(self.submit or waiting or self.reuse or self.restore or self.prune)

    def held_by(self, *reasons: HoldReason) -> tuple[str, ...]:
        return tuple(h.fingerprint for h in self.held if h.reason in reasons)


def plan(desired: Desired, snapshot: Snapshot, now: float, limits: Limits) -> Plan:
    """The one decision of what a pass does, for ``reconciler plan`` and the pass alike.

    Queued fingerprints go out in spec order unless something holds them: a
    suspension, a pause, a backoff, the in-flight cap, then the budget, the
    run's ceiling or the balance (``due_submissions`` says how many fit). Each
    held one says which, so ``plan`` tells a person why the next ``sync``
    will not send it.
    """
    gens = snapshot.generations
    suspended = held_by_suspension(desired, snapshot.suspension)
    parked: list[str] = []
    waiting: list[str] = []
    held: list[Held] = []
    eligible: list[str] = []
    for fp in desired.fingerprints():
        gen = gens.get(fp)
        if gen is not None and gen.state == "parked":
            parked.append(fp)
        elif gen is not None and gen.state in IN_FLIGHT:
            waiting.append(fp)
        elif gen is not None and gen.state != "queued":
            continue
        elif fp in suspended:
            held.append(Held(fp, "suspended", "suspended (`reconciler resume` lifts it)"))
        elif snapshot.only is not None and fp not in snapshot.only:
            held.append(Held(fp, "unplanned", "not in the saved plan"))
        elif now < snapshot.paused_until:
            reason = snapshot.pause_reason or "submissions paused"
            held.append(Held(fp, "paused", reason, snapshot.paused_until))
        elif gen is not None and gen.next_attempt > now:
            detail = f"retry after: {gen.reason}" if gen.reason else "retry"
            held.append(Held(fp, "backoff", detail, gen.next_attempt))
        else:
            eligible.append(fp)
    fits = due_submissions(
        eligible,
        gens,
        now,
        in_flight=snapshot.in_flight,
        max_in_flight=limits.max_in_flight,
        affordable=None,
        batch_size=limits.batch_size,
    )
    allowance = snapshot.allowance
    submit = fits if allowance.tasks is None else fits[: max(0, allowance.tasks)]
    cap = f"in-flight cap ({snapshot.in_flight} of {limits.max_in_flight} in flight)"
    for fp in eligible[len(submit) :]:
        if fp in fits:
            assert allowance.limit is not None
            until = utc_day_start(now) + 86_400 if allowance.limit == "budget" else None
            held.append(Held(fp, allowance.limit, allowance.reason or allowance.limit, until))
        else:
            held.append(Held(fp, "in_flight", cap))
    reuse, restore, prune = _outputs_plan(desired, gens, snapshot.outputs, limits.prune)
    return Plan(
        submit=tuple(submit),
        held=tuple(sorted(held, key=_spec_order(desired))) if held else (),
        reuse=reuse,
        restore=restore,
        prune=prune,
        parked=tuple(parked),
        waiting=tuple(waiting),
        batch_size=limits.batch_size,
    )


def _spec_order(desired: Desired) -> Callable[[Held], int]:
    order = {fp: i for i, fp in enumerate(desired.fingerprints())}
    return lambda h: order[h.fingerprint]


def _outputs_plan(
    desired: Desired,
    generations: Mapping[str, Generation],
    outputs: Mapping[str, OutputFact] | None,
    prune: bool,
) -> tuple[tuple[DesiredTrack, ...], tuple[str, ...], tuple[str, ...]]:
    """Reuse, restore and prune: free work on files, from the recorded outputs."""
    if outputs is None:
        return (), (), ()
    reuse: list[DesiredTrack] = []
    restore: list[str] = []
    for t in desired.tracks:
        gen = generations.get(t.fingerprint)
        if gen is None or gen.state in ("queued", "parked"):
            continue
        for path in t.outputs:
            fact = outputs.get(path)
            if fact is None or fact.fingerprint != t.fingerprint:
                reuse.append(t)
                break
            if fact.disk != "ok" and fact.cached:
                restore.append(path)
    if not (prune and desired.prune_allowed):
        return tuple(reuse), tuple(restore), ()
    wanted = {p for t in desired.tracks for p in t.outputs}
    wanted |= {f"{s}/{n}" for s in desired.soundtracks for n in LIST_FILES}
    return tuple(reuse), tuple(restore), tuple(sorted(p for p in outputs if p not in wanted))
