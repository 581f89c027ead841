"""The ops listener: Prometheus metrics, health checks and the listening dashboard.

Where it sits: beside the daemon loop, on a socket of its own
(:class:`~reconciler.serving.AppServer`, loopback unless configured
otherwise), never on the webhook receiver's, which may face the internet.
Everything here only reads: the daemon's ledger connection (on the event
loop's thread, between the pass's steps), the settings in force, the output
folder, and the figures the daemon hands to :class:`Metrics` as it goes
(every API request, every webhook, every pass).

Routes:

- ``/metrics``: Prometheus text format, from this module's own registry
  (never the process-global one). Ledger figures (tracks by state, credits
  spent, possible double spend) are read at scrape time.
- ``/healthz``: 503 when the last pass is older than three poll intervals
  past the moment it was due (a converged daemon sleeps until its rescan, and
  that is healthy).
- ``/readyz``: 503 when the ledger or the specs folder cannot be read.
- ``/``, ``/static/*``: the dashboard (``dashboard/``), no external assets.
- ``/api/status``: what ``status --json`` says, plus audio links for the
  dashboard, which fetches it every couple of seconds.
- ``/audio/<soundtrack>/<file>``: an output MP3, resolved by
  :class:`~reconciler.outputs.OutputFolder` rules; hidden names, ``..``,
  slashes and symlinks are refused.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.staticfiles import StaticFiles

from reconciler.config import Settings
from reconciler.errors import OutputError
from reconciler.ledger import Ledger
from reconciler.outputs import OutputFolder
from reconciler.planning import CREDITS_PER_TASK
from reconciler.reconciling import PassResult
from reconciler.status import TRACK_STATES, build_report

DASHBOARD = Path(__file__).parent / "dashboard"
#: Scrapes and dashboard polls within this many seconds share one ledger read.
REPORT_TTL = 1.0
#: /healthz allows this many poll intervals past a pass's due time.
STALE_POLLS = 3
#: ``reconciler_submissions_paused`` reasons: one series each, 1 for the one in force.
PAUSE_REASONS = ("budget", "run", "credits", "auth", "other")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Security headers for every answer: the page loads nothing from elsewhere.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; media-src 'self'; "
        "style-src 'self'; script-src 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def pause_reason(blocked: str | None) -> str | None:
    """The label of a submit pause's reason text (see planning.affordable_tasks)."""
    if blocked is None:
        return None
    text = blocked.lower()
    for needle, label in (
        ("daily budget", "budget"),
        ("--max-credits", "run"),
        ("balance", "credits"),
        ("insufficient credits", "credits"),
        ("api key", "auth"),
    ):
        if needle in text:
            return label
    return "other"


def outcome_label(outcome: str) -> str:
    """``TemporaryAPIError`` → ``temporary``: the error tree's names, short."""
    if outcome == "ok":
        return outcome
    name = outcome.removesuffix("Error").removesuffix("API")
    snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")
    return snake or "error"


