"""Typed facts the ledger hands out and takes in: tasks, clips, outputs, status reads.

Where it sits: plain records shared by the ledger's writers (``work``), its
reports (``reports``) and their callers; no I/O here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reconciler.planning import FileTracks, Generation, Suspension


@dataclass(frozen=True)
class TaskRef:
    task_id: str
    fingerprint: str
    batch_id: str | None
    created_at: float


@dataclass(frozen=True, slots=True)
class ClipRecord:
    clip_id: str
    task_id: str
    fingerprint: str
    position: int
    state: str
    audio_url: str | None
    duration: float | None
    title: str | None
    lyrics: str | None
    tags: str | None
    sha256: str | None
    image_url: str | None = None
    #: The cover's sha256 in the cache; '' none to be had; None not fetched yet.
    cover: str | None = None


@dataclass(frozen=True, slots=True)
class OutputRecord:
    path: str
    soundtrack: str
    track: str | None
    clip: int | None
    fingerprint: str | None
    sha256: str
    size: int
    mtime_ns: int
    #: ``tags.TrackTags.key`` of the file written (audio checksum and tag
    #: values); None for a list file, and as read by ``outputs`` and ``outputs_at``.
    tags_key: str | None = None


#: One track as ``status`` reads it: soundtrack, name, fingerprint, clips,
#: source, when it last changed, and its generation's state, reason, attempts,
#: next attempt and whether a callback proved a lost submit paid (the
#: generation's fields are None before the first plan).
StatusRow = tuple[
    str, str, str, int, str, float, str | None, str | None, int | None, float | None, int | None
]


@dataclass(frozen=True)
class StatusRead:
    """Everything ``status`` shows, read in one transaction (``reports.read_status``)."""

    tracks: list[StatusRow]
    spec_errors: dict[str, str]
    #: Output path → (the fingerprint its file holds, its size and mtime_ns when written).
    outputs: dict[str, tuple[str | None, int, int]]
    #: The ``kv`` facts it shows (output errors, submit block, last pass, API
    #: health, short generations, unexpected shapes, suspension, output folder).
    facts: dict[str, Any]
    open_batches: int
    ambiguous_submits: int
    possible_double_spend: int
    #: Credits' worth of tasks that may have been charged since ``since``, as ``spent_since``.
    spent: int
    #: Generations paid for or possibly so and not finished (the in-flight cap counts these).
    in_flight: int
    #: Orphan tasks still being matched, or finished without an owner.
    orphans: int
    #: Every (soundtrack, track), read only when a selector matched nothing.
    names: list[tuple[str, str]]
    #: The leader's lease (holder, host, pid, since, renewed_at, expires_at,
    #: token); None when no replica ever took it (a ledger used by one daemon).
    lease: tuple[Any, ...] | None = None
    #: Replicas' heartbeats (holder, host, pid, role, started, seen), newest first.
    replicas: list[tuple[Any, ...]] = field(default_factory=list)
    #: When read, on the clock the lease is kept by (PostgreSQL's own clock).
    now: float | None = None


#: One output as ``plan`` reads it: path, fingerprint, size, mtime_ns (the row
#: as it comes: 60,000 ``OutputRecord`` cost a cold plan 0.3 s).
PlanOutput = tuple[str, str | None, int, int]
#: A file's (size, mtime_ns), or None where it is missing (``outputs.file_state``).
FileState = tuple[int, int] | None
#: An output not as recorded: its state now, and its clip and checksum as recorded.
ChangedOutput = tuple[FileState, int | None, str]


@dataclass(frozen=True)
class PlanRead:
    """What ``plan`` reads of the ledger, in one transaction (``reports.read_plan``)."""

    #: Spec file path → its last good version with its desired tracks.
    last_good: dict[str, FileTracks]
    #: Spec file path → ``specs.stamp`` of its last good version, where trusted.
    stamps: dict[str, str]
    generations: dict[str, Generation]
    outputs: dict[str, PlanOutput]
    #: The outputs whose size or mtime is not the recorded one.
    changed: dict[str, ChangedOutput]
    #: The usable clips of the fingerprints of the ``changed`` outputs.
    clips: dict[str, list[ClipRecord]]
    suspension: Suspension
    #: Tasks that may have been charged since ``since``, as ``spent_since``.
    spent: int
    #: Lost-answer items past their grace period, with their resubmits so far
    #: (``work.EXPIRED_UNKNOWN_SQL``): the pass sends them again or parks them.
    expired: list[tuple[str, int]] = field(default_factory=list)


@dataclass(frozen=True)
class TaskUpdate:
    """What one poll (or verified webhook) said about one task."""

    task_id: str
    status: str
    clips: Sequence[ClipRecord]
    error: str | None = None
    failure_type: str | None = None


@dataclass(frozen=True)
class Hint:
    """A verified callback: something happened to ``task_id`` of ``fingerprint``.

    Either may be unknown: the batch-level URL names no fingerprint, and the
    documented body names no task, only its clips.
    """

    fingerprint: str | None
    task_id: str | None
    clip_ids: tuple[str, ...] = ()
