"""Run the sandbox in-process: :class:`SandboxServer`, for tests, ``--sandbox`` and the CLI.

Sits on top of the package: builds the state (``state.py``) and the app
(``app.py``) and serves them with uvicorn on a socket it binds itself, so a
port of 0 yields a free port that is known before the first request.

Two ways to run it::

    with SandboxServer(SandboxConfig(latency=0.2)) as sandbox:   # uvicorn in a thread
        client = MusicAPI(api_key=sandbox.key, base_url=sandbox.base_url)

    async with SandboxServer(config) as sandbox:                 # in the running loop
        ...

Shutdown takes a few tenths of a second and leaves no thread behind. The
server never touches signal handlers or logging configuration: those belong
to the program that embeds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from reconciler.sandbox.app import Connections, create_app
from reconciler.sandbox.config import SandboxConfig
from reconciler.sandbox.state import Clock, SandboxState

__all__ = ["SandboxConfig", "SandboxServer"]

START_TIMEOUT = 10.0
# Upper bound on waiting for open requests (a slow-fault sleeper, a download) at shutdown.
GRACEFUL_SECONDS = 1


def _protocol_class(connections: Connections) -> type[H11Protocol]:
    """uvicorn's h11 protocol, registering each connection so a fault can hang up on it."""

    class TrackedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            peer = transport.get_extra_info("peername")
            self._sandbox_peer = (str(peer[0]), int(peer[1]))
            connections.add(self._sandbox_peer, transport)

        def connection_lost(self, exc: Exception | None) -> None:
            connections.discard(self._sandbox_peer)
            super().connection_lost(exc)

    return TrackedH11Protocol


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The embedding program owns SIGINT/SIGTERM (the CLI and the daemon install their own).
        yield


class SandboxServer:
    """The sandbox served over HTTP on loopback; a sync or async context manager.

    ``base_url`` (``http://127.0.0.1:PORT/api/v1``) and ``key`` are what a
    client needs; ``url`` is the root (``/_sandbox/*`` lives there);
    ``state`` is the live :class:`~reconciler.sandbox.state.SandboxState`
    for in-process inspection. ``clock`` replaces ``time.monotonic`` for
    task timing (see :class:`~reconciler.sandbox.state.ManualClock`).
    """

    def __init__(
        self, config: SandboxConfig | None = None, *, clock: Clock = time.monotonic
    ) -> None:
        self.config = config or SandboxConfig()
        self.state = SandboxState(self.config, clock)
        self._connections = Connections()
        self._socket: socket.socket | None = None
        self._server: _EmbeddedServer | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """Root URL of the server, e.g. ``http://127.0.0.1:8123``."""
        return f"http://{self.config.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The API base URL a MusicAPI client is given."""
        return f"{self.url}/api/v1"

    @property
    def key(self) -> str:
        return self.config.key

    def __repr__(self) -> str:
        return f"SandboxServer(url={self.url!r})"

    def _prepare(self) -> tuple[_EmbeddedServer, socket.socket]:
        # proto must be TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only
        # when it is, and without it h11's separate header and body writes meet the
        # client's delayed ACK, adding 40 ms to every response.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.config.host, self.config.port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self.state.public_base = self.url
        uv_config = uvicorn.Config(
            create_app(self.state, self._connections),
            http=_protocol_class(self._connections),
            lifespan="on",
            log_config=None,
            log_level="warning",
            access_log=False,
            backlog=2048,
            timeout_graceful_shutdown=GRACEFUL_SECONDS,
        )
        self._socket = sock
        self._server = _EmbeddedServer(uv_config)
        return self._server, sock

    def _release_socket(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    # -- in a thread ---------------------------------------------------------------

    def __enter__(self) -> SandboxServer:
        server, sock = self._prepare()
        failure: list[BaseException] = []

        def run() -> None:
            async def serve() -> None:
                self._loop = asyncio.get_running_loop()
                await server.serve(sockets=[sock])

            try:
                asyncio.run(serve())
            except BaseException as exc:  # reported to the starting thread below
                failure.append(exc)

        self._thread = threading.Thread(target=run, name=f"sandbox-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        # uvicorn exposes readiness only as a flag; this waits on it with a deadline.
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"sandbox server did not start: {failure or 'timeout'}")
            time.sleep(0.005)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            if self._loop is not None and not self._loop.is_closed():
                with contextlib.suppress(RuntimeError):  # the loop may have just finished
                    self._loop.call_soon_threadsafe(self.state.stopping.set)
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._release_socket()

    # -- in the running loop ---------------------------------------------------------

    async def __aenter__(self) -> SandboxServer:
        server, sock = self._prepare()
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(server.serve(sockets=[sock]))
        deadline = time.monotonic() + START_TIMEOUT
        while not server.started:
            if self._task.done() or time.monotonic() > deadline:
                await self.__aexit__(None, None, None)
                raise RuntimeError("sandbox server did not start")
            await asyncio.sleep(0.005)
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.state.stopping.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            task, self._task = self._task, None
            with contextlib.suppress(Exception, SystemExit):
                await task
        self._release_socket()
