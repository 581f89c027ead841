"""The MusicAPI client: the only module of reconciler that speaks HTTP (httpx).

Where it sits in the flow: plan → **submit** → **track (poll/webhook)** →
**download** → materialise. ``reconciling`` hands it the fingerprints' create
requests ten at a time (:meth:`MusicAPI.submit_batch`, or :meth:`MusicAPI.create`
when the deployment has no batch endpoint), follows them with
:meth:`MusicAPI.poll_batch` / :meth:`MusicAPI.poll_task`, and fetches finished
clips with :meth:`MusicAPI.download`. The wire format, and which parts of it
the public documentation leaves open, is described in ``docs/protocol.md``.

What this module promises its callers:

* Only exceptions from :mod:`reconciler.errors` leave it; httpx's never do (and
  are not chained either, because an httpx exception holds the request and so
  the Authorization header).
* The error's class carries the retry policy (rule 7). Submits are never retried
  here: there is no idempotency key, so a submit that may have reached the
  service raises :class:`AmbiguousSubmitError` and the caller applies the
  protocol's grace-period rule (rule 2). A submit cancelled while in flight is
  just as ambiguous; the caller's recorded intent covers that case.
* Idempotent GETs (polls, credits, downloads) are retried here with capped
  exponential backoff and jitter, honouring ``Retry-After`` (via stamina).
* The API key goes into the Authorization header of API calls and nowhere else:
  not into ``repr``, messages, logs, or requests to other hosts (rule 10).
* Answers are read leniently: every plausible shape of the partly documented
  batch answers is understood (:func:`read_batch_results`,
  :func:`read_batch_poll`), an item is only matched to a task when that is
  certain, and what stays uncertain is returned as such (:class:`Unconfirmed`,
  orphan task ids, unread tasks) for the caller to hold, never to pay again.
  A 2xx body that cannot be read at all is a temporary error for a GET and an
  ambiguous one for a submit.
"""

from __future__ import annotations

import asyncio
import email.utils
import html
import json
import math
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, TypeVar
from urllib.parse import quote

from reconciler.hiding import without

# httpx imports pygments and rich only for its own command line.
with without("pygments"):
    import httpx
import stamina
import structlog
from structlog.typing import FilteringBoundLogger

from reconciler.config import Secret
from reconciler.errors import (
    AmbiguousSubmitError,
    APIError,
    AudioExpiredError,
    AuthError,
    BatchUnsupportedError,
    ConfigError,
    InsufficientCreditsError,
    NotFoundError,
    OutputError,
    PermanentAPIError,
    RateLimitedError,
    RejectedError,
    TemporaryAPIError,
)
from reconciler.limits import MAX_BATCH_ITEMS
from reconciler.outcomes import rejection_kind

__all__ = [
    "Accepted",
    "BatchPoll",
    "BatchProbe",
    "BatchSubmission",
    "Clip",
    "Credits",
    "MusicAPI",
    "Reading",
    "Rejected",
    "TaskState",
    "TaskStatus",
    "TokenBucket",
    "Unconfirmed",
    "error_message",
    "parse_retry_after",
    "read_batch_poll",
    "read_batch_results",
]


TaskState = Literal["pending", "running", "succeeded", "failed"]

T = TypeVar("T")


class HasSecret(Protocol):
    """A wrapped key (``config.Secret``, pydantic's ``SecretStr``): unwrapped only to send it."""

    def get_secret_value(self) -> str: ...


# Which endpoint an answer came from decides how its status maps to an error.
_Kind = Literal["create", "batch", "poll", "credits", "download"]
_SUBMITS: frozenset[_Kind] = frozenset({"create", "batch"})

# Only these prove that no byte of the request left this machine; every other
# transport fault during a submit may have happened after the service read it.
_NOTHING_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)

_REQUEST_ID_HEADERS = ("x-request-id", "x-vercel-id", "cf-ray")
_MESSAGE_LIMIT = 200
_ERROR_BODY_LIMIT = 16_384
_KEY_FORBIDDEN = re.compile(r"[\s\x00-\x1f\x7f]")


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Clip:
    """One song of a task, as the service last described it."""

    clip_id: str
    state: str
    """As sent; states other than ``succeeded``/``failed`` mean "not finished yet"."""
    audio_url: str | None
    duration: float | None
    """Seconds; None when the service sent nothing usable."""
    title: str | None
    lyrics: str | None
    tags: str | None
    image_url: str | None
    created_at: str | None
    mv: str | None = None
    gpt_description_prompt: str | None = None
    """The request fields a clip echoes: how an orphan task is matched to its item."""

    @property
    def done(self) -> bool:
        """Ready to download: succeeded *and* an audio URL to fetch."""
        return self.state == "succeeded" and bool(self.audio_url)

    @property
    def failed(self) -> bool:
        return self.state == "failed"


@dataclass(frozen=True, slots=True)
class TaskStatus:
    """Where one task stands.

    ``status`` is derived the same way for a single poll, a batch poll entry
    and a 202: ``failed`` when the service names a failure ``type`` (or says
    ``failed``) or every clip failed; ``succeeded`` when every clip is done or
    failed and at least one is done (callers decide per clip, so one failed
    clip next to a done one is still ``succeeded``); ``running`` while any clip
    is unfinished, on a 202 ``not_ready`` and when no clip is known yet;
    ``pending`` only when a batch entry says so and carries no clips.
    """

    task_id: str
    index: int | None
    """Position in its batch, when known."""
    status: TaskState
    clips: tuple[Clip, ...]
    failure_type: str | None
    """``failed``, ``timeout``, ``forbidden``, ``api_error``, ... when failed."""
    error: str | None
    """The service's reason, for people."""


