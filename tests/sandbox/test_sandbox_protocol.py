"""The sandbox speaks the protocol: lifecycle, audio, the official SDK, batch,
validation, auth, credits and counters. All over real HTTP on loopback."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import httpx
import mutagen.mp3
import pytest
from musicapi import MusicAPI, PollOptions, SonicCreateParams
from sandbox_helpers import Stepped, description

from reconciler.sandbox import SandboxConfig, SandboxControl, SandboxServer
from reconciler.sandbox.validation import validate_item
from tests.project import wait_until


def _create(client: httpx.Client, body: dict[str, Any]) -> str:
    response = client.post("/sonic/create", json=body)
    assert response.status_code == 200, response.text
    task_id: str = response.json()["task_id"]
    return task_id


# -- 1. lifecycle and audio ------------------------------------------------------------


def test_task_moves_pending_running_then_clips_finish_one_after_the_other(stepped: Stepped) -> None:
    task_id = _create(stepped.api, description())
    batch = stepped.api.post("/sonic/batch", json={"items": [description("ambient drones")]}).json()

    def poll() -> httpx.Response:
        return stepped.api.get(f"/sonic/task/{task_id}")

    def batch_status() -> str:
        body = stepped.api.get("/sonic/batch", params={"batch_id": batch["batch_id"]}).json()
        status: str = body["tasks"][0]["status"]
        return status

    first = poll()
    assert (first.status_code, first.json()) == (202, {"type": "not_ready"})
    assert batch_status() == "pending"

    stepped.clock.advance(5)
    assert poll().status_code == 202
    assert batch_status() == "running"

    stepped.clock.advance(5)  # generation time over: the first clip is done, the second streams
    partial = poll()
    assert partial.status_code == 200
    first_clip, second_clip = partial.json()["data"]
    assert (first_clip["state"], second_clip["state"]) == ("succeeded", "streaming")
    assert first_clip["audio_url"]
    assert second_clip["audio_url"] == ""
    assert batch_status() == "running"

    stepped.clock.advance(5)
    done = poll().json()
    assert done["code"] == 200
    assert done["message"] == "success"
    assert [clip["state"] for clip in done["data"]] == ["succeeded", "succeeded"]
    assert all(clip["audio_url"] for clip in done["data"])
    assert batch_status() == "succeeded"


def test_clip_has_the_protocol_fields(sandbox: Any, api: httpx.Client) -> None:
    body = description(title="Morning Focus", tags="lofi", style_weight=0.4)
    task_id = _create(api, body)
    wait_until(lambda: api.get(f"/sonic/task/{task_id}").status_code == 200)
    clip = api.get(f"/sonic/task/{task_id}").json()["data"][0]
    assert set(clip) >= {
        "clip_id", "state", "title", "tags", "lyrics", "image_url", "audio_url", "video_url",
        "created_at", "mv", "gpt_description_prompt", "duration", "negative_tags",
        "style_weight", "weirdness_constraint",
    }  # fmt: skip
    assert clip["title"] == "Morning Focus"
    assert clip["tags"] == "lofi"
    assert clip["mv"] == "sonic-v5"
    assert clip["style_weight"] == 0.4
    assert clip["video_url"] is None
    assert clip["created_at"].endswith("Z")


def test_audio_is_a_small_real_mp3_matching_the_duration(sandbox: Any, api: httpx.Client) -> None:
    task_id = _create(api, description())
    wait_until(lambda: api.get(f"/sonic/task/{task_id}").status_code == 200)
    clips = api.get(f"/sonic/task/{task_id}").json()["data"]
    assert clips[0]["clip_id"] != clips[1]["clip_id"]
    bodies = []
    for clip in clips:
        response = httpx.get(clip["audio_url"])  # no key: audio is served like a CDN
        assert response.status_code == 200
        assert response.headers["content-type"] == "audio/mpeg"
        assert len(response.content) < 64_000
        info = mutagen.mp3.MP3(io.BytesIO(response.content)).info
        assert info.length > 2
        assert abs(info.length - clip["duration"]) < 0.1
        bodies.append(response.content)
        assert httpx.get(clip["audio_url"]).content == response.content
    assert bodies[0] != bodies[1]
    assert sandbox.stats()["downloads"] == 4


def _generate(client: httpx.Client, prompt: str) -> tuple[list[str], bytes]:
    """Create a task and a one-item batch; every id handed out, and the first clip's audio."""
    task_id = _create(client, description(prompt))
    clips = client.get(f"/sonic/task/{task_id}").json()["data"]
    batch = client.post("/sonic/batch", json={"items": [description(prompt)]}).json()
    ids = [task_id, *(clip["clip_id"] for clip in clips), batch["batch_id"]]
    ids.append(batch["tasks"][0]["task_id"])
    return ids, client.get(clips[0]["audio_url"]).content


