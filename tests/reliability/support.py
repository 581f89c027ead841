"""What the reliability tests share: checks on the result, the sandbox's accounting, figures.

The tests drive real ``reconciler`` processes (``tests/project.py``,
``tests/daemonproc.py``) against the session's sandbox; the functions here
judge what those processes left behind, from the outside: the output folder,
the ledger (its SQLite file, or a PostgreSQL database) and the sandbox's own books.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from bench.common import revision
from reconciler.audio import probe_audio
from reconciler.durable import TEMP_PREFIX
from reconciler.outcomes import MAX_UPSTREAM_ATTEMPTS
from reconciler.sandbox import SandboxServer, fingerprint
from reconciler.sandbox.state import TASK_COST, SandboxState

#: The sandbox counters that are API requests the reconciler made.
API_COUNTERS = (
    "create_calls",
    "batch_submit_calls",
    "task_polls",
    "batch_polls",
    "credit_calls",
    "downloads",
)


def api_calls(stats: Mapping[str, Any]) -> int:
    """Every request the reconciler sent the sandbox (downloads included)."""
    return sum(int(stats[name]) for name in API_COUNTERS)


def ledger_path(state: Path) -> Path:
    return state / "ledger.sqlite3"


def integrity(state: Path) -> str:
    """``PRAGMA integrity_check`` of the ledger, read-only (a killed writer's WAL included)."""
    db = sqlite3.connect(f"file:{ledger_path(state)}?mode=ro", uri=True, timeout=10)
    try:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        db.close()


def assert_outputs_whole(out: Path) -> int:
    """Every file under an output name is whole: each MP3 decodes, each list parses.

    Temp files are hidden (``TEMP_PREFIX``), so a crash may leave one behind
    but never a partial file under a name a player would pick up. Returns the
    number of MP3 files.
    """
    mp3s = 0
    if not out.is_dir():
        return mp3s
    for path in sorted(out.rglob("*")):
        if path.name.startswith(TEMP_PREFIX) or not path.is_file():
            continue
        if path.suffix == ".mp3":
            assert probe_audio(path) > 0, path
            mp3s += 1
        elif path.name == "tracks.json":
            json.loads(path.read_text())
        elif path.name == "playlist.m3u8":
            assert path.read_text().startswith("#EXTM3U\n"), path
    return mp3s


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@dataclass
class Spend:
    """What the sandbox charged, per reconciler fingerprint, against what ``status`` admits.

    ``tasks``: tasks created for the fingerprint; ``refunded``: those that
    failed upstream (the service refunds them, and a retry after one is a
    legitimate second task); ``possible_double``: the ledger's count of
    resubmits after a lost submit answer, which ``status`` reports as
    possible double spend.
    """

    tasks: int
    refunded: int
    possible_double: int

    @property
    def paid(self) -> int:
        return self.tasks - self.refunded

    @property
    def extra(self) -> int:
        """Tasks paid beyond the one the fingerprint needs."""
        return max(0, self.paid - 1)


@dataclass
class Accounting:
    """The sandbox's books after a run, checked against the ledger."""

    by_fingerprint: dict[str, Spend]
    tasks_created: int
    credits_charged: int
    credits_refunded: int
    failed_tasks: int
    stuck_tasks: int
    faults: Counter[str] = field(default_factory=Counter)

    @property
    def paid_twice(self) -> int:
        """Fingerprints with more than one task that was not refunded."""
        return sum(1 for s in self.by_fingerprint.values() if s.extra)

    @property
    def extra_tasks(self) -> int:
        return sum(s.extra for s in self.by_fingerprint.values())

    @property
    def unexplained(self) -> dict[str, Spend]:
        """Fingerprints paid more often than the ledger admits as possible double spend."""
        return {fp: s for fp, s in self.by_fingerprint.items() if s.extra > s.possible_double}

    @property
    def retried_after_failure(self) -> int:
        """Second (or later) tasks that followed a refunded upstream failure."""
        return sum(min(s.refunded, s.tasks - 1) for s in self.by_fingerprint.values())

    def check_credits(self) -> None:
        """Only accepted tasks are charged, and exactly the failed ones are refunded.

        ``credits_charged`` counts 15 per created task (rejected items create
        none); ``credits_refunded`` 15 per task that failed upstream and whose
        failure time has passed. Net spend is then 15 per task that was not
        refunded: the successes, the stuck ones and the lost-answer duplicates.
        """
        assert self.credits_charged == TASK_COST * self.tasks_created, self
        assert self.credits_refunded == TASK_COST * self.failed_tasks, self
        paid = sum(s.paid for s in self.by_fingerprint.values())
        assert self.credits_charged - self.credits_refunded == TASK_COST * paid, self


def generation_rows(ledger: Path | str) -> list[tuple[str, str, int]]:
    """(fingerprint, request, possible_double) of every generation, read from outside.

    ``ledger``: a state folder (its SQLite file, opened read-only) or a
    ``postgresql://`` URL.
    """
    query = "SELECT fingerprint, request, possible_double FROM generations"
    if isinstance(ledger, str):
        with psycopg.connect(ledger) as conn:
            return [(fp, request, int(double)) for fp, request, double in conn.execute(query)]
    db = sqlite3.connect(f"file:{ledger_path(ledger)}?mode=ro", uri=True, timeout=10)
    try:
        return [(fp, request, int(double)) for fp, request, double in db.execute(query)]
    finally:
        db.close()


#: The sandbox's task faults that use up one of a generation's attempts: it
#: failed upstream, or never finished and was given up on.
UPSTREAM_FAILURES = ("task_failed", "stuck")


def unexplained_parks(server: SandboxServer, state: Path) -> dict[str, str]:
    """Parked generations of a SQLite ledger that the sandbox's books do not explain.

    A generation is parked for a person, by design, once
    ``MAX_UPSTREAM_ATTEMPTS`` of its tasks failed upstream or never finished;
    every other park under faults that reject nothing is a fault of the
    reconciler (one was: two 429s on a submit used up two attempts). Returns
    fingerprint → the ledger's reason and what the books show. Read from this
    thread, like ``accounting``: call it when no daemon runs.
    """
    failures: Counter[str] = Counter(
        fingerprint(task.item)
        for task in server.state.tasks.values()
        if any(kind in task.faults for kind in UPSTREAM_FAILURES)
    )
    db = sqlite3.connect(f"file:{ledger_path(state)}?mode=ro", uri=True, timeout=10)
    try:
        rows = db.execute(
            "SELECT fingerprint, request, reason FROM generations WHERE state = 'parked'"
        ).fetchall()
    finally:
        db.close()
    found: dict[str, str] = {}
    for fp, request, reason in rows:
        failed = failures[fingerprint(json.loads(request))]
        if failed < MAX_UPSTREAM_ATTEMPTS:
            found[fp] = f"{reason} (the sandbox failed or stuck {failed} of its tasks)"
    return found


def accounting(server: SandboxServer | SandboxState, ledger: Path | str) -> Accounting:
    """Join the sandbox's tasks (in process) with the ledger's generations.

    A task is keyed by the sandbox's fingerprint of the submitted item
    (webhook fields left out), which is the ledger's stored request for a
    generation, so each task is attributed to the reconciler fingerprint that
    paid for it. Call it once the run is over: it reads the server's state
    from this thread (or takes a ``SandboxState`` run in process). ``ledger``:
    the state folder of a SQLite ledger, or a PostgreSQL ledger's URL.
    """
    sandbox = server.state if isinstance(server, SandboxServer) else server
    sandbox.advance()  # refunds that are due
    now = sandbox.clock()
    tasks = list(sandbox.tasks.values())
    rows = generation_rows(ledger)
    ours = {fingerprint(json.loads(request)): (fp, double) for fp, request, double in rows}
    spends = {fp: Spend(0, 0, double) for fp, double in ours.values()}
    failed = stuck = 0
    for task in tasks:
        key = fingerprint(task.item)
        assert key in ours, f"task {task.task_id} was not asked for by this ledger: {task.item}"
        spend = spends[ours[key][0]]
        spend.tasks += 1
        if "task_failed" in task.faults and now >= task.done_at:
            spend.refunded += 1
            failed += 1
        stuck += "stuck" in task.faults
    stats = sandbox.stats()
    return Accounting(
        by_fingerprint={fp: s for fp, s in spends.items() if s.tasks},
        tasks_created=int(stats["tasks_created"]),
        credits_charged=int(stats["credits_charged"]),
        credits_refunded=int(stats["credits_refunded"]),
        failed_tasks=failed,
        stuck_tasks=stuck,
        faults=Counter(stats["faults_fired"]),
    )


def log_time(event: Mapping[str, Any]) -> float:
    """When the daemon logged an event (its ISO timestamp), as Unix seconds."""
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


def big_spec(n: int) -> str:
    """One valid YAML spec file of ``n`` description-mode tracks, each its own fingerprint."""
    lines = ["defaults:", "  mv: sonic-v5", "tracks:"]
    for i in range(n):
        lines += [f"  - name: t{i:05d}", f"    gpt_description_prompt: ten thousand {i}"]
    return "\n".join(lines) + "\n"


# -- figures for bench/RESULTS.md ----------------------------------------------------------

FIGURES_ENV = "RELIABILITY_FIGURES"


class Figures:
    """Appends measured figures as JSON lines to ``$RELIABILITY_FIGURES``, when it is set.

    ``python -m tests.reliability.figures`` turns the file into the results
    table; without the variable the tests only check, they record nothing.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.commit = revision() if path is not None else ""

    def record(self, section: str, name: str, **values: Any) -> None:
        if self.path is None:
            return
        record = {
            "section": section,
            "name": name,
            "at": time.time(),
            "loadavg": os.getloadavg(),
            "commit": self.commit,
        }
        line = json.dumps({**record, **values})
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")

    @classmethod
    def from_env(cls) -> Figures:
        value = os.environ.get(FIGURES_ENV)
        return cls(Path(value).absolute() if value else None)


def count_events(events: Iterable[Mapping[str, Any]]) -> Counter[str]:
    return Counter(str(e.get("event")) for e in events)


# -- what a failed run leaves for a person -------------------------------------------------

KEEP_ENV = "RELIABILITY_KEEP"


def keep_root() -> Path:
    """Where failed runs are kept: ``$RELIABILITY_KEEP``, else ``<temp folder>/reconciler-kept``.

    Outside pytest's own temporary folders on purpose: pytest keeps only the
    last three runs' folders, so a rare failure seen in a loop of runs was
    gone before anyone looked at it.
    """
    value = os.environ.get(KEEP_ENV)
    return Path(value) if value else Path(tempfile.gettempdir()) / "reconciler-kept"


def sandbox_books(server: SandboxServer) -> dict[str, Any]:
    """The sandbox's own account of a run, as JSON: every task and every submit call.

    Each task carries the key of the item it was created for (the
    ``fingerprint`` of ``accounting``), its prompt, when it was created
    (seconds before now), the faults that hit it and its status now; with
    the counters (``submits`` lists, per submit call, the keys it charged
    for), the configuration and the batches, it says who paid for what and
    when. Read from this thread, like ``accounting``: call it when no daemon runs.
    """
    state = server.state
    state.advance()
    now = state.clock()
    tasks = [
        {
            "task_id": task.task_id,
            "key": fingerprint(task.item),
            "prompt": task.item.get("gpt_description_prompt"),
            "seconds_ago": round(now - task.created, 3),
            "created_at": task.created_at,
            "faults": sorted(task.faults),
            "status": task.snapshot(now).status,
            "webhook": task.webhook.url if task.webhook else None,
        }
        for task in sorted(state.tasks.values(), key=lambda t: t.created)
    ]
    return {
        "config": state.describe(),
        "stats": state.stats(),
        "batches": {batch_id: members for batch_id, members in state.batches.items()},
        "tasks": tasks,
    }


@contextmanager
def kept_on_failure(root: Path, what: str, server: SandboxServer) -> Iterator[None]:
    """On any failure inside, keep a copy of ``root`` and the sandbox's books, and say where.

    ``root`` is the test's folder: the daemon logs, the ledger (with its
    WAL), the outputs, the config. The books go beside it as
    ``sandbox-books.json``. The failure gets a note naming the kept folder
    and ``what`` (the seed that reruns it), so the report a person reads
    says where to look. A pytest-timeout in its default (signal) mode is
    caught here too; the kept copy is the state at the moment of failure.
    """
    try:
        yield
    except BaseException as exc:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        kept = keep_root() / f"{root.name}-{stamp}"
        try:
            shutil.copytree(root, kept, symlinks=True)
            books = json.dumps(sandbox_books(server), indent=1, sort_keys=True)
            (kept / "sandbox-books.json").write_text(books + "\n", encoding="utf-8")
        except Exception as keeping:  # the original failure matters more than this one
            exc.add_note(f"{what}; keeping its files in {kept} failed: {keeping!r}")
        else:
            exc.add_note(
                f"{what}; the daemon logs, ledger, outputs and the sandbox's books "
                f"are kept in {kept}"
            )
        raise
