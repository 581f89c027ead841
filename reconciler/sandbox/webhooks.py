"""Webhook delivery for the sandbox: signed POSTs, retried in the background.

``state.py`` decides *when* a task's webhook is due and hands a
:class:`~reconciler.sandbox.state.Delivery` to :meth:`WebhookSender.enqueue`,
which only appends to a queue: API handlers never wait on a delivery. A few
worker tasks on the server's event loop send them with one shared
``httpx.AsyncClient`` and retry failures with exponential backoff.

Signing follows the protocol doc: ``X-Webhook-Signature: sha256=<hex>`` is
HMAC-SHA256 keyed with ``webhook_secret`` over ``<timestamp>.<raw body>``.
Under the shape profile ``webhook-x-signature`` a delivery is signed the
older way instead: ``X-Signature: <hex>`` over the raw body alone, with no
timestamp header. Without a secret the signature header is left out. The webhook faults
(duplicate, out-of-order, badly signed) are applied here, as decided per
delivery by the state's injector.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import httpx

from reconciler.sandbox.state import Delivery, SandboxState

WORKERS = 4
BACKOFF_SECONDS = 0.25  # first retry; doubles each time
TIMEOUT_SECONDS = 5.0


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Webhook-Signature`` value for a body sent at ``timestamp`` (Unix seconds)."""
    digest = hmac.new(
        secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256
    )
    return f"sha256={digest.hexdigest()}"


def sign_legacy(secret: str, body: bytes) -> str:
    """The older ``X-Signature`` value: hex HMAC-SHA256 over the raw body, no timestamp."""
    return hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


class WebhookSender:
    """Queue and workers that deliver webhooks for one sandbox state."""

    def __init__(self, state: SandboxState) -> None:
        self._state = state
        self._queue: asyncio.Queue[tuple[Delivery, int]] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._retries: set[asyncio.TimerHandle] = set()
        self._client: httpx.AsyncClient | None = None

    def start(self) -> None:
        """Start the workers on the running loop and connect the state's outbox."""
        self._client = httpx.AsyncClient(
            timeout=TIMEOUT_SECONDS, headers={"User-Agent": "musicapi-sandbox"}
        )
        self._workers = [asyncio.create_task(self._work()) for _ in range(WORKERS)]
        self._state.outbox = self.enqueue

    async def stop(self) -> None:
        """Drop pending deliveries, stop the workers and close the client."""
        self._state.outbox = None
        for handle in self._retries:
            handle.cancel()
        self._retries.clear()
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def enqueue(self, delivery: Delivery) -> None:
        """Queue a delivery (and its duplicate, if that fault fired); never blocks."""
        self._queue.put_nowait((delivery, 0))
        if "webhook_duplicate" in delivery.faults:
            self._queue.put_nowait((delivery, 0))

    def _retry_later(self, delivery: Delivery, attempt: int) -> None:
        loop = asyncio.get_running_loop()
        delay = BACKOFF_SECONDS * 2 ** (attempt - 1)

        def requeue() -> None:
            self._retries.discard(handle)
            self._queue.put_nowait((delivery, attempt))

        handle = loop.call_later(delay, requeue)
        self._retries.add(handle)

    async def _work(self) -> None:
        while True:
            delivery, attempt = await self._queue.get()
            if delivery.epoch != self._state.epoch:
                continue  # queued before a reset
            ok = await self._send(delivery, delivery.payload, delivery.webhook_id)
            if delivery.epoch != self._state.epoch:
                continue  # a reset happened while it was on the wire
            counters = self._state.counters
            if ok:
                counters.webhooks_delivered += 1
                if delivery.stale_payload is not None and attempt == 0:
                    # The stale snapshot goes out after the real one: out of order.
                    stale_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{delivery.webhook_id}/stale"))
                    await self._send(delivery, delivery.stale_payload, stale_id)
            elif attempt < self._state.config.webhook_retries:
                self._retry_later(delivery, attempt + 1)
            else:
                counters.webhooks_failed += 1

    async def _send(self, delivery: Delivery, payload: dict[str, Any], webhook_id: str) -> bool:
        assert self._client is not None  # started before any delivery is queued
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-Webhook-Id": webhook_id,
            "Idempotency-Key": webhook_id,
            "X-Webhook-Event": delivery.event,
        }
        if not delivery.x_signature:
            headers["X-Webhook-Timestamp"] = timestamp
        if delivery.secret is not None:
            secret = delivery.secret
            if "webhook_bad_signature" in delivery.faults:
                secret += "-wrong"
            if delivery.x_signature:
                headers["X-Signature"] = sign_legacy(secret, body)
            else:
                headers["X-Webhook-Signature"] = sign(secret, timestamp, body)
        self._state.counters.webhooks_sent += 1
        try:
            response = await self._client.post(delivery.url, content=body, headers=headers)
        except httpx.HTTPError:
            return False
        return response.is_success
