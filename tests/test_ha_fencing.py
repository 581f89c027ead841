"""A leader that lost its lease cannot submit: whole passes in process, the
sandbox's books as the proof (``tests/inprocess.py``).

The replica tests (test_ha_replicas.py) show the same with real processes,
where which of the resumed leader's steps meets the fence first is up to
timing; here each moment is chosen: a pass begun after the lease was lost,
and a takeover between the submit intent and the submit itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.errors import LeaseLostError
from reconciler.ledger import Ledger
from reconciler.ledger.lease import Identity, Lease
from tests.inprocess import World

SPEC = """\
defaults:
  mv: sonic-v5
tracks:
  - name: a
    gpt_description_prompt: fenced a
  - name: b
    gpt_description_prompt: fenced b
"""
LEASE = 15.0


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path, {"mix.yaml": SPEC})
    yield w
    w.close()


def leases(world: World) -> tuple[Lease, Lease]:
    """The world's reconciler leads (its ledger fenced); a rival replica on the same file."""
    ours = Lease(world.ledger, Identity("old:1:aa", "old", 1), LEASE)
    assert ours.acquire()
    world.ledger.fence = ours.fence
    rival_ledger = Ledger.open(world.settings.ledger_target, clock=world.clock)
    rival = Lease(rival_ledger, Identity("new:2:bb", "new", 2), LEASE)
    return ours, rival


def test_a_pass_after_the_lease_was_taken_over_submits_nothing(world: World) -> None:
    _, rival = leases(world)
    world.later(LEASE + 1)
    assert rival.acquire()
    with pytest.raises(LeaseLostError):
        world.one_pass()
    assert world.sandbox.stats()["batch_submit_calls"] == 0
    assert world.sandbox.stats()["tasks_created"] == 0
    rival.store.close()


def test_a_takeover_between_the_intent_and_the_submit_sends_nothing(world: World) -> None:
    """The intent was recorded under the old lease; the fence checked right
    before sending refuses; the new leader's start-up then holds the intent
    as ambiguous rather than sending it blindly."""
    _, rival = leases(world)
    begin = world.ledger.begin_submit

    def begin_then_lose(fingerprints: list[str], kind: str) -> int:
        submit_id = begin(fingerprints, kind)
        world.later(LEASE + 1)  # paused past the lease right here
        assert rival.acquire()
        return submit_id

    world.ledger.begin_submit = begin_then_lose  # type: ignore[method-assign]
    with pytest.raises(LeaseLostError):
        world.one_pass()
    assert world.sandbox.stats()["batch_submit_calls"] == 0
    assert world.sandbox.stats()["tasks_created"] == 0

    rival_ledger = rival.store
    assert isinstance(rival_ledger, Ledger)
    rival_ledger.fence = rival.fence
    assert rival_ledger.recover_interrupted() == 1
    states = {g.state for g in rival_ledger.generations().values()}
    assert states == {"unknown"}
    rival_ledger.close()
