"""A small Chrome DevTools protocol client for the dashboard's browser test.

Starts Debian's headless Chromium (``/usr/bin/chromium``) with a fresh
profile and its DevTools endpoint on a free loopback port, attaches to its
page over a websocket and sends commands one at a time. Only what the test
needs: navigate, evaluate JavaScript, take a screenshot.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import signal
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

from tests.project import wait_until

CHROMIUM = Path("/usr/bin/chromium")
INSTALLER = Path(__file__).parent.parent / "ops" / "install-chromium"
#: What headless Chromium needs in a container: no sandbox (root), no GPU,
#: and nothing that reaches the network on its own.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--autoplay-policy=no-user-gesture-required",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


class DevToolsError(Exception):
    pass


class Browser:
    """``with Browser() as b: b.navigate(url); b.evaluate("document.title")``."""

    def __init__(self, width: int = 1200, height: int = 900) -> None:
        self.size = (width, height)
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-")
        self._proc: subprocess.Popen[bytes] | None = None
        self._ws: ClientConnection | None = None
        self._stack = contextlib.ExitStack()
        self._ids = itertools.count(1)

    def __enter__(self) -> Browser:
        profile = Path(self._profile.name)
        self._proc = subprocess.Popen(
            [
                str(CHROMIUM),
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={self.size[0]},{self.size[1]}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own process group: the browser's helpers (zygote, renderer,
            # GPU) go with it, rather than writing on into the profile while
            # it is removed.
            start_new_session=True,
        )
        # Chromium writes the port it took into the profile once it listens.
        active = profile / "DevToolsActivePort"
        port = wait_until(
            lambda: active.exists() and active.read_text().split("\n")[0].strip(), 30, "DevTools"
        )
        pages = wait_until(
            lambda: [
                t
                for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=5).json()
                if t["type"] == "page"
            ],
            10,
            "a page target",
        )
        self._ws = self._stack.enter_context(
            connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=10)
        )
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stack.close()
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=10)
        self._profile.cleanup()

    def send(self, method: str, timeout: float = 30, **params: Any) -> dict[str, Any]:
        """One command and its result; events arriving meanwhile are skipped."""
        assert self._ws is not None
        ident = next(self._ids)
        self._ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv(timeout=timeout))
            if message.get("id") != ident:
                continue
            if "error" in message:
                raise DevToolsError(f"{method}: {message['error']}")
            result: dict[str, Any] = message["result"]
            return result

    def navigate(self, url: str) -> None:
        self.send("Page.enable")
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str, timeout: float = 30) -> Any:
        """The JSON value of ``expression``; promises are awaited."""
        result = self.send(
            "Runtime.evaluate",
            timeout=timeout,
            expression=expression,
            returnByValue=True,
            awaitPromise=True,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise DevToolsError(details.get("exception", {}).get("description") or str(details))
        return result["result"].get("value")

    def screenshot(self, dest: Path) -> None:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        dest.write_bytes(base64.b64decode(data["data"]))


def ensure_chromium() -> str | None:
    """None when Chromium is there (installed now if need be); else why it is not."""
    if CHROMIUM.exists():
        return None
    proc = subprocess.run([str(INSTALLER)], capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not CHROMIUM.exists():
        return f"Chromium is not installed and {INSTALLER} could not install it: {proc.stderr}"
    return None
