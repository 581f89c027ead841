"""Shape profiles: every alternative answer shape, exactly, over real HTTP on loopback.

Each profile gets a test that shows the bytes a client receives; the books
(charges, tasks per fingerprint) must not move with the shape.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Any

import httpx
import pytest
from sandbox_helpers import Received, Stepped, WebhookReceiver, description

from reconciler.sandbox import (
    SHAPES,
    FaultProfileError,
    SandboxConfig,
    SandboxControl,
    SandboxServer,
)
from tests.project import wait_until

SECRET = "whsec-shapes"
BAD = description("bad", mv="sonic-v9")
BAD_ERROR = "mv: unknown model 'sonic-v9'"
# Generation time 10 s, second clip 5 s later (the stepped fixture).
FIRST_CLIP = 10
ALL_CLIPS = 15


def _submit(stepped: Stepped, items: list[Any], *shapes: str, **extra: Any) -> Any:
    stepped.control.configure(shapes=list(shapes))
    response = stepped.api.post("/sonic/batch", json={"items": items, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def _poll(stepped: Stepped, batch_id: object) -> httpx.Response:
    # A query string is text: a numeric id goes back as its digits.
    return stepped.api.get("/sonic/batch", params={"batch_id": str(batch_id)})


def _task(stepped: Stepped, task_id: str) -> httpx.Response:
    return stepped.api.get(f"/sonic/task/{task_id}")


def _task_ids(stepped: Stepped, count: int) -> list[str]:
    """The newest ``count`` task ids, oldest first, from the sandbox's own books."""
    return list(stepped.server.state.tasks)[-count:]


# -- the batch poll ---------------------------------------------------------------------


def test_batch_poll_202_while_any_task_is_unfinished(stepped: Stepped) -> None:
    stepped.control.configure(faults=[{"kind": "task_failed", "at": [2], "error": "boom"}])
    batch = _submit(stepped, [description("a"), description("b")], "batch-poll-202")
    first, second = (entry["task_id"] for entry in batch["tasks"])

    running = _poll(stepped, batch["batch_id"])
    assert (running.status_code, running.json()) == (202, {"type": "not_ready"})
    stepped.clock.advance(FIRST_CLIP)  # b has failed; a has one clip, the other streams
    assert _task(stepped, second).json() == {"type": "failed", "error": "boom"}
    partial = _poll(stepped, batch["batch_id"])
    assert (partial.status_code, partial.json()) == (202, {"type": "not_ready"})

    stepped.clock.advance(ALL_CLIPS - FIRST_CLIP)  # a finished, b failed: all done
    done = _poll(stepped, batch["batch_id"])
    assert done.status_code == 200
    assert done.json()["batch_id"] == batch["batch_id"]
    entries = done.json()["tasks"]
    assert entries[0]["index"] == 0
    assert entries[0]["task_id"] == first
    assert entries[0]["status"] == "succeeded"
    assert entries[0]["data"] == _task(stepped, first).json()["data"]
    assert entries[1] == {
        "index": 1,
        "task_id": second,
        "status": "failed",
        "type": "failed",
        "error": "boom",
    }


def test_poll_no_index(stepped: Stepped) -> None:
    batch = _submit(stepped, [description("a"), BAD, description("c")], "poll-no-index")
    stepped.clock.advance(ALL_CLIPS)
    entries = _poll(stepped, batch["batch_id"]).json()["tasks"]
    assert [set(entry) for entry in entries] == [{"task_id", "status", "data"}] * 2
    accepted = [batch["tasks"][0]["task_id"], batch["tasks"][2]["task_id"]]
    assert [entry["task_id"] for entry in entries] == accepted
    assert batch["tasks"][0]["index"] == 0  # the submit answer keeps its indexes


def test_poll_no_task_id(stepped: Stepped) -> None:
    batch = _submit(stepped, [description("a"), BAD, description("c")], "poll-no-task-id")
    stepped.clock.advance(ALL_CLIPS)
    entries = _poll(stepped, batch["batch_id"]).json()["tasks"]
    assert [set(entry) for entry in entries] == [{"index", "status", "data"}] * 2
    assert [entry["index"] for entry in entries] == [0, 2]
    assert all(entry["status"] == "succeeded" for entry in entries)