@dataclass(frozen=True, slots=True)
class Accepted:
    """Batch item ``index`` became task ``task_id`` (and is being charged)."""

    index: int
    task_id: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """Batch item ``index`` was refused and not charged.

    ``type`` is ``bad_request``, ``insufficient_credits``, ``forbidden`` or
    whatever else the service names; ``error`` is its reason.
    """

    index: int
    type: str
    error: str


@dataclass(frozen=True, slots=True)
class Unconfirmed:
    """Batch item ``index`` is not accounted for in the service's answer.

    The submit itself went through, so the item may have become a task that is
    being charged: treat it like an ambiguous submit (never resubmit blindly).
    """

    index: int
    reason: str


@dataclass(frozen=True, slots=True)
class BatchSubmission:
    """The answer to one batch submit: one result per item, in item order."""

    batch_id: str | None
    """None when the answer names no batch: its tasks are then polled one by one."""
    results: tuple[Accepted | Rejected | Unconfirmed, ...]
    orphans: tuple[str, ...] = ()
    """Task ids the answer names but that could not be matched to an item:
    created and charged, owner unknown (see :class:`Unconfirmed`)."""
    submitted: int | None = None
    """How many items the service says it accepted (charged), when it says so."""


@dataclass(frozen=True, slots=True)
class BatchPoll:
    """What one batch poll told: statuses it could read, and the tasks it could not."""

    statuses: tuple[TaskStatus, ...]
    unread: tuple[str, ...]
    """Known task ids the answer left out or left unreadable: ask the task endpoint."""


@dataclass(frozen=True, slots=True)
class BatchProbe:
    """How ``POST /sonic/batch`` with no items was answered (``doctor``, at no cost)."""

    status: int
    message: str
    """The answer's reason, key removed."""
    server_time: float | None
    """The answer's ``Date`` header as Unix seconds, when it has a readable one."""


@dataclass(frozen=True, slots=True)
class Reading:
    """How the client read one answer: for ``doctor`` and the shape counters.

    ``shape`` is ``"documented"`` for the shape the client expects, else the
    ways the answer differs from it (``"task id as id, 1-based index"``).
    ``body`` is the raw answer with the key removed, cut at 16 KiB.
    """

    endpoint: str
    shape: str
    status: int
    body: str

    @property
    def expected(self) -> bool:
        return self.shape == "documented"


@dataclass(frozen=True, slots=True)
class Credits:
    credits: int
    extra_credits: int
    """Spent first by the service."""

    @property
    def total(self) -> int:
        return self.credits + self.extra_credits


# ---------------------------------------------------------------------------
# Reading answers
# ---------------------------------------------------------------------------


class _MalformedError(Exception):
    """A 2xx body we cannot read; never leaves this module (translated by kind)."""


