"""The sandbox's bookkeeping: tasks, batches, credits, counters and the clock.

Sits between the HTTP handlers in ``app.py`` and the pieces they need
(``validation.py``, ``faults.py``, ``audio.py``); ``webhooks.py`` receives
the deliveries it schedules. Everything runs on the server's event loop, so
there are no locks.

Task state is lazy: a task stores when it was created, the generation time
in force then and the faults that hit it, and its status is computed from
the clock on every read. Nothing runs per task, which is what lets 1,000
tasks sit in flight for free. The few things that must *happen* at a point
in time (a refund when a task fails, a webhook when a task finishes) go on
one heap that :meth:`SandboxState.advance` drains: on every request and from
one background ticker.

Task, clip and batch ids are derived from a per-start salt, a reset counter
(the epoch) and a sequence number: without a seed the salt is random, so a
sandbox started again never hands out an id a client may still remember,
and a reset never repeats one of its own. With an explicit seed the salt is
the seed, so a fresh sandbox fed the same requests hands out the same ids.
Audio follows the seed (0 without one), the epoch and the task's sequence
number, so it is the same from one start to the next either way.

Bodies are built here in the default shape; ``shapes.py`` rewrites them for
the shape profiles in force.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import json
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from reconciler.sandbox.audio import AudioCache, ClipPlan, cover_png, plan_clip
from reconciler.sandbox.config import PROFILE_KEYS, SandboxConfig, apply_changes
from reconciler.sandbox.faults import FaultInjector, FaultRule
from reconciler.sandbox.shapes import webhook_payload
from reconciler.sandbox.validation import WEBHOOK_FIELDS, validate_item

Clock = Callable[[], float]
"""A monotonic time source in seconds (``time.monotonic`` by default)."""

TASK_COST = 15
CLIPS_PER_TASK = 2
# Share of the generation time a task spends "pending" before "running".
_PENDING_SHARE = 0.2


class ManualClock:
    """A clock that moves only when told to, for tests that step through a task's life."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move time forward; the server thread sees the new time on its next read."""
        with self._lock:
            self._now += seconds


def fingerprint(item: Mapping[str, Any]) -> str:
    """The key of ``tasks_by_fingerprint``: the submitted item without webhook fields.

    ``sha256(json.dumps(item_without_webhook_fields, sort_keys=True, separators=(",", ":")))``
    """
    body = {key: value for key, value in item.items() if key not in WEBHOOK_FIELDS}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _derived_uuid(material: str) -> str:
    digest = hashlib.sha256(material.encode("utf-8")).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class WebhookTarget:
    url: str
    secret: str | None


@dataclass(frozen=True)
class Delivery:
    """One webhook to send: what, where, and which webhook faults hit it."""

    epoch: int
    url: str
    secret: str | None
    event: str
    webhook_id: str
    payload: dict[str, Any]
    faults: frozenset[str]
    # Sent after the real delivery when the out-of-order fault fires: an older snapshot.
    stale_payload: dict[str, Any] | None = None
    # The older signing scheme (shape "webhook-x-signature"): X-Signature over the body alone.
    x_signature: bool = False


@dataclass(frozen=True)
class Rejection:
    """A submitted item that was not accepted, as the batch response reports it."""

    type: str
    error: str

    @property
    def http_status(self) -> int:
        """The status a single ``/sonic/create`` answers with."""
        return 400 if self.type == "bad_request" else 403