def _start_and_generate(seed: int | None, prompt: str = "lofi") -> tuple[list[str], bytes]:
    with (
        SandboxServer(SandboxConfig(latency=0, seed=seed)) as server,
        httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {server.key}"}
        ) as client,
    ):
        return _generate(client, prompt)


def test_ids_and_audio_are_deterministic_under_a_seed() -> None:
    first = _start_and_generate(7)
    assert _start_and_generate(7) == first
    assert set(_start_and_generate(8)[0]).isdisjoint(first[0])
    assert _start_and_generate(7, "dark techno")[1] != first[1]


def test_ids_are_fresh_on_every_start_without_a_seed() -> None:
    """A client's ledger from an earlier run must never meet one of its ids again."""
    first_ids, first_audio = _start_and_generate(None)
    second_ids, second_audio = _start_and_generate(None)
    assert len(set(first_ids)) == len(first_ids) == 5
    assert set(first_ids).isdisjoint(second_ids)
    assert second_audio == first_audio  # the audio still follows the prompt and the order


@pytest.mark.parametrize("seed", [None, 7])
def test_a_reset_never_hands_out_an_id_again(seed: int | None) -> None:
    with (
        SandboxServer(SandboxConfig(latency=0, seed=seed)) as server,
        httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Bearer {server.key}"}
        ) as client,
    ):
        before, _ = _generate(client, "lofi")
        SandboxControl(server.base_url, server.key).reset()
        after, _ = _generate(client, "lofi")
    assert set(before).isdisjoint(after)


# -- 2. the official client -------------------------------------------------------------


def test_official_sdk_generates_and_waits_for_two_songs(sandbox: Any) -> None:
    with MusicAPI(api_key=sandbox.key, base_url=sandbox.base_url, timeout=5) as client:
        result = client.sonic.generate_and_wait(
            SonicCreateParams(
                custom_mode=False, mv="sonic-v5", gpt_description_prompt="uplifting synthwave"
            ),
            PollOptions(poll_interval_ms=50, timeout_ms=10_000),
        )
        balance = client.credits.get()
    assert result.code == 200
    assert len(result.data) == 2
    for song in result.data:
        assert song.state == "succeeded"
        assert song.audio_url
        assert song.duration
        assert song.duration > 0
    assert balance.credits == 100_000 - 15
    assert balance.extra_credits == 0
    stats = sandbox.stats()
    assert stats["create_calls"] == 1
    assert stats["task_polls"] >= 2  # it had to wait: at least one 202 before the 200


# -- 3. batch ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"items": []}, "items"),
        ({"items": [description(str(i)) for i in range(11)]}, "items"),
        ({}, "items"),
        ({"items": "lofi"}, "items"),
        ([description()], "body"),
        ({"items": [description()], "webhook_url": "ftp://x"}, "webhook_url"),
    ],
)
def test_batch_shape_errors_are_400_naming_the_field(
    sandbox: Any, api: httpx.Client, body: Any, field: str
) -> None:
    response = api.post("/sonic/batch", json=body)
    assert response.status_code == 400
    assert response.json()["type"] == "bad_request"
    assert response.json()["error"].startswith(f"{field}:")
    assert sandbox.stats()["tasks_created"] == 0


def test_batch_rejects_items_by_index_and_charges_only_accepted(
    sandbox: Any, api: httpx.Client
) -> None:
    items = [
        description("one"),
        description("two", mv="sonic-v9"),
        description("three"),
        {"custom_mode": True, "mv": "sonic-v4"},
        description("five"),
        "six",
    ]
    response = api.post("/sonic/batch", json={"items": items})
    assert response.status_code == 200
    body = response.json()
    assert body["message"] == "success"
    assert body["submitted"] == 3
    tasks = body["tasks"]
    assert [entry["index"] for entry in tasks] == [0, 1, 2, 3, 4, 5]
    assert tasks[1] == {"index": 1, "type": "bad_request", "error": "mv: unknown model 'sonic-v9'"}
    assert tasks[3]["type"] == "bad_request"
    assert tasks[3]["error"].startswith("prompt:")
    assert tasks[5] == {"index": 5, "type": "bad_request", "error": "item: expected a JSON object"}
    accepted = {entry["index"]: entry["task_id"] for entry in tasks if "task_id" in entry}
    assert sorted(accepted) == [0, 2, 4]
    stats = sandbox.stats()
    assert stats["credits_charged"] == 45
    assert stats["credits"] == 100_000 - 45

    def finished() -> Any:
        polled = api.get("/sonic/batch", params={"batch_id": body["batch_id"]}).json()
        return polled if all(e["status"] == "succeeded" for e in polled["tasks"]) else None

    polled = wait_until(finished)
    assert polled["batch_id"] == body["batch_id"]
    assert {e["index"]: e["task_id"] for e in polled["tasks"]} == accepted
    for entry in polled["tasks"]:
        assert [clip["state"] for clip in entry["data"]] == ["succeeded", "succeeded"]


