"""The webhook receiver: verified callbacks become hints, never facts (rule 11).

Where it sits: beside the daemon loop. Each submitted item carries its own
``webhook_url`` (``<public_url>/hook/<fingerprint>``, see
``Reconciler._item``), so a callback names its generation even when the
submit's answer, and with it the task id, was lost. The receiver is a
Starlette app served by uvicorn in the daemon's event loop.

The batch-level ``webhook_url`` (``<public_url>/hook``) names no
generation; such a callback is matched by what its body names.

A request is checked in this order, cheapest first, and anything that fails
gets 401 or 413, a ``webhook.rejected`` log line with a stable ``reason``, and
changes nothing:

1. size: ``Content-Length`` over ``max_body`` → 413 before reading; the
   stream is counted too (chunked bodies have no length) → 413;
2. headers: ``X-Webhook-Timestamp`` and ``X-Webhook-Signature`` present, or
   an older deployment's ``X-Signature`` alone;
3. time: the timestamp within ``tolerance`` seconds of now (either way); the
   older scheme carries no timestamp, so only the replay check guards it;
4. signature: HMAC-SHA256 of ``<timestamp>.<raw body>`` (older scheme: of the
   raw body), compared in constant time;
5. replay: a delivery already taken (same ``X-Webhook-Id``, or the same
   signature under a new id) is answered 200 and ignored. The service retries
   deliveries it thinks failed and may send duplicates; 200 stops that, and
   a 4xx would only make it retry.

A verified callback is queued as a :class:`Hint` (the fingerprint from the
URL, the task id and clip ids found anywhere in the body: the documented body
carries no top-level ``task_id``) and wakes the daemon; the body's clip data
is never used as a fact. The daemon applies the
hints to the ledger between passes (``ledger.apply_hints``), never during one: a
pass holds ledger reads across awaits (a batch poll in flight would
overwrite a "poll now" written under it), and one writer at a time keeps that
simple. Applying means: a known task's batch is polled now; an unknown task
of a generation whose submit answer was lost is claimed (then polled); a
callback that names no task for a lost submit marks it paid (it is never sent
again on its own); a callback that names nothing known polls every open batch
now. The poll is the truth.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from reconciler.config import WebhookSettings
from reconciler.ledger import Hint
from reconciler.serving import AppServer

Clock = Callable[[], float]

#: Fingerprints are SHA-256 hex digests (planning.fingerprint).
_FINGERPRINT = re.compile(r"[0-9a-f]{64}\Z")
#: Task ids are UUIDs in practice; anything longer or stranger is not one.
_TASK_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}\Z")
#: Deliveries remembered for replay detection (ids and signatures).
SEEN_CAPACITY = 8192
#: Hints waiting for the next pass; one per task at most, so this bounds a flood.
MAX_PENDING = 50_000


class _Rejection(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def signature(secret: str, timestamp: str | None, body: bytes) -> str:
    """The hex HMAC-SHA256 the service sends as ``X-Webhook-Signature: sha256=<hex>``
    (of ``<timestamp>.<body>``), or, with no timestamp, as the older ``X-Signature``
    (of the body alone)."""
    msg = body if timestamp is None else f"{timestamp}.".encode() + body
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


class WebhookReceiver:
    """Verifies callbacks and queues them as hints; ``app`` is the ASGI app to serve.

    ``on_hint`` is called (on the event loop) whenever a hint was queued, so
    the daemon can wake. ``on_outcome`` hears how every request ended
    (``accepted``, ``duplicate``, ``dropped`` or the rejection's reason), for
    the metrics. ``clock`` gives Unix seconds for the timestamp check.
    """

    def __init__(
        self,
        settings: WebhookSettings,
        *,
        on_hint: Callable[[], None],
        on_outcome: Callable[[str], None] | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.settings = settings
        self.on_hint = on_hint
        self.on_outcome = on_outcome
        self.clock = clock
        self.log = structlog.get_logger("reconciler")
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._pending: dict[Hint, None] = {}
        self.app = Starlette(
            routes=[
                Route("/hook", self._handle, methods=["POST"]),
                Route("/hook/{fingerprint}", self._handle, methods=["POST"]),
            ]
        )

    def drain(self) -> list[Hint]:
        """The hints queued since the last call, oldest first."""
        hints = list(self._pending)
        self._pending.clear()
        return hints

    async def _handle(self, request: Request) -> Response:
        response, outcome = await self._answer(request)
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        return response

    async def _answer(self, request: Request) -> tuple[Response, str]:
        fingerprint: str | None = request.path_params.get("fingerprint")
        webhook_id = request.headers.get("x-webhook-id", "")
        try:
            if fingerprint is not None and not _FINGERPRINT.match(fingerprint):
                raise _Rejection(404, "unknown_path")
            body = await self._read_body(request)
            sig = self._verify(request, body)
        except _Rejection as rej:
            self.log.warning(
                "webhook.rejected",
                reason=rej.reason,
                status=rej.status,
                fingerprint=(fingerprint or "")[:64],
                webhook_id=webhook_id[:64],
                peer=request.client.host if request.client else None,
            )
            return JSONResponse({"error": rej.reason}, status_code=rej.status), rej.reason
        keys = [f"sig:{sig}"] + ([f"id:{webhook_id}"] if webhook_id else [])
        if any(k in self._seen for k in keys):
            self.log.info("webhook.duplicate", fingerprint=fingerprint, webhook_id=webhook_id[:64])
            return JSONResponse({"status": "duplicate"}), "duplicate"
        task_id, clip_ids = _named(body)
        outcome = "accepted"
        if len(self._pending) >= MAX_PENDING:
            outcome = "dropped"
            self.log.warning("webhook.dropped", fingerprint=fingerprint, task_id=task_id)
        else:
            # Even a body that names nothing is worth a hint: it says that
            # something finished, so the open batches are polled now.
            self._pending[Hint(fingerprint, task_id, clip_ids)] = None
            self.log.info(
                "webhook.received",
                fingerprint=fingerprint,
                task_id=task_id,
                webhook_event=request.headers.get("x-webhook-event", "")[:64],
            )
            self.on_hint()
        # Remembered only once handled: a delivery we failed to take must
        # still be accepted when the service retries it.
        for key in keys:
            self._seen[key] = None
        while len(self._seen) > SEEN_CAPACITY:
            self._seen.popitem(last=False)
        return JSONResponse({"status": "accepted"}), outcome

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _Rejection(413, "too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _Rejection(413, "too_large")
        return bytes(body)

    def _verify(self, request: Request, body: bytes) -> str:
        """Check timestamp and signature; returns the verified signature."""
        timestamp = request.headers.get("x-webhook-timestamp")
        given = request.headers.get("x-webhook-signature")
        older = request.headers.get("x-signature")
        if older and not given and not timestamp:
            return self._verify_older(older, body)
        if not timestamp or not given:
            raise _Rejection(401, "missing_headers")
        if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
            raise _Rejection(401, "bad_timestamp")
        if abs(self.clock() - int(timestamp)) > self.settings.tolerance:
            raise _Rejection(401, "stale_timestamp")
        scheme, _, digest = given.strip().partition("=")
        if scheme.lower() != "sha256" or not digest:
            raise _Rejection(401, "bad_signature")
        expected = signature(self.settings.secret.get_secret_value(), timestamp, body)
        # Header values arrive as latin-1 text; compare bytes so any input is comparable.
        if not hmac.compare_digest(expected.encode(), digest.lower().encode("latin-1")):
            raise _Rejection(401, "bad_signature")
        return expected

    def _verify_older(self, given: str, body: bytes) -> str:
        """The older deployment's ``X-Signature``: HMAC-SHA256 of the raw body, hex,
        with or without a ``sha256=`` prefix. It has no timestamp to check."""
        scheme, sep, digest = given.strip().rpartition("=")
        if sep and scheme.lower() != "sha256":
            raise _Rejection(401, "bad_signature")
        expected = signature(self.settings.secret.get_secret_value(), None, body)
        if not hmac.compare_digest(expected.encode(), digest.lower().encode("latin-1")):
            raise _Rejection(401, "bad_signature")
        return expected


def _an_id(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return value if isinstance(value, str) and _TASK_ID.match(value) else None


def _named(body: bytes) -> tuple[str | None, tuple[str, ...]]:
    """The task id and clip ids a callback body names, read leniently.

    The task id may sit at the top level, inside ``data`` as an object, or on
    the clips; clip ids let a body without any task id still name its task.
    """
    try:
        data: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, ()
    if not isinstance(data, dict):
        return None, ()
    inner = data.get("data")
    clips = inner if isinstance(inner, list) else [inner] if isinstance(inner, dict) else []
    places = [data, *(c for c in clips if isinstance(c, dict))]
    task_id = next(
        (
            found
            for place in places
            for key in ("task_id", "taskId")
            if (found := _an_id(place.get(key))) is not None
        ),
        None,
    )
    clip_ids = tuple(
        found for c in clips if isinstance(c, dict) and (found := _an_id(c.get("clip_id")))
    )
    return task_id, clip_ids


class WebhookServer(AppServer):
    """The receiver's own listener (it may face the internet; ops has another)."""

    def __init__(self, receiver: WebhookReceiver, host: str, port: int) -> None:
        super().__init__(receiver.app, host, port, name="webhook")
        self.receiver = receiver
