"""The webhook receiver: in process with an injected clock, and end to end.

In process, requests go through ``httpx.ASGITransport`` to the receiver's
app, so every verification step is pinned down exactly (order, status,
logged reason, nothing queued). End to end, a daemon subprocess takes the
sandbox's real signed deliveries, and requests forged by the test (which
knows the secret) are shown to change nothing: no poll, no ledger event.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from structlog.testing import capture_logs

from reconciler.config import WebhookSettings
from reconciler.ledger import Hint, Ledger, apply_hints
from reconciler.ops import Metrics
from reconciler.planning import desired_state
from reconciler.sandbox import SandboxControl
from reconciler.specs import scan_specs
from reconciler.webhooks import WebhookReceiver, signature
from tests.daemonproc import DaemonProc, daemon_project, free_port
from tests.project import Project, track, wait_until

SECRET = "whsec-test-5f2a9c"
NOW = 1_800_000_000.0
FP = "ab" * 32


# -- in process -------------------------------------------------------------------


class Harness:
    """The receiver's app behind httpx.ASGITransport, with a clock the test moves."""

    def __init__(self, max_body: int = 2048, tolerance: float = 300) -> None:
        self.now = NOW
        self.woken = 0
        settings = WebhookSettings(
            host="127.0.0.1",
            port=0,
            public_url="http://hooks.example",
            secret=SecretStr(SECRET),
            max_body=max_body,
            tolerance=tolerance,
        )
        self.receiver = WebhookReceiver(settings, on_hint=self.wake, clock=lambda: self.now)

    def wake(self) -> None:
        self.woken += 1

    def request(
        self,
        method: str,
        path: str,
        content: bytes | Callable[[], AsyncIterator[bytes]] = b"",
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.receiver.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://hooks") as c:
                body = content if isinstance(content, bytes) else content()
                return await c.request(method, path, content=body, headers=headers)

        return asyncio.run(go())

    def headers(
        self, raw: bytes, *, ts: str | None = None, secret: str = SECRET, webhook_id: str = "wh-1"
    ) -> dict[str, str]:
        ts = str(int(self.now)) if ts is None else ts
        return {
            "X-Webhook-Id": webhook_id,
            "X-Webhook-Event": "song.completed",
            "X-Webhook-Timestamp": ts,
            "X-Webhook-Signature": "sha256=" + signature(secret, ts, raw),
        }

    def post(self, raw: bytes, fp: str = FP, **kw: Any) -> httpx.Response:
        return self.request("POST", f"/hook/{fp}", raw, self.headers(raw, **kw))


def body(task_id: str = "task-1", **extra: Any) -> bytes:
    clip = {"clip_id": "c1", "state": "succeeded", "audio_url": "http://evil.example/x.mp3"}
    return json.dumps({"code": 200, "data": [clip], "task_id": task_id, **extra}).encode()


@pytest.fixture
def harness() -> Harness:
    return Harness()


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with capture_logs() as captured:
        yield captured


def rejections(logs: list[dict[str, Any]]) -> list[str]:
    return [e["reason"] for e in logs if e["event"] == "webhook.rejected"]


def test_a_verified_callback_is_queued_as_a_hint(harness: Harness, logs: list[Any]) -> None:
    r = harness.post(body("task-1"))
    assert r.status_code == 200
    assert r.json() == {"status": "accepted"}
    assert harness.receiver.drain() == [Hint(FP, "task-1", ("c1",))]
    assert harness.receiver.drain() == []
    assert harness.woken == 1
    assert [e["event"] for e in logs] == ["webhook.received"]


def test_upper_case_hex_and_scheme_are_accepted(harness: Harness) -> None:
    raw = body()
    h = harness.headers(raw)
    h["X-Webhook-Signature"] = h["X-Webhook-Signature"].upper()
    assert harness.request("POST", f"/hook/{FP}", raw, h).status_code == 200


def _forged(h: Harness, case: str) -> tuple[bytes, dict[str, str]]:
    raw = body()
    good = h.headers(raw)
    ts = good["X-Webhook-Timestamp"]
    if case == "wrong_secret":
        return raw, h.headers(raw, secret="guessed")
    if case == "tampered_body":
        return body("task-2"), good
    if case in ("no_signature", "no_timestamp"):
        name = "X-Webhook-Signature" if case == "no_signature" else "X-Webhook-Timestamp"
        return raw, {k: v for k, v in good.items() if k != name}
    if case == "not_sha256":
        return raw, {**good, "X-Webhook-Signature": "md5=" + signature(SECRET, ts, raw)}
    if case == "timestamp_not_a_number":
        return raw, h.headers(raw, ts="18e8")
    if case == "stale":
        return raw, h.headers(raw, ts=str(int(NOW) - 301))
    if case == "from_the_future":
        return raw, h.headers(raw, ts=str(int(NOW) + 301))
    if case == "signed_for_another_timestamp":
        return raw, {**good, "X-Webhook-Timestamp": str(int(NOW) - 1)}
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong_secret", "bad_signature"),
        ("tampered_body", "bad_signature"),
        ("no_signature", "missing_headers"),
        ("no_timestamp", "missing_headers"),
        ("not_sha256", "bad_signature"),
        ("timestamp_not_a_number", "bad_timestamp"),
        ("stale", "stale_timestamp"),
        ("from_the_future", "stale_timestamp"),
        ("signed_for_another_timestamp", "bad_signature"),
    ],
)
def test_unverified_requests_get_401_are_logged_and_change_nothing(
    harness: Harness, logs: list[dict[str, Any]], case: str, reason: str
) -> None:
    raw, headers = _forged(harness, case)
    r = harness.request("POST", f"/hook/{FP}", raw, headers)
    assert r.status_code == 401
    assert rejections(logs) == [reason]
    assert harness.receiver.drain() == []
    assert harness.woken == 0
    for entry in logs:
        assert SECRET not in json.dumps(entry, default=str)


