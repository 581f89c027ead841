"""The sandbox's HTTP face: a Starlette app speaking the MusicAPI protocol.

Requests pass through :class:`FaultLayer` first, which counts them, injects
request-level faults (429, 5xx, resets, slow or dropped responses, 401,
expired or truncated audio) and checks the bearer key; then the route
handlers below turn them into calls on :class:`~reconciler.sandbox.state.SandboxState`
and pass batch answers through ``shapes.py`` for the shape profiles in force.
``server.py`` runs the app under uvicorn and supplies the
:class:`Connections` registry, which is how a fault closes a connection
without answering: ASGI itself has no way to say "hang up".

Routes (all under the base URL ``/api/v1`` except the sandbox's own)::

    POST /api/v1/sonic/create            GET  /api/v1/sonic/task/{task_id}
    POST /api/v1/sonic/batch             GET  /api/v1/sonic/batch?batch_id=
    GET  /api/v1/get-credits             GET  /_sandbox/audio/{clip_id}.mp3  (no key)
    GET  /_sandbox/image/{clip_id}.png   (no key)
    GET  /_sandbox/stats                 POST /_sandbox/reset
    GET  /_sandbox/config                POST /_sandbox/config
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from http import HTTPStatus
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reconciler.limits import MAX_BATCH_ITEMS
from reconciler.sandbox.faults import FaultProfileError, FaultRule
from reconciler.sandbox.shapes import batch_problem, poll_answer, submit_body
from reconciler.sandbox.state import SandboxState, Task
from reconciler.sandbox.validation import validate_webhook
from reconciler.sandbox.webhooks import WebhookSender

API = "/api/v1"
# The ticker re-reads the clock at least this often, so an injected clock that
# jumps (tests) still gets its refunds and webhooks on time.
TICK_SECONDS = 0.05

Peer = tuple[str, int]


class Connections:
    """Open client connections by peer address, filled by the server's protocol class."""

    def __init__(self) -> None:
        self._by_peer: dict[Peer, asyncio.Transport] = {}

    def add(self, peer: Peer, transport: asyncio.Transport) -> None:
        self._by_peer[peer] = transport

    def discard(self, peer: Peer) -> None:
        self._by_peer.pop(peer, None)

    def close(self, peer: Peer, *, reset: bool) -> None:
        """Close a client's connection: with a TCP reset (RST) or a plain close (FIN)."""
        transport = self._by_peer.get(peer)
        if transport is None:
            raise RuntimeError(
                f"no open connection from {peer}: is the app served by SandboxServer?"
            )
        if reset:
            sock = transport.get_extra_info("socket")
            # Linger on, timeout zero: close() then sends RST instead of FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()
        else:
            transport.close()


def classify(method: str, path: str) -> str | None:
    """The fault-and-counter endpoint name of a request; None for control and unknown paths."""
    if path.startswith("/_sandbox/audio/"):
        return "audio"
    if not path.startswith(API):
        return None
    rest = path[len(API) :]
    if rest == "/sonic/create" and method == "POST":
        return "create"
    if rest == "/sonic/batch":
        return {"POST": "batch_submit", "GET": "batch_poll"}.get(method)
    if rest.startswith("/sonic/task/") and method == "GET":
        return "task_poll"
    if rest == "/get-credits" and method == "GET":
        return "credits"
    return None


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSONResponse({"type": kind, "error": message}, status_code=status, headers=headers)


def _html_error(status: int) -> Response:
    title = f"{status} {HTTPStatus(status).phrase}"
    page = (
        f"<html><head><title>{title}</title></head><body>"
        f"<center><h1>{title}</h1></center><hr><center>nginx</center></body></html>"
    )
    return Response(page, status_code=status, media_type="text/html")


def _cdn_error(status: int) -> Response:
    code, message = (
        ("AccessDenied", "Request has expired") if status == 403 else ("NoSuchKey", "Not found")
    )
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
    )
    return Response(body, status_code=status, media_type="application/xml")


