"""The ledger package: everything the reconciler keeps in its database (SQLite
by default, or PostgreSQL), and the only package that touches one
(import-linter holds to that).

- ``store``: the connection (SQLite in WAL mode), schema and migrations, event
  log, key/value facts;
- ``postgres``: the same on PostgreSQL, translating the one dialect of SQL;
- ``work``: ``Ledger``, the state transitions, each one transaction;
- ``facts``: the typed records handed in and out;
- ``reports``: the reads behind ``status``, ``plan``, ``describe``, ``events`` and ``retry``;
- ``hints``: webhook hints turned into "poll now" between passes.

Public names are re-exported here, so callers import ``from reconciler.ledger``
and not from the module that happens to hold a name today.
"""

from reconciler.ledger.facts import (
    ClipRecord,
    Hint,
    OutputRecord,
    PlanOutput,
    PlanRead,
    StatusRead,
    StatusRow,
    TaskRef,
    TaskUpdate,
)
from reconciler.ledger.hints import apply_hints
from reconciler.ledger.reports import read_plan, read_status
from reconciler.ledger.store import MIGRATIONS
from reconciler.ledger.work import (
    LOST_ANSWER_PARK,
    Ledger,
    spec_columns,
)

__all__ = [
    "LOST_ANSWER_PARK",
    "MIGRATIONS",
    "ClipRecord",
    "Hint",
    "Ledger",
    "OutputRecord",
    "PlanOutput",
    "PlanRead",
    "StatusRead",
    "StatusRow",
    "TaskRef",
    "TaskUpdate",
    "apply_hints",
    "read_plan",
    "read_status",
    "spec_columns",
]
