"""Shared pytest fixtures.

The suite runs in parallel (pytest-xdist, ``-n`` in pyproject's addopts): each
worker is its own session, so each has its own sandbox server on its own
free port, its own PostgreSQL server once a test asks for one, and tests keep
their files under ``tmp_path``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.sandbox import SandboxConfig, SandboxControl, SandboxServer
from tests.pgserver import PgServer, throwaway_server

SANDBOX_LATENCY = 0.2


@pytest.fixture(scope="session", autouse=True)
def bytecode_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Let the ``reconciler`` processes the tests start cache their bytecode.

    Where PYTHONDONTWRITEBYTECODE=1 is set (this machine sets it), every CLI
    run compiled its imports from source, about 0.6 s each: a second per
    ``status`` call, many times per test, and timings no installed copy has.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
        patch.setenv("PYTHONPYCACHEPREFIX", str(tmp_path_factory.mktemp("pycache")))
        yield


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


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One real PostgreSQL server for this worker, started the first time a test needs it.

    The machine's PostgreSQL, from ``initdb`` in a temporary folder, on a free
    127.0.0.1 port, fsync off; stopped and removed at the end of the session,
    or by its watchdog if the run is killed. Where PostgreSQL is not installed
    the tests that need it fail, saying how to install it: they never skip.
    Use ``pg_url`` for a database; this fixture is for tests of the server itself.
    """
    with throwaway_server() as server:
        yield server


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """``postgresql://postgres@127.0.0.1:PORT/test_N``: a fresh empty database for this test.

    Dropped after the test, whatever connections it left open.
    """
    with pg_server.database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_target(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a test's ledger lives, once per backend: what ``Ledger.open`` takes.

    ``sqlite``: a file under ``tmp_path`` (the default ledger); ``postgresql``:
    a fresh database on this worker's PostgreSQL server (``pg_url``), which is
    started only when such a test runs.
    """
    if request.param == "sqlite":
        return tmp_path / "ledger.sqlite3"
    url: str = request.getfixturevalue("pg_url")
    return url
