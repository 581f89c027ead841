"""Unit tests of the MusicAPI client against ``httpx.MockTransport``.

Every answer is forced precisely by a handler; the handler also records what the
client sent, so retry counts and "submits are never retried" are checked on the
wire. stamina runs in test mode (no waits) except where a test measures a wait.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pydantic
import pytest
import stamina
import structlog
from structlog.testing import capture_logs

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
from reconciler.musicapi import (
    Accepted,
    BatchSubmission,
    Clip,
    Credits,
    MusicAPI,
    Rejected,
    TaskStatus,
    TokenBucket,
    Unconfirmed,
    error_message,
    parse_retry_after,
)

KEY = "sk-SECRET-123"
BASE = "https://api.test/api/v1"
T = TypeVar("T")
Handler = Callable[[httpx.Request], httpx.Response]
Op = Callable[[MusicAPI], Awaitable[Any]]


@pytest.fixture(autouse=True)
def _no_backoff_waits() -> Iterator[None]:
    # Keep each client's own max_attempts, but do not sleep between attempts.
    with stamina.set_testing(True, attempts=1000, cap=True):
        yield


class Wire:
    """A MockTransport handler that answers from a script and records requests."""

    def __init__(self, *answers: httpx.Response | Exception | Handler) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        # The last answer repeats, so "always 503" is one entry.
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, httpx.Response):
            # A Response can only be sent once; hand out a fresh copy each time.
            return httpx.Response(
                answer.status_code, headers=answer.headers, content=answer.content
            )
        return answer(request)


def run(wire: Wire, op: Callable[[MusicAPI], Awaitable[T]], **options: Any) -> T:
    async def main() -> T:
        async with MusicAPI(BASE, KEY, transport=httpx.MockTransport(wire), **options) as api:
            return await op(api)

    return asyncio.run(main())


def fails(wire: Wire, op: Op, **options: Any) -> APIError:
    with pytest.raises(APIError) as caught:
        run(wire, op, **options)
    return caught.value


def answer(status: int, body: Any = None, **headers: str) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.Response(status, content=body, headers=headers)
    if isinstance(body, str):
        return httpx.Response(status, text=body, headers=headers)
    if body is None:
        return httpx.Response(status, headers=headers)
    return httpx.Response(status, json=body, headers=headers)


def clip(clip_id: str = "c1", state: str = "succeeded", **fields: Any) -> dict[str, Any]:
    audio = f"https://cdn.test/{clip_id}.mp3" if state == "succeeded" else ""
    return {"clip_id": clip_id, "state": state, "audio_url": audio} | fields


def interrupted(exc_type: type[httpx.TransportError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type("fault injected", request=request)

    return handler


CREATE: Op = lambda api: api.create({"custom_mode": False, "mv": "sonic-v5"})  # noqa: E731
BATCH: Op = lambda api: api.submit_batch([{"mv": "sonic-v5"}, {"mv": "sonic-v4"}])  # noqa: E731
POLL: Op = lambda api: api.poll_task("t-1")  # noqa: E731
POLL_BATCH: Op = lambda api: api.poll_batch("b-1", {})  # noqa: E731
CREDITS: Op = lambda api: api.get_credits()  # noqa: E731
OPS = {"create": CREATE, "batch": BATCH, "poll": POLL, "poll_batch": POLL_BATCH, "credits": CREDITS}


# ---------------------------------------------------------------------------
# Error mapping: status and body shape → class and message
# ---------------------------------------------------------------------------

HTML_502 = "<html><head><title>502 Bad Gateway</title></head><body><h1>502</h1></body></html>"
HTML_NO_TITLE = "<html><style>p{}</style><body><p>Upstream   &amp; gone</p></body></html>"


@pytest.mark.parametrize(
    ("op", "response", "error", "message"),
    [
        (
            "create",
            answer(400, {"error": "prompt: must be at most 3000 characters"}),
            RejectedError,
            "prompt: must be at most 3000 characters",
        ),
        (
            "create",
            answer(400, {"message": "mv: unknown model"}),
            RejectedError,
            "mv: unknown model",
        ),
        (
            "batch",
            answer(400, {"type": "bad_request", "error": "items: 1 to 10 items"}),
            RejectedError,
            "items: 1 to 10 items",
        ),
        ("create", answer(422, {"detail": "title: too long"}), RejectedError, "title: too long"),
        (
            "create",
            answer(400, {"error": {"message": "nested reason"}}),
            RejectedError,
            "nested reason",
        ),
        (
            "poll",
            answer(400, {"type": "bad_request", "error": "task not found."}),
            NotFoundError,
            "task not found.",
        ),
        ("poll", answer(400, "task not found."), NotFoundError, "task not found."),
        ("poll", answer(404), NotFoundError, "HTTP 404 Not Found"),
        ("poll_batch", answer(404, {"error": "unknown batch"}), NotFoundError, "unknown batch"),
        ("poll", answer(400, {"error": "task_id: malformed"}), RejectedError, "task_id: malformed"),
        (
            "create",
            answer(401, {"code": 401, "message": "Invalid API key"}),
            AuthError,
            "Invalid API key",
        ),
        ("credits", answer(401, "Unauthorized"), AuthError, "Unauthorized"),
        (
            "create",
            answer(402, {"error": "Payment required"}),
            InsufficientCreditsError,
            "Payment required",
        ),
        (
            "create",
            answer(403, {"type": "forbidden", "error": "Insufficient credits"}),
            InsufficientCreditsError,
            "Insufficient credits",
        ),
        (
            "batch",
            answer(403, {"message": "No active subscription"}),
            InsufficientCreditsError,
            "No active subscription",
        ),
        (
            "create",
            answer(403, {"type": "forbidden", "error": "copyrighted lyrics"}),
            RejectedError,
            "copyrighted lyrics",
        ),
        (
            "create",
            answer(403, {"error": "inappropriate content"}),
            RejectedError,
            "inappropriate content",
        ),
        (
            "create",
            answer(403, {"error": "blocked for another reason"}),
            RejectedError,
            "blocked for another reason",
        ),
        (
            "batch",
            answer(404, {"error": "Not Found"}),
            BatchUnsupportedError,
            "no batch endpoint here (HTTP 404)",
        ),
        ("batch", answer(405, ""), BatchUnsupportedError, "no batch endpoint here (HTTP 405)"),
        ("create", answer(429, {"error": "slow down"}), RateLimitedError, "slow down"),
        ("credits", answer(429), RateLimitedError, "HTTP 429 Too Many Requests"),
        (
            "credits",
            answer(502, HTML_502, **{"content-type": "text/html"}),
            TemporaryAPIError,
            "502 Bad Gateway",
        ),
        (
            "poll",
            answer(500, HTML_NO_TITLE, **{"content-type": "text/html"}),
            TemporaryAPIError,
            "Upstream & gone",
        ),
        ("poll_batch", answer(503, b""), TemporaryAPIError, "HTTP 503 Service Unavailable"),
        ("credits", answer(408), TemporaryAPIError, "HTTP 408 Request Timeout"),
        (
            "create",
            answer(500, {"error": "internal"}),
            AmbiguousSubmitError,
            "the submit may have been processed (HTTP 500: internal)",
        ),
        ("create", answer(418, "teapot"), PermanentAPIError, "unexpected HTTP 418: teapot"),
        (
            "credits",
            answer(200, {"code": 401, "message": "Invalid API key"}),
            AuthError,
            "Invalid API key",
        ),
        (
            "poll",
            answer(200, {"code": 404, "message": "task not found."}),
            NotFoundError,
            "task not found.",
        ),
    ],
)
def test_status_and_body_map_to_error(
    op: str, response: httpx.Response, error: type[APIError], message: str
) -> None:
    response.headers["x-request-id"] = "req-42"
    raised = fails(Wire(response), OPS[op], max_attempts=1)
    assert type(raised) is error
    assert raised.message == message
    assert str(raised) == message
    # An error envelope inside a 2xx is judged (and reported) by the code it names.
    status = response.json()["code"] if response.is_success else response.status_code
    assert raised.status == status
    assert raised.request_id == "req-42"


@pytest.mark.parametrize(
    ("status", "body", "content_type", "message"),
    [
        (400, b'{"error": "tags: too long"}', "application/json", "tags: too long"),
        (400, b'{"type": "forbidden", "error": "copyrighted"}', "", "copyrighted"),
        (400, b'{"code": 400, "message": "bad field"}', "", "bad field"),
        (400, b'{"type": "bad_request"}', "", "bad_request"),
        (400, b'{"error": ""}', "", "HTTP 400 Bad Request"),
        (400, b"[1, 2]", "", "HTTP 400 Bad Request"),
        (500, b"plain\n  text\treason", "text/plain", "plain text reason"),
        (502, HTML_502.encode(), "text/html", "502 Bad Gateway"),
        (502, b"<html><body><script>x=1</script>down</body></html>", "", "down"),
        (503, b"   ", "", "HTTP 503 Service Unavailable"),
        (599, b"", "", "HTTP 599"),
        (500, b"\xff\xfe broken bytes", "", "\ufffd\ufffd broken bytes"),
    ],
)
def test_error_message_normalises_every_body_shape(
    status: int, body: bytes, content_type: str, message: str
) -> None:
    assert error_message(status, body, content_type) == message


def test_error_message_is_one_short_line() -> None:
    message = error_message(500, ("word " * 500).encode(), "text/plain")
    assert len(message) == 200
    assert "\n" not in message
    assert message.endswith("…")


# ---------------------------------------------------------------------------
# Retry-After
# ---------------------------------------------------------------------------

NOW = 1_700_000_000.0


def http_date(offset: float) -> str:
    return format_datetime(datetime.fromtimestamp(NOW + offset, UTC), usegmt=True)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("5", 5.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("1000", 300.0),
        ("-1", None),
        ("soon", None),
        ("inf", None),
        ("nan", None),
        (http_date(30), 30.0),
        (http_date(-30), 0.0),
        (http_date(86_400), 300.0),
        ("Wed, 21 Oct 2015 07:28:00 -0000", None),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    assert parse_retry_after(header, now=NOW, cap=300.0) == expected


def test_429_with_short_retry_after_is_retried_inside_the_call() -> None:
    wire = Wire(answer(429, {"error": "slow"}, **{"retry-after": "2"}), answer(200, {"credits": 5}))
    assert run(wire, CREDITS) == Credits(5, 0)
    assert len(wire.requests) == 2


def test_retry_after_longer_than_backoff_cap_is_raised_for_the_caller() -> None:
    wire = Wire(answer(429, {"error": "slow"}, **{"retry-after": "120"}), answer(200, {}))
    raised = fails(wire, CREDITS, backoff_cap=30.0)
    assert isinstance(raised, RateLimitedError)
    assert raised.retry_after == 120.0
    assert len(wire.requests) == 1


def test_retry_after_is_capped_and_an_http_date_is_understood() -> None:
    far = format_datetime(datetime.now(UTC) + timedelta(hours=2), usegmt=True)
    raised = fails(Wire(answer(429, None, **{"retry-after": far})), CREDITS)
    assert isinstance(raised, RateLimitedError)
    assert raised.retry_after == 300.0


def test_429_without_retry_after_backs_off_then_gives_up() -> None:
    wire = Wire(answer(429))
    raised = fails(wire, POLL, max_attempts=4)
    assert isinstance(raised, RateLimitedError)
    assert raised.retry_after is None
    assert len(wire.requests) == 4


def test_retry_after_replaces_the_exponential_backoff() -> None:
    """Measured for real: a 0.2 s Retry-After wins over a 5 s backoff."""
    sent: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(time.monotonic())
        if len(sent) == 1:
            return answer(503, None, **{"retry-after": "0.2"})
        return answer(200, {"credits": 1})

    with stamina.set_testing(False):
        assert run(Wire(handler), CREDITS, backoff_initial=5.0) == Credits(1, 0)
    assert 0.2 <= sent[1] - sent[0] < 2.0


def test_backoff_without_retry_after_waits_between_attempts() -> None:
    sent: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(time.monotonic())
        return answer(503) if len(sent) < 3 else answer(200, {"credits": 1})

    with stamina.set_testing(False):
        run(Wire(handler), CREDITS, backoff_initial=0.05, backoff_cap=0.5)
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert len(gaps) == 2
    assert all(0.05 <= gap < 1.0 for gap in gaps)


# ---------------------------------------------------------------------------
# Submits: never retried; ambiguous vs. nothing sent
# ---------------------------------------------------------------------------

AMBIGUOUS_FAULTS: list[httpx.Response | Handler] = [
    answer(500, {"error": "internal"}),
    answer(502, HTML_502, **{"content-type": "text/html"}),
    answer(503, b""),
    answer(504),
    answer(408),
    answer(200, b"{not json"),
    answer(200, b""),
    answer(200, ["a list"]),
    interrupted(httpx.ReadTimeout),
    interrupted(httpx.WriteTimeout),
    interrupted(httpx.ReadError),
    interrupted(httpx.WriteError),
    interrupted(httpx.RemoteProtocolError),
]


@pytest.mark.parametrize("op", ["create", "batch"])
@pytest.mark.parametrize("fault", AMBIGUOUS_FAULTS)
def test_submit_that_may_have_been_processed_is_ambiguous_and_not_retried(
    op: str, fault: httpx.Response | Handler
) -> None:
    wire = Wire(fault, answer(200, {"task_id": "t", "batch_id": "b", "tasks": []}))
    raised = fails(wire, OPS[op], max_attempts=5)
    assert type(raised) is AmbiguousSubmitError
    assert "may have been processed" in raised.message
    assert len(wire.requests) == 1


@pytest.mark.parametrize("op", ["create", "batch"])
@pytest.mark.parametrize("fault", [httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout])
def test_submit_that_never_left_is_temporary_and_not_retried(
    op: str, fault: type[httpx.TransportError]
) -> None:
    wire = Wire(interrupted(fault), answer(200, {"task_id": "t"}))
    raised = fails(wire, OPS[op], max_attempts=5)
    assert type(raised) is TemporaryAPIError
    assert fault.__name__ in raised.message
    assert len(wire.requests) == 1


@pytest.mark.parametrize("op", ["create", "batch"])
def test_rate_limited_submit_is_raised_not_retried(op: str) -> None:
    wire = Wire(answer(429, None, **{"retry-after": "3"}), answer(200, {"task_id": "t"}))
    raised = fails(wire, OPS[op], max_attempts=5)
    assert type(raised) is RateLimitedError
    assert raised.retry_after == 3.0
    assert len(wire.requests) == 1


def test_create_sends_the_item_with_the_key_and_returns_the_task_id() -> None:
    wire = Wire(answer(200, {"message": "success", "task_id": "task-9", "extra": 1}))
    item = {"custom_mode": False, "mv": "sonic-v5", "gpt_description_prompt": "lofi"}
    assert run(wire, lambda api: api.create(item)) == "task-9"
    (request,) = wire.requests
    assert request.method == "POST"
    assert request.url == f"{BASE}/sonic/create"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert json.loads(request.content) == item


# ---------------------------------------------------------------------------
# Batch submit: per-item results
# ---------------------------------------------------------------------------

ITEMS = [{"mv": "sonic-v5", "gpt_description_prompt": f"p{i}"} for i in range(3)]


def submit(body: Any, items: list[dict[str, Any]] = ITEMS) -> BatchSubmission:
    return run(Wire(answer(200, body)), lambda api: api.submit_batch(items))


def test_batch_request_shape() -> None:
    wire = Wire(answer(200, {"batch_id": "b", "tasks": [{"index": 0, "task_id": "t0"}]}))
    run(
        wire,
        lambda api: api.submit_batch(
            ITEMS[:1], webhook_url="https://hook.test/x", webhook_secret="whsec"
        ),
    )
    (request,) = wire.requests
    assert request.url == f"{BASE}/sonic/batch"
    assert json.loads(request.content) == {
        "items": ITEMS[:1],
        "webhook_url": "https://hook.test/x",
        "webhook_secret": "whsec",
    }


def test_batch_results_in_item_order() -> None:
    body = {
        "message": "success",
        "batch_id": "b-1",
        "submitted": 2,
        "tasks": [
            {"index": 2, "task_id": "t2"},
            {"index": 0, "task_id": "t0"},
            {"index": 1, "type": "forbidden", "error": "copyrighted lyrics"},
        ],
    }
    assert submit(body) == BatchSubmission(
        "b-1",
        (Accepted(0, "t0"), Rejected(1, "forbidden", "copyrighted lyrics"), Accepted(2, "t2")),
        submitted=2,
    )


def test_batch_answer_the_client_cannot_attribute_holds_items_and_keeps_task_ids() -> None:
    # Indexes that fit both bases, rejected items left out: nobody can say
    # whose t1 and t2 are, so no item gets a task and both ids are kept.
    body = {
        "batch_id": "b",
        "tasks": [{"index": 1, "task_id": "t1"}, {"index": 2, "task_id": "t2"}],
    }
    with capture_logs() as logs:
        got = submit(body)
    assert got.batch_id == "b"
    assert [type(r) for r in got.results] == [Unconfirmed, Unconfirmed, Unconfirmed]
    assert got.orphans == ("t1", "t2")
    unconfirmed = next(e for e in logs if e["event"] == "api.batch_unconfirmed")
    assert unconfirmed["orphans"] == ["t1", "t2"]
    shape = next(e for e in logs if e["event"] == "api.unexpected_shape")
    assert shape["endpoint"] == "batch_submit"
    assert "indexes that fit no single base" in shape["shape"]
    assert '"t1"' in shape["body"]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"batch_id": "b", "tasks": "nope"}, "tasks is not a list"),
        ({"tasks": {"t": 1}}, "tasks is not a list"),
        (["a", "list"], "not an object"),
    ],
)
def test_unreadable_batch_answer_is_ambiguous(body: Any, named: str) -> None:
    wire = Wire(answer(200, body))
    raised = fails(wire, lambda api: api.submit_batch(ITEMS))
    assert type(raised) is AmbiguousSubmitError
    assert named in raised.message
    assert len(wire.requests) == 1


@pytest.mark.parametrize("count", [0, 11])
def test_batch_size_is_checked_before_sending(count: int) -> None:
    wire = Wire(answer(200, {}))
    with pytest.raises(ValueError, match="1 to 10 items"):
        run(wire, lambda api: api.submit_batch([{"mv": "sonic-v5"}] * count))
    assert wire.requests == []


# ---------------------------------------------------------------------------
# Polls and tolerance rules
# ---------------------------------------------------------------------------


def poll(response: httpx.Response) -> TaskStatus:
    return run(Wire(response), lambda api: api.poll_task("t-1"))


@pytest.mark.parametrize(
    ("response", "status", "failure_type", "error"),
    [
        (answer(202, {"type": "not_ready"}), "running", None, None),
        (answer(202, b""), "running", None, None),
        (answer(200, {"type": "not_ready"}), "running", None, None),
        (
            answer(200, {"type": "failed", "error": "upstream boom"}),
            "failed",
            "failed",
            "upstream boom",
        ),
        (answer(200, {"type": "timeout"}), "failed", "timeout", "task timeout"),
        (
            answer(200, {"type": "forbidden", "message": "moderated"}),
            "failed",
            "forbidden",
            "moderated",
        ),
        (answer(200, {"type": "api_error", "error": "x"}), "failed", "api_error", "x"),
        (answer(200, {"code": 200, "data": [clip("a"), clip("b")]}), "succeeded", None, None),
        (
            answer(200, {"code": 200, "data": [clip("a"), clip("b", "streaming")]}),
            "running",
            None,
            None,
        ),
        (answer(200, {"data": [clip("a"), clip("b", "failed")]}), "succeeded", None, None),
        (
            answer(200, {"data": [clip("a", "failed"), clip("b", "failed")]}),
            "failed",
            "failed",
            "every clip failed",
        ),
        (
            answer(200, {"data": [clip("a", "succeeded", audio_url=""), clip("b")]}),
            "running",
            None,
            None,
        ),
        (answer(200, {"data": [clip("a", "queued-v9"), clip("b")]}), "running", None, None),
        (answer(200, {"code": 200, "message": "success", "data": []}), "running", None, None),
        (answer(200, {"code": 200, "message": "success"}), "running", None, None),
        (answer(200, {"data": clip("a")}), "succeeded", None, None),
    ],
)
def test_poll_task_status_rules(
    response: httpx.Response, status: str, failure_type: str | None, error: str | None
) -> None:
    got = poll(response)
    assert (got.task_id, got.index, got.status) == ("t-1", None, status)
    assert (got.failure_type, got.error) == (failure_type, error)


def test_poll_task_path_is_quoted() -> None:
    wire = Wire(answer(202))
    run(wire, lambda api: api.poll_task("a/b?c"))
    assert wire.requests[0].url.raw_path == b"/api/v1/sonic/task/a%2Fb%3Fc"


def test_clip_fields_are_read_leniently() -> None:
    full = clip(
        "a",
        title="Night Drive",
        lyrics="[Verse]",
        tags="synthwave",
        image_url="https://cdn.test/a.jpg",
        created_at="2026-01-01T00:00:00Z",
        duration="183.5",
        video_url=None,
        mv="sonic-v5",
        brand_new_field={"x": 1},
    )
    sparse = {"clip_id": "b", "state": "succeeded", "audio_url": "https://cdn.test/b.mp3"}
    got = poll(answer(200, {"code": 200, "data": [full, sparse]}))
    assert got.clips == (
        Clip(
            "a",
            "succeeded",
            "https://cdn.test/a.mp3",
            183.5,
            "Night Drive",
            "[Verse]",
            "synthwave",
            "https://cdn.test/a.jpg",
            "2026-01-01T00:00:00Z",
            mv="sonic-v5",
        ),
        Clip("b", "succeeded", "https://cdn.test/b.mp3", None, None, None, None, None, None),
    )
    assert all(c.done for c in got.clips)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (120, 120.0),
        (95.25, 95.25),
        ("183.5", 183.5),
        (" 60 ", 60.0),
        ("3:05", None),
        ("", None),
        (None, None),
        (True, None),
        (-1, None),
        ("nan", None),
        ([1], None),
    ],
)
def test_duration_number_or_string(value: Any, expected: float | None) -> None:
    got = poll(answer(200, {"data": [clip("a", duration=value)]}))
    assert got.clips[0].duration == expected


def test_clip_done_and_failed() -> None:
    def make(state: str, url: str | None) -> Clip:
        return Clip("c", state, url, None, None, None, None, None, None)

    assert make("succeeded", "https://x").done
    assert not make("succeeded", "").done
    assert not make("succeeded", None).done
    assert not make("streaming", "https://x").done
    assert make("failed", None).failed
    assert not make("running", None).failed


@pytest.mark.parametrize(
    "body",
    [
        [clip("a")],
        {"something": "else"},
        {"data": [{"state": "succeeded"}]},
        {"data": ["not a clip"]},
        {"data": "nope"},
    ],
)
def test_unreadable_poll_body_is_temporary_and_retried(body: Any) -> None:
    wire = Wire(answer(200, body))
    raised = fails(wire, POLL, max_attempts=2)
    assert type(raised) is TemporaryAPIError
    assert raised.message.startswith("unreadable answer")
    assert len(wire.requests) == 2


def test_poll_batch_entries_of_both_shapes() -> None:
    body = {
        "batch_id": "b-1",
        "tasks": [
            {"index": 0, "task_id": "t0", "status": "running", "data": []},
            {"index": 1, "task_id": "t1", "status": "pending"},
            {"index": 2, "task_id": "t2", "status": "succeeded", "data": [clip("a"), clip("b")]},
            {"index": 3, "task_id": "t3", "status": "failed", "type": "failed", "error": "boom"},
            {"index": 4, "task_id": "t4", "status": "failed"},
            {"index": 5, "task_id": "t5", "code": 200, "message": "success", "data": [clip("c")]},
            {"index": 6, "task_id": "t6", "type": "timeout", "error": "took too long"},
            {"index": 7, "task_id": "t7", "status": "succeeded", "data": []},
            {"index": 8, "task_id": "t8", "status": "running", "data": [clip("d"), clip("e")]},
            {"index": 9, "task_id": "t9", "status": "weird-new-state", "data": [clip("f", "x")]},
        ],
        "unknown": True,
    }
    wire = Wire(answer(200, body))
    known = {i: f"t{i}" for i in range(10)}
    got = run(wire, lambda api: api.poll_batch("b-1", known))
    assert wire.requests[0].url.params["batch_id"] == "b-1"
    assert [(s.task_id, s.index, s.status, s.failure_type, s.error) for s in got.statuses] == [
        ("t0", 0, "running", None, None),
        ("t1", 1, "pending", None, None),
        ("t2", 2, "succeeded", None, None),
        ("t3", 3, "failed", "failed", "boom"),
        ("t4", 4, "failed", "failed", "task failed"),
        ("t5", 5, "succeeded", None, None),
        ("t6", 6, "failed", "timeout", "took too long"),
        ("t8", 8, "succeeded", None, None),
        ("t9", 9, "running", None, None),
    ]
    # "succeeded" with no clips says nothing to download: the task endpoint is asked.
    assert got.unread == ("t7",)


def test_poll_batch_leaves_unreadable_entries_to_the_task_endpoint() -> None:
    body = {
        "tasks": [
            {"index": 0, "status": "running"},
            "garbage",
            {"index": 2, "task_id": "t2", "data": [{"state": "succeeded"}]},
            {"index": 3, "task_id": "t3", "status": "running"},
        ]
    }
    known = {0: "t0", 1: "t1", 2: "t2", 3: "t3"}
    with capture_logs() as logs:
        got = run(Wire(answer(200, body)), lambda api: api.poll_batch("b", known))
    # t0 is placed by its index; "garbage" names nothing; t2's clips are unreadable.
    assert [s.task_id for s in got.statuses] == ["t0", "t3"]
    assert set(got.unread) == {"t1", "t2"}
    assert [e["event"] for e in logs] == ["api.unexpected_shape"]


@pytest.mark.parametrize("body", [{"batch_id": "b"}, {"tasks": {}}, [], "x"])
def test_poll_batch_without_tasks_list_is_temporary(body: Any) -> None:
    raised = fails(Wire(answer(200, body)), POLL_BATCH, max_attempts=1)
    assert type(raised) is TemporaryAPIError


# ---------------------------------------------------------------------------
# Credits
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"credits": 50, "extra_credits": 10}, Credits(50, 10)),
        ({"credits": 50}, Credits(50, 0)),
        ({"credits": "45", "extra_credits": 5.0, "plan": "pro"}, Credits(45, 5)),
    ],
)
def test_credits(body: dict[str, Any], expected: Credits) -> None:
    wire = Wire(answer(200, body))
    got = run(wire, CREDITS)
    assert got == expected
    assert got.total == expected.credits + expected.extra_credits
    assert wire.requests[0].url == f"{BASE}/get-credits"


@pytest.mark.parametrize("body", [{}, {"credits": "lots"}, {"credits": 1.5}, {"credits": None}])
def test_unreadable_credits_are_temporary(body: dict[str, Any]) -> None:
    assert type(fails(Wire(answer(200, body)), CREDITS)) is TemporaryAPIError


# ---------------------------------------------------------------------------
# GET retries
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["poll", "poll_batch", "credits"])
@pytest.mark.parametrize(
    "fault",
    [
        answer(503),
        answer(500, HTML_502),
        answer(429),
        answer(200, b"<html>oops</html>"),
        interrupted(httpx.ReadTimeout),
        interrupted(httpx.ConnectError),
        interrupted(httpx.RemoteProtocolError),
    ],
)
def test_gets_retry_temporary_faults_up_to_max_attempts(
    op: str, fault: httpx.Response | Handler
) -> None:
    good = {"credits": 1, "batch_id": "b", "tasks": [], "type": "not_ready"}
    wire = Wire(fault, fault, answer(200, good))
    run(wire, OPS[op], max_attempts=3)
    assert len(wire.requests) == 3

    wire = Wire(fault)
    raised = fails(wire, OPS[op], max_attempts=3)
    assert isinstance(raised, TemporaryAPIError)
    assert len(wire.requests) == 3


@pytest.mark.parametrize(
    ("op", "response"),
    [
        ("poll", answer(404)),
        ("poll", answer(400, {"error": "task not found."})),
        ("poll_batch", answer(401)),
        ("credits", answer(403, {"error": "no subscription"})),
    ],
)
def test_gets_do_not_retry_permanent_errors(op: str, response: httpx.Response) -> None:
    wire = Wire(response)
    assert isinstance(fails(wire, OPS[op], max_attempts=5), PermanentAPIError)
    assert len(wire.requests) == 1


def test_every_failed_attempt_is_logged_with_its_context() -> None:
    wire = Wire(
        answer(503, None, **{"x-request-id": "r1"}),
        interrupted(httpx.ReadTimeout),
        answer(200, {"credits": 3}),
    )
    with capture_logs() as logs:
        run(wire, CREDITS)
    errors = [e for e in logs if e["event"] == "api.error"]
    assert [
        {k: e[k] for k in ("method", "path", "status", "request_id", "attempt", "error")}
        for e in errors
    ] == [
        {
            "method": "GET",
            "path": "/get-credits",
            "status": 503,
            "request_id": "r1",
            "attempt": 1,
            "error": "TemporaryAPIError",
        },
        {
            "method": "GET",
            "path": "/get-credits",
            "status": None,
            "request_id": None,
            "attempt": 2,
            "error": "TemporaryAPIError",
        },
    ]
    assert all(e["log_level"] == "warning" for e in errors)


def test_permanent_errors_log_at_error_level() -> None:
    with capture_logs() as logs:
        fails(Wire(answer(400, {"error": "prompt: empty"})), CREDITS)
    (entry,) = [e for e in logs if e["event"] == "api.error"]
    assert entry["log_level"] == "error"
    assert entry["message"] == "prompt: empty"


# ---------------------------------------------------------------------------
# Download
# ---------------------------------------------------------------------------

AUDIO = bytes(range(256)) * 40  # 10 KiB
CDN = "https://cdn.test/audio/c1.mp3?token=signed-secret"


async def chunks(
    data: bytes, size: int = 1024, fail_after: int | None = None
) -> AsyncIterator[bytes]:
    for n, start in enumerate(range(0, len(data), size)):
        if fail_after is not None and n == fail_after:
            raise httpx.ReadError("connection dropped")
        yield data[start : start + size]


def audio(
    data: bytes = AUDIO, *, length: int | None = None, fail_after: int | None = None
) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"content-length": str(len(data) if length is None else length)}
        return httpx.Response(200, headers=headers, content=chunks(data, fail_after=fail_after))

    return handler


def download(wire: Wire, dest: Path, url: str = CDN, **options: Any) -> int:
    return run(wire, lambda api: api.download(url, dest), **options)


def test_download_streams_the_body_to_dest(tmp_path: Path) -> None:
    dest = tmp_path / "c1.mp3.tmp"
    wire = Wire(audio())
    assert download(wire, dest) == len(AUDIO)
    assert dest.read_bytes() == AUDIO
    (request,) = wire.requests
    # Audio lives on another host: the key must not travel there.
    assert "authorization" not in request.headers


def test_download_on_the_api_origin_sends_the_key(tmp_path: Path) -> None:
    wire = Wire(audio())
    download(wire, tmp_path / "a", url="https://api.test/audio/c1.mp3")
    assert wire.requests[0].headers["authorization"] == f"Bearer {KEY}"


def test_download_follows_redirects_without_leaking_the_key(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "api.test":
            return httpx.Response(302, headers={"location": CDN})
        return audio()(request)

    wire = Wire(handler)
    assert download(wire, tmp_path / "a", url="https://api.test/audio/c1.mp3") == len(AUDIO)
    assert [r.url.host for r in wire.requests] == ["api.test", "cdn.test"]
    assert "authorization" not in wire.requests[1].headers


def test_download_without_content_length_takes_what_comes(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=chunks(AUDIO))

    assert download(Wire(handler), tmp_path / "a") == len(AUDIO)


def test_truncated_body_is_retried_and_dest_rewritten(tmp_path: Path) -> None:
    dest = tmp_path / "a"
    wire = Wire(audio(AUDIO[:5000], length=len(AUDIO)), audio())
    assert download(wire, dest) == len(AUDIO)
    assert dest.read_bytes() == AUDIO
    assert len(wire.requests) == 2


@pytest.mark.parametrize(
    ("handler", "message"),
    [
        (audio(AUDIO[:5000], length=len(AUDIO)), "audio body truncated: 5000 of 10240 bytes"),
        (audio(fail_after=3), "network fault (ReadError: connection dropped)"),
        (interrupted(httpx.RemoteProtocolError), "network fault (RemoteProtocolError"),
    ],
)
def test_short_or_dropped_download_is_temporary_after_retries(
    tmp_path: Path, handler: Handler, message: str
) -> None:
    wire = Wire(handler)
    with capture_logs() as logs:
        raised = fails(wire, lambda api: api.download(CDN, tmp_path / "a"), max_attempts=3)
    assert type(raised) is TemporaryAPIError
    assert raised.message.startswith(message)
    assert len(wire.requests) == 3
    # The signed query string stays out of the log.
    assert {e["path"] for e in logs if e["event"] == "api.error"} == {"/audio/c1.mp3"}


@pytest.mark.parametrize("status", [403, 404, 410])
def test_expired_audio_url(tmp_path: Path, status: int) -> None:
    wire = Wire(answer(status, "<Error><Code>AccessDenied</Code></Error>"))
    raised = fails(wire, lambda api: api.download(CDN, tmp_path / "a"))
    assert type(raised) is AudioExpiredError
    assert raised.status == status
    assert len(wire.requests) == 1


def test_download_5xx_is_retried(tmp_path: Path) -> None:
    wire = Wire(answer(503), audio())
    assert download(wire, tmp_path / "a") == len(AUDIO)
    assert len(wire.requests) == 2


def test_download_error_body_is_read_only_in_part(tmp_path: Path) -> None:
    huge = b"x" * 1_000_000

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, content=chunks(huge, size=4096))

    raised = fails(Wire(handler), lambda api: api.download(CDN, tmp_path / "a"), max_attempts=1)
    assert raised.message == "x" * 199 + "…"


@pytest.mark.parametrize("url", ["", "ftp://cdn.test/a.mp3", "/relative.mp3", "http://"])
def test_unusable_audio_url_is_expired_without_a_request(tmp_path: Path, url: str) -> None:
    wire = Wire(audio())
    raised = fails(wire, lambda api: api.download(url, tmp_path / "a"))
    assert type(raised) is AudioExpiredError
    assert wire.requests == []


def test_unwritable_dest_is_an_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="cannot write"):
        download(Wire(audio()), tmp_path / "missing-dir" / "a")


# ---------------------------------------------------------------------------
# Construction and secrets (rule 10)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "key"),
    [
        ("ftp://api.test", KEY),
        ("api.test/api/v1", KEY),
        ("http://[::1", KEY),
        (BASE, ""),
        (BASE, "   "),
        (BASE, "sk-SECRET 123"),
        (BASE, "sk-SECRET-123\r\nX-Evil: 1"),
    ],
)
def test_bad_construction_is_a_config_error_that_hides_the_key(base_url: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        MusicAPI(base_url, key)
    assert "SECRET" not in str(caught.value)


@pytest.mark.parametrize(
    "key", [f"{KEY}\n", pydantic.SecretStr(KEY), pydantic.SecretStr(f" {KEY}")]
)
def test_key_from_a_file_or_secretstr(key: str | pydantic.SecretStr) -> None:
    wire = Wire(answer(200, {"credits": 1}))

    async def main() -> None:
        async with MusicAPI(BASE, key, transport=httpx.MockTransport(wire)) as api:
            await api.get_credits()

    asyncio.run(main())
    assert wire.requests[0].headers["authorization"] == f"Bearer {KEY}"


def test_max_attempts_must_allow_one_try() -> None:
    with pytest.raises(ConfigError, match="max_attempts"):
        MusicAPI(BASE, KEY, max_attempts=0)


def test_an_injected_logger_is_used() -> None:
    with capture_logs() as logs:
        log = structlog.get_logger("test").bind(component="musicapi-test")
        fails(Wire(answer(404)), POLL, log=log)
    assert [(e["event"], e["component"]) for e in logs] == [("api.error", "musicapi-test")]


def test_repr_hides_the_key() -> None:
    api = MusicAPI(BASE, KEY)
    assert repr(api) == "MusicAPI(base_url='https://api.test/api/v1')"
    assert KEY not in str(api)
    asyncio.run(api.aclose())


SECRET_SCENARIOS: list[tuple[Op, Any]] = [
    (CREATE, answer(400, {"error": f"field x: bad, key {KEY} rejected"})),
    (CREDITS, answer(401, f"invalid key {KEY}")),
    (CREATE, answer(402, {"message": f"{KEY} has no credits"})),
    (CREATE, answer(403, {"error": "copyrighted"})),
    (POLL, answer(404)),
    (BATCH, answer(405)),
    (CREDITS, answer(429, None, **{"retry-after": "999"})),
    (POLL_BATCH, answer(500, f"<html><title>{KEY}</title></html>")),
    (CREATE, answer(502)),
    (CREATE, answer(200, f"not json {KEY}")),
    (BATCH, answer(200, {"batch_id": KEY, "tasks": "nope"})),
    (POLL, answer(200, {"code": 401, "message": f"bad key {KEY}"})),
    (CREATE, interrupted(httpx.ReadTimeout)),
    (CREATE, interrupted(httpx.ConnectError)),
    (CREDITS, interrupted(httpx.RemoteProtocolError)),
    (
        lambda api: api.download(f"https://api.test/a.mp3?k={KEY}", Path("/nonexistent/x")),
        answer(403, KEY),
    ),
    (
        lambda api: api.download("https://cdn.test/a.mp3", Path("x")),
        audio(AUDIO[:10], length=100),
    ),
]


def chain(error: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = error
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


@pytest.mark.parametrize(("op", "fault"), SECRET_SCENARIOS)
def test_the_key_never_appears_in_errors_or_logs(
    op: Op, fault: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # downloads write to a relative path
    with capture_logs() as logs:
        raised = fails(Wire(fault), op, max_attempts=2)
    for error in chain(raised):
        assert KEY not in str(error)
        assert KEY not in repr(error)
        assert KEY not in repr(vars(error))
        # No httpx exception rides along: it would hold the request's headers.
        assert not isinstance(error, httpx.HTTPError)
    assert logs
    assert KEY not in repr(logs)


# ---------------------------------------------------------------------------
# The token bucket every API request passes
# ---------------------------------------------------------------------------


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))
        self.now += seconds


@pytest.mark.parametrize(
    ("rate", "burst", "requests", "waits"),
    [
        (4.0, None, 4, []),  # a burst of `rate` goes at once
        (4.0, None, 6, [0.25, 0.25]),  # then one every 1/rate s
        (2.0, 1.0, 3, [0.5, 0.5]),
        (0.5, None, 2, [2.0]),  # a rate below one still allows one request at once
    ],
)
def test_token_bucket_spaces_requests(
    rate: float, burst: float | None, requests: int, waits: list[float]
) -> None:
    fake = FakeTime()
    bucket = TokenBucket(rate, burst=burst, clock=fake.clock, sleep=fake.sleep)

    async def main() -> None:
        for _ in range(requests):
            await bucket.take()

    asyncio.run(main())
    assert fake.slept == waits


def test_every_api_request_takes_a_token() -> None:
    fake = FakeTime()
    bucket = TokenBucket(1.0, clock=fake.clock, sleep=fake.sleep)
    wire = Wire(answer(200, {"credits": 5}))
    for _ in range(3):
        run(wire, CREDITS, bucket=bucket)
    assert len(wire.requests) == 3
    assert fake.slept == [1.0, 1.0]
