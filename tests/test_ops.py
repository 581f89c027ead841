"""The ops listener: metrics checked against the sandbox's books, health, audio paths.

The integration test runs a real daemon subprocess with ``--ops-listen``
against the sandbox and scrapes it over loopback; the figures must agree with
what the sandbox counted (tasks it created, batch submits it received).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from reconciler.config import Flags, Settings, load_settings, parse_listen
from reconciler.errors import ConfigError
from reconciler.ledger import Ledger
from reconciler.ops import DASHBOARD, Metrics, OpsApp, outcome_label, pause_reason
from reconciler.planning import CREDITS_PER_TASK
from reconciler.reconciling import PassResult
from reconciler.sandbox import SandboxControl
from tests.daemonproc import DaemonProc, daemon_project, free_port
from tests.project import Project, track, wait_until

ALERTS = Path(__file__).parent.parent / "ops" / "alerts.yml"


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: (name, sorted labels) → value."""
    text = httpx.get(f"{base}/metrics", timeout=5).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict[Any, float], name: str, **labels: str) -> float:
    """Sum over the series of ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


@pytest.fixture
def daemon_with_ops(tmp_path: Path, sandbox: SandboxControl) -> tuple[Project, DaemonProc, str]:
    project = daemon_project(tmp_path, sandbox)
    project.write_spec("study.yaml", [track(f"focus-{i}", f"lofi beats {i}") for i in range(12)])
    project.write_spec("gym.yaml", [track(f"run-{i}", f"drum and bass {i}") for i in range(3)])
    port = free_port()
    # A bare port: the listener takes loopback.
    return project, DaemonProc(project, "--ops-listen", str(port)), f"http://127.0.0.1:{port}"


def test_metrics_agree_with_the_sandbox_books(
    daemon_with_ops: tuple[Project, DaemonProc, str],
) -> None:
    project, daemon, base = daemon_with_ops
    with daemon:
        daemon.wait_event("ops.listening")
        # Scraped while tracks are still on their way, then again once all are ready.
        wait_until(
            lambda: value(scrape(base), "reconciler_batch_submits_total") >= 1, 20, "a submit"
        )
        wait_until(
            lambda: value(scrape(base), "reconciler_tracks", state="ready") == 15, 30, "15 ready"
        )
        samples = scrape(base)
        books = project.stats()

        assert books["tasks_created"] == 15
        assert value(samples, "reconciler_credits_spent_total") == 15 * CREDITS_PER_TASK
        assert value(samples, "reconciler_credits_spent_total") == books["credits_charged"]
        assert value(samples, "reconciler_batch_submits_total") == books["batch_submit_calls"] == 2
        assert total(samples, "reconciler_api_requests_total", endpoint="batch_submit") == 2
        assert (
            total(samples, "reconciler_api_requests_total", endpoint="batch_poll")
            == books["batch_polls"]
        )
        assert (
            total(samples, "reconciler_api_request_duration_seconds_count", endpoint="batch_poll")
            == books["batch_polls"]
        )
        for state in ("queued", "generating", "retrying", "failed", "invalid"):
            assert value(samples, "reconciler_tracks", state=state) == 0
        assert value(samples, "reconciler_possible_double_spend") == 0
        assert value(samples, "reconciler_spec_errors") == 0
        assert value(samples, "reconciler_pass_duration_seconds_count") >= 1
        assert value(samples, "reconciler_last_pass_timestamp_seconds") > 0
        assert value(samples, "reconciler_submissions_paused", reason="budget") == 0
        # No per-track series anywhere.
        assert not any(dict(ls).keys() & {"track", "fingerprint"} for _, ls in samples)

        # An invalid spec shows at once, in its metric and in the page's data.
        mark = daemon.mark()
        (project.specs / "broken.yaml").write_text("tracks: [\n")
        daemon.wait_event("pass.completed", after=mark)
        wait_until(lambda: value(scrape(base), "reconciler_spec_errors") == 1, 10, "spec error")

        assert httpx.get(f"{base}/healthz").status_code == 200
        assert httpx.get(f"{base}/readyz").status_code == 200
        project.specs.rename(project.root / "specs-away")
        answer = httpx.get(f"{base}/readyz")
        assert answer.status_code == 503
        assert "specs folder" in answer.text


def test_status_api_and_audio_stay_inside_the_output_folder(
    daemon_with_ops: tuple[Project, DaemonProc, str], tmp_path: Path
) -> None:
    project, daemon, base = daemon_with_ops
    secret = tmp_path / "secret.mp3"
    secret.write_bytes(b"not for you")
    with daemon:
        daemon.converged()
        status = wait_until(
            lambda: (s := httpx.get(f"{base}/api/status").json())["summary"]["ready"] == 15 and s,
            10,
            "ready in /api/status",
        )
        focus = next(t for t in status["tracks"] if t["track"] == "focus-0")
        assert focus["audio"] == ["/audio/study/focus-0.mp3"]
        answer = httpx.get(base + focus["audio"][0])
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "audio/mpeg"
        assert answer.content == (project.out / "study" / "focus-0.mp3").read_bytes()
        assert project.sandbox.key not in httpx.get(f"{base}/api/status").text

        (project.out / "study" / "leak.mp3").symlink_to(secret)
        (project.out / "outside").symlink_to(tmp_path)
        for path in (
            "/audio/study/leak.mp3",  # a symlink to a file outside
            "/audio/outside/secret.mp3",  # a soundtrack folder that is a symlink out
            "/audio/study/..%2F..%2Fsecret.mp3",
            "/audio/%2E%2E/secret.mp3",
            "/audio/study/.hidden.mp3",
            "/audio/study/playlist.m3u8",
            "/audio/study/nope.mp3",
        ):
            answer = httpx.get(base + path)
            assert answer.status_code == 404, path
            assert b"not for you" not in answer.content
        # Raw, unnormalised dot segments, as a client that does not clean them sends.
        with httpx.Client() as client:
            request = client.build_request("GET", base + "/audio/x")
            request.url = request.url.copy_with(raw_path=b"/audio/../secret.mp3")
            assert client.send(request).status_code == 404


def test_dashboard_loads_nothing_from_elsewhere() -> None:
    for path in DASHBOARD.rglob("*"):
        if path.is_file():
            text = path.read_text()
            # Every URL in the page is relative to the listener.
            assert "http://" not in text, path
            assert "https://" not in text, path


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("9100", ("127.0.0.1", 9100)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        ("[::1]:9100", ("::1", 9100)),
        (" localhost:80 ", ("localhost", 80)),
        ("0", ("127.0.0.1", 0)),
    ],
)
def test_parse_listen(given: str, expected: tuple[str, int]) -> None:
    assert parse_listen(given, "ops.listen") == expected


@pytest.mark.parametrize("given", ["", "host:", ":9100", "x:y", "70000", "-1", "a:b:c"])
def test_parse_listen_refuses(given: str) -> None:
    with pytest.raises(ConfigError, match=r"ops\.listen: expected HOST:PORT or PORT"):
        parse_listen(given, "ops.listen")


def test_ops_listen_flag_beats_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "r.toml"
    config.write_text('[ops]\nlisten = "9300"\n')
    assert load_settings(Flags(config=config), env={}).ops_listen == ("127.0.0.1", 9300)
    flagged = load_settings(Flags(config=config, ops_listen="::1:9400"), env={})
    assert flagged.ops_listen == ("::1", 9400)
    assert load_settings(Flags(), env={}).ops_listen is None
    config.write_text('[ops]\nlisten = "nope"\n')
    with pytest.raises(ConfigError, match=r"r\.toml: ops\.listen"):
        load_settings(Flags(config=config), env={})


@pytest.mark.parametrize(
    ("blocked", "label"),
    [
        (None, None),
        ("daily budget reached (3000/3000 credits)", "budget"),
        ("--max-credits reached (30/30 credits this run)", "run"),
        ("account balance too low (10 credits)", "credits"),
        ("insufficient credits: balance 0", "credits"),
        ("insufficient credits on the account", "credits"),
        ("API key rejected (401): bad key", "auth"),
        ("something new", "other"),
    ],
)
def test_pause_reason(blocked: str | None, label: str | None) -> None:
    assert pause_reason(blocked) == label


@pytest.mark.parametrize(
    ("outcome", "label"),
    [
        ("ok", "ok"),
        ("TemporaryAPIError", "temporary"),
        ("AmbiguousSubmitError", "ambiguous_submit"),
        ("InsufficientCreditsError", "insufficient_credits"),
        ("APIError", "error"),
    ],
)
def test_outcome_label(outcome: str, label: str) -> None:
    assert outcome_label(outcome) == label


def test_health_fails_three_poll_intervals_after_a_pass_was_due() -> None:
    now = [1000.0]
    metrics = Metrics(clock=lambda: now[0])
    assert metrics.stale(10) is None, "just started"
    now[0] = 1031
    assert metrics.stale(10) == pytest.approx(1), "no pass within three intervals of the start"
    metrics.pass_completed(PassResult())
    metrics.next_pass_at = 1031 + 300  # converged: the loop sleeps until the rescan
    now[0] = 1031 + 300 + 29
    assert metrics.stale(10) is None
    now[0] = 1031 + 300 + 31
    assert metrics.stale(10) == pytest.approx(1)
    metrics.pass_completed(PassResult())
    assert metrics.stale(10) is None


def test_metrics_use_their_own_registry() -> None:
    from prometheus_client import REGISTRY

    Metrics()
    Metrics()  # a second instance would clash on the global registry
    assert "reconciler_tracks" not in {m.name for m in REGISTRY.collect()}


def test_alert_rules_use_only_metrics_the_listener_serves(tmp_path: Path) -> None:
    rules = yaml.safe_load(ALERTS.read_text())
    alerts = [r for group in rules["groups"] for r in group["rules"]]
    assert {r["alert"] for r in alerts} >= {
        "ReconcilerCreditsExhausted",
        "ReconcilerPassesStalled",
        "ReconcilerPossibleDoubleSpend",
        "ReconcilerTracksParked",
    }
    for rule in alerts:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["annotations"]["summary"], rule
    ledger = Ledger.open(tmp_path / "ledger.sqlite3")
    try:
        settings = Settings(tmp_path, tmp_path / "out", tmp_path, "http://x", None)
        metrics = Metrics()
        OpsApp(metrics, ledger, lambda: settings)
        served = {
            s.name
            for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
            for s in family.samples
        }
    finally:
        ledger.close()
    used = {name for r in alerts for name in re.findall(r"reconciler_[a-z_]+", r["expr"])}
    assert used, "the rules watch reconciler's metrics"
    assert used <= served, used - served
