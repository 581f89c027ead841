"""Table-driven tests of the pure suspension rule (``reconciler suspend``/``resume``)."""

from __future__ import annotations

import pytest

from reconciler.planning import (
    Desired,
    DesiredTrack,
    Generation,
    Limits,
    Snapshot,
    Suspension,
    held_by_suspension,
    plan,
)


def desired(*tracks: tuple[str, str, str]) -> Desired:
    """(soundtrack, track, fingerprint) triples, in spec order."""
    return Desired(
        tracks=tuple(
            DesiredTrack(st, name, fp, clips=1, source=f"{st}.yaml", position=i)
            for i, (st, name, fp) in enumerate(tracks)
        ),
        requests={fp: {"gpt_description_prompt": fp} for _, _, fp in tracks},
    )


TWO_SOUNDTRACKS = desired(("a", "x", "f1"), ("a", "y", "f2"), ("b", "z", "f3"))
#: f2 is asked for by both soundtracks.
SHARED = desired(("a", "x", "f1"), ("a", "y", "f2"), ("b", "y", "f2"), ("b", "z", "f3"))


@pytest.mark.parametrize(
    ("state", "suspension", "held"),
    [
        (TWO_SOUNDTRACKS, Suspension(), set()),
        (TWO_SOUNDTRACKS, Suspension(all=True), {"f1", "f2", "f3"}),
        (TWO_SOUNDTRACKS, Suspension(soundtracks=frozenset({"a"})), {"f1", "f2"}),
        (TWO_SOUNDTRACKS, Suspension(soundtracks=frozenset({"b"})), {"f3"}),
        (TWO_SOUNDTRACKS, Suspension(soundtracks=frozenset({"a", "b"})), {"f1", "f2", "f3"}),
        # A soundtrack the specs no longer have holds nothing back.
        (TWO_SOUNDTRACKS, Suspension(soundtracks=frozenset({"gone"})), set()),
        # Shared with an active soundtrack: still submitted, for that one.
        (SHARED, Suspension(soundtracks=frozenset({"a"})), {"f1"}),
        (SHARED, Suspension(soundtracks=frozenset({"b"})), {"f3"}),
        (SHARED, Suspension(soundtracks=frozenset({"a", "b"})), {"f1", "f2", "f3"}),
        # Everything suspended holds everything, whatever the list says.
        (SHARED, Suspension(all=True, soundtracks=frozenset({"a"})), {"f1", "f2", "f3"}),
        (desired(), Suspension(all=True), set()),
    ],
)
def test_held_by_suspension(state: Desired, suspension: Suspension, held: set[str]) -> None:
    assert held_by_suspension(state, suspension) == held


@pytest.mark.parametrize(
    ("before", "action", "name", "after"),
    [
        (Suspension(), "suspend", None, Suspension(all=True)),
        (Suspension(), "suspend", "a", Suspension(soundtracks=frozenset({"a"}))),
        (
            Suspension(soundtracks=frozenset({"a"})),
            "suspend",
            "b",
            Suspension(soundtracks=frozenset({"a", "b"})),
        ),
        # Suspending all keeps the list, so resuming all later clears both.
        (
            Suspension(soundtracks=frozenset({"a"})),
            "suspend",
            None,
            Suspension(all=True, soundtracks=frozenset({"a"})),
        ),
        (Suspension(all=True, soundtracks=frozenset({"a"})), "resume", None, Suspension()),
        (
            Suspension(soundtracks=frozenset({"a", "b"})),
            "resume",
            "a",
            Suspension(soundtracks=frozenset({"b"})),
        ),
        # One name cannot lift a suspension of everything.
        (Suspension(all=True), "resume", "a", Suspension(all=True)),
        (Suspension(), "resume", "a", Suspension()),
    ],
)
def test_suspend_and_resume(
    before: Suspension, action: str, name: str | None, after: Suspension
) -> None:
    changed = before.suspend(name) if action == "suspend" else before.resume(name)
    assert changed == after


@pytest.mark.parametrize(
    ("stored", "suspension"),
    [
        (None, Suspension()),
        ({"all": False, "soundtracks": []}, Suspension()),
        ({"all": True, "soundtracks": ["b", "a"]}, Suspension(True, frozenset({"a", "b"}))),
        ({"soundtracks": ["a"]}, Suspension(soundtracks=frozenset({"a"}))),
    ],
)
def test_stored_form_round_trips(stored: object, suspension: Suspension) -> None:
    assert Suspension.from_json(stored) == suspension
    assert Suspension.from_json(suspension.to_json()) == suspension


def test_plan_lists_held_generations_apart_and_charges_only_the_rest() -> None:
    queued = {fp: Generation(fp, "queued", 0, 0.0, None) for fp in ("f1", "f2", "f3")}
    snapshot = Snapshot(queued, suspension=Suspension(soundtracks=frozenset({"a"})))
    d = plan(SHARED, snapshot, 0.0, Limits(200))
    assert (d.submit, d.held_by("suspended")) == (("f2", "f3"), ("f1",))
    assert d.cost == 30