def test_unknown_batch_and_task_are_404(sandbox: Any, api: httpx.Client) -> None:
    assert api.get("/sonic/batch", params={"batch_id": "nope"}).status_code == 404
    assert api.get("/sonic/task/00000000-0000-4000-8000-000000000000").status_code == 404


# -- 4. validation and auth ---------------------------------------------------------------

V4 = {"custom_mode": True, "mv": "sonic-v4", "prompt": "la la la"}
V5 = {"custom_mode": True, "mv": "sonic-v5", "prompt": "la la la"}


@pytest.mark.parametrize(
    ("item", "problem"),
    [
        (description(), None),
        (V4, None),
        ({"mv": "sonic-v5", "gpt_description_prompt": "x"}, "custom_mode: required"),
        (description(custom_mode="false"), "custom_mode: expected true or false"),
        (description(mv="sonic-v9"), "mv: unknown model 'sonic-v9'"),
        ({"custom_mode": False, "gpt_description_prompt": "x"}, "mv: required"),
        ({"custom_mode": True, "mv": "sonic-v5"}, "prompt: required when custom_mode is true"),
        (
            {"custom_mode": False, "mv": "sonic-v5", "prompt": "x"},
            "gpt_description_prompt: required when custom_mode is false",
        ),
        ({**V4, "prompt": "a" * 3000}, None),
        ({**V4, "prompt": "a" * 3001}, "prompt: 3001 characters, the limit is 3000"),
        ({**V5, "prompt": "a" * 5000}, None),
        ({**V5, "prompt": "a" * 5001}, "prompt: 5001 characters, the limit is 5000"),
        (description("a" * 400), None),
        (description("a" * 401), "gpt_description_prompt: 401 characters, the limit is 400"),
        (description(title="t" * 79), None),
        (description(title="t" * 80), "title: 80 characters, the limit is 79"),
        ({**V4, "tags": "t" * 199}, None),
        ({**V4, "tags": "t" * 200}, "tags: 200 characters, the limit is 199"),
        (description(tags="t" * 1000), None),
        (description(tags="t" * 1001), "tags: 1001 characters, the limit is 1000"),
        (description(tags=5), "tags: expected a string, got int"),
        (description(make_instrumental="yes"), "make_instrumental: expected true or false"),
        (description(vocal_gender="f"), None),
        (description(vocal_gender="x"), "vocal_gender: expected 'f' or 'm'"),
        ({**V4, "vocal_gender": "m"}, "vocal_gender: not supported by model 'sonic-v4'"),
        (description(style_weight=0, weirdness_constraint=1), None),
        (description(style_weight=1.5), "style_weight: 1.5 is outside 0 to 1"),
        (description(weirdness_constraint="0.5"), "weirdness_constraint: expected a number"),
        (description(style_weight=True), "style_weight: expected a number"),
        (description(task_type="extend"), "task_type: unsupported task type 'extend'"),
        (description(task_type=["create_music"]), "task_type: unsupported task type"),
        ("lofi", "body: expected a JSON object"),
        (description(webhook_url="not a url"), "webhook_url: expected an http"),
    ],
)
def test_validation_rules(item: Any, problem: str | None) -> None:
    found = validate_item(item)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert found.startswith(problem)


def test_invalid_create_is_400_naming_the_field_and_costs_nothing(
    sandbox: Any, api: httpx.Client
) -> None:
    response = api.post("/sonic/create", json=description(mv="sonic-v9"))
    assert response.status_code == 400
    assert response.json() == {"type": "bad_request", "error": "mv: unknown model 'sonic-v9'"}
    not_json = api.post("/sonic/create", content=b"{not json", headers={"Content-Type": "x"})
    assert not_json.status_code == 400
    assert not_json.json()["error"].startswith("body:")
    stats = sandbox.stats()
    assert (stats["create_calls"], stats["tasks_created"], stats["credits_charged"]) == (2, 0, 0)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "x"}])
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/v1/sonic/create"),
        ("GET", "/api/v1/sonic/task/x"),
        ("POST", "/api/v1/sonic/batch"),
        ("GET", "/api/v1/sonic/batch?batch_id=x"),
        ("GET", "/api/v1/get-credits"),
        ("GET", "/_sandbox/stats"),
        ("POST", "/_sandbox/reset"),
        ("POST", "/_sandbox/config"),
    ],
)
def test_missing_or_wrong_key_is_401(
    sandbox: Any, headers: dict[str, str], method: str, path: str
) -> None:
    response = httpx.request(method, sandbox.url + path, headers=headers, json=description())
    assert response.status_code == 401
    assert response.json()["type"] == "unauthorized"


# -- 5. credits -------------------------------------------------------------------------


