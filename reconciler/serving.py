"""uvicorn serving a Starlette app inside the daemon's event loop.

Where it sits: under the daemon. Both of its listeners, the webhook receiver
(``webhooks.py``, which may face the internet) and the ops listener
(``ops.py``: metrics, health, dashboard; loopback by default), are an
:class:`AppServer` each on its own socket, so a request to one never reaches
the other's routes. The daemon owns the signals; uvicorn is told not to
install its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator

import structlog
import uvicorn
from starlette.types import ASGIApp

from reconciler.errors import ConfigError

START_TIMEOUT = 10.0
#: uvicorn's wait for open requests at shutdown.
GRACEFUL_SECONDS = 1


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The daemon owns SIGTERM/SIGINT/SIGHUP; uvicorn must not install its own.
        yield


class AppServer:
    """uvicorn serving ``app`` on ``host:port`` in the running event loop.

    ``name`` is the config section the address came from (``webhook``,
    ``ops``): it names the address in errors and the ``<name>.listening`` log
    event. Port 0 takes a free port; ``port`` holds the bound one after start.
    """

    def __init__(self, app: ASGIApp, host: str, port: int, *, name: str) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.name = name
        self.log = structlog.get_logger("reconciler")
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None

    def _bind(self) -> socket.socket:
        where = f"{self.name}.listen {self.host}:{self.port}"
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(
                self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise ConfigError(f"{where}: {exc.strerror}") from exc
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"{where}: cannot listen: {exc.strerror}") from exc
        self.port = sock.getsockname()[1]
        return sock

    async def start(self) -> None:
        """Bind (a ``ConfigError`` names the address when that fails) and serve."""
        self._sock = self._bind()
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
            date_header=False,
            proxy_headers=False,
            limit_concurrency=64,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=GRACEFUL_SECONDS,
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
        deadline = time.monotonic() + START_TIMEOUT
        # uvicorn reports readiness only as a flag.
        while not self._server.started:
            if self._task.done() or time.monotonic() > deadline:
                await self.stop()
                raise ConfigError(
                    f"{self.name}.listen {self.host}:{self.port}: server did not start"
                )
            await asyncio.sleep(0.01)
        self.log.info(f"{self.name}.listening", host=self.host, port=self.port)

    @property
    def failed(self) -> bool:
        """The server task ended on its own (it only should when told to)."""
        return self._task is not None and self._task.done()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            task, self._task = self._task, None
            with contextlib.suppress(Exception):
                await task
        if self._sock is not None:
            self._sock.close()
            self._sock = None