@dataclass
class Task:
    """One generation: what was asked, when, and what the faults decided about it."""

    task_id: str
    item: dict[str, Any]
    created: float
    created_at: str
    latency: float
    stagger: float
    faults: dict[str, FaultRule]
    clip_ids: tuple[str, ...]
    clips: tuple[ClipPlan, ...]
    webhook: WebhookTarget | None
    webhook_count: int = 0

    @property
    def done_at(self) -> float:
        """When the first clip finishes (or the task fails)."""
        return self.created + self.latency

    def snapshot(self, now: float) -> Snapshot:
        """The task as a poll at ``now`` sees it."""
        if now < self.created + self.latency * _PENDING_SHARE:
            return Snapshot("pending")
        if "stuck" in self.faults:
            return Snapshot("running")
        failure = self.faults.get("task_failed")
        if now < self.done_at:
            if "unfinished_clips" in self.faults and now >= self.created + self.latency / 2:
                return Snapshot("running", ("streaming",) * CLIPS_PER_TASK)
            return Snapshot("running")
        if failure is not None:
            return Snapshot(
                "failed",
                failure=(failure.type or "failed", failure.error or "upstream generation failed"),
            )
        last = "failed" if "clip_failed" in self.faults else "succeeded"
        second = last if now >= self.done_at + self.stagger else "streaming"
        states = ("succeeded", second)
        status = "running" if "streaming" in states else "succeeded"
        return Snapshot(status, states)

    def milestones(self) -> list[float]:
        """Times a webhook is due: reaching streaming, each clip finishing, failing."""
        if "stuck" in self.faults:
            return []
        if "task_failed" in self.faults:
            return [self.done_at]
        times = [self.done_at]
        if "unfinished_clips" in self.faults:
            times.insert(0, self.created + self.latency / 2)
        if self.stagger > 0:
            times.append(self.done_at + self.stagger)
        return times


@dataclass(frozen=True)
class Snapshot:
    """A task's status at one instant; ``clips`` is None while no clip is reported."""

    status: str
    clips: tuple[str, ...] | None = None
    failure: tuple[str, str] | None = None


@dataclass
class Counters:
    """What ``GET /_sandbox/stats`` reports (besides the balance and faults fired)."""

    create_calls: int = 0
    batch_submit_calls: int = 0
    tasks_created: int = 0
    tasks_by_fingerprint: dict[str, int] = field(default_factory=dict)
    #: Per submit call, in order: the keys of the items it charged for.
    submits: list[list[str]] = field(default_factory=list)
    task_polls: int = 0
    batch_polls: int = 0
    credit_calls: int = 0
    downloads: int = 0
    credits_charged: int = 0
    credits_refunded: int = 0
    webhooks_sent: int = 0
    webhooks_delivered: int = 0
    webhooks_failed: int = 0


# Which counter a request to each endpoint bumps (counted on arrival, faults or not).
_CALL_COUNTERS = {
    "create": "create_calls",
    "batch_submit": "batch_submit_calls",
    "task_poll": "task_polls",
    "batch_poll": "batch_polls",
    "credits": "credit_calls",
    "audio": "downloads",
}


