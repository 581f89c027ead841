"""Webhooks: signed exactly as the protocol doc says, retried, never in the API's way."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import httpx
from sandbox_helpers import Received, WebhookReceiver, description

from reconciler.sandbox import SandboxControl
from tests.project import wait_until

SECRET = "whsec-test"


def _verify(delivery: Received, secret: str = SECRET) -> bool:
    timestamp = delivery.headers["X-Webhook-Timestamp"]
    expected = hmac.new(
        secret.encode(), timestamp.encode() + b"." + delivery.body, hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(delivery.headers["X-Webhook-Signature"], f"sha256={expected}")


def _final(api: httpx.Client, task_id: str) -> dict[str, Any] | None:
    response = api.get(f"/sonic/task/{task_id}")
    return response.json() if response.status_code == 200 else None


def test_signed_delivery_on_completion(
    sandbox: SandboxControl, api: httpx.Client, receiver: WebhookReceiver
) -> None:
    body = description(webhook_url=receiver.url, webhook_secret=SECRET)
    task_id = api.post("/sonic/create", json=body).json()["task_id"]
    wait_until(lambda: receiver.received)
    (delivery,) = receiver.received
    headers = delivery.headers
    assert _verify(delivery)
    assert abs(int(headers["X-Webhook-Timestamp"]) - time.time()) < 30
    assert headers["X-Webhook-Id"] == headers["Idempotency-Key"]
    assert headers["X-Webhook-Event"] == "song.completed"
    assert headers["Content-Type"] == "application/json"
    payload = delivery.json
    assert payload.pop("task_id") == task_id
    assert payload == _final(api, task_id)  # the finished poll body, plus task_id
    assert [clip["state"] for clip in payload["data"]] == ["succeeded", "succeeded"]
    stats = sandbox.stats()
    assert (stats["webhooks_sent"], stats["webhooks_delivered"]) == (1, 1)


def test_failure_is_announced_as_song_failed(
    sandbox: SandboxControl, api: httpx.Client, receiver: WebhookReceiver
) -> None:
    sandbox.configure(faults=[{"kind": "task_failed", "every": 1, "error": "boom"}])
    body = description(webhook_url=receiver.url, webhook_secret=SECRET)
    task_id = api.post("/sonic/create", json=body).json()["task_id"]
    wait_until(lambda: receiver.received)
    (delivery,) = receiver.received
    assert delivery.headers["X-Webhook-Event"] == "song.failed"
    assert delivery.json == {"type": "failed", "error": "boom", "task_id": task_id}
    assert _verify(delivery)


def test_batch_webhook_applies_to_items_unless_an_item_has_its_own(
    sandbox: SandboxControl, api: httpx.Client, receiver: WebhookReceiver
) -> None:
    own = receiver.url + "?item=own"
    items = [description("a"), description("b", webhook_url=own, webhook_secret="other")]
    batch = api.post(
        "/sonic/batch",
        json={"items": items, "webhook_url": receiver.url, "webhook_secret": SECRET},
    ).json()
    wait_until(lambda: len(receiver.received) == 2)
    by_task = {delivery.json["task_id"]: delivery for delivery in receiver.received}
    first, second = (entry["task_id"] for entry in batch["tasks"])
    assert _verify(by_task[first])
    assert _verify(by_task[second], "other")
    # Webhook fields are not part of an item's fingerprint.
    assert sandbox.stats()["tasks_by_fingerprint"].keys() == {
        hashlib.sha256(json.dumps(item, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        for item in (description("a"), description("b"))
    }


def test_staggered_clips_give_two_deliveries(
    sandbox: SandboxControl, api: httpx.Client, receiver: WebhookReceiver
) -> None:
    sandbox.configure(clip_stagger=0.2)
    body = description(webhook_url=receiver.url, webhook_secret=SECRET)
    api.post("/sonic/create", json=body)
    wait_until(lambda: len(receiver.received) == 2)
    partial, final = (delivery.json for delivery in receiver.received)
    assert [clip["state"] for clip in partial["data"]] == ["succeeded", "streaming"]
    assert [clip["state"] for clip in final["data"]] == ["succeeded", "succeeded"]
    assert (
        receiver.received[0].headers["X-Webhook-Id"] != receiver.received[1].headers["X-Webhook-Id"]
    )


def test_failed_deliveries_are_retried(
    sandbox: SandboxControl, api: httpx.Client, receiver: WebhookReceiver
) -> None:
    receiver.fail_next = 2
    body = description(webhook_url=receiver.url, webhook_secret=SECRET)
    api.post("/sonic/create", json=body)
    wait_until(lambda: sandbox.stats()["webhooks_delivered"] == 1)
    assert len(receiver.received) == 3
    ids = {delivery.headers["X-Webhook-Id"] for delivery in receiver.received}
    assert len(ids) == 1  # a retry is the same delivery
    assert sandbox.stats()["webhooks_sent"] == 3


def test_delivery_gives_up_after_the_retries(
    sandbox: SandboxControl, api: httpx.Client, receiver: WebhookReceiver
) -> None:
    sandbox.configure(webhook_retries=1)
    receiver.fail_next = 5
    api.post("/sonic/create", json=description(webhook_url=receiver.url))
    wait_until(lambda: sandbox.stats()["webhooks_failed"] == 1)
    assert len(receiver.received) == 2
    assert "X-Webhook-Signature" not in receiver.received[0].headers  # no secret, no signature


def test_deliveries_never_slow_the_api(
    sandbox: SandboxControl, api: httpx.Client, receiver: WebhookReceiver
) -> None:
    receiver.gate.clear()  # the receiver hangs on every delivery
    items = [description(str(i)) for i in range(10)]
    batch = api.post("/sonic/batch", json={"items": items, "webhook_url": receiver.url}).json()
    wait_until(lambda: receiver.waiting >= 4)  # every sender worker is stuck on the receiver
    started = time.monotonic()
    for _ in range(20):
        assert api.get("/sonic/batch", params={"batch_id": batch["batch_id"]}).status_code == 200
        assert api.post("/sonic/create", json=description("x")).status_code == 200
    assert time.monotonic() - started < 1.0
    receiver.gate.set()
    wait_until(lambda: sandbox.stats()["webhooks_delivered"] == 10)


def test_duplicate_out_of_order_and_badly_signed_deliveries(
    sandbox: SandboxControl, api: httpx.Client, receiver: WebhookReceiver
) -> None:
    sandbox.configure(
        faults=[
            {"kind": "webhook_duplicate", "at": [1]},
            {"kind": "webhook_out_of_order", "at": [2]},
            {"kind": "webhook_bad_signature", "at": [3]},
        ]
    )
    hook = {"webhook_url": receiver.url, "webhook_secret": SECRET}
    for prompt in ("dup", "ooo", "badsig"):
        api.post("/sonic/create", json=description(prompt, **hook))
        count = len(receiver.received)
        wait_until(lambda count=count: len(receiver.received) > count)
        wait_until(lambda: sandbox.stats()["webhooks_sent"] == len(receiver.received))
    by_prompt: dict[str, list[Received]] = {}
    for delivery in receiver.received:
        data = delivery.json["data"]
        by_prompt.setdefault(data[0]["gpt_description_prompt"], []).append(delivery)

    duplicate = by_prompt["dup"]
    assert len(duplicate) == 2
    assert duplicate[0].headers["X-Webhook-Id"] == duplicate[1].headers["X-Webhook-Id"]
    assert duplicate[0].body == duplicate[1].body

    final, stale = by_prompt["ooo"]
    assert [clip["state"] for clip in final.json["data"]] == ["succeeded", "succeeded"]
    assert [clip["state"] for clip in stale.json["data"]] == ["streaming", "streaming"]
    assert _verify(stale)

    (bad,) = by_prompt["badsig"]
    assert not _verify(bad)
    assert sandbox.stats()["faults_fired"] == {
        "webhook_duplicate": 1,
        "webhook_out_of_order": 1,
        "webhook_bad_signature": 1,
    }