def test_stale_uses_the_injected_clock_and_tolerance() -> None:
    h = Harness(tolerance=10)
    ts = str(int(NOW))
    assert h.post(body("task-1"), ts=ts, webhook_id="a").status_code == 200
    h.now = NOW + 10
    assert h.post(body("task-2"), ts=ts, webhook_id="b").status_code == 200
    h.now = NOW + 11
    assert h.post(body("task-3"), ts=ts, webhook_id="c").status_code == 401


def test_oversized_bodies_get_413_before_anything_else(
    harness: Harness, logs: list[dict[str, Any]]
) -> None:
    unsigned = {"X-Webhook-Timestamp": "0", "X-Webhook-Signature": "sha256=00"}
    # A declared length over the limit is refused before the body is read.
    big = body(padding="x" * 3000)
    assert harness.request("POST", f"/hook/{FP}", big, unsigned).status_code == 413

    # Without a declared length (chunked) the stream is counted.
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 512

    assert harness.request("POST", f"/hook/{FP}", chunks, unsigned).status_code == 413
    # Exactly at the limit is fine.
    at_limit = body(padding="")
    at_limit = body(padding="y" * (2048 - len(at_limit)))
    assert len(at_limit) == 2048
    assert harness.post(at_limit).status_code == 200
    assert rejections(logs) == ["too_large", "too_large"]
    assert harness.receiver.drain() == [Hint(FP, "task-1", ("c1",))]


def test_replays_are_acknowledged_and_ignored(harness: Harness, logs: list[dict[str, Any]]) -> None:
    raw = body()
    assert harness.post(raw, webhook_id="wh-1").json()["status"] == "accepted"
    # The service retries with the same id and a fresh timestamp.
    harness.now += 5
    assert harness.post(raw, webhook_id="wh-1").json()["status"] == "duplicate"
    # A copy under a new id carries the same signature: still a replay.
    harness.now -= 5
    assert harness.post(raw, webhook_id="wh-other").json()["status"] == "duplicate"
    assert harness.receiver.drain() == [Hint(FP, "task-1", ("c1",))]
    assert harness.woken == 1
    assert [e["event"] for e in logs].count("webhook.duplicate") == 2