class SandboxState:
    """Tasks, batches, credits and counters of one sandbox, plus its timed events."""

    def __init__(self, config: SandboxConfig, clock: Clock = time.monotonic) -> None:
        self.initial_config = config
        self.clock = clock
        self.public_base = ""
        self.outbox: Callable[[Delivery], None] | None = None
        self.bind_events()
        # Fixed for the life of this state; the epoch below separates resets.
        self.salt = secrets.token_hex(16) if config.seed is None else str(config.seed)
        self.epoch = 0
        self.audio = AudioCache()
        self._clear()

    def bind_events(self) -> None:
        """Fresh asyncio events for a server run (an event belongs to the loop that waits on it)."""
        # Set when the server stops, so slow-response faults stop sleeping.
        self.stopping = asyncio.Event()
        # Set whenever the event heap changes, to wake the ticker early.
        self.scheduled = asyncio.Event()

    def _clear(self) -> None:
        self.config = self.initial_config
        self.credits = self.config.credits
        self.counters = Counters()
        self.injector = FaultInjector(self.config.faults, self.seed)
        self.tasks: dict[str, Task] = {}
        self.batches: dict[str, list[tuple[int, str]]] = {}
        self._clip_index: dict[str, tuple[Task, int]] = {}
        self._events: list[tuple[float, int, str, Task]] = []
        self._event_seq = 0
        self._task_seq = 0
        self._request_seq = 0

    @property
    def seed(self) -> int:
        """The seed of audio and fault schedules: the configured one, else 0."""
        return self.config.seed or 0

    # -- control -----------------------------------------------------------------

    def reset(self) -> None:
        """Forget every task and counter; restore the starting balance and configuration."""
        self.epoch += 1
        self.audio.clear()
        self._clear()

    def configure(self, changes: Mapping[str, Any]) -> None:
        """Apply a ``POST /_sandbox/config`` body (raises ``FaultProfileError``)."""
        config, credits = apply_changes(self.config, changes)
        self.config = config
        if credits is not None:
            self.credits = credits
        if PROFILE_KEYS & set(changes):
            # A new profile starts its schedules from scratch.
            self.injector = FaultInjector(config.faults, self.seed)

    def describe(self) -> dict[str, Any]:
        """The configuration in force, as ``GET /_sandbox/config`` shows it."""
        return {
            "latency": self.config.latency,
            "clip_stagger": self.config.clip_stagger,
            "webhook_retries": self.config.webhook_retries,
            "credits": self.credits,
            "seed": self.config.seed,
            "shapes": list(self.config.shapes),
            **self.config.faults.to_mapping(),
        }

    def stats(self) -> dict[str, Any]:
        """Every counter, plus the balance and how often each fault kind fired."""
        self.advance()
        c = self.counters
        return {
            "create_calls": c.create_calls,
            "batch_submit_calls": c.batch_submit_calls,
            "tasks_created": c.tasks_created,
            "tasks_by_fingerprint": dict(c.tasks_by_fingerprint),
            "submits": [list(keys) for keys in c.submits],
            "task_polls": c.task_polls,
            "batch_polls": c.batch_polls,
            "credit_calls": c.credit_calls,
            "downloads": c.downloads,
            "credits_charged": c.credits_charged,
            "credits_refunded": c.credits_refunded,
            "webhooks_sent": c.webhooks_sent,
            "webhooks_delivered": c.webhooks_delivered,
            "webhooks_failed": c.webhooks_failed,
            "faults_fired": dict(self.injector.fired),
            "credits": self.credits,
        }

    def count_request(self, endpoint: str) -> str:
        """Count one API request on arrival; returns its ``x-request-id``."""
        name = _CALL_COUNTERS[endpoint]
        setattr(self.counters, name, getattr(self.counters, name) + 1)
        self._request_seq += 1
        return f"sbx-{self.epoch}-{self._request_seq}"

    # -- submitting ---------------------------------------------------------------

    def submit(
        self, item: object, endpoint: str, batch_webhook: Mapping[str, Any] | None = None
    ) -> Task | Rejection:
        """Validate, fault-check and charge one item; create its task if it is accepted."""
        self.advance()
        problem = validate_item(item, "body" if endpoint == "create" else "item")
        if problem is not None:
            return Rejection("bad_request", problem)
        assert isinstance(item, Mapping)  # validate_item checked it
        rule = self.injector.on_item(endpoint)
        if rule is not None and rule.kind == "reject":
            default = "copyrighted" if rule.type == "forbidden" else "prompt: rejected upstream"
            return Rejection(rule.type or "forbidden", rule.error or default)
        if (rule is not None and rule.kind == "insufficient_credits") or self.credits < TASK_COST:
            return Rejection(
                "insufficient_credits",
                f"insufficient credits: {self.credits} left, {TASK_COST} needed",
            )
        self.credits -= TASK_COST
        self.counters.credits_charged += TASK_COST
        return self._create_task(dict(item), endpoint, batch_webhook or {})

    def _create_task(
        self, item: dict[str, Any], endpoint: str, batch_webhook: Mapping[str, Any]
    ) -> Task:
        now = self.clock()
        self._task_seq += 1
        sequence = f"{self.epoch}:task:{self._task_seq}"
        task_id = _derived_uuid(f"{self.salt}:{sequence}")
        prompt = (
            item.get("prompt") if item.get("custom_mode") else item.get("gpt_description_prompt")
        )
        clip_ids = tuple(_derived_uuid(f"{task_id}:clip:{i}") for i in range(CLIPS_PER_TASK))
        clips = tuple(
            plan_clip(f"{prompt} {item.get('tags') or ''}", f"{self.seed}:{sequence}:{i}".encode())
            for i in range(CLIPS_PER_TASK)
        )
        url = item.get("webhook_url") or batch_webhook.get("webhook_url")
        secret = item.get("webhook_secret") or batch_webhook.get("webhook_secret")
        task = Task(
            task_id=task_id,
            item=item,
            created=now,
            created_at=_iso(time.time()),
            latency=self.config.latency,
            stagger=self.config.clip_stagger,
            faults=self.injector.on_task(endpoint),
            clip_ids=clip_ids,
            clips=clips,
            webhook=WebhookTarget(url, secret) if url else None,
        )
        self.tasks[task_id] = task
        for index, clip_id in enumerate(clip_ids):
            self._clip_index[clip_id] = (task, index)
        self.counters.tasks_created += 1
        key = fingerprint(item)
        self.counters.tasks_by_fingerprint[key] = self.counters.tasks_by_fingerprint.get(key, 0) + 1
        if "task_failed" in task.faults:
            self._schedule(task.done_at, "refund", task)
        if task.webhook is not None:
            for at in task.milestones():
                self._schedule(at, "webhook", task)
        return task

    def charged(self, outcomes: Sequence[Task | Rejection]) -> None:
        """Book one submit call: which items it charged for, in the order sent."""
        self.counters.submits.append([fingerprint(o.item) for o in outcomes if isinstance(o, Task)])

    def create_batch(self, outcomes: list[Task | Rejection]) -> str:
        """Record the accepted tasks of one batch submit under a new batch id."""
        material = f"{self.salt}:{self.epoch}:batch:{len(self.batches)}"
        if "numeric-batch-id" in self.config.shapes:
            # Digits only, below 2**53 so that every JSON reader keeps it exact.
            digest = hashlib.sha256(material.encode("utf-8")).digest()
            batch_id = str(int.from_bytes(digest[:6], "big"))
        else:
            batch_id = _derived_uuid(material)
        self.batches[batch_id] = [
            (index, outcome.task_id)
            for index, outcome in enumerate(outcomes)
            if isinstance(outcome, Task)
        ]
        return batch_id

    # -- reading ------------------------------------------------------------------

    def poll_body(self, task: Task, at: float | None = None) -> tuple[int, dict[str, Any]]:
        """Status code and body of ``GET /sonic/task/{id}`` at ``at`` (default: now)."""
        now = self.clock() if at is None else at
        snap = task.snapshot(now)
        if snap.failure is not None:
            return 200, {"type": snap.failure[0], "error": snap.failure[1]}
        if snap.clips is None:
            return 202, {"type": "not_ready"}
        return 200, {
            "code": 200,
            "message": "success",
            "data": [self._clip_json(task, i, state, now) for i, state in enumerate(snap.clips)],
        }

    def batch_body(self, batch_id: str) -> dict[str, Any] | None:
        """Body of ``GET /sonic/batch?batch_id=``, or None for an unknown batch."""
        entries = self.batches.get(batch_id)
        if entries is None:
            return None
        now = self.clock()
        tasks = []
        for index, task_id in entries:
            task = self.tasks[task_id]
            snap = task.snapshot(now)
            entry: dict[str, Any] = {"index": index, "task_id": task_id, "status": snap.status}
            if snap.failure is not None:
                entry["type"], entry["error"] = snap.failure
            else:
                entry["data"] = [
                    self._clip_json(task, i, state, now) for i, state in enumerate(snap.clips or ())
                ]
            tasks.append(entry)
        return {"batch_id": batch_id, "tasks": tasks}

    def _clip_json(self, task: Task, index: int, state: str, now: float) -> dict[str, Any]:
        item = task.item
        plan = task.clips[index]
        clip_id = task.clip_ids[index]
        finished = state == "succeeded"
        audio_url = ""
        duration: float | str | None = None
        if finished:
            audio_url = f"{self.public_base}/_sandbox/audio/{clip_id}.mp3"
            ttl = self.config.faults.audio_url_ttl
            if ttl is not None:
                audio_url += f"?expires={now + ttl:.3f}"
            duration = round(plan.duration, 3)
            if "duration_string" in task.faults:
                duration = f"{duration:.2f}"
        description = item.get("gpt_description_prompt") or ""
        if item.get("custom_mode"):
            lyrics = item["prompt"]
        elif item.get("make_instrumental"):
            lyrics = ""
        else:
            lyrics = f"[Verse]\n{description}"
        return {
            "clip_id": clip_id,
            "state": state,
            "title": item.get("title") or description[:60].title() or "Untitled",
            "tags": item.get("tags") or "",
            "lyrics": lyrics,
            "image_url": f"{self.public_base}/_sandbox/image/{clip_id}.png" if finished else "",
            "audio_url": audio_url,
            "video_url": None,
            "created_at": task.created_at,
            "mv": item["mv"],
            "gpt_description_prompt": description,
            "duration": duration,
            "negative_tags": item.get("negative_tags") or "",
            "style_weight": item.get("style_weight"),
            "weirdness_constraint": item.get("weirdness_constraint"),
        }

    def audio_file(self, name: str, expires: str | None) -> tuple[int, bytes | str]:
        """Status and MP3 bytes (or an error text) for ``/_sandbox/audio/{name}``."""
        clip_id = name.removesuffix(".mp3")
        found = self._clip_index.get(clip_id) if name.endswith(".mp3") else None
        if found is None:
            return 404, "no such clip"
        task, index = found
        now = self.clock()
        snap = task.snapshot(now)
        if snap.clips is None or snap.clips[index] != "succeeded":
            return 404, "clip not finished"
        if expires is not None:
            try:
                expired = now > float(expires)
            except ValueError:
                expired = True
            if expired:
                return 403, "Access Denied: the URL has expired"
        return 200, self.audio.get(clip_id, task.clips[index])

    def image_file(self, name: str) -> bytes | None:
        """PNG bytes for ``/_sandbox/image/{name}``; None when no such clip exists."""
        clip_id = name.removesuffix(".png")
        if not name.endswith(".png") or clip_id not in self._clip_index:
            return None
        return cover_png(clip_id)

    # -- time ---------------------------------------------------------------------

    def _schedule(self, at: float, kind: str, task: Task) -> None:
        self._event_seq += 1
        heapq.heappush(self._events, (at, self._event_seq, kind, task))
        self.scheduled.set()

    def next_due(self) -> float | None:
        """When the earliest timed event is due, if any."""
        return self._events[0][0] if self._events else None

    def advance(self) -> None:
        """Carry out every timed event that is due: refunds and webhook deliveries."""
        now = self.clock()
        while self._events and self._events[0][0] <= now:
            at, _, kind, task = heapq.heappop(self._events)
            if kind == "refund":
                self.credits += TASK_COST
                self.counters.credits_refunded += TASK_COST
            else:
                self._deliver(task, at)

    def _deliver(self, task: Task, at: float) -> None:
        assert task.webhook is not None  # only scheduled for tasks with a webhook
        status, body = self.poll_body(task, at)
        if status != 200:
            return
        task.webhook_count += 1
        faults = self.injector.on_webhook()
        shapes = self.config.shapes
        stale = None
        if "webhook_out_of_order" in faults:
            older = {
                "code": 200,
                "message": "success",
                "data": [self._clip_json(task, i, "streaming", at) for i in range(CLIPS_PER_TASK)],
            }
            stale = webhook_payload(older, task.task_id, shapes)
        delivery = Delivery(
            epoch=self.epoch,
            url=task.webhook.url,
            secret=task.webhook.secret,
            event="song.failed" if "error" in body else "song.completed",
            webhook_id=_derived_uuid(f"{task.task_id}:webhook:{task.webhook_count}"),
            payload=webhook_payload(body, task.task_id, shapes),
            faults=faults,
            stale_payload=stale,
            x_signature="webhook-x-signature" in shapes,
        )
        if self.outbox is not None:
            self.outbox(delivery)
