"""Table-driven tests of the pure helpers behind ``events`` and ``describe``."""

from __future__ import annotations

from typing import Any

import pytest

from reconciler.inspection import event_line, parse_duration, unknown_name


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("90s", 90.0),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1.5h", 5400.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "-5m", "5 minutes", "1w", "2h30m"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def event(**fields: Any) -> dict[str, Any]:
    base = {"at": "2026-11-29T14:00:00Z", "event": "task.accepted", "soundtrack": None,
            "track": None, "fingerprint": None, "data": {}}  # fmt: skip
    return {**base, **fields}


@pytest.mark.parametrize(
    ("e", "line"),
    [
        (
            event(soundtrack="study", track="focus", data={"path": "study/focus.mp3"}),
            "2026-11-29T14:00:00Z  task.accepted  study/focus  path=study/focus.mp3",
        ),
        (
            event(soundtrack="study", data={"all": False}),
            "2026-11-29T14:00:00Z  task.accepted  study  all=false",
        ),
        (
            event(fingerprint="0123456789abcdef", data={"task_id": "t1", "batch_id": None}),
            "2026-11-29T14:00:00Z  task.accepted  0123456789ab  task_id=t1 batch_id=null",
        ),
        (event(), "2026-11-29T14:00:00Z  task.accepted  -"),
    ],
)
def test_event_line(e: dict[str, Any], line: str) -> None:
    assert event_line(e) == line


@pytest.mark.parametrize(
    ("name", "known", "message"),
    [
        (
            "stduy",
            ["study", "road-trip"],
            "no soundtrack 'stduy' in the ledger (did you mean 'study'?)",
        ),
        ("zzz", ["study", "road-trip"], "no soundtrack 'zzz' in the ledger"),
        ("x", [], "no soundtrack 'x' in the ledger"),
    ],
)
def test_unknown_name_suggests_the_closest(name: str, known: list[str], message: str) -> None:
    assert str(unknown_name("soundtrack", name, known)) == message
