"""A ``reconciler run`` subprocess for the daemon, webhook and systemd tests.

The daemon runs as a real process (``python -m reconciler run``) against the
real sandbox, with real files; its JSON log lines (stderr is not a terminal)
are read back from a file so tests wait on events, never on sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reconciler.planning import fingerprint
from reconciler.sandbox import SandboxControl
from reconciler.specs import scan_specs
from tests.project import Project, wait_until

#: Short intervals for tests: the sandbox answers in about half a second.
DAEMON_CONFIG = """\
log_level = "info"

[poll]
interval = {poll}
rescan_interval = {rescan}

[submit]
batch_window = {window}
ambiguous_grace = {grace}

[retry]
backoff_initial = 0.1
backoff_cap = 1.0
request_timeout = 5.0

[api]
max_requests_per_second = 200
"""
SANDBOX_LATENCY = 0.5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon_project(
    root: Path,
    sandbox: SandboxControl,
    *,
    poll: float = 0.2,
    window: float = 0.3,
    rescan: float = 600,
    grace: float = 600,
    extra: str = "",
) -> Project:
    """A project whose config suits the daemon; the rescan interval is long
    by default so the tests prove the watcher, not the periodic rescan."""
    sandbox.configure(latency=SANDBOX_LATENCY)
    project = Project(root, sandbox)
    project.config.write_text(
        DAEMON_CONFIG.format(poll=poll, window=window, rescan=rescan, grace=grace) + extra
    )
    return project


def expected_tracks(specs: Path) -> dict[str, dict[str, str]]:
    """soundtrack → track → fingerprint, as the valid spec files say now."""
    scan = scan_specs(specs)
    return {
        spec.soundtrack: {t.name: fingerprint(t.request, t.variant) for t in spec.tracks}
        for spec in scan.files.values()
    }


def materialised(out: Path) -> dict[str, dict[str, str]]:
    """soundtrack → track → fingerprint, as the output folder's tracks.json files say."""
    found: dict[str, dict[str, str]] = {}
    if not out.is_dir():
        return found
    for listing in sorted(out.glob("*/tracks.json")):
        try:
            doc = json.loads(listing.read_text())
        except FileNotFoundError:
            continue  # pruned by the daemon between the glob and the read

        tracks = {t["track"]: t["fingerprint"] for t in doc["tracks"]}
        if all((listing.parent / t["file"]).is_file() for t in doc["tracks"]):
            found[doc["soundtrack"]] = tracks
    return found


class DaemonProc:
    """``reconciler run`` in a subprocess; use as a context manager (killed on exit)."""

    def __init__(
        self,
        project: Project,
        *extra: str,
        env: dict[str, str] | None = None,
        name: str = "daemon",
    ) -> None:
        self.project = project
        self.extra = extra
        self.env_extra = env or {}
        self.log_path = project.root / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        #: The log's events parsed so far, and how many bytes of it that was.
        self._events: list[dict[str, Any]] = []
        self._read = 0

    def env(self) -> dict[str, str]:
        env = self.project.env()
        for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "CREDENTIALS_DIRECTORY"):
            env.pop(var, None)
        env.update(self.env_extra)
        return env

    def start(self, *, wait: bool = True) -> DaemonProc:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*self.project.args("run"), *self.extra],
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        if wait:
            self.wait_event("daemon.started", timeout=30)
        return self

    def __enter__(self) -> DaemonProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        """Every JSON event of the log so far; only the lines added since the last call are read."""
        if not self.log_path.exists():
            return list(self._events)
        with self.log_path.open("rb") as log:
            log.seek(self._read)
            chunk = log.read()
        # A line still being written waits for its newline.
        whole = chunk[: chunk.rfind(b"\n") + 1]
        self._read += len(whole)
        for line in whole.decode(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    self._events.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # not an event (a traceback's line, say)
        return list(self._events)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == event]

    def wait_event(
        self,
        event: str,
        where: Callable[[dict[str, Any]], bool] = lambda e: True,
        *,
        after: int = 0,
        timeout: float = 20,
    ) -> dict[str, Any]:
        """The first ``event`` (matching ``where``) beyond the first ``after`` events of the log."""

        def find() -> dict[str, Any] | None:
            self.assert_running()
            for e in self.events()[after:]:
                if e.get("event") == event and where(e):
                    return e
            return None

        found: dict[str, Any] = wait_until(find, timeout, f"log event {event}")
        return found

    def mark(self) -> int:
        """How many log events there are now: pass to ``wait_event(after=...)``."""
        return len(self.events())

    def assert_running(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(
                f"daemon exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}"
            )

    def converged(self, timeout: float = 30) -> None:
        """Wait until the output folder holds every track the valid specs ask for."""
        wait_until(
            lambda: self.assert_running() or _matches(self.project),
            timeout,
            "outputs to match the specs",
        )

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> tuple[int, float]:
        """Send ``sig`` and wait for the exit: (exit code, seconds it took)."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=timeout)
        return code, time.monotonic() - started


def _matches(project: Project) -> bool:
    want = expected_tracks(project.specs)
    have = materialised(project.out)
    return all(have.get(st) == tracks for st, tracks in want.items())


def stopped_within(proc: DaemonProc, seconds: float) -> None:
    code, took = proc.stop()
    assert code == 0, proc.log_text()[-3000:]
    assert took < seconds, f"took {took:.1f}s to stop"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
