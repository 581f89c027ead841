"""A reconciler and the sandbox in one process, for tests of whole passes that need no CLI.

The sandbox's ASGI app answers through ``httpx.ASGITransport`` on a manual
clock, and the ``Reconciler`` runs on a real ledger (the SQLite file, or the
database a test names with ``ledger=``) and real folders
under the test's ``tmp_path`` with an injected clock; both clocks move
together, a poll interval per pass, so generation takes no wall time and
nothing waits. Behaviour a user sees through the CLI keeps its subprocess
tests (``tests/project.py``); these cover the logic behind it in many more
cases at a fraction of the cost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import structlog
from pydantic import SecretStr

from reconciler.config import Settings
from reconciler.ledger import Ledger
from reconciler.musicapi import MusicAPI
from reconciler.reconciling import PassResult, Reconciler
from reconciler.sandbox.app import Connections, create_app
from reconciler.sandbox.config import SandboxConfig
from reconciler.sandbox.state import ManualClock, SandboxState

BASE = "http://sandbox.test"
KEY = "sandbox-key"
POLL = 1.0
LATENCY = 3.0


class World:
    """The sandbox app, a reconciler over a real ledger file, and one clock for both."""

    def __init__(self, root: Path, specs: Mapping[str, str], **settings: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.now = 1_800_000_000.0
        self.sandbox_clock = ManualClock()
        self.sandbox = SandboxState(
            SandboxConfig(latency=LATENCY, seed=1), clock=self.sandbox_clock
        )
        self.sandbox.public_base = BASE
        self.settings = Settings(
            specs_dir=root / "specs",
            out_dir=root / "tracks",
            state_dir=root / "state",
            api_url=f"{BASE}/api/v1",
            api_key=SecretStr(KEY),
            batch_window=0.0,
            poll_interval=POLL,
            **settings,
        )
        self.settings.specs_dir.mkdir()
        for name, text in specs.items():
            (self.settings.specs_dir / name).write_text(text)
        self.api = MusicAPI(
            self.settings.api_url,
            KEY,
            transport=httpx.ASGITransport(app=create_app(self.sandbox, Connections())),
            max_requests_per_second=1e6,
            log=structlog.get_logger("test"),
        )
        self.ledger = Ledger.open(self.settings.ledger_target, clock=self.clock)
        self.reconciler = Reconciler(self.settings, self.ledger, self.api, clock=self.clock)

    def clock(self) -> float:
        return self.now

    def later(self, seconds: float) -> None:
        self.now += seconds
        self.sandbox_clock.advance(seconds)

    def configure(self, **changes: Any) -> None:
        """Change the sandbox's settings (shapes, faults, ...), as ``SandboxControl.configure``."""
        self.sandbox.configure(changes)

    def run(self, max_passes: int = 20) -> list[PassResult]:
        """Passes, the clocks a poll interval apart, until every track is ready or
        nothing can move without a person (where ``sync`` stops too)."""
        results: list[PassResult] = []
        for _ in range(max_passes):
            results.append(self.one_pass())
            if results[-1].converged or results[-1].stuck:
                return results
            self.later(POLL)
        raise AssertionError(f"not settled after {max_passes} passes: {results[-1]}")

    def one_pass(self) -> PassResult:
        return self.loop.run_until_complete(self.reconciler.run_pass())

    def close(self) -> None:
        self.loop.run_until_complete(self.api.aclose())
        self.loop.close()
        self.ledger.close()