class _NoClipsError(_MalformedError):
    """An answer that says ``succeeded`` but carries no clip to download."""


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _duration(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _count(value: Any, what: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise _MalformedError(f"{what} is not a whole number")


def _clip(value: Any) -> Clip:
    if not isinstance(value, Mapping):
        raise _MalformedError("a clip is not an object")
    clip_id = value.get("clip_id")
    if not isinstance(clip_id, str) or not clip_id:
        raise _MalformedError("a clip has no clip_id")
    return Clip(
        clip_id=clip_id,
        state=_text(value.get("state")) or "",
        audio_url=_text(value.get("audio_url")),
        duration=_duration(value.get("duration")),
        title=_text(value.get("title")),
        lyrics=_text(value.get("lyrics")),
        tags=_text(value.get("tags")),
        image_url=_text(value.get("image_url")),
        created_at=_text(value.get("created_at")),
        mv=_text(value.get("mv")),
        gpt_description_prompt=_text(value.get("gpt_description_prompt")),
    )


def _clips(value: Any) -> tuple[Clip, ...]:
    if value is None:
        return ()
    if isinstance(value, Mapping):  # one clip sent bare instead of in a list
        return (_clip(value),)
    if not isinstance(value, list):
        raise _MalformedError("data is neither a list of clips nor a clip")
    return tuple(_clip(item) for item in value)


def _task_status(body: Mapping[str, Any], task_id: str, index: int | None) -> TaskStatus:
    """Derive a task's status from a single-poll body or a batch poll entry."""
    clips = _clips(body.get("data"))
    failure = _text(body.get("type"))
    declared = body.get("status")
    reason = _text(body.get("error"))

    def result(status: TaskState, failure_type: str | None, error: str | None) -> TaskStatus:
        return TaskStatus(task_id, index, status, clips, failure_type, error)

    if failure and failure != "not_ready":
        return result("failed", failure, reason or _text(body.get("message")) or f"task {failure}")
    if declared == "failed":
        return result("failed", "failed", reason or "task failed")
    if clips:
        if all(clip.failed for clip in clips):
            return result("failed", "failed", reason or "every clip failed")
        if all(clip.done or clip.failed for clip in clips):
            return result("succeeded", None, None)
        return result("running", None, None)
    if declared == "succeeded":
        # Finished, says the entry, but nothing to download: only the task
        # endpoint can tell what it holds.
        raise _NoClipsError("an entry says succeeded but carries no clips")
    # No clips to judge by: nothing can be downloaded yet, whatever else it says.
    return result("pending" if declared == "pending" else "running", None, None)


def _an_id(value: Any) -> str | None:
    """An id sent as text or as a number (never a bool); None when unusable."""
    if isinstance(value, str):
        value = value.strip()
        return value if 0 < len(value) <= 200 else None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


#: Where a task id may sit in an entry, the documented key first.
_TASK_ID_KEYS = ("task_id", "id", "taskId", "taskID")


def _entry_task_id(entry: Any) -> tuple[str | None, str | None]:
    """(task id, the key it was under) of a submit or poll entry; a bare id string counts."""
    if isinstance(entry, str | int) and not isinstance(entry, bool):
        return _an_id(entry), "bare id"
    if isinstance(entry, Mapping):
        for key in _TASK_ID_KEYS:
            found = _an_id(entry.get(key))
            if found:
                return found, key
    return None, None


def _entry_index(entry: Any) -> int | None:
    index = entry.get("index") if isinstance(entry, Mapping) else None
    if isinstance(index, int) and not isinstance(index, bool):
        return index
    return None


def _index_base(indexes: Sequence[int], slots: Collection[int]) -> int | None:
    """0 or 1 when the entries' indexes fit ``slots`` under exactly one base, else None.

    ``slots`` are the 0-based positions the indexes may name. A set that fits
    both ways (some entries left out) proves nothing, so it maps nothing.
    """
    if len(set(indexes)) != len(indexes):
        return None
    fits = [base for base in (0, 1) if all(i - base in slots for i in indexes)]
    return fits[0] if len(fits) == 1 else None


@dataclass(frozen=True, slots=True)
class _SubmitEntry:
    index: int | None
    task_id: str | None
    id_key: str | None
    rejection: tuple[str | None, str] | None


def _submit_entry(entry: Any) -> _SubmitEntry | None:
    task_id, key = _entry_task_id(entry)
    index = _entry_index(entry)
    if task_id:
        # A task id wins over a failure type: a created task must be tracked.
        return _SubmitEntry(index, task_id, key, None)
    if isinstance(entry, Mapping):
        kind = _text(entry.get("type"))
        reason = _text(entry.get("error")) or _text(entry.get("message"))
        if kind or reason:
            return _SubmitEntry(index, None, None, (kind, reason or kind or "rejected"))
    return None


def read_batch_results(
    tasks: Any, count: int, submitted: Any = None
) -> tuple[tuple[Accepted | Rejected | Unconfirmed, ...], tuple[str, ...], list[str]]:
    """One result per submitted item, the task ids it could not attribute, and
    the ways the answer differs from the documented shape.

    An entry is mapped to an item by ``index`` only when every entry has one
    and they fit the items under one base (0 or 1); by position only when
    there are as many entries as items and none has an index. Anything else
    leaves the unmatched items :class:`Unconfirmed` and their task ids as
    orphans: they exist and are charged, but nobody can say whose they are.
    """
    if not isinstance(tasks, list):
        raise _MalformedError("tasks is not a list")
    odd: set[str] = set()
    entries: list[_SubmitEntry] = []
    for raw in tasks:
        entry = _submit_entry(raw)
        if entry is None:
            odd.add("unreadable entry")
            continue
        entries.append(entry)
        if entry.id_key and entry.id_key != "task_id":
            odd.add(f"task id as {entry.id_key}")
        if entry.rejection is not None and entry.rejection[0] is None:
            odd.add("rejection without type")
    ids = [e.task_id for e in entries if e.task_id]
    placed: dict[int, _SubmitEntry] = {}
    indexes = [e.index for e in entries if e.index is not None]
    if len(set(ids)) != len(ids):
        odd.add("one task id twice")
    elif entries and len(indexes) == len(entries):
        base = _index_base(indexes, range(count))
        if base is None:
            odd.add("indexes that fit no single base")
        else:
            if base == 1:
                odd.add("1-based index")
            placed = {e.index - base: e for e in entries if e.index is not None}
    elif not indexes and len(entries) == count and len(tasks) == count:
        if count > 1:
            odd.add("no index")
        placed = dict(enumerate(entries))
    else:
        odd.add("no index" if not indexes else "some entries without index")
    if len(tasks) < count and not odd & {"unreadable entry"}:
        odd.add("items left out")
    results: list[Accepted | Rejected | Unconfirmed] = []
    for i in range(count):
        entry = placed.get(i)
        if entry is None:
            results.append(
                Unconfirmed(i, "the service's answer does not account for this item; it may exist")
            )
        elif entry.task_id:
            results.append(Accepted(i, entry.task_id))
        else:
            assert entry.rejection is not None
            kind, reason = entry.rejection
            results.append(Rejected(i, kind or "rejected", reason))
    attributed = {r.task_id for r in results if isinstance(r, Accepted)}
    orphans = tuple(t for t in ids if t and t not in attributed)
    accepted = sum(isinstance(r, Accepted) for r in results)
    claimed = _an_id(submitted)
    if claimed is not None and claimed.isdigit() and int(claimed) == accepted and not orphans:
        # The service counts exactly the tasks we placed: an item it left out
        # was not created (a refusal without its words), so it costs nothing
        # to send it again.
        results = [
            Rejected(r.index, "left out", "left out of the answer, which counts it as not created")
            if isinstance(r, Unconfirmed)
            else r
            for r in results
        ]
    elif claimed is not None and claimed.isdigit() and int(claimed) > accepted + len(orphans):
        # More were charged than we can see: a "rejected" item may be one of them.
        odd.add("fewer task ids than submitted")
        results = [
            Unconfirmed(r.index, "the service counts more tasks than it names; it may exist")
            if isinstance(r, Rejected)
            else r
            for r in results
        ]
    return tuple(results), orphans, sorted(odd)


def read_batch_poll(
    body: Any, known: Mapping[int, str]
) -> tuple[tuple[TaskStatus, ...], tuple[str, ...], list[str]]:
    """Statuses a batch poll gives, the known task ids it leaves unread, and its odd shapes.

    ``known`` maps each accepted item's 0-based index to its task id. An entry
    without a task id is placed by its index (learnt from the entries that
    carry both, else from the indexes alone) or by position when the counts
    match; an entry that says ``succeeded`` without clips, or cannot be read,
    leaves its task unread: the caller asks the task endpoint.
    """
    if body is None or (
        isinstance(body, Mapping) and body.get("type") == "not_ready" and "tasks" not in body
    ):
        running = tuple(TaskStatus(t, i, "running", (), None, None) for i, t in known.items())
        return running, (), ["202 not_ready"]
    tasks = body.get("tasks") if isinstance(body, Mapping) else None
    if not isinstance(tasks, list):
        raise _MalformedError("the answer has no tasks list")
    odd: set[str] = set()
    by_index = dict(known)
    pairs = [(_entry_task_id(e), _entry_index(e), e) for e in tasks]
    # The base is learnt from entries that carry both an id and an index, else
    # from the indexes alone.
    bases = {
        b
        for (tid, _), i, _ in pairs
        if tid and i is not None
        for b in (0, 1)
        if by_index.get(i - b) == tid
    }
    base = (
        bases.pop()
        if len(bases) == 1
        else _index_base([i for _, i, _ in pairs if i is not None], by_index)
    )
    indexes_absent = all(i is None for _, i, _ in pairs)
    positional = indexes_absent and len(pairs) == len(by_index)
    ordered = [by_index[i] for i in sorted(by_index)]
    statuses: list[TaskStatus] = []
    seen: set[str] = set()
    unread: list[str] = []
    for position, ((named, key), index, entry) in enumerate(pairs):
        if key and key != "task_id":
            odd.add(f"task id as {key}")
        tid = named
        if tid is None:
            odd.add("entry without task id")
            if index is not None and base is not None:
                tid = by_index.get(index - base)
            elif positional:
                tid = ordered[position]
            if tid is None:
                continue
        if index is None:
            odd.add("no index")
        elif base == 1:
            odd.add("1-based index")
        seen.add(tid)
        item_index = index - base if index is not None and base is not None else None
        if not isinstance(entry, Mapping):
            unread.append(tid)
            continue
        if "status" not in entry and any(k in entry for k in ("code", "data", "type")):
            odd.add("entries shaped like task polls")
        try:
            statuses.append(_task_status(entry, tid, item_index))
        except _NoClipsError:
            odd.add("succeeded without clips")
            unread.append(tid)
        except _MalformedError:
            odd.add("unreadable entry")
            unread.append(tid)
    missing = [t for t in ordered if t not in seen]
    if missing:
        odd.add("known tasks left out")
    mine = set(ordered)
    unread = [t for t in unread if t in mine]
    return tuple(statuses), tuple(dict.fromkeys([*unread, *missing])), sorted(odd)


def _loads(content: bytes) -> tuple[bool, Any]:
    """(readable, value): parse JSON without leaving a JSONDecodeError to chain."""
    try:
        return True, json.loads(content)
    except ValueError:
        return False, None


# ---------------------------------------------------------------------------
# Errors: bodies, headers, classification
# ---------------------------------------------------------------------------


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _MESSAGE_LIMIT else line[: _MESSAGE_LIMIT - 1] + "…"


def _reason_from_json(value: Any) -> str | None:
    if isinstance(value, str):
        return value or None
    if isinstance(value, Mapping):
        # {"error"}, {"message"}, {"type","error"}, {"code","message"}, {"detail"},
        # and {"error": {"message": ...}} one level down.
        for key in ("error", "message", "detail", "type"):
            found = _reason_from_json(value.get(key))
            if found:
                return found
    return None


def error_message(status: int, content: bytes, content_type: str) -> str:
    """A short, one-line reason from any error body the service sends.

    JSON (any of the service's envelopes), plain text and HTML pages (their
    title, else their text) are all reduced to one line; an empty or useless
    body gives ``HTTP <status> <phrase>``.
    """
    text = content.decode("utf-8", errors="replace").strip()
    reason: str | None = None
    if text:
        try:
            reason = _reason_from_json(json.loads(text))
        except ValueError:
            if "html" in content_type.lower() or text.startswith("<"):
                title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
                if title:
                    source = title.group(1)
                else:
                    source = re.sub(r"<(script|style)\b.*?</\1\s*>", " ", text, flags=re.I | re.S)
                    source = re.sub(r"<[^>]*>", " ", source)
                reason = html.unescape(source)
            else:
                reason = text
    if reason and reason.strip():
        return _one_line(reason)
    phrase = httpx.codes.get_reason_phrase(status)
    return f"HTTP {status} {phrase}".rstrip()


def parse_retry_after(value: str | None, *, now: float, cap: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or HTTP-date), capped.

    None when absent or unreadable; a date in the past gives 0.
    """
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are GMT; an unmarked one is taken as such
            return None
        seconds = max(0.0, when.timestamp() - now)
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, cap)


def _request_id(headers: httpx.Headers) -> str | None:
    for name in _REQUEST_ID_HEADERS:
        if value := headers.get(name):
            return str(value)
    return None


def _classify(
    status: int, message: str, kind: _Kind, request_id: str | None, retry_after: float | None
) -> APIError:
    """Map a non-2xx answer from endpoint ``kind`` to the error that carries its policy."""
    if status == 429:
        # Rate limiting happens before processing, so even a submit is safe to repeat.
        return RateLimitedError(
            message, status=status, request_id=request_id, retry_after=retry_after
        )
    if status == 408 or status >= 500:
        if kind in _SUBMITS:
            return AmbiguousSubmitError(
                f"the submit may have been processed (HTTP {status}: {message})",
                status=status,
                request_id=request_id,
            )
        return TemporaryAPIError(
            message, status=status, request_id=request_id, retry_after=retry_after
        )
    if kind == "download" and status in (403, 404, 410):
        return AudioExpiredError(
            f"audio URL expired or gone: {message}", status=status, request_id=request_id
        )
    if kind == "batch" and status in (404, 405):
        return BatchUnsupportedError(
            f"no batch endpoint here (HTTP {status})", status=status, request_id=request_id
        )
    if kind == "poll" and (status == 404 or (status == 400 and "not found" in message.lower())):
        return NotFoundError(message, status=status, request_id=request_id)
    if status == 401:
        return AuthError(message, status=status, request_id=request_id)
    if status == 402 or (status == 403 and rejection_kind(None, message) == "credits"):
        return InsufficientCreditsError(message, status=status, request_id=request_id)
    if status in (400, 403, 413, 422):
        return RejectedError(message, status=status, request_id=request_id)
    return PermanentAPIError(
        f"unexpected HTTP {status}: {message}", status=status, request_id=request_id
    )


# ---------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------


class TokenBucket:
    """At most ``rate`` requests a second on average, ``burst`` at once.

    Every API request takes a token first, whatever the pass found to do, so
    no bug upstream can turn into a flood against a service that bills and
    bans. ``clock`` and ``sleep`` are injected for tests.
    """

    def __init__(
        self,
        rate: float,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise ConfigError("the API request rate must be positive")
        self.rate = rate
        self.burst = max(1.0, burst if burst is not None else rate)
        self._clock = clock
        self._sleep = sleep
        self._tokens = self.burst
        self._stamp = clock()
        self._lock = asyncio.Lock()

    async def take(self) -> None:
        # One waiter at a time keeps the order fair and the arithmetic simple.
        async with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            if self._tokens < 1:
                await self._sleep((1 - self._tokens) / self.rate)
                now = self._clock()
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
            self._tokens -= 1


_Note = Callable[[Sequence[str]], None]
"""Tells the client which ways an answer differed from the documented shape."""


class MusicAPI:
    """Async client for the MusicAPI (live service or the sandbox).

    ``max_attempts`` bounds tries of each GET; ``backoff_initial`` and
    ``backoff_cap`` shape the exponential backoff between them. A
    ``Retry-After`` (capped at ``retry_after_cap``) replaces the backoff when
    it is at most ``backoff_cap``; a longer one is not slept inside the call
    but raised as :class:`RateLimitedError` for the caller to schedule.
    Every API request waits for a token of ``bucket`` (by default
    ``max_requests_per_second``). ``observer`` sees how every answer was read
    (:class:`Reading`); answers in an unexpected shape are also counted in
    ``unexpected`` and logged once per shape with their raw body, key removed.
    ``on_request`` hears every API request as it ends: endpoint, outcome
    (``ok`` or the error's class name) and seconds, for the metrics.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | HasSecret,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        max_attempts: int = 3,
        backoff_initial: float = 0.5,
        backoff_cap: float = 30.0,
        retry_after_cap: float = 300.0,
        max_requests_per_second: float = 4.0,
        bucket: TokenBucket | None = None,
        observer: Callable[[Reading], None] | None = None,
        on_request: Callable[[str, str, float], None] | None = None,
        log: FilteringBoundLogger | None = None,
    ) -> None:
        try:
            base = httpx.URL(base_url)
        except httpx.InvalidURL:
            base = httpx.URL()
        if base.scheme not in ("http", "https") or not base.host:
            raise ConfigError(f"MusicAPI base URL must be an http(s) URL, not {base_url!r}")
        key = api_key if isinstance(api_key, str) else api_key.get_secret_value()
        key = key.strip()
        if not key or _KEY_FORBIDDEN.search(key):
            # httpx would reject such a header and quote it in its message.
            raise ConfigError("the MusicAPI key is empty or contains whitespace")
        if max_attempts < 1:
            raise ConfigError("max_attempts must be at least 1")
        self._key = Secret(key)
        self._base = base
        self._max_attempts = max_attempts
        self._backoff_initial = backoff_initial
        self._backoff_cap = backoff_cap
        self._retry_after_cap = retry_after_cap
        self._log: FilteringBoundLogger = log if log is not None else structlog.get_logger(__name__)
        self._bucket = bucket or TokenBucket(max_requests_per_second)
        self._observer = observer
        self._on_request = on_request
        #: "endpoint: shape" → answers read in a shape other than the documented one.
        self.unexpected: Counter[str] = Counter()
        self._logged_shapes: set[str] = set()
        self._http = httpx.AsyncClient(
            base_url=base, timeout=httpx.Timeout(timeout), transport=transport
        )

    def __repr__(self) -> str:
        return f"MusicAPI(base_url={str(self._base)!r})"

    async def __aenter__(self) -> MusicAPI:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- submits: one try each, never retried here ---------------------------

    async def submit_batch(
        self,
        items: Sequence[Mapping[str, Any]],
        *,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
    ) -> BatchSubmission:
        """Submit 1 to :data:`MAX_BATCH_ITEMS` create requests in one call.

        Returns one result per item, in item order: :class:`Accepted` (a task
        now exists), :class:`Rejected` (refused, not charged) or
        :class:`Unconfirmed` (the answer left the item out, so it may exist).

        Raises :class:`AmbiguousSubmitError` when the request may have been
        processed but the answer is lost or unreadable, :class:`TemporaryAPIError`
        only when nothing was sent, :class:`RateLimitedError` on 429,
        :class:`BatchUnsupportedError` on 404/405, and the permanent errors
        for a refusal of the whole batch.
        """
        if not 1 <= len(items) <= MAX_BATCH_ITEMS:
            raise ValueError(f"a batch holds 1 to {MAX_BATCH_ITEMS} items, not {len(items)}")
        payload: dict[str, Any] = {"items": [dict(item) for item in items]}
        if webhook_url is not None:
            payload["webhook_url"] = webhook_url
        if webhook_secret is not None:
            payload["webhook_secret"] = webhook_secret

        def parse(body: Any, note: _Note) -> BatchSubmission:
            if not isinstance(body, Mapping):
                raise _MalformedError("the answer is not an object")
            odd: list[str] = []
            raw_id = body.get("batch_id", body.get("batchId"))
            batch_id = _an_id(raw_id)
            if batch_id is None:
                odd.append("no batch id")
            elif not isinstance(raw_id, str):
                odd.append("numeric batch id")
            tasks = body.get("tasks")
            if tasks is None and batch_id is not None:
                # The batch exists; its poll may name the tasks later.
                odd.append("no tasks list")
                tasks = []
            results, orphans, more = read_batch_results(tasks, len(items), body.get("submitted"))
            note(odd + more)
            unconfirmed = [r.index for r in results if isinstance(r, Unconfirmed)]
            if unconfirmed or orphans:
                self._log.warning(
                    "api.batch_unconfirmed",
                    batch_id=batch_id,
                    indexes=unconfirmed,
                    orphans=[self._scrub(t) for t in orphans],
                    path="/sonic/batch",
                )
            count = _an_id(body.get("submitted"))
            return BatchSubmission(
                batch_id, results, orphans, int(count) if count and count.isdigit() else None
            )

        return await self._call(
            "POST", "/sonic/batch", "batch", "batch_submit", parse, json_body=payload
        )

    async def create(self, item: Mapping[str, Any]) -> str:
        """Submit one create request (``POST /sonic/create``); returns its task id.

        Raises as :meth:`submit_batch` does (without :class:`BatchUnsupportedError`).
        """

        def parse(body: Any, note: _Note) -> str:
            task_id, key = _entry_task_id(body) if isinstance(body, Mapping) else (None, None)
            if task_id is None and isinstance(body, Mapping):
                task_id, key = _entry_task_id(body.get("data"))
                key = f"data.{key}" if key else None
            if task_id is None:
                raise _MalformedError("the answer has no task_id")
            note([] if key == "task_id" else [f"task id as {key}"])
            return task_id

        return await self._call(
            "POST", "/sonic/create", "create", "create", parse, json_body=dict(item)
        )

    async def probe_batch_endpoint(self) -> BatchProbe:
        """Send a batch of no items: whether the endpoint exists, without spending.

        The protocol refuses 0 items with 400, so nothing can be created or
        charged: 400 means the endpoint is there, 404/405 that it is not. The
        answer is returned whatever its status (with the service's clock from
        its ``Date`` header); only a request that got no answer raises
        :class:`TemporaryAPIError`. Never retried.
        """
        request = self._http.build_request(
            "POST", "/sonic/batch", json={"items": []}, headers=self._auth()
        )
        await self._bucket.take()
        try:
            response = await self._http.send(request)
        except httpx.RequestError as exc:
            # "poll": an empty batch cannot be an ambiguous submit.
            error = self._transport_error(exc, "poll")
        else:
            try:
                when = email.utils.parsedate_to_datetime(response.headers.get("date", ""))
            except (TypeError, ValueError):
                when = None
            message = error_message(
                response.status_code, response.content, response.headers.get("content-type", "")
            )
            return BatchProbe(
                response.status_code,
                self._scrub(message),
                when.timestamp() if when is not None and when.tzinfo is not None else None,
            )
        self._log_error(error, "POST", "/sonic/batch", 1)
        raise error

    # -- idempotent reads: retried here ---------------------------------------

    async def poll_batch(self, batch_id: str, known: Mapping[int, str]) -> BatchPoll:
        """The tasks of a batch: what the answer says of each, and what it leaves unread.

        ``known`` maps the 0-based item index of each accepted item to its task
        id. A 202 means every task is still running. Whatever the answer does
        not say readably of a known task is listed in ``unread``, for
        :meth:`poll_task`.
        """

        def parse(body: Any, note: _Note) -> BatchPoll:
            statuses, unread, odd = read_batch_poll(body, known)
            note(odd)
            return BatchPoll(statuses, unread)

        return await self._retrying(
            lambda attempt: self._call(
                "GET",
                "/sonic/batch",
                "poll",
                "batch_poll",
                parse,
                params={"batch_id": batch_id},
                attempt=attempt,
            )
        )

    async def poll_task(self, task_id: str) -> TaskStatus:
        """One task's status (``GET /sonic/task/{id}``); a 202 means ``running``."""

        def parse(body: Any, note: _Note) -> TaskStatus:
            if body is None:  # 202 not_ready
                note([])
                return TaskStatus(task_id, None, "running", (), None, None)
            if not isinstance(body, Mapping):
                raise _MalformedError("the answer is not an object")
            if not any(key in body for key in ("data", "type", "code", "status")):
                raise _MalformedError("the answer is not a task")
            try:
                status = _task_status(body, task_id, None)
            except _NoClipsError:
                # "succeeded" with no clips, from the task endpoint itself:
                # not finished as far as anything can be downloaded.
                note(["succeeded without clips"])
                return TaskStatus(task_id, None, "running", (), None, None)
            note([])
            return status

        path = f"/sonic/task/{quote(task_id, safe='')}"
        return await self._retrying(
            lambda attempt: self._call("GET", path, "poll", "task_poll", parse, attempt=attempt)
        )

    async def get_credits(self) -> Credits:
        """The account balance (``GET /get-credits``)."""

        def parse(body: Any, note: _Note) -> Credits:
            if not isinstance(body, Mapping) or "credits" not in body:
                raise _MalformedError("the answer has no credits")
            note([])
            return Credits(
                credits=_count(body["credits"], "credits"),
                extra_credits=_count(body.get("extra_credits", 0), "extra_credits"),
            )

        return await self._retrying(
            lambda attempt: self._call(
                "GET", "/get-credits", "credits", "credits", parse, attempt=attempt
            )
        )

    async def download(self, url: str, dest: Path) -> int:
        """Stream ``url`` into ``dest`` (overwritten); returns the bytes written.

        Raises :class:`AudioExpiredError` on 403/404/410 or an unusable URL
        (poll again for a fresh one), :class:`TemporaryAPIError` when the body
        stays short of its Content-Length or the connection drops after all
        attempts, :class:`OutputError` when ``dest`` cannot be written. On
        failure ``dest`` may hold a partial body: the caller discards it. The
        key is only sent when ``url`` is on the API's own origin.
        """
        try:
            target = httpx.URL(url)
        except httpx.InvalidURL:
            target = None
        if target is None or target.scheme not in ("http", "https") or not target.host:
            error = AudioExpiredError("audio URL is not a usable http(s) URL")
            self._log_error(error, "GET", "", 1)
            raise error
        return await self._retrying(lambda attempt: self._download_once(target, dest, attempt))

    # -- machinery -------------------------------------------------------------

    def _backoff_hint(self, exc: Exception) -> bool | float:
        """stamina's hook: retry temporary errors, with Retry-After as the backoff."""
        if not isinstance(exc, TemporaryAPIError):
            return False
        if exc.retry_after is None:
            return True
        if exc.retry_after > self._backoff_cap:
            return False  # too long to block inside a call: the caller schedules it
        return exc.retry_after

    async def _retrying(self, call: Callable[[int], Awaitable[T]]) -> T:
        async for attempt in stamina.retry_context(
            on=self._backoff_hint,
            attempts=self._max_attempts,
            timeout=None,
            wait_initial=self._backoff_initial,
            wait_max=self._backoff_cap,
            wait_jitter=self._backoff_initial,
        ):
            with attempt:
                return await call(attempt.num)
        raise AssertionError("unreachable: stamina re-raises the last error")

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key.get_secret_value()}"}

    def _same_origin(self, url: httpx.URL) -> bool:
        base = self._base
        return (url.scheme, url.host, url.port) == (base.scheme, base.host, base.port)

    async def _call(
        self,
        method: str,
        path: str,
        kind: _Kind,
        endpoint: str,
        parse: Callable[[Any, _Note], T],
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
        attempt: int = 1,
    ) -> T:
        """One request: send, map a non-2xx to its error, read the body with ``parse``.

        Errors are raised outside any ``except`` block so that no httpx
        exception (which holds the request's headers) is chained to them.
        """
        request = self._http.build_request(
            method, path, params=params, json=json_body, headers=self._auth()
        )
        error: APIError
        await self._bucket.take()
        started = time.monotonic()
        try:
            response = await self._http.send(request)
        except httpx.RequestError as exc:
            error = self._transport_error(exc, kind)
        else:
            try:
                result = self._read(response, kind, endpoint, parse)
            except APIError as exc:
                error = exc
            else:
                if self._on_request is not None:
                    self._on_request(endpoint, "ok", time.monotonic() - started)
                return result
        if self._on_request is not None:
            self._on_request(endpoint, type(error).__name__, time.monotonic() - started)
        self._log_error(error, method, path, attempt)
        raise error

    def _read(
        self,
        response: httpx.Response,
        kind: _Kind,
        endpoint: str,
        parse: Callable[[Any, _Note], T],
    ) -> T:
        # Errors are raised after the ``except`` blocks: a chained JSONDecodeError or
        # _MalformedError would carry the raw body, unscrubbed.
        status = response.status_code
        request_id = _request_id(response.headers)
        if not response.is_success:
            raise self._status_error(response, response.content, kind)

        def note(odd: Sequence[str]) -> None:
            self._saw(endpoint, odd, status, response.content)

        if kind == "poll" and status == 202:
            return parse(None, note)
        readable, body = _loads(response.content)
        if not readable:
            raise self._malformed(kind, "the answer is not JSON", status, request_id)
        embedded = body.get("code") if isinstance(body, Mapping) else None
        if (
            isinstance(embedded, int)
            and not isinstance(embedded, bool)
            and embedded >= 400
            and not any(k in body for k in ("data", "task_id", "tasks"))
        ):
            # A 2xx whose body is an error envelope: judge it by the code it names.
            message = self._scrub(_one_line(_reason_from_json(body) or f"HTTP {embedded}"))
            raise _classify(embedded, message, kind, request_id, None)
        try:
            return parse(body, note)
        except _MalformedError as exc:
            reason = str(exc)
        self._saw(endpoint, [f"unreadable: {reason}"], status, response.content)
        raise self._malformed(kind, reason, status, request_id)

    def _saw(self, endpoint: str, odd: Sequence[str], status: int, content: bytes) -> None:
        """Report how an answer was read; an unexpected shape is counted and logged once."""
        shape = ", ".join(odd) if odd else "documented"
        body = self._scrub(content[:_ERROR_BODY_LIMIT].decode("utf-8", errors="replace"))
        if self._observer is not None:
            self._observer(Reading(endpoint, shape, status, body))
        if not odd:
            return
        key = f"{endpoint}: {shape}"
        self.unexpected[key] += 1
        if key not in self._logged_shapes:
            self._logged_shapes.add(key)
            self._log.warning(
                "api.unexpected_shape", endpoint=endpoint, shape=shape, status=status, body=body
            )

    def _malformed(self, kind: _Kind, reason: str, status: int, request_id: str | None) -> APIError:
        reason = self._scrub(reason)
        if kind in _SUBMITS:
            return AmbiguousSubmitError(
                f"the submit may have been processed but its answer is unreadable: {reason}",
                status=status,
                request_id=request_id,
            )
        return TemporaryAPIError(
            f"unreadable answer: {reason}", status=status, request_id=request_id
        )

    def _status_error(self, response: httpx.Response, content: bytes, kind: _Kind) -> APIError:
        status = response.status_code
        message = self._scrub(
            error_message(status, content, response.headers.get("content-type", ""))
        )
        retry_after = parse_retry_after(
            response.headers.get("retry-after"), now=time.time(), cap=self._retry_after_cap
        )
        return _classify(status, message, kind, _request_id(response.headers), retry_after)

    async def _download_once(self, url: httpx.URL, dest: Path, attempt: int) -> int:
        headers = self._auth() if self._same_origin(url) else {}
        request = self._http.build_request("GET", url, headers=headers)
        error: APIError
        try:
            response = await self._http.send(request, stream=True, follow_redirects=True)
            try:
                if not response.is_success:
                    head = await _read_head(response, _ERROR_BODY_LIMIT)
                    error = self._status_error(response, head, "download")
                else:
                    written = await _write_body(response, dest)
                    expected = _content_length(response.headers)
                    if expected is None or response.num_bytes_downloaded >= expected:
                        return written
                    error = TemporaryAPIError(
                        f"audio body truncated: {response.num_bytes_downloaded} of "
                        f"{expected} bytes",
                        status=response.status_code,
                        request_id=_request_id(response.headers),
                    )
            finally:
                await response.aclose()
        except httpx.RequestError as exc:
            error = self._transport_error(exc, "download")
        # Only the path: an audio URL's query string may be a signed token.
        self._log_error(error, "GET", url.path, attempt)
        raise error

    def _transport_error(self, exc: httpx.RequestError, kind: _Kind) -> APIError:
        detail = self._scrub(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        if kind in _SUBMITS and not isinstance(exc, _NOTHING_SENT):
            return AmbiguousSubmitError(
                f"the submit may have been processed but its answer was lost ({detail})"
            )
        return TemporaryAPIError(f"network fault ({detail})")

    def _scrub(self, text: str) -> str:
        """Remove the key from text the service sent back (it may echo it)."""
        return text.replace(self._key.get_secret_value(), "***")

    def _log_error(self, error: APIError, method: str, path: str, attempt: int) -> None:
        # Warning for what has a recovery path of its own; error for what needs a decision.
        expected = (TemporaryAPIError, BatchUnsupportedError, AudioExpiredError)
        emit = self._log.warning if isinstance(error, expected) else self._log.error
        emit(
            "api.error",
            method=method,
            path=path,
            status=error.status,
            request_id=error.request_id,
            attempt=attempt,
            error=type(error).__name__,
            message=error.message,
            retry_after=error.retry_after if isinstance(error, TemporaryAPIError) else None,
        )


async def _read_head(response: httpx.Response, limit: int) -> bytes:
    """The first ``limit`` bytes of a streamed body: enough for an error reason."""
    head = b""
    async for chunk in response.aiter_bytes():
        head += chunk
        if len(head) >= limit:
            break
    return head[:limit]


async def _write_body(response: httpx.Response, dest: Path) -> int:
    written = 0
    try:
        # Plain blocking writes: chunks are small, and a local disk write is
        # far shorter than the network read that precedes each one.
        with dest.open("wb") as out:
            async for chunk in response.aiter_bytes():
                out.write(chunk)
                written += len(chunk)
    except OSError as exc:
        raise OutputError(f"cannot write {dest}: {exc.strerror or exc}") from exc
    return written


def _content_length(headers: httpx.Headers) -> int | None:
    value = headers.get("content-length", "")
    return int(value) if value.strip().isdigit() else None
