"""Fault injection: the profile format, the seeded schedules, and every fault over HTTP."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import httpx
import mutagen.mp3
import pytest
from sandbox_helpers import Stepped, description

from reconciler.sandbox import (
    FaultProfile,
    FaultProfileError,
    SandboxConfig,
    SandboxControl,
    SandboxServer,
)
from reconciler.sandbox.faults import FaultInjector
from tests.project import wait_until

# -- the profile format --------------------------------------------------------------------

EXAMPLE = """
batch_disabled = 405
audio_url_ttl = 30

[[faults]]
kind = "rate_limited"
rate = 0.1
retry_after = 2

[[faults]]
kind = "drop_response"
at = [2, 5]

[[faults]]
kind = "reject"
every = 4
type = "forbidden"
error = "copyrighted"
endpoints = ["batch_submit"]

[[faults]]
kind = "unauthorized"
after = 100

[[faults]]
kind = "audio_truncated"
rate = 0.05
"""


def test_toml_profile_reads_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "chaos.toml"
    path.write_text(EXAMPLE)
    profile = FaultProfile.from_toml(path)
    assert profile.batch_disabled == 405
    assert profile.audio_url_ttl == 30
    kinds = [rule.kind for rule in profile.faults]
    assert kinds == ["rate_limited", "drop_response", "reject", "unauthorized", "audio_truncated"]
    rate_limited, dropped, reject, unauthorized, truncated = profile.faults
    assert (rate_limited.rate, rate_limited.retry_after) == (0.1, 2)
    assert dropped.at == {2, 5}
    assert dropped.endpoints == {"create", "batch_submit"}  # the kind's default
    assert (reject.every, reject.endpoints, reject.error) == (4, {"batch_submit"}, "copyrighted")
    assert unauthorized.after == 100
    assert (truncated.mode, truncated.fraction, truncated.endpoints) == ("hang_up", 0.5, {"audio"})
    assert FaultProfile.from_mapping(profile.to_mapping()) == profile


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"faults": [{"kind": "boom", "rate": 1}]}, "faults[0].kind: unknown fault 'boom'"),
        ({"faults": [{"kind": "stuck"}]}, "faults[0]: give exactly one of"),
        ({"faults": [{"kind": "stuck", "rate": 1, "at": [1]}]}, "give exactly one of"),
        ({"faults": [{"kind": "stuck", "rate": 1.5}]}, "faults[0].rate: 1.5 is not from"),
        ({"faults": [{"kind": "stuck", "at": 3}]}, "faults[0].at: expected a list"),
        ({"faults": [{"kind": "stuck", "at": [0]}]}, "faults[0].at: 0 is less than 1"),
        ({"faults": [{"kind": "stuck", "every": 0}]}, "faults[0].every: 0 is less than 1"),
        (
            {"faults": [{"kind": "reject", "rate": 1, "endpoints": ["audio"]}]},
            "faults[0].endpoints: 'audio' is not one of",
        ),
        (
            {"faults": [{"kind": "server_error", "rate": 1, "retry_after": 1}]},
            "faults[0].retry_after: not a field of fault 'server_error'",
        ),
        ({"faults": [{"kind": "server_error", "rate": 1, "status": 200}]}, "faults[0].status"),
        ({"faults": [{"kind": "server_error", "rate": 1, "body": "xml"}]}, "faults[0].body"),
        ({"faults": [{"kind": "reject", "rate": 1, "type": "nope"}]}, "faults[0].type"),
        ({"faults": [{"kind": "audio_truncated", "rate": 1, "mode": "x"}]}, "faults[0].mode"),
        ({"faults": [{"kind": "task_failed", "rate": 1, "error": 3}]}, "faults[0].error"),
        ({"faults": {"kind": "stuck"}}, "faults: expected a list"),
        ({"batch_disabled": 403}, "batch_disabled: 403 is not one of"),
        ({"audio_url_ttl": -1}, "audio_url_ttl: -1 is not at least"),
        ({"colour": 1}, "colour: unknown setting"),
    ],
)
def test_profile_errors_name_the_field(data: dict[str, Any], message: str) -> None:
    with pytest.raises(FaultProfileError) as caught:
        FaultProfile.from_mapping(data, "chaos.toml")
    assert str(caught.value).startswith("chaos.toml: ")
    assert message in str(caught.value)


def test_unreadable_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[[faults]\n")
    with pytest.raises(FaultProfileError, match=r"bad\.toml"):
        FaultProfile.from_toml(path)


# -- schedules -------------------------------------------------------------------------------


def _fired(rule: dict[str, Any], endpoints: list[str], seed: int = 0) -> list[bool]:
    injector = FaultInjector(FaultProfile.from_mapping({"faults": [rule]}), seed)
    return [injector.on_request(endpoint) is not None for endpoint in endpoints]


def test_ordinal_schedules() -> None:
    polls = ["task_poll"] * 6
    assert _fired({"kind": "slow", "at": [2, 4]}, polls) == [False, True, False, True, False, False]
    assert _fired({"kind": "slow", "every": 3}, polls) == [False, False, True, False, False, True]
    assert _fired({"kind": "slow", "after": 4}, polls) == [False] * 4 + [True] * 2


def test_endpoint_filter_counts_only_matching_requests() -> None:
    rule = {"kind": "slow", "at": [2], "endpoints": ["create"]}
    fired = _fired(rule, ["create", "task_poll", "task_poll", "create", "create"])
    assert fired == [False, False, False, True, False]


def test_rates_are_deterministic_under_the_seed() -> None:
    rule = {"kind": "slow", "rate": 0.5}
    polls = ["task_poll"] * 64
    first = _fired(rule, polls, seed=1)
    assert _fired(rule, polls, seed=1) == first
    assert _fired(rule, polls, seed=2) != first
    assert 10 < sum(first) < 54
    assert not any(_fired({"kind": "slow", "rate": 0}, polls))
    assert all(_fired({"kind": "slow", "rate": 1}, polls))


def test_each_rule_keeps_its_own_schedule() -> None:
    profile = FaultProfile.from_mapping(
        {"faults": [{"kind": "rate_limited", "every": 2}, {"kind": "server_error", "at": [2, 3]}]}
    )
    injector = FaultInjector(profile, 0)
    kinds = [getattr(injector.on_request("credits"), "kind", None) for _ in range(4)]
    # Request 2 matches both: the first rule wins, yet the second still counted it.
    assert kinds == [None, "rate_limited", "server_error", "rate_limited"]
    assert injector.fired == {"rate_limited": 2, "server_error": 1}


def test_seeded_faults_repeat_over_http() -> None:
    profile = FaultProfile.from_mapping({"faults": [{"kind": "rate_limited", "rate": 0.5}]})

    def statuses() -> list[int]:
        with SandboxServer(SandboxConfig(faults=profile, seed=11)) as server:
            headers = {"Authorization": f"Bearer {server.key}"}
            with httpx.Client(base_url=server.base_url, headers=headers) as client:
                return [client.get("/get-credits").status_code for _ in range(24)]

    first = statuses()
    assert set(first) == {200, 429}
    assert statuses() == first


# -- request faults over HTTP -------------------------------------------------------------------


def test_rate_limited_with_and_without_retry_after(
    sandbox: SandboxControl, api: httpx.Client
) -> None:
    sandbox.configure(
        faults=[
            {"kind": "rate_limited", "at": [1], "retry_after": 2},
            {"kind": "rate_limited", "at": [2]},
        ]
    )
    first, second, third = (api.get("/get-credits") for _ in range(3))
    assert first.status_code == 429
    assert first.headers["retry-after"] == "2"
    assert second.status_code == 429
    assert "retry-after" not in second.headers
    assert third.status_code == 200
    assert sandbox.stats()["faults_fired"] == {"rate_limited": 2}


def test_server_errors_with_html_or_empty_bodies(
    sandbox: SandboxControl, api: httpx.Client
) -> None:
    sandbox.configure(
        faults=[
            {"kind": "server_error", "at": [1], "status": 502},
            {"kind": "server_error", "at": [2], "status": 500, "body": "empty"},
        ]
    )
    html = api.post("/sonic/create", json=description())
    assert html.status_code == 502
    assert html.headers["content-type"].startswith("text/html")
    assert "<html>" in html.text
    empty = api.post("/sonic/create", json=description())
    assert empty.status_code == 500
    assert empty.content == b""
    assert sandbox.stats()["tasks_created"] == 0


def test_connection_reset_before_processing(sandbox: SandboxControl, api: httpx.Client) -> None:
    sandbox.configure(faults=[{"kind": "connection_reset", "at": [1]}])
    with pytest.raises(httpx.TransportError):
        api.post("/sonic/create", json=description())
    assert api.post("/sonic/create", json=description()).status_code == 200
    stats = sandbox.stats()
    assert (stats["create_calls"], stats["tasks_created"]) == (2, 1)
    assert stats["faults_fired"] == {"connection_reset": 1}


def test_submit_processed_but_response_dropped(sandbox: SandboxControl, api: httpx.Client) -> None:
    sandbox.configure(faults=[{"kind": "drop_response", "at": [1]}])
    with pytest.raises(httpx.RemoteProtocolError):
        api.post("/sonic/batch", json={"items": [description("a"), description("b")]})
    stats = sandbox.stats()
    assert stats["tasks_created"] == 2  # the tasks exist and are paid for
    assert stats["credits_charged"] == 30
    assert len(stats["tasks_by_fingerprint"]) == 2
    assert api.post("/sonic/batch", json={"items": [description("c")]}).status_code == 200


def test_slow_response_outlasts_the_client_timeout(
    sandbox: SandboxControl, api: httpx.Client
) -> None:
    sandbox.configure(faults=[{"kind": "slow", "at": [1], "delay": 0.6}])
    with pytest.raises(httpx.ReadTimeout):
        api.post("/sonic/create", json=description(), timeout=0.2)
    # The server handled it; only the answer was late: an ambiguous submit.
    assert sandbox.stats()["tasks_created"] == 1
    assert api.get("/get-credits").status_code == 200


def test_unauthorized_after_n_requests(sandbox: SandboxControl, api: httpx.Client) -> None:
    sandbox.configure(faults=[{"kind": "unauthorized", "after": 2}])
    statuses = [api.get("/get-credits").status_code for _ in range(5)]
    assert statuses == [200, 200, 401, 401, 401]


@pytest.mark.parametrize("status", [404, 405])
def test_batch_endpoint_can_be_disabled(
    sandbox: SandboxControl, api: httpx.Client, status: int
) -> None:
    sandbox.configure(batch_disabled=status)
    assert api.post("/sonic/batch", json={"items": [description()]}).status_code == status
    assert api.get("/sonic/batch", params={"batch_id": "x"}).status_code == status
    assert api.post("/sonic/create", json=description()).status_code == 200
    assert sandbox.stats()["tasks_created"] == 1


# -- item faults --------------------------------------------------------------------------------


def test_items_rejected_by_moderation_or_validation(
    sandbox: SandboxControl, api: httpx.Client
) -> None:
    sandbox.configure(
        faults=[
            {"kind": "reject", "at": [2], "endpoints": ["batch_submit"]},
            {"kind": "reject", "at": [1], "type": "bad_request", "endpoints": ["create"]},
            {"kind": "insufficient_credits", "at": [2], "endpoints": ["create"]},
        ]
    )
    batch = api.post("/sonic/batch", json={"items": [description("a"), description("b")]}).json()
    assert batch["submitted"] == 1
    assert batch["tasks"][1] == {"index": 1, "type": "forbidden", "error": "copyrighted"}
    bad = api.post("/sonic/create", json=description("c"))
    assert bad.status_code == 400
    assert bad.json()["type"] == "bad_request"
    broke = api.post("/sonic/create", json=description("d"))
    assert broke.status_code == 403
    assert broke.json()["type"] == "insufficient_credits"
    assert sandbox.stats()["credits_charged"] == 15


def test_moderation_on_a_single_create_is_403(sandbox: SandboxControl, api: httpx.Client) -> None:
    sandbox.configure(faults=[{"kind": "reject", "at": [1], "error": "inappropriate"}])
    response = api.post("/sonic/create", json=description())
    assert response.status_code == 403
    assert response.json() == {"type": "forbidden", "error": "inappropriate"}


# -- task faults --------------------------------------------------------------------------------


def _done(api: httpx.Client, task_id: str) -> dict[str, Any] | None:
    response = api.get(f"/sonic/task/{task_id}")
    if response.status_code != 200:
        return None
    body: dict[str, Any] = response.json()
    return body


def test_one_clip_fails(sandbox: SandboxControl, api: httpx.Client) -> None:
    sandbox.configure(faults=[{"kind": "clip_failed", "every": 1}])
    task_id = api.post("/sonic/create", json=description()).json()["task_id"]
    body = wait_until(lambda: _done(api, task_id))
    first, second = body["data"]
    assert (first["state"], second["state"]) == ("succeeded", "failed")
    assert first["audio_url"]
    assert second["audio_url"] == ""
    assert sandbox.stats()["credits_refunded"] == 0


def test_duration_as_string(sandbox: SandboxControl, api: httpx.Client) -> None:
    sandbox.configure(faults=[{"kind": "duration_string", "every": 1}])
    task_id = api.post("/sonic/create", json=description()).json()["task_id"]
    clip = wait_until(lambda: _done(api, task_id))["data"][0]
    assert isinstance(clip["duration"], str)
    audio = httpx.get(clip["audio_url"]).content
    assert abs(mutagen.mp3.MP3(io.BytesIO(audio)).info.length - float(clip["duration"])) < 0.1


def test_stuck_task_never_finishes(stepped: Stepped) -> None:
    stepped.control.configure(faults=[{"kind": "stuck", "at": [1]}])
    stuck = stepped.api.post("/sonic/create", json=description("a")).json()["task_id"]
    fine = stepped.api.post("/sonic/create", json=description("b")).json()["task_id"]
    stepped.clock.advance(10_000)
    assert stepped.api.get(f"/sonic/task/{stuck}").status_code == 202
    assert stepped.api.get(f"/sonic/task/{fine}").status_code == 200


def test_200_with_unfinished_clips(stepped: Stepped) -> None:
    stepped.control.configure(faults=[{"kind": "unfinished_clips", "every": 1}])
    task_id = stepped.api.post("/sonic/create", json=description()).json()["task_id"]
    stepped.clock.advance(6)  # past half the generation time
    early = stepped.api.get(f"/sonic/task/{task_id}")
    assert early.status_code == 200
    assert early.json()["code"] == 200
    assert [clip["state"] for clip in early.json()["data"]] == ["streaming", "streaming"]
    assert [clip["audio_url"] for clip in early.json()["data"]] == ["", ""]
    stepped.clock.advance(10)
    done = stepped.api.get(f"/sonic/task/{task_id}").json()
    assert [clip["state"] for clip in done["data"]] == ["succeeded", "succeeded"]


# -- audio faults -------------------------------------------------------------------------------


def _audio_url(api: httpx.Client) -> str:
    task_id = api.post("/sonic/create", json=description()).json()["task_id"]
    url: str = wait_until(lambda: _done(api, task_id))["data"][0]["audio_url"]
    return url


@pytest.mark.parametrize("status", [403, 404])
def test_audio_url_answers_as_expired(
    sandbox: SandboxControl, api: httpx.Client, status: int
) -> None:
    sandbox.configure(faults=[{"kind": "audio_expired", "at": [1], "status": status}])
    url = _audio_url(api)
    assert httpx.get(url).status_code == status
    assert httpx.get(url).status_code == 200


def test_audio_urls_expire_after_their_ttl(stepped: Stepped) -> None:
    stepped.control.configure(audio_url_ttl=60)
    task_id = stepped.api.post("/sonic/create", json=description()).json()["task_id"]
    stepped.clock.advance(20)
    url = stepped.api.get(f"/sonic/task/{task_id}").json()["data"][0]["audio_url"]
    assert "expires=" in url
    assert httpx.get(url).status_code == 200
    stepped.clock.advance(61)
    assert httpx.get(url).status_code == 403
    fresh = stepped.api.get(f"/sonic/task/{task_id}").json()["data"][0]["audio_url"]
    assert httpx.get(fresh).status_code == 200


def test_truncated_audio_hangs_up_mid_body(sandbox: SandboxControl, api: httpx.Client) -> None:
    sandbox.configure(faults=[{"kind": "audio_truncated", "at": [1]}])
    url = _audio_url(api)
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(url)
    assert httpx.get(url).status_code == 200
    assert sandbox.stats()["faults_fired"] == {"audio_truncated": 1}


def test_truncated_audio_as_a_short_file(sandbox: SandboxControl, api: httpx.Client) -> None:
    sandbox.configure(
        faults=[{"kind": "audio_truncated", "at": [1], "fraction": 0.5, "mode": "short"}]
    )
    url = _audio_url(api)
    cut = httpx.get(url)
    whole = httpx.get(url).content
    assert cut.status_code == 200
    assert len(cut.content) == len(whole) // 2
    assert whole.startswith(cut.content)