def test_succeeded_without_clip_data(stepped: Stepped) -> None:
    batch = _submit(stepped, [description("a")], "succeeded-no-data")
    task_id = batch["tasks"][0]["task_id"]
    stepped.clock.advance(FIRST_CLIP)  # still running: the clips are reported as usual
    (running,) = _poll(stepped, batch["batch_id"]).json()["tasks"]
    assert running["status"] == "running"
    assert [clip["state"] for clip in running["data"]] == ["succeeded", "streaming"]

    stepped.clock.advance(ALL_CLIPS - FIRST_CLIP)
    (done,) = _poll(stepped, batch["batch_id"]).json()["tasks"]
    assert done == {"index": 0, "task_id": task_id, "status": "succeeded", "data": []}
    clips = _task(stepped, task_id).json()["data"]  # only the task poll has them
    assert [clip["state"] for clip in clips] == ["succeeded", "succeeded"]
    assert all(clip["audio_url"] for clip in clips)


def test_poll_entries_in_the_single_task_shape(stepped: Stepped) -> None:
    stepped.control.configure(faults=[{"kind": "task_failed", "at": [2], "error": "boom"}])
    batch = _submit(stepped, [description("a"), description("b")], "poll-single-shape")
    first, second = (entry["task_id"] for entry in batch["tasks"])

    pending = _poll(stepped, batch["batch_id"])
    assert pending.status_code == 200
    assert pending.json() == {
        "batch_id": batch["batch_id"],
        "tasks": [
            {"type": "not_ready", "task_id": first},
            {"type": "not_ready", "task_id": second},
        ],
    }
    stepped.clock.advance(ALL_CLIPS)
    done, failed = _poll(stepped, batch["batch_id"]).json()["tasks"]
    assert done == {**_task(stepped, first).json(), "task_id": first}
    assert done["code"] == 200
    assert len(done["data"]) == 2
    assert failed == {"type": "failed", "error": "boom", "task_id": second}


# -- the submit answer --------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "key"), [("submit-id", "id"), ("submit-taskId", "taskId")])
def test_submit_entries_name_the_task_under_another_key(
    stepped: Stepped, shape: str, key: str
) -> None:
    batch = _submit(stepped, [description("a"), BAD], shape)
    (task_id,) = _task_ids(stepped, 1)
    assert batch["tasks"] == [
        {"index": 0, key: task_id},
        {"index": 1, "type": "bad_request", "error": BAD_ERROR},
    ]
    assert _task(stepped, task_id).status_code == 202  # a real task under that id


def test_submit_bare_task_id_strings(stepped: Stepped) -> None:
    batch = _submit(stepped, [description("a"), BAD, description("c")], "submit-bare")
    ids = _task_ids(stepped, 2)
    assert batch["tasks"] == ids  # accepted items only, in item order
    assert batch["submitted"] == 2
    entries = _poll(stepped, batch["batch_id"]).json()["tasks"]
    assert {entry["index"]: entry["task_id"] for entry in entries} == {0: ids[0], 2: ids[1]}


def test_numeric_batch_id(stepped: Stepped) -> None:
    batch = _submit(stepped, [description("a")], "numeric-batch-id")
    batch_id = batch["batch_id"]
    assert type(batch_id) is int
    assert 0 < batch_id < 2**53  # exact in every JSON reader
    polled = _poll(stepped, batch_id)
    assert polled.status_code == 200
    assert polled.json()["batch_id"] == batch_id
    assert f'"batch_id":{batch_id},' in polled.text
    assert polled.json()["tasks"][0]["task_id"] == batch["tasks"][0]["task_id"]


def test_one_based_indexes_on_submit_and_poll(stepped: Stepped) -> None:
    batch = _submit(stepped, [description("a"), BAD, description("c")], "one-based-index")
    a, c = _task_ids(stepped, 2)
    assert batch["tasks"] == [
        {"index": 1, "task_id": a},
        {"index": 2, "type": "bad_request", "error": BAD_ERROR},
        {"index": 3, "task_id": c},
    ]
    entries = _poll(stepped, batch["batch_id"]).json()["tasks"]
    assert [(entry["index"], entry["task_id"]) for entry in entries] == [(1, a), (3, c)]


@pytest.mark.parametrize(
    ("shapes", "expected"),
    [
        (["rejected-omitted"], [{"index": 0, "task_id": "a"}, {"index": 2, "task_id": "c"}]),
        (
            ["submit-no-index"],
            [{"task_id": "a"}, {"type": "bad_request", "error": BAD_ERROR}, {"task_id": "c"}],
        ),
        # The dangerous case: two entries for three items, and nothing says which.
        (["submit-no-index", "rejected-omitted"], [{"task_id": "a"}, {"task_id": "c"}]),
    ],
)
def test_rejected_omitted_and_entries_without_index(
    stepped: Stepped, shapes: list[str], expected: list[dict[str, str]]
) -> None:
    batch = _submit(stepped, [description("a"), BAD, description("c")], *shapes)
    ids = dict(zip("ac", _task_ids(stepped, 2), strict=True))
    named = [{k: ids.get(v, v) if k == "task_id" else v for k, v in e.items()} for e in expected]
    assert batch["tasks"] == named
    assert batch["submitted"] == 2


