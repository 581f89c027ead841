"""The money policy under random sequences of answers (hypothesis stateful testing).

A real ``Reconciler`` with its real ledger (SQLite, and again PostgreSQL) talks, in process, to the
real sandbox app (its books are the truth about what was charged) through a
transport that makes each submit end the way hypothesis chose: accepted,
answer lost after the service processed it, a 5xx before or after
processing, a 429, an answer in a shape the client cannot attribute, or a
crash of the process mid-call (then a restart on the same ledger). Between
passes the sandbox may reject items or fail tasks, the clock moves, a signed
callback may claim a lost submit, and the specs change.

After every step the invariants a user's money depends on must hold:

* never a second task for a generation while an earlier submit may still
  create one, beyond the resubmit allowance that ``status`` reports as
  possible double spend;
* every credit the service charged is counted by the ledger (tasks it knows,
  plus items of submits not settled), so budgets can never be passed;
* the run's ``--max-credits`` ceiling is never passed;
* no track is ever given the task of another item (the wrong song);
* nothing paid is dropped: every charged task is known, or still counted.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import stamina
import structlog
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from pydantic import SecretStr

from reconciler.config import Settings
from reconciler.ledger import Hint, Ledger, apply_hints
from reconciler.musicapi import MusicAPI
from reconciler.reconciling import Reconciler
from reconciler.sandbox.app import Connections, create_app
from reconciler.sandbox.config import SandboxConfig
from reconciler.sandbox.state import ManualClock, SandboxState
from reconciler.sandbox.state import fingerprint as item_hash
from tests.pgserver import PgServer

BASE = "http://sandbox.test"
KEY = "sandbox-key"
PROMPTS = [f"lofi study beats {n}" for n in range(6)]
MAX_CREDITS = 15 * 9
OUTCOMES = ["ok", "ok", "ok", "lost", "5xx_before", "5xx_after", "429", "reshape", "crash"]


class Crash(BaseException):
    """The process dies mid-call (a BaseException, so nothing in it catches it)."""


class Wire(httpx.AsyncBaseTransport):
    """The sandbox app in process, with each submit's outcome scripted."""

    def __init__(self, app: Any) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.script: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        is_submit = request.method == "POST" and request.url.path.endswith(
            ("/sonic/batch", "/sonic/create")
        )
        outcome = self.script.pop(0) if is_submit and self.script else "ok"
        if outcome == "429":
            return httpx.Response(429, json={"error": "slow down"})
        if outcome == "5xx_before":
            return httpx.Response(503, text="<html><title>503</title></html>")
        response = await self.inner.handle_async_request(request)
        if not is_submit:
            return response
        content = await response.aread()
        if outcome == "lost":
            raise httpx.ReadTimeout("answer lost", request=request)
        if outcome == "crash":
            raise Crash
        if outcome == "5xx_after":
            return httpx.Response(502, text="bad gateway")
        if outcome == "reshape" and response.status_code == 200:
            body = json.loads(content)
            if isinstance(body.get("tasks"), list):
                # Bare task ids of the accepted items only, no index: with a
                # rejection among them, nobody can say whose each one is.
                ids = [t["task_id"] for t in body["tasks"] if "task_id" in t]
                body = {"batch_id": body["batch_id"], "tasks": ids}
            return httpx.Response(200, json=body)
        return httpx.Response(response.status_code, headers=response.headers, content=content)


@settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
class MoneyPolicy(RuleBasedStateMachine):
    #: None: each example's ledger is the SQLite file in its state folder; a
    #: server: a fresh PostgreSQL database on it (see the test at the end).
    pg_server: PgServer | None = None

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="money-"))
        self.database = self.pg_server.create_database() if self.pg_server else None
        (self.tmp / "specs").mkdir()
        self.now = 1_800_000_000.0
        self.sandbox_clock = ManualClock()
        self.sandbox = SandboxState(SandboxConfig(latency=3.0, seed=1), clock=self.sandbox_clock)
        self.sandbox.public_base = BASE
        self.wire = Wire(create_app(self.sandbox, Connections()))
        self.loop = asyncio.new_event_loop()
        self.api = MusicAPI(
            f"{BASE}/api/v1",
            KEY,
            transport=self.wire,
            max_requests_per_second=1e6,
            log=structlog.get_logger("test"),
        )
        self.settings = Settings(
            specs_dir=self.tmp / "specs",
            out_dir=self.tmp / "out",
            state_dir=self.tmp / "state",
            api_url=f"{BASE}/api/v1",
            api_key=SecretStr(KEY),
            batch_window=0.0,
            poll_interval=1.0,
            ambiguous_grace=30.0,
            task_timeout=600.0,
            backoff_initial=1.0,
            backoff_cap=20.0,
            max_credits=MAX_CREDITS,
            ledger=self.pg_server.url(self.database) if self.pg_server and self.database else None,
        )
        self.ledger = Ledger.open(self.settings.ledger_target, clock=self.clock)
        self.reconciler = self._reconciler()
        self.tracks: list[tuple[int, int]] = []
        self.charged_before_run = 0

    def clock(self) -> float:
        return self.now

    def _reconciler(self) -> Reconciler:
        return Reconciler(self.settings, self.ledger, self.api, clock=self.clock)

    def teardown(self) -> None:
        self.loop.run_until_complete(self.api.aclose())
        self.loop.close()
        self.ledger.close()
        if self.pg_server and self.database:
            self.pg_server.drop_database(self.database)

    # -- what happens -------------------------------------------------------------

    @rule(
        tracks=st.lists(
            st.tuples(st.sampled_from(range(len(PROMPTS))), st.integers(1, 2)),
            min_size=1,
            max_size=12,
        )
    )
    def write_specs(self, tracks: list[tuple[int, int]]) -> None:
        lines = ["defaults:", "  mv: sonic-v5", "tracks:"]
        for n, (prompt, variant) in enumerate(tracks):
            lines += [
                f"  - name: t{n}",
                f"    gpt_description_prompt: {PROMPTS[prompt]}",
                f"    variant: {variant}",
            ]
        (self.tmp / "specs" / "mix.yaml").write_text("\n".join(lines) + "\n")
        self.tracks = tracks

    @rule(outcomes=st.lists(st.sampled_from(OUTCOMES), max_size=3))
    def script_submits(self, outcomes: list[str]) -> None:
        self.wire.script = outcomes

    @rule(kind=st.sampled_from(["none", "reject", "task_failed", "clip_failed"]))
    def sandbox_faults(self, kind: str) -> None:
        faults = [] if kind == "none" else [{"kind": kind, "rate": 0.3}]
        self.sandbox.configure({"faults": faults})

    @rule(seconds=st.sampled_from([0.5, 2.0, 5.0, 40.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.sandbox_clock.advance(seconds)

    @rule()
    def run_pass(self) -> None:
        try:
            self.loop.run_until_complete(self.reconciler.run_pass())
        except Crash:
            self.restart()

    def restart(self) -> None:
        self.charged_before_run = self.sandbox.counters.credits_charged
        self.ledger.close()
        self.ledger = Ledger.open(self.settings.ledger_target, clock=self.clock)
        self.reconciler = self._reconciler()

    @precondition(lambda self: self.tracks)
    @rule()
    def webhook_claims_a_lost_submit(self) -> None:
        """A signed callback names the task of an item whose answer was lost."""
        unknown = self.ledger.query(
            "SELECT fingerprint, request FROM generations WHERE state = 'unknown'"
        )
        known = {r["task_id"] for r in self.ledger.query("SELECT task_id FROM tasks")}
        hints = []
        for row in unknown:
            want = item_hash(json.loads(row["request"]))
            for task in self.sandbox.tasks.values():
                if task.task_id not in known and item_hash(task.item) == want:
                    hints.append(Hint(row["fingerprint"], task.task_id))
                    break
        apply_hints(self.ledger, hints[:1], self.now)

    # -- what must always hold --------------------------------------------------------

    def _books(self) -> tuple[Counter[str], list[Any]]:
        # A task that fails upstream is refunded and then retried by design:
        # only tasks that stay paid count towards paying twice.
        created: Counter[str] = Counter(
            item_hash(t.item) for t in self.sandbox.tasks.values() if "task_failed" not in t.faults
        )
        return created, self.ledger.query(
            "SELECT fingerprint, request, possible_double FROM generations"
        )

    @invariant()
    def never_paid_twice_beyond_what_status_reports(self) -> None:
        created, gens = self._books()
        allowed: Counter[str] = Counter()
        for g in gens:
            # Variants share a request: each distinct fingerprint may cost one task.
            allowed[item_hash(json.loads(g["request"]))] += 1 + g["possible_double"]
        for item, n in created.items():
            assert n <= allowed[item], (item, n, allowed[item])

    @invariant()
    def every_charged_credit_is_counted(self) -> None:
        charged = self.sandbox.counters.credits_charged
        assert charged <= 15 * self.ledger.spent_since(0.0)

    @invariant()
    def the_run_ceiling_holds(self) -> None:
        # --max-credits bounds one run: a restart starts the next one.
        charged = self.sandbox.counters.credits_charged - self.charged_before_run
        assert charged <= MAX_CREDITS

    @invariant()
    def no_track_gets_another_items_song(self) -> None:
        for row in self.ledger.query(
            "SELECT t.task_id, g.request FROM tasks t JOIN generations g "
            "ON g.fingerprint = t.fingerprint"
        ):
            task = self.sandbox.tasks.get(row["task_id"])
            assert task is not None, row["task_id"]
            assert item_hash(task.item) == item_hash(json.loads(row["request"]))

    @invariant()
    def nothing_paid_is_dropped(self) -> None:
        known = {r["task_id"] for r in self.ledger.query("SELECT task_id FROM tasks")}
        orphans = {r["task_id"] for r in self.ledger.query("SELECT task_id FROM orphans")}
        unsettled = self.ledger.query("SELECT coalesce(sum(unsettled), 0) AS n FROM submits")
        unknown_tasks = set(self.sandbox.tasks) - known
        # Every task the service created is tracked, an orphan being read, or
        # covered by a submit the budget still counts as possibly charged.
        assert len(unknown_tasks - orphans) <= unsettled[0]["n"]


@pytest.fixture(autouse=True)
def _no_retry_waits() -> Any:
    with stamina.set_testing(True, attempts=3):
        yield


TestMoneyPolicy = MoneyPolicy.TestCase


def test_the_money_policy_holds_on_a_postgresql_ledger(pg_server: PgServer) -> None:
    class OnPostgres(MoneyPolicy):
        pass

    OnPostgres.pg_server = pg_server
    run_state_machine_as_test(OnPostgres, settings=TestMoneyPolicy.settings)