class FaultLayer:
    """ASGI wrapper: count, inject request-level faults, check the key, then route."""

    def __init__(self, app: ASGIApp, state: SandboxState, connections: Connections) -> None:
        self.app = app
        self.state = state
        self.connections = connections

    def _authorized(self, scope: Scope) -> bool:
        expected = f"Bearer {self.state.config.key}".encode()
        for name, value in scope["headers"]:
            if name == b"authorization":
                return hmac.compare_digest(value, expected)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = classify(scope["method"], scope["path"])
        if endpoint is None:
            path = scope["path"]
            public = path.startswith("/_sandbox/image/")
            if path.startswith("/_sandbox/") and not public and not self._authorized(scope):
                await self._unauthorized(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return

        request_id = self.state.count_request(endpoint)
        if endpoint != "audio":
            send = _with_header(send, b"x-request-id", request_id.encode())
        rule = self.state.injector.on_request(endpoint)
        if rule is not None and rule.kind == "slow":
            # The request is handled at once and only the answer is late, so a
            # submit that times out on the client has still created its tasks.
            send = _delayed(send, rule.delay, self.state.stopping)
            rule = None
        if rule is not None and await self._answer_fault(rule, scope, receive, send):
            return
        if endpoint != "audio" and not self._authorized(scope):
            await self._unauthorized(scope, receive, send)
            return
        if rule is not None and rule.kind == "drop_response":
            await self.app(scope, receive, _discard)
            await self._hang_up(scope, receive, reset=False)
            return
        await self.app(scope, receive, send)

    async def _answer_fault(
        self, rule: FaultRule, scope: Scope, receive: Receive, send: Send
    ) -> bool:
        """Carry out a fault that decides the answer; False leaves the request to the handler.

        (``drop_response`` also answers False: it runs the handler, after the key check.)
        """
        response: Response
        if rule.kind == "rate_limited":
            headers = {}
            if rule.retry_after is not None:
                headers["Retry-After"] = f"{rule.retry_after:g}"
            response = _error(429, "rate_limited", "too many requests", headers)
        elif rule.kind == "server_error":
            status = rule.status or 503
            response = _html_error(status) if rule.body == "html" else Response(status_code=status)
        elif rule.kind == "unauthorized":
            await self._unauthorized(scope, receive, send)
            return True
        elif rule.kind == "audio_expired":
            response = _cdn_error(rule.status or 403)
        elif rule.kind == "connection_reset":
            await self._hang_up(scope, receive, reset=True)
            return True
        elif rule.kind == "audio_truncated":
            truncate = _Truncate(send, rule.fraction, hang_up=rule.mode == "hang_up")
            await self.app(scope, receive, truncate)
            if truncate.cut_off:
                await self._hang_up(scope, receive, reset=False)
            return True
        else:
            return False
        await response(scope, receive, send)
        return True

    async def _unauthorized(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _error(401, "unauthorized", "invalid or missing API key")(scope, receive, send)

    async def _hang_up(self, scope: Scope, receive: Receive, *, reset: bool) -> None:
        client = scope["client"]
        self.connections.close((client[0], client[1]), reset=reset)
        # Wait until the server has seen the connection go: then it knows not to
        # answer (uvicorn would otherwise send a 500 on the closed socket).
        while (await receive())["type"] != "http.disconnect":
            pass


def _with_header(send: Send, name: bytes, value: bytes) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), (name, value)]
        await send(message)

    return wrapped


class _Truncate:
    """An ASGI send that passes on only the first ``fraction`` of a 200 response's body.

    ``hang_up``: the headers keep the full Content-Length and the connection is
    to be closed after the partial body (what a dropped download looks like).
    Otherwise the Content-Length is cut to match: a shorter file, valid HTTP,
    that only decoding it can tell from the whole one.
    """

    def __init__(self, send: Send, fraction: float, *, hang_up: bool) -> None:
        self.send = send
        self.fraction = fraction
        self.hang_up = hang_up
        self.keep: int | None = None
        self.cut_off = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] == 200:
            headers = list(message.get("headers", []))
            length = next(int(value) for name, value in headers if name == b"content-length")
            self.keep = int(length * self.fraction)
            if not self.hang_up:
                headers = [(n, v) for n, v in headers if n != b"content-length"]
                headers.append((b"content-length", str(self.keep).encode()))
            message = {**message, "headers": headers}
        elif message["type"] == "http.response.body" and self.keep is not None:
            # Starlette sends a Response body in one message.
            body = message.get("body", b"")[: self.keep]
            message = {"type": "http.response.body", "body": body, "more_body": self.hang_up}
            self.cut_off = self.hang_up
        await self.send(message)


def _delayed(send: Send, delay: float, stopping: asyncio.Event) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            with suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)
        await send(message)

    return wrapped


async def _discard(message: Message) -> None:
    """An ASGI send that throws the response away (the submit is processed, the answer lost)."""


async def _json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HTTPException(400, "body: invalid JSON") from exc