def test_rejection_with_only_a_message(stepped: Stepped) -> None:
    # The invalid item never reaches the fault: c is the second item it counts.
    stepped.control.configure(faults=[{"kind": "reject", "at": [2], "error": "copyrighted"}])
    batch = _submit(stepped, [description("a"), BAD, description("c")], "rejection-message-only")
    (a,) = _task_ids(stepped, 1)
    assert batch["tasks"] == [
        {"index": 0, "task_id": a},
        {"index": 1, "message": BAD_ERROR},
        {"index": 2, "message": "copyrighted"},
    ]
    assert batch["submitted"] == 1


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (description("c", title="t" * 80), "items[2].title: 80 characters, the limit is 79"),
        ("c", "items[2]: expected a JSON object"),
        (BAD, f"items[2].{BAD_ERROR}"),
    ],
)
def test_one_bad_item_fails_the_whole_batch(stepped: Stepped, bad: Any, error: str) -> None:
    stepped.control.configure(shapes=["batch-400-one-bad"])
    response = stepped.api.post(
        "/sonic/batch", json={"items": [description("a"), description("b"), bad]}
    )
    assert response.status_code == 400
    assert response.json() == {"type": "bad_request", "error": error}
    stats = stepped.control.stats()
    assert stats["batch_submit_calls"] == 1
    assert (stats["tasks_created"], stats["credits_charged"]) == (0, 0)
    assert stats["tasks_by_fingerprint"] == {}

    fine = stepped.api.post("/sonic/batch", json={"items": [description("a"), description("b")]})
    assert fine.status_code == 200
    assert fine.json()["submitted"] == 2
    assert stepped.control.stats()["credits_charged"] == 30


def test_profiles_combine(stepped: Stepped) -> None:
    batch = _submit(
        stepped,
        [BAD, description("b"), description("c")],
        "submit-bare",
        "numeric-batch-id",
        "one-based-index",
        "poll-no-task-id",
        "batch-poll-202",
    )
    assert type(batch["batch_id"]) is int
    assert batch["tasks"] == _task_ids(stepped, 2)
    assert _poll(stepped, batch["batch_id"]).status_code == 202
    stepped.clock.advance(ALL_CLIPS)
    entries = _poll(stepped, batch["batch_id"]).json()["tasks"]
    assert [set(entry) for entry in entries] == [{"index", "status", "data"}] * 2
    assert [entry["index"] for entry in entries] == [2, 3]


def test_shapes_change_nothing_in_the_books(stepped: Stepped) -> None:
    """The same requests under every profile at once charge and count exactly as without."""

    def books(*shapes: str) -> dict[str, Any]:
        stepped.control.reset()
        stepped.control.configure(shapes=list(shapes))
        stepped.api.post("/sonic/batch", json={"items": [description("a"), description("a")]})
        stepped.api.post("/sonic/batch", json={"items": [description("b"), BAD]})
        stepped.clock.advance(ALL_CLIPS)
        stats = stepped.control.stats()
        return {key: stats[key] for key in ("tasks_created", "tasks_by_fingerprint", "credits")}

    plain = books()
    assert plain["tasks_created"] == 3
    # batch-400-one-bad refuses the second batch whole, and the id keys exclude one another.
    everything = [s for s in SHAPES if s not in ("batch-400-one-bad", "submit-id", "submit-bare")]
    assert books(*everything) == plain


# -- webhooks -----------------------------------------------------------------------------


def _signed(delivery: Received, secret: str = SECRET) -> bool:
    timestamp = delivery.headers["X-Webhook-Timestamp"]
    expected = hmac.new(
        secret.encode(), timestamp.encode() + b"." + delivery.body, hashlib.sha256
    ).hexdigest()
    return hmac.compare_digest(delivery.headers["X-Webhook-Signature"], f"sha256={expected}")


def _batch_with_hooks(
    sandbox: SandboxControl, api: httpx.Client, receiver: WebhookReceiver, *shapes: str
) -> list[str]:
    """Two tasks, the second failing, with the webhook set for the whole batch."""
    sandbox.configure(
        shapes=list(shapes), faults=[{"kind": "task_failed", "at": [2], "error": "boom"}]
    )
    body = {
        "items": [description("a"), description("b")],
        "webhook_url": receiver.url,
        "webhook_secret": SECRET,
    }
    batch = api.post("/sonic/batch", json=body).json()
    wait_until(lambda: len(receiver.received) == 2, what="two webhook deliveries")
    return [entry["task_id"] for entry in batch["tasks"]]