class Metrics:
    """The daemon's metrics in their own registry, fed as things happen."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.registry = CollectorRegistry()
        r = self.registry
        self.api_requests = Counter(
            "reconciler_api_requests",
            "MusicAPI requests by endpoint and outcome (ok, or the error kind).",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.api_seconds = Histogram(
            "reconciler_api_request_duration_seconds",
            "Time from sending a MusicAPI request to reading its answer, by endpoint.",
            ["endpoint"],
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.batch_submits = Counter(
            "reconciler_batch_submits",
            "Batch submit requests sent (up to ten items each).",
            registry=r,
        )
        self.pass_seconds = Histogram(
            "reconciler_pass_duration_seconds",
            "Duration of completed reconcile passes.",
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.last_pass = Gauge(
            "reconciler_last_pass_timestamp_seconds",
            "Unix time the last reconcile pass completed.",
            registry=r,
        )
        self.leader = Gauge(
            "reconciler_leader",
            "1 while this process leads (it holds the lease of a ledger replicas share, "
            "or the ledger is its own); 0 while it follows.",
            registry=r,
        )
        self.leader.set(1)
        self.spec_errors = Gauge(
            "reconciler_spec_errors", "Spec files that are invalid right now.", registry=r
        )
        self.paused = Gauge(
            "reconciler_submissions_paused",
            "1 while submissions are paused for this reason (budget, run, credits, auth, other).",
            ["reason"],
            registry=r,
        )
        for reason in PAUSE_REASONS:
            self.paused.labels(reason).set(0)
        self.webhooks = Counter(
            "reconciler_webhooks",
            "Webhook requests by outcome (accepted, duplicate, dropped, or why rejected).",
            ["outcome"],
            registry=r,
        )
        self.started_at = clock()
        self.last_pass_at: float | None = None
        #: When the loop means to run the next pass (Unix time).
        self.next_pass_at: float | None = None

    def api_request(self, endpoint: str, outcome: str, seconds: float) -> None:
        """``MusicAPI(on_request=...)``."""
        self.api_requests.labels(endpoint, outcome_label(outcome)).inc()
        self.api_seconds.labels(endpoint).observe(seconds)
        if endpoint == "batch_submit":
            self.batch_submits.inc()

    def webhook(self, outcome: str) -> None:
        """``WebhookReceiver(on_outcome=...)``."""
        self.webhooks.labels(outcome).inc()

    def pass_completed(self, result: PassResult) -> None:
        now = self.clock()
        self.last_pass_at = now
        self.last_pass.set(now)
        self.pass_seconds.observe(result.seconds)
        self.spec_errors.set(result.invalid_files)
        reason = pause_reason(result.blocked)
        for label in PAUSE_REASONS:
            self.paused.labels(label).set(1 if label == reason else 0)

    def stale(self, poll_interval: float) -> float | None:
        """Seconds past the health limit (None: healthy). See the module docstring."""
        due = max(self.last_pass_at or self.started_at, self.next_pass_at or 0.0)
        if not math.isfinite(due):
            due = self.last_pass_at or self.started_at
        late = self.clock() - due - STALE_POLLS * poll_interval
        return late if late > 0 else None


class _LedgerFigures(Collector):
    """What only the ledger knows, read when Prometheus scrapes."""

    def __init__(self, ops: OpsApp) -> None:
        self.ops = ops

    def collect(self) -> Iterator[Metric]:
        report = self.ops.report()
        tracks = GaugeMetricFamily(
            "reconciler_tracks",
            "Tracks by state, as reconciler status counts them.",
            labels=["state"],
        )
        for state in TRACK_STATES:
            tracks.add_metric([state], report["summary"][state])
        yield tracks
        yield CounterMetricFamily(
            "reconciler_credits_spent",
            "Credits that may have been spent, all time: tasks created and unsettled "
            "submit items, 15 each (the figure budgets are checked against).",
            value=report["credits_spent_total"],
        )
        yield GaugeMetricFamily(
            "reconciler_possible_double_spend",
            "Generations sent again after a lost answer: each may have been paid twice.",
            value=report["possible_double_spend"],
        )


class OpsApp:
    """The Starlette app of the ops listener over the daemon's ledger and settings."""

    def __init__(self, metrics: Metrics, ledger: Ledger, settings: Callable[[], Settings]) -> None:
        self.metrics = metrics
        self.ledger = ledger
        self.settings = settings
        self._report: tuple[float, dict[str, Any]] | None = None
        metrics.registry.register(_LedgerFigures(self))
        self.app = Starlette(
            routes=[
                Route("/", self._index, methods=["GET"]),
                Route("/metrics", self._metrics, methods=["GET"]),
                Route("/healthz", self._healthz, methods=["GET"]),
                Route("/readyz", self._readyz, methods=["GET"]),
                Route("/api/status", self._status, methods=["GET"]),
                Route("/audio/{soundtrack}/{filename}", self._audio, methods=["GET"]),
            ]
        )
        self.app.mount("/static", StaticFiles(directory=DASHBOARD / "static"), name="static")
        self.app.add_middleware(_Headers)

    def report(self) -> dict[str, Any]:
        """``status --json`` plus all-time credits; shared by scrapes and the page for a second."""
        now = time.monotonic()
        if self._report is not None and now - self._report[0] < REPORT_TTL:
            return self._report[1]
        settings = self.settings()
        report = build_report(settings, self.metrics.clock())
        report["credits_spent_total"] = CREDITS_PER_TASK * self.ledger.spent_since(0)
        report["credits"]["max_credits_this_run"] = settings.max_credits
        self._report = (now, report)
        return report

    async def _index(self, request: Request) -> Response:
        return FileResponse(DASHBOARD / "index.html", media_type="text/html; charset=utf-8")

    async def _metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE)

    async def _healthz(self, request: Request) -> Response:
        late = self.metrics.stale(self.settings().poll_interval)
        if late is not None:
            return PlainTextResponse(f"last pass overdue by {late:.0f} s\n", status_code=503)
        return PlainTextResponse("ok\n")

    async def _readyz(self, request: Request) -> Response:
        problems = []
        try:
            self.ledger.get("last_pass_at")
        except Exception as exc:
            problems.append(f"ledger cannot be read: {exc}")
        specs = self.settings().specs_dir
        try:
            os.listdir(specs)
        except OSError as exc:
            problems.append(f"specs folder {specs} cannot be read: {exc.strerror}")
        if problems:
            return PlainTextResponse("\n".join(problems) + "\n", status_code=503)
        return PlainTextResponse("ok\n")

    async def _status(self, request: Request) -> Response:
        report = self.report()
        tracks = []
        for t in report["tracks"]:
            audio = (
                [f"/audio/{f}" for f in t["files"] if f.endswith(".mp3")]
                if t["state"] == "ready"
                else []
            )
            tracks.append({**t, "audio": audio})
        return JSONResponse({**report, "tracks": tracks}, headers={"Cache-Control": "no-store"})

    async def _audio(self, request: Request) -> Response:
        soundtrack = request.path_params["soundtrack"]
        filename = request.path_params["filename"]
        folder = OutputFolder(self.settings().out_dir)
        try:
            path = folder.path(soundtrack, filename)
        except OutputError:
            return PlainTextResponse("not found\n", status_code=404)
        # A symlinked file could point anywhere: only regular files inside the folder.
        real = path.resolve()
        if (
            not filename.endswith(".mp3")
            or path.is_symlink()
            or not real.is_relative_to(folder.root.resolve())
            or not real.is_file()
        ):
            return PlainTextResponse("not found\n", status_code=404)
        return FileResponse(real, media_type="audio/mpeg")


class _Headers:
    """Adds the security headers to every answer of the ops listener."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.lower().encode(), v.encode()) for k, v in _HEADERS.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)