def create_app(state: SandboxState, connections: Connections) -> ASGIApp:
    """The sandbox as an ASGI app over ``state``; serve it with ``server.SandboxServer``."""

    async def create(request: Request) -> Response:
        outcome = state.submit(await _json_body(request), "create")
        state.charged([outcome])
        if isinstance(outcome, Task):
            return JSONResponse({"message": "success", "task_id": outcome.task_id})
        return _error(outcome.http_status, outcome.type, outcome.error)

    async def task(request: Request) -> Response:
        state.advance()
        found = state.tasks.get(request.path_params["task_id"])
        if found is None:
            return _error(404, "not_found", "task not found.")
        status, body = state.poll_body(found)
        return JSONResponse(body, status_code=status)

    def batch_disabled() -> Response | None:
        status = state.config.faults.batch_disabled
        if status is None:
            return None
        if status == 405:
            return _error(405, "method_not_allowed", "Method Not Allowed", {"Allow": "OPTIONS"})
        return _error(404, "not_found", "Not Found")

    async def batch_submit(request: Request) -> Response:
        disabled = batch_disabled()
        if disabled is not None:
            return disabled
        body = await _json_body(request)
        if not isinstance(body, dict):
            return _error(400, "bad_request", "body: expected a JSON object")
        items = body.get("items")
        if not isinstance(items, list):
            return _error(
                400, "bad_request", f"items: required, a list of 1 to {MAX_BATCH_ITEMS} requests"
            )
        if not 1 <= len(items) <= MAX_BATCH_ITEMS:
            return _error(
                400,
                "bad_request",
                f"items: {len(items)} given, a batch holds 1 to {MAX_BATCH_ITEMS}",
            )
        problem = validate_webhook(body)
        if problem is None and "batch-400-one-bad" in state.config.shapes:
            problem = batch_problem(items)
        if problem is not None:
            return _error(400, "bad_request", problem)
        outcomes = [state.submit(item, "batch_submit", body) for item in items]
        state.charged(outcomes)
        tasks: list[dict[str, Any]] = []
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, Task):
                tasks.append({"index": index, "task_id": outcome.task_id})
            else:
                tasks.append({"index": index, "type": outcome.type, "error": outcome.error})
        answer = {
            "message": "success",
            "batch_id": state.create_batch(outcomes),
            "submitted": sum(isinstance(outcome, Task) for outcome in outcomes),
            "tasks": tasks,
        }
        return JSONResponse(submit_body(answer, state.config.shapes))

    async def batch_poll(request: Request) -> Response:
        disabled = batch_disabled()
        if disabled is not None:
            return disabled
        state.advance()
        batch_id = request.query_params.get("batch_id")
        if not batch_id:
            return _error(400, "bad_request", "batch_id: required")
        body = state.batch_body(batch_id)
        if body is None:
            return _error(404, "not_found", "batch not found.")
        status, shaped = poll_answer(body, state.config.shapes)
        return JSONResponse(shaped, status_code=status)

    async def credits(request: Request) -> Response:
        state.advance()
        return JSONResponse({"credits": state.credits, "extra_credits": 0})

    async def audio(request: Request) -> Response:
        status, data = state.audio_file(
            request.path_params["name"], request.query_params.get("expires")
        )
        if isinstance(data, str):
            return _cdn_error(status)
        return Response(data, media_type="audio/mpeg", headers={"Cache-Control": "max-age=3600"})

    async def image(request: Request) -> Response:
        data = state.image_file(request.path_params["name"])
        if data is None:
            return _cdn_error(404)
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    async def stats(request: Request) -> Response:
        return JSONResponse(state.stats())

    async def reset(request: Request) -> Response:
        state.reset()
        return JSONResponse(state.describe())

    async def config(request: Request) -> Response:
        if request.method == "POST":
            changes = await _json_body(request)
            if not isinstance(changes, dict):
                return _error(400, "bad_request", "body: expected a JSON object")
            try:
                state.configure(changes)
            except FaultProfileError as exc:
                return _error(400, "bad_request", str(exc))
        return JSONResponse(state.describe())

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = "bad_request" if exc.status_code == 400 else "not_found"
        if exc.status_code == 405:
            kind = "method_not_allowed"
        return _error(exc.status_code, kind, exc.detail, dict(exc.headers or {}))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.bind_events()
        sender = WebhookSender(state)
        sender.start()
        ticker = asyncio.create_task(_tick(state))
        try:
            yield
        finally:
            ticker.cancel()
            await asyncio.gather(ticker, return_exceptions=True)
            await sender.stop()

    routes = [
        Route(f"{API}/sonic/create", create, methods=["POST"]),
        Route(f"{API}/sonic/task/{{task_id}}", task, methods=["GET"]),
        Route(f"{API}/sonic/batch", batch_submit, methods=["POST"]),
        Route(f"{API}/sonic/batch", batch_poll, methods=["GET"]),
        Route(f"{API}/get-credits", credits, methods=["GET"]),
        Route("/_sandbox/audio/{name}", audio, methods=["GET"]),
        Route("/_sandbox/image/{name}", image, methods=["GET"]),
        Route("/_sandbox/stats", stats, methods=["GET"]),
        Route("/_sandbox/reset", reset, methods=["POST"]),
        Route("/_sandbox/config", config, methods=["GET", "POST"]),
    ]
    app = Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error}
    )
    return FaultLayer(app, state, connections)


async def _tick(state: SandboxState) -> None:
    """Carry out timed events (refunds, webhooks) even when no request comes in."""
    while True:
        state.scheduled.clear()
        state.advance()
        due = state.next_due()
        wait = TICK_SECONDS if due is None else min(max(due - state.clock(), 0.0), TICK_SECONDS)
        with suppress(TimeoutError):
            await asyncio.wait_for(state.scheduled.wait(), wait)
