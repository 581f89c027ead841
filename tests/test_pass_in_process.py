"""Whole passes in process: a real ``Reconciler`` and ledger against the sandbox app.

The sandbox's ASGI app runs in this process behind ``httpx.ASGITransport``
on a manual clock, so generation takes no wall time and nothing waits: each
pass moves both clocks on by the poll interval. What a user depends on is
read from the outside: the output folder's files and ``tracks.json``, and
the sandbox's own books of what it charged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import structlog
from pydantic import SecretStr

from reconciler.config import Settings
from reconciler.ledger import Ledger
from reconciler.musicapi import MusicAPI
from reconciler.reconciling import PassResult, Reconciler
from reconciler.sandbox.app import Connections, create_app
from reconciler.sandbox.config import SandboxConfig
from reconciler.sandbox.state import ManualClock, SandboxState
from tests.daemonproc import expected_tracks, materialised
from tests.reliability.support import accounting, assert_outputs_whole

BASE = "http://sandbox.test"
KEY = "sandbox-key"
POLL = 1.0
LATENCY = 3.0

SPECS = {
    "study.yaml": """\
soundtrack: study
defaults:
  mv: sonic-v5
tracks:
  - name: rain
    gpt_description_prompt: lofi beats with rain
  - name: dawn
    gpt_description_prompt: slow piano at dawn
    clips: 2
""",
    "run.yaml": """\
soundtrack: run
defaults:
  mv: sonic-v5
tracks:
  - name: pace
    gpt_description_prompt: fast synthwave for running
""",
}


class World:
    """The sandbox app, a reconciler over a real ledger file, and one clock for both."""

    def __init__(self, root: Path) -> None:
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
        )
        self.settings.specs_dir.mkdir()
        for name, text in SPECS.items():
            (self.settings.specs_dir / name).write_text(text)
        self.api = MusicAPI(
            self.settings.api_url,
            KEY,
            transport=httpx.ASGITransport(app=create_app(self.sandbox, Connections())),
            max_requests_per_second=1e6,
            log=structlog.get_logger("test"),
        )
        self.ledger = Ledger.open(self.settings.ledger_path, clock=self.clock)
        self.reconciler = Reconciler(self.settings, self.ledger, self.api, clock=self.clock)

    def clock(self) -> float:
        return self.now

    def later(self, seconds: float) -> None:
        self.now += seconds
        self.sandbox_clock.advance(seconds)

    async def converge(self, max_passes: int = 20) -> list[PassResult]:
        """Passes, the clocks a poll interval apart, until every track is ready."""
        results = []
        for _ in range(max_passes):
            results.append(await self.reconciler.run_pass())
            if results[-1].converged:
                return results
            self.later(POLL)
        raise AssertionError(f"not converged after {max_passes} passes: {results[-1]}")

    def run(self, passes: int = 20) -> list[PassResult]:
        return self.loop.run_until_complete(self.converge(passes))

    def one_pass(self) -> PassResult:
        return self.loop.run_until_complete(self.reconciler.run_pass())

    def close(self) -> None:
        self.loop.run_until_complete(self.api.aclose())
        self.loop.close()
        self.ledger.close()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    yield w
    w.close()


def test_passes_write_every_track_and_the_books_match(world: World) -> None:
    results = world.run()
    # One batch for the three tracks, then polls until the sandbox's latency
    # has passed on its clock: a handful of passes, not one per second of it.
    assert sum(r.submit_calls for r in results) == 1
    assert len(results) <= LATENCY / POLL + 2
    final = results[-1]
    assert (final.total, final.ready, final.parked) == (3, 3, 0)

    # The tracks are written: each soundtrack's tracks.json lists what the
    # specs ask for, every listed file is whole audio, dawn keeps both clips.
    out = world.settings.out_dir
    assert materialised(out) == expected_tracks(world.settings.specs_dir)
    assert assert_outputs_whole(out) == 4
    assert (out / "study" / "playlist.m3u8").is_file()

    # The books: the sandbox charged one task per track, the ledger counts
    # exactly those, and nothing was paid twice.
    books = accounting(world.sandbox, world.settings.state_dir)
    books.check_credits()
    assert books.tasks_created == 3
    assert books.paid_twice == 0
    assert not books.unexplained
    assert world.ledger.spent_since(0) == 3


def test_a_pass_over_a_converged_folder_changes_and_costs_nothing(world: World) -> None:
    world.run()
    out = world.settings.out_dir
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    calls = world.sandbox.stats()
    world.later(60)
    result = world.one_pass()
    assert result.converged
    assert not result.changed
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    after = world.sandbox.stats()
    for counter in ("batch_submit_calls", "create_calls", "downloads", "credits_charged"):
        assert after[counter] == calls[counter], counter


def test_an_edited_track_is_generated_again_and_only_it(world: World) -> None:
    world.run()
    spec = world.settings.specs_dir / "run.yaml"
    spec.write_text(spec.read_text().replace("fast synthwave", "slow synthwave"))
    world.later(POLL)
    world.run()
    out = world.settings.out_dir
    assert materialised(out) == expected_tracks(world.settings.specs_dir)
    books = accounting(world.sandbox, world.settings.state_dir)
    books.check_credits()
    # Three tracks at first, then one more for the edit.
    assert books.tasks_created == 4
    assert books.paid_twice == 0
