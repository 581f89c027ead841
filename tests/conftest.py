"""Shared pytest fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from reconciler.sandbox import SandboxConfig, SandboxControl, SandboxServer

SANDBOX_LATENCY = 0.2


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[SandboxServer]:
    """One real sandbox for the whole session, on a free 127.0.0.1 port, in a thread.

    Generation takes ``SANDBOX_LATENCY`` (0.2 s), both clips finish together,
    100,000 credits, key ``sandbox-key``, seed 1. Use the ``sandbox`` fixture
    rather than this one: it resets the server before each test.
    """
    config = SandboxConfig(latency=SANDBOX_LATENCY, seed=1)
    with SandboxServer(config) as server:
        yield server


@pytest.fixture
def sandbox(sandbox_server: SandboxServer) -> SandboxControl:
    """The shared sandbox, reset to its starting state (no tasks, zero counters, no faults).

    - ``sandbox.base_url``: ``http://127.0.0.1:PORT/api/v1``, give it to a MusicAPI client
    - ``sandbox.key``: the bearer key
    - ``sandbox.stats()``: the counters of ``GET /_sandbox/stats`` (``create_calls``,
      ``tasks_created``, ``tasks_by_fingerprint``, ``faults_fired``, ``credits``, ...)
    - ``sandbox.reset()``: forget everything again
    - ``sandbox.configure(**changes)``: change settings for this test, e.g.
      ``sandbox.configure(latency=1.0, clip_stagger=0.3, credits=20,
      faults=[{"kind": "rate_limited", "at": [1], "retry_after": 1}], batch_disabled=405)``

    The next test's reset undoes any ``configure``. For in-process access to
    the state, take ``sandbox_server`` too (``sandbox_server.state``).
    """
    control = SandboxControl(sandbox_server.base_url, sandbox_server.key)
    control.reset()
    return control
