"""Replicas for the tests: several ``reconciler run`` processes sharing one
ledger, one specs folder and one output folder, each with its own state folder.

Each replica is a real process (``tests/daemonproc.py``) against the real
sandbox. Who leads is read the way an operator reads it: ``status --json``.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from reconciler.sandbox import SandboxControl
from tests.daemonproc import DaemonProc, daemon_project
from tests.project import Project, wait_until

#: Short enough that a takeover costs the tests seconds, long enough that a
#: busy two-core machine does not take the lease from a healthy leader.
TEST_LEASE = 2.0


class ReplicaProject(Project):
    """The shared project as one replica sees it: its own state folder, the shared ledger."""

    def __init__(self, base: Project, state: Path, ledger: str) -> None:
        self.__dict__.update(base.__dict__)
        self.state = state
        self.ledger = ledger

    def args(self, command: str) -> list[str]:
        return [*super().args(command), "--ledger", self.ledger]


def shared_ledger(request: pytest.FixtureRequest, root: Path) -> str:
    """The ledger replicas share: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        # A folder's ledger.sqlite3, as the reliability books read one.
        return str(root / "shared" / "ledger.sqlite3")
    return str(request.getfixturevalue("pg_url"))


class Replicas:
    """N replicas of one project; ``start``/``kill``/``leader`` by index or process."""

    def __init__(
        self, root: Path, sandbox: SandboxControl, ledger: str, *, lease: float = TEST_LEASE,
        **config: Any,
    ) -> None:  # fmt: skip
        self.base = daemon_project(root, sandbox, extra=f"\n[ha]\nlease = {lease}\n", **config)
        self.ledger = ledger
        self.procs: list[DaemonProc] = []
        self.started = 0

    def project(self, index: int, config: Path | None = None) -> ReplicaProject:
        project = ReplicaProject(self.base, self.base.root / f"state-{index}", self.ledger)
        if config is not None:
            project.config = config
        return project

    def start(
        self, index: int | None = None, config: Path | None = None, *extra: str
    ) -> DaemonProc:
        """A new replica process (in state folder ``index``, by default a new one),
        with the shared config file or its own, and ``extra`` options for ``run``."""
        index = self.started if index is None else index
        proc = DaemonProc(self.project(index, config), *extra, name=f"replica-{self.started:02d}")
        self.started += 1
        self.procs.append(proc.start())
        return proc

    def running(self) -> list[DaemonProc]:
        return [p for p in self.procs if p.proc is not None and p.proc.poll() is None]

    @property
    def books(self) -> Path | str:
        """The ledger as the reliability books (``accounting``) take it: a
        PostgreSQL URL, or the folder of a SQLite ledger."""
        if self.ledger.startswith("postgresql://"):
            return self.ledger
        return Path(self.ledger).parent

    def status(self) -> dict[str, Any]:
        return self.project(0).status()

    def leader(self, timeout: float = 30) -> DaemonProc:
        """The running replica that holds an unexpired lease and has said so in its log."""

        def find() -> DaemonProc | None:
            lead = self.status()["leader"]
            if lead is None or lead["expired"]:
                return None
            for p in self.running():
                if p.pid == lead["pid"] and p.named("lease.acquired"):
                    return p
            return None

        found: DaemonProc = wait_until(find, timeout, "a leader")
        return found

    def kill(self, proc: DaemonProc) -> None:
        proc.send(signal.SIGKILL)
        assert proc.proc is not None
        proc.proc.wait(timeout=10)

    def close(self) -> None:
        for p in self.procs:
            p.__exit__()