def test_a_forged_request_cannot_burn_a_real_delivery_id(harness: Harness) -> None:
    raw = body()
    assert harness.post(raw, webhook_id="wh-9", secret="guessed").status_code == 401
    assert harness.post(raw, webhook_id="wh-9").json()["status"] == "accepted"


@pytest.mark.parametrize(
    ("payload", "task_id", "clip_ids"),
    [
        (b"not json", None, ()),
        (b"[1, 2]", None, ()),
        (b'{"data": []}', None, ()),
        (b'{"task_id": "a b"}', None, ()),
        (b'{"task_id": 7}', "7", ()),
        # The documented body: no top-level task id, only clips.
        (b'{"code": 200, "data": [{"clip_id": "c9", "state": "succeeded"}]}', None, ("c9",)),
        (b'{"code": 200, "data": [{"clip_id": "c9", "task_id": "t9"}]}', "t9", ("c9",)),
        (b'{"code": 200, "data": {"task_id": "t8", "clip_id": "c8"}}', "t8", ("c8",)),
    ],
)
def test_every_verified_body_becomes_a_hint_with_what_it_names(
    harness: Harness, payload: bytes, task_id: str | None, clip_ids: tuple[str, ...]
) -> None:
    # Even a body naming nothing says something finished: the open batches
    # are polled now.
    assert harness.post(payload).status_code == 200
    assert harness.receiver.drain() == [Hint(FP, task_id, clip_ids)]


def test_the_batch_level_url_and_the_older_signature_are_accepted(harness: Harness) -> None:
    raw = body("task-2")
    older = {"X-Signature": signature(SECRET, None, raw)}
    assert harness.request("POST", "/hook", raw, older).json()["status"] == "accepted"
    assert harness.receiver.drain() == [Hint(None, "task-2", ("c1",))]
    forged = {"X-Signature": signature("guessed", None, raw)}
    assert harness.request("POST", "/hook", raw, forged).status_code == 401
    # The older scheme has no timestamp: a replay is caught by its signature.
    assert harness.request("POST", "/hook", raw, older).json()["status"] == "duplicate"


def test_only_the_hook_route_answers(harness: Harness) -> None:
    assert harness.post(body(), fp="not-a-fingerprint").status_code == 404
    assert harness.request("GET", f"/hook/{FP}").status_code == 405
    assert harness.request("POST", "/").status_code == 404


# -- applying hints to a real ledger ---------------------------------------------------


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "a.yaml").write_text(
        "defaults:\n  mv: sonic-v5\ntracks:\n"
        "  - name: lost\n    gpt_description_prompt: one\n"
        "  - name: known\n    gpt_description_prompt: two\n"
    )
    scan = scan_specs(specs)
    ledger = Ledger.open(tmp_path / "ledger.sqlite3", clock=lambda: NOW)
    ledger.apply_desired(desired_state(scan.files, (), scan.root_state, {}))
    yield ledger
    ledger.close()


def fingerprints(ledger: Ledger) -> tuple[str, str]:
    rows = ledger.query("SELECT name, fingerprint FROM tracks ORDER BY name")
    by_name = {r["name"]: r["fingerprint"] for r in rows}
    return by_name["lost"], by_name["known"]