def test_credits_charge_per_task_and_run_out_per_item(sandbox: Any, api: httpx.Client) -> None:
    sandbox.configure(credits=40)
    assert api.get("/get-credits").json() == {"credits": 40, "extra_credits": 0}
    _create(api, description("a"))
    batch = api.post(
        "/sonic/batch", json={"items": [description("b"), description("c"), description("d")]}
    ).json()
    assert batch["submitted"] == 1
    assert "task_id" in batch["tasks"][0]
    for rejected in batch["tasks"][1:]:
        assert rejected["type"] == "insufficient_credits"
    single = api.post("/sonic/create", json=description("e"))
    assert single.status_code == 403
    assert single.json()["type"] == "insufficient_credits"
    assert api.get("/get-credits").json()["credits"] == 10
    assert sandbox.stats()["credits_charged"] == 30


def test_starting_balance_is_configurable(sandbox: Any) -> None:
    with SandboxServer(SandboxConfig(credits=15, latency=0)) as server:
        client = MusicAPI(api_key=server.key, base_url=server.base_url, max_retries=0)
        assert client.credits.get().credits == 15
        client.sonic.create(
            SonicCreateParams(custom_mode=False, mv="sonic-v5", gpt_description_prompt="x")
        )
        assert client.credits.get().credits == 0
        client.close()


def test_failed_task_is_refunded(sandbox: Any, api: httpx.Client) -> None:
    sandbox.configure(faults=[{"kind": "task_failed", "at": [1], "error": "upstream exploded"}])
    failing = _create(api, description("a"))
    fine = _create(api, description("b"))
    assert api.get("/get-credits").json()["credits"] == 100_000 - 30
    response = wait_until(lambda: _finished(api, failing))
    assert response.status_code == 200
    assert response.json() == {"type": "failed", "error": "upstream exploded"}
    assert api.get("/get-credits").json()["credits"] == 100_000 - 15
    assert _finished(api, fine).json()["code"] == 200  # type: ignore[union-attr]
    stats = sandbox.stats()
    assert (stats["credits_charged"], stats["credits_refunded"]) == (30, 15)
    assert stats["faults_fired"] == {"task_failed": 1}


def _finished(api: httpx.Client, task_id: str) -> httpx.Response | None:
    response = api.get(f"/sonic/task/{task_id}")
    return response if response.status_code == 200 else None


# -- 8. counters, reset and runtime configuration -------------------------------------------


def test_stats_count_everything_and_fingerprint_items(sandbox: Any, api: httpx.Client) -> None:
    body = description("same", webhook_url="http://127.0.0.1:9/x", webhook_secret="s")
    first = _create(api, body)
    api.post("/sonic/batch", json={"items": [description("same"), description("other")]})
    batch = api.post("/sonic/batch", json={"items": [description("same")]}).json()
    wait_until(lambda: _finished(api, first))
    api.get("/sonic/batch", params={"batch_id": batch["batch_id"]})
    api.get("/get-credits")
    stats = sandbox.stats()

    def key(item: dict[str, Any]) -> str:
        text = json.dumps(item, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    assert stats["tasks_by_fingerprint"] == {
        key(description("same")): 3,
        key(description("other")): 1,
    }
    assert stats["create_calls"] == 1
    assert stats["batch_submit_calls"] == 2
    assert stats["tasks_created"] == 4
    assert stats["task_polls"] >= 1
    assert stats["batch_polls"] == 1
    assert stats["credit_calls"] == 1
    assert stats["credits_charged"] == 60
    assert stats["credits_refunded"] == 0
    assert stats["downloads"] == 0
    assert stats["faults_fired"] == {}
    assert set(stats) >= {"webhooks_sent", "credits"}

    sandbox.reset()
    cleared = sandbox.stats()
    assert cleared["tasks_created"] == 0
    assert cleared["tasks_by_fingerprint"] == {}
    assert cleared["credits"] == 100_000
    assert api.get(f"/sonic/task/{first}").status_code == 404


def test_runtime_configuration(sandbox: Any, api: httpx.Client) -> None:
    from reconciler.sandbox import FaultProfileError

    shown = sandbox.configure(latency=30, faults=[{"kind": "stuck", "every": 1}])
    assert shown["latency"] == 30
    assert shown["faults"][0]["kind"] == "stuck"
    with pytest.raises(FaultProfileError, match=r"faults\[0\]\.kind: unknown fault 'boom'"):
        sandbox.configure(faults=[{"kind": "boom", "rate": 1}])
    with pytest.raises(FaultProfileError, match="latency"):
        sandbox.configure(latency=-1)
    with pytest.raises(FaultProfileError, match="colour: unknown setting"):
        sandbox.configure(colour="blue")
    sandbox.reset()
    assert sandbox.config()["latency"] == 0.2
    assert sandbox.config()["faults"] == []