def _by_event(receiver: WebhookReceiver) -> dict[str, Received]:
    return {delivery.headers["X-Webhook-Event"]: delivery for delivery in receiver.received}


def test_webhook_documented_body_without_task_id(
    sandbox: SandboxControl, api: httpx.Client, receiver: WebhookReceiver
) -> None:
    done, _ = _batch_with_hooks(sandbox, api, receiver, "webhook-documented")
    deliveries = _by_event(receiver)
    completed = deliveries["song.completed"]
    assert completed.json == {"code": 200, "data": api.get(f"/sonic/task/{done}").json()["data"]}
    assert deliveries["song.failed"].json == {"code": 500, "type": "failed", "error": "boom"}
    for delivery in deliveries.values():  # headers as always
        assert _signed(delivery)
        assert delivery.headers["X-Webhook-Id"] == delivery.headers["Idempotency-Key"]


def test_webhook_signed_the_older_way(
    sandbox: SandboxControl, api: httpx.Client, receiver: WebhookReceiver
) -> None:
    done, failed = _batch_with_hooks(sandbox, api, receiver, "webhook-x-signature")
    deliveries = _by_event(receiver)
    assert deliveries["song.completed"].json["task_id"] == done  # the body is unchanged
    assert deliveries["song.failed"].json == {"type": "failed", "error": "boom", "task_id": failed}
    for delivery in deliveries.values():
        expected = hmac.new(SECRET.encode(), delivery.body, hashlib.sha256).hexdigest()
        assert delivery.headers["X-Signature"] == expected
        assert "X-Webhook-Signature" not in delivery.headers
        assert "X-Webhook-Timestamp" not in delivery.headers
        assert delivery.headers["X-Webhook-Id"]


def test_batch_webhook_reaches_every_task_and_an_item_url_keeps_the_batch_secret(
    sandbox: SandboxControl, api: httpx.Client, receiver: WebhookReceiver
) -> None:
    own = receiver.url + "?item=own"
    items = [description("a"), description("b"), description("c", webhook_url=own)]
    body = {"items": items, "webhook_url": receiver.url, "webhook_secret": SECRET}
    batch = api.post("/sonic/batch", json=body).json()
    wait_until(lambda: len(receiver.received) == 3, what="three webhook deliveries")
    by_task = {delivery.json["task_id"]: delivery for delivery in receiver.received}
    assert set(by_task) == {entry["task_id"] for entry in batch["tasks"]}
    assert all(_signed(delivery) for delivery in receiver.received)


# -- choosing profiles ----------------------------------------------------------------------


def test_config_names_are_checked_and_normalised() -> None:
    config = SandboxConfig(shapes=("submit-bare,batch-poll-202", "submit-bare"))
    assert config.shapes == ("batch-poll-202", "submit-bare")  # in the order of SHAPES
    with pytest.raises(FaultProfileError, match="unknown shape 'nope'") as raised:
        SandboxConfig(shapes=("nope",))
    assert all(name in str(raised.value) for name in SHAPES)
    with pytest.raises(FaultProfileError, match="submit-id and submit-bare"):
        SandboxConfig(shapes=("submit-id", "submit-bare"))


def test_shapes_over_the_config_endpoint(sandbox: SandboxControl) -> None:
    assert sandbox.config()["shapes"] == []
    shown = sandbox.configure(shapes=["submit-bare", "numeric-batch-id"])
    assert shown["shapes"] == ["submit-bare", "numeric-batch-id"]
    assert sandbox.config()["shapes"] == ["submit-bare", "numeric-batch-id"]
    with pytest.raises(FaultProfileError, match=r"shapes: unknown shape 'bare' \(known: "):
        sandbox.configure(shapes=["bare"])
    with pytest.raises(FaultProfileError, match="shapes: expected a list"):
        sandbox.configure(shapes="submit-bare")
    assert sandbox.config()["shapes"] == ["submit-bare", "numeric-batch-id"]  # unchanged
    sandbox.reset()
    assert sandbox.config()["shapes"] == []


def test_in_process_server_starts_with_its_shapes() -> None:
    with (
        SandboxServer(SandboxConfig(shapes=("submit-taskId",))) as server,
        httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {server.key}"}
        ) as client,
    ):
        (entry,) = client.post("/sonic/batch", json={"items": [description()]}).json()["tasks"]
        assert set(entry) == {"index", "taskId"}
        control = SandboxControl(server.base_url, server.key)
        assert control.config()["shapes"] == ["submit-taskId"]
        control.reset()
        assert control.config()["shapes"] == ["submit-taskId"]  # reset returns to the start


def test_readme_documents_every_profile() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    missing = [name for name in SHAPES if f"`{name}`" not in readme]
    assert missing == []