def test_apply_hints_claims_lost_answers_and_wakes_known_batches(ledger: Ledger) -> None:
    lost, known = fingerprints(ledger)
    sid = ledger.begin_submit([lost], "batch")
    ledger.submit_ambiguous(sid, "connection reset after sending")
    sid = ledger.begin_submit([known], "batch")
    ledger.submit_answered(sid, "batch-1", {known: ("task-k", 0)}, {}, {}, poll_at=NOW + 600)
    assert ledger.batches_due_by(NOW) == []

    hints = [
        Hint(known, "task-k"),
        Hint(lost, "task-l"),
        Hint(lost, "task-k"),  # a known task under another fingerprint's URL
        Hint("cd" * 32, "task-z"),  # nothing the ledger waits for
    ]
    with capture_logs() as logs:
        assert apply_hints(ledger, hints, NOW) == 2
    assert [b.batch_id for b in ledger.batches_due_by(NOW)] == ["batch-1"]
    assert ledger.generations()[lost].state == "running"
    ref = ledger.task_ref("task-l")
    assert ref is not None
    assert ref.fingerprint == lost
    assert [t.task_id for t in ledger.due_single_tasks(NOW)] == ["task-l"]
    events = [e["event"] for e in logs]
    assert events == ["webhook.claimed", "webhook.mismatch", "webhook.unmatched"]
    # A second callback for the claimed task is an ordinary wake, not a second claim.
    assert apply_hints(ledger, [Hint(lost, "task-l")], NOW) == 1


# -- end to end ------------------------------------------------------------------------


@pytest.fixture
def hooked(tmp_path: Path, sandbox: SandboxControl) -> Project:
    """A project whose daemon listens for webhooks; polling alone would take 30 s."""
    port = free_port()
    hook = (
        f'\n[webhook]\nlisten = "127.0.0.1:{port}"\npublic_url = "http://127.0.0.1:{port}"\n'
        f'secret = "{SECRET}"\nmax_body = 16384\ntolerance = 60\n'
    )
    return daemon_project(tmp_path, sandbox, poll=30.0, extra=hook)


def hook_url(project: Project) -> str:
    listen = tomllib.loads(project.config.read_text())["webhook"]["listen"]
    return f"http://{listen}"


def test_signed_deliveries_drive_the_polls(hooked: Project) -> None:
    hooked.write_spec("st.yaml", [track(f"t{i}", f"marimba {i}") for i in range(3)])
    with DaemonProc(hooked) as d:
        started = time.monotonic()
        d.converged(timeout=15)
        assert time.monotonic() - started < 10, "converged by webhooks, not the 30 s poll"
        stats = hooked.stats()
        assert stats["webhooks_delivered"] >= 3
        assert stats["batch_polls"] <= 3
        assert len(d.named("webhook.received")) >= 3
        assert not d.named("webhook.rejected")
        code, _ = d.stop()
        assert code == 0


def test_a_lost_submit_answer_is_claimed_through_the_items_webhook(
    hooked: Project, sandbox: SandboxControl
) -> None:
    sandbox.configure(faults=[{"kind": "drop_response", "at": [1], "endpoints": ["batch_submit"]}])
    hooked.write_spec("st.yaml", [track("only", "steel drums")])
    with DaemonProc(hooked) as d:
        d.wait_event("submit.ambiguous")
        d.wait_event("webhook.claimed")
        d.converged(timeout=15)
        stats = hooked.stats()
        assert stats["tasks_created"] == 1, "claimed, never resubmitted"
        assert stats["batch_submit_calls"] == 1
        code, _ = d.stop()
        assert code == 0


def test_sandbox_duplicates_are_ignored_and_bad_signatures_rejected(
    hooked: Project, sandbox: SandboxControl
) -> None:
    sandbox.configure(
        faults=[
            {"kind": "webhook_duplicate", "at": [1]},
            {"kind": "webhook_bad_signature", "at": [2, 3, 4, 5]},
        ],
        webhook_retries=3,
    )
    hooked.write_spec("st.yaml", [track("a", "kalimba"), track("b", "ocarina")])
    with DaemonProc(hooked) as d:
        d.wait_event("webhook.duplicate")
        d.wait_event("webhook.rejected", lambda e: e["reason"] == "bad_signature")
        d.converged(timeout=20)
        code, _ = d.stop()
        assert code == 0


