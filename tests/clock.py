"""A clock the test sets: ledgers and leases are given it instead of ``time.time``."""

from __future__ import annotations

#: A fixed, plausible "now" (2027-01-15), far from any real clock a test might meet.
NOW = 1_800_000_000.0


class Clock:
    """Returns ``now``; a test moves time by assigning or adding to it."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now
