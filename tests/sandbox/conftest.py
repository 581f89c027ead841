"""Fixtures for the sandbox's own tests: an API client, a stepped clock, a webhook receiver."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from sandbox_helpers import Received, Stepped, WebhookReceiver

from reconciler.sandbox import ManualClock, SandboxConfig, SandboxControl, SandboxServer


@pytest.fixture
def api(sandbox: SandboxControl) -> Iterator[httpx.Client]:
    """An httpx client on the shared sandbox's base URL, with the bearer key."""
    with httpx.Client(
        base_url=sandbox.base_url,
        headers={"Authorization": f"Bearer {sandbox.key}"},
        timeout=5.0,
    ) as client:
        yield client


@pytest.fixture(scope="module")
def _stepped_server() -> Iterator[tuple[SandboxServer, ManualClock]]:
    clock = ManualClock()
    config = SandboxConfig(latency=10.0, clip_stagger=5.0, seed=3)
    with SandboxServer(config, clock=clock) as server:
        yield server, clock


@pytest.fixture
def stepped(_stepped_server: tuple[SandboxServer, ManualClock]) -> Iterator[Stepped]:
    """Generation time 10 s, second clip 5 s later, on a ManualClock; reset per test."""
    server, clock = _stepped_server
    control = SandboxControl(server.base_url, server.key)
    control.reset()
    with httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {server.key}"}, timeout=5.0
    ) as client:
        yield Stepped(server, clock, control, client)


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver()
    hook.gate.set()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with hook.lock:
                hook.waiting += 1
            hook.gate.wait(10)
            with hook.lock:
                hook.waiting -= 1
                failing = hook.fail_next > 0
                hook.fail_next -= failing
                hook.received.append(Received(dict(self.headers.items()), body))
            self.send_response(500 if failing else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            """Keep test output quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    hook.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield hook
    hook.gate.set()
    server.shutdown()
    server.server_close()
    thread.join()