def _ledger_facts(project: Project) -> tuple[int, list[tuple[Any, ...]]]:
    with sqlite3.connect(f"file:{project.state / 'ledger.sqlite3'}?mode=ro", uri=True) as db:
        events = db.execute("SELECT count(*) FROM events").fetchone()[0]
        tasks = db.execute("SELECT task_id, next_poll FROM tasks ORDER BY task_id").fetchall()
    return int(events), tasks


def test_forged_stale_replayed_and_oversized_requests_change_nothing(
    hooked: Project, sandbox: SandboxControl
) -> None:
    sandbox.configure(latency=60.0)  # the real deliveries come long after this test
    hooked.write_spec("st.yaml", [track("a", "didgeridoo")])
    url = hook_url(hooked)
    with DaemonProc(hooked) as d:
        d.wait_event("batch.submitted")
        d.wait_event("pass.completed", lambda e: e["in_flight"] == 1)
        with sqlite3.connect(f"file:{hooked.state / 'ledger.sqlite3'}?mode=ro", uri=True) as db:
            task_id, fp = db.execute("SELECT task_id, fingerprint FROM tasks").fetchone()
        raw = json.dumps({"code": 200, "data": [], "task_id": task_id}).encode()
        facts, stats, mark = _ledger_facts(hooked), hooked.stats(), d.mark()

        def send(ts: float, secret: str, content: bytes, webhook_id: str) -> httpx.Response:
            t = str(int(ts))
            return httpx.post(
                f"{url}/hook/{fp}",
                content=content,
                headers={
                    "X-Webhook-Id": webhook_id,
                    "X-Webhook-Timestamp": t,
                    "X-Webhook-Signature": "sha256=" + signature(secret, t, content),
                },
                timeout=5,
            )

        now = time.time()
        assert send(now, "guessed-secret", raw, "f1").status_code == 401
        assert send(now - 3600, SECRET, raw, "f2").status_code == 401
        assert send(now, SECRET, raw + b" " * 20000, "f3").status_code == 413
        reasons = [e["reason"] for e in d.events()[mark:] if e["event"] == "webhook.rejected"]
        assert reasons == ["bad_signature", "stale_timestamp", "too_large"]
        assert _ledger_facts(hooked) == facts
        after = hooked.stats()
        assert after["batch_polls"] == stats["batch_polls"]
        assert after["task_polls"] == stats["task_polls"]
        assert not [e for e in d.events()[mark:] if e["event"] == "pass.completed"]

        # The same request signed with the secret is taken: a poll follows at once.
        assert send(now, SECRET, raw, "real-1").json()["status"] == "accepted"
        wait_until(lambda: hooked.stats()["batch_polls"] == stats["batch_polls"] + 1, 10, "poll")
        polled = hooked.stats()["batch_polls"]
        # Replayed, as is or under a new id: acknowledged, ignored, no poll.
        mark = d.mark()
        assert send(now, SECRET, raw, "real-1").json()["status"] == "duplicate"
        assert send(now, SECRET, raw, "real-2").json()["status"] == "duplicate"
        assert [e["event"] for e in d.events()[mark:]] == ["webhook.duplicate"] * 2
        assert hooked.stats()["batch_polls"] == polled
        code, _ = d.stop()
        assert code == 0
        assert SECRET not in d.log_text()


def test_every_outcome_reaches_the_webhooks_metric(harness: Harness) -> None:
    metrics = Metrics()
    harness.receiver.on_outcome = metrics.webhook
    raw = body()
    assert harness.post(raw).status_code == 200
    assert harness.post(raw).json() == {"status": "duplicate"}
    assert harness.post(body("task-2"), secret="wrong", webhook_id="wh-2").status_code == 401
    counted = {
        s.labels["outcome"]: s.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples
        if s.name == "reconciler_webhooks_total"
    }
    assert counted == {"accepted": 1, "duplicate": 1, "bad_signature": 1}
