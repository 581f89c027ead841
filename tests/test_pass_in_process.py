"""Whole passes in process: a real ``Reconciler`` and ledger against the sandbox app.

See ``tests/inprocess.py``: no process, no port and no wall-clock wait, so
each pass moves both clocks on by the poll interval. What a user depends on
is read from the outside: the output folder's files and ``tracks.json``, and
the sandbox's own books of what it charged.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest

from tests.daemonproc import expected_tracks, materialised
from tests.inprocess import LATENCY, POLL, World
from tests.reliability.support import accounting, assert_outputs_whole

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


@pytest.fixture
def world(tmp_path: Path, ledger_target: Path | str) -> Iterator[World]:
    """On each backend: the default SQLite file in the state folder, or a PostgreSQL URL."""
    w = World(tmp_path, SPECS, ledger=ledger_target if isinstance(ledger_target, str) else None)
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
    books = accounting(world.sandbox, world.settings.ledger or world.settings.state_dir)
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
    books = accounting(world.sandbox, world.settings.ledger or world.settings.state_dir)
    books.check_credits()
    # Three tracks at first, then one more for the edit.
    assert books.tasks_created == 4
    assert books.paid_twice == 0


def test_submits_the_service_turned_away_do_not_use_up_a_tracks_tries(
    tmp_path: Path, ledger_target: Path | str
) -> None:
    """Two 429s on the batch submit, then the first task fails upstream once: it is
    tried again and ready. The 429s reached no verdict on the items, so they are
    not tries: counted as such, the failure was the "third" and parked the track."""
    world = World(
        tmp_path,
        SPECS,
        ledger=ledger_target if isinstance(ledger_target, str) else None,
        backoff_initial=1.0,
        backoff_cap=4.0,
    )
    try:
        world.configure(
            faults=[
                {"kind": "rate_limited", "at": [1, 2], "endpoints": ["batch_submit"]},
                {"kind": "task_failed", "at": [1]},
            ]
        )
        final = world.run(max_passes=40)[-1]
        assert (final.total, final.ready, final.parked) == (3, 3, 0)
        books = accounting(world.sandbox, world.settings.ledger or world.settings.state_dir)
        books.check_credits()
        assert (books.tasks_created, books.failed_tasks) == (4, 1)
        assert not books.unexplained
    finally:
        world.close()


def test_submits_turned_away_in_a_row_wait_longer_each_time(tmp_path: Path) -> None:
    """Four 429s in a row on the batch submit: each wait is at least the one
    before and the last at least 4 s (ceilings 1, 2, 4, 8 s, each wait between
    half its ceiling and the ceiling), though no attempt of the items is used up."""
    world = World(tmp_path, SPECS, backoff_initial=1.0, backoff_cap=100.0)
    try:
        world.configure(
            faults=[{"kind": "rate_limited", "at": [1, 2, 3, 4], "endpoints": ["batch_submit"]}]
        )
        submitted_at: list[float] = []
        for _ in range(40):
            calls = world.sandbox.stats()["batch_submit_calls"]
            result = world.one_pass()
            if world.sandbox.stats()["batch_submit_calls"] > calls:
                submitted_at.append(world.now)
            if result.converged:
                break
            world.later(POLL)
        assert result.converged
        waits = [b - a for a, b in pairwise(submitted_at)]
        assert len(waits) == 4, submitted_at
        assert waits == sorted(waits), waits
        assert waits[-1] >= 4, waits
        fps = list(world.ledger.generations())
        assert set(world.ledger.attempts(fps).values()) == {0}
    finally:
        world.close()


def test_a_retry_after_a_task_given_up_on_counts_as_possible_double_spend(
    tmp_path: Path, ledger_target: Path | str
) -> None:
    """Two upstream failures, then a task that never finishes: the third try
    parks the track. The stuck task was charged and is not refunded, so the
    `retry` a person runs may pay twice, and status must count it."""
    spec = "defaults:\n  mv: sonic-v5\ntracks:\n  - name: rain\n    gpt_description_prompt: rain\n"
    world = World(
        tmp_path,
        {"solo.yaml": spec},
        ledger=ledger_target if isinstance(ledger_target, str) else None,
        backoff_initial=1.0,
        task_timeout=10.0,
    )
    try:
        world.configure(
            faults=[{"kind": "task_failed", "at": [1, 2]}, {"kind": "stuck", "at": [3]}]
        )
        final = world.run(max_passes=60)[-1]
        assert (final.ready, final.parked) == (0, 1)
        assert world.ledger.retry(world.ledger.parked_fingerprints()) == 1
        world.later(POLL)
        final = world.run(max_passes=20)[-1]
        assert final.ready == 1
        books = accounting(world.sandbox, world.settings.ledger or world.settings.state_dir)
        assert (books.tasks_created, books.failed_tasks, books.extra_tasks) == (4, 2, 1)
        assert not books.unexplained, books.unexplained
    finally:
        world.close()
