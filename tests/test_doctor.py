"""`reconciler doctor`: every check's pass and fail path, and `--live` end to end.

The checks run in-process against the real sandbox over loopback (real
folders, a real webhook receiver); `--live` runs as a CLI subprocess, once
per shape profile of the sandbox. Only the clock check forces its answer
through ``httpx.MockTransport``: the sandbox's ``Date`` is always right.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from reconciler.config import KEY_HELP, Flags, Settings, WebhookSettings, load_settings
from reconciler.doctor import (
    CLOCK_TOLERANCE,
    Check,
    Report,
    check_batch,
    check_budget,
    check_clock,
    check_webhook,
    run_doctor,
)
from reconciler.errors import TemporaryAPIError
from reconciler.musicapi import MusicAPI
from reconciler.sandbox import SHAPES, SandboxControl
from reconciler.webhooks import WebhookReceiver, WebhookServer
from tests.daemonproc import free_port
from tests.project import Project, track

SECRET = "doctor-webhook-secret"


def webhook_config(port: int, public_port: int | None = None) -> str:
    return f"""
[webhook]
listen = "127.0.0.1:{port}"
public_url = "http://127.0.0.1:{public_port or port}"
secret = "{SECRET}"
"""


def make_settings(
    root: Path,
    sandbox: SandboxControl,
    *,
    key: str | None = "sandbox",
    config: str = "",
    specs: Path | None = None,
    out: Path | None = None,
    max_credits: int | None = None,
) -> Settings:
    conf = root / "doctor.toml"
    conf.write_text(config)
    (root / "specs").mkdir(exist_ok=True)
    return load_settings(
        Flags(
            specs=specs or root / "specs",
            out=out or root / "tracks",
            state=root / "state",
            config=conf,
            api_url=sandbox.base_url,
            max_credits=max_credits,
        ),
        env={"MUSICAPI_KEY": sandbox.key if key == "sandbox" else key} if key else {},
    )


def write_tracks(root: Path, n: int) -> None:
    spec = {"defaults": {"mv": "sonic-v5"}, "tracks": [track(f"t{i}", f"p{i}") for i in range(n)]}
    (root / "specs").mkdir(exist_ok=True)
    (root / "specs" / "set.yaml").write_text(yaml.safe_dump(spec))


def doctor(settings: Settings, **kwargs: Any) -> dict[str, Check]:
    report = asyncio.run(run_doctor(settings, **kwargs))
    return {c.name: c for c in report.checks}


def outcomes(checks: dict[str, Check]) -> dict[str, str]:
    return {name: c.outcome for name, c in checks.items()}


# ---------------------------------------------------------------------------
# The preflight against the sandbox


def test_a_sound_setup_passes_and_spends_nothing(tmp_path: Path, sandbox: SandboxControl) -> None:
    write_tracks(tmp_path, 2)
    report = asyncio.run(run_doctor(make_settings(tmp_path, sandbox)))
    checks = {c.name: c for c in report.checks}
    assert outcomes(checks) == {
        "specs": "ok",
        "folders": "ok",
        "key": "ok",
        "balance": "ok",
        "budget": "ok",
        "batch": "ok",
        "webhook": "warn",  # not configured
        "clock": "ok",
    }
    assert report.passed
    assert "2 tracks in 1 file" in checks["specs"].found
    assert "100000 credits cover the plan's 30" in checks["balance"].found
    assert "double spend" in checks["webhook"].found
    stats = sandbox.stats()
    assert stats["tasks_created"] == 0
    assert stats["credits_charged"] == 0
    assert stats["batch_submit_calls"] == 1  # the empty batch


def test_a_missing_specs_folder_fails(tmp_path: Path, sandbox: SandboxControl) -> None:
    checks = doctor(make_settings(tmp_path, sandbox, specs=tmp_path / "nowhere"))
    assert checks["specs"].outcome == "FAIL"
    assert "nowhere does not exist" in checks["specs"].found
    assert "--specs" in checks["specs"].todo


def test_an_invalid_spec_file_fails(tmp_path: Path, sandbox: SandboxControl) -> None:
    write_tracks(tmp_path, 1)
    (tmp_path / "specs" / "bad.yaml").write_text("tracks:\n  - name: x\n    mv: sonic-v9\n")
    checks = doctor(make_settings(tmp_path, sandbox))
    assert checks["specs"].outcome == "FAIL"
    assert "1 invalid file (1 track in 1 file valid)" in checks["specs"].found
    assert "bad.yaml" in checks["specs"].found
    assert "reconciler validate" in checks["specs"].todo


def test_an_output_folder_inside_the_specs_folder_fails(
    tmp_path: Path, sandbox: SandboxControl
) -> None:
    write_tracks(tmp_path, 1)
    checks = doctor(make_settings(tmp_path, sandbox, out=tmp_path / "specs" / "tracks"))
    assert checks["folders"].outcome == "FAIL"
    assert "inside the specs folder" in checks["folders"].found


def test_an_unwritable_state_folder_fails(tmp_path: Path, sandbox: SandboxControl) -> None:
    (tmp_path / "state").write_text("a file where the state folder should be")
    checks = doctor(make_settings(tmp_path, sandbox))
    assert checks["folders"].outcome == "FAIL"
    assert "is a file, not a folder" in checks["folders"].found


def test_a_wrong_key_fails_with_the_401(tmp_path: Path, sandbox: SandboxControl) -> None:
    write_tracks(tmp_path, 1)
    report = asyncio.run(run_doctor(make_settings(tmp_path, sandbox, key="not-the-key")))
    checks = {c.name: c for c in report.checks}
    assert not report.passed
    assert checks["key"].outcome == "FAIL"
    assert "refused the key (HTTP 401" in checks["key"].found
    assert "MUSICAPI_KEY" in checks["key"].todo
    assert "not-the-key" not in json.dumps([vars(c) for c in report.checks])
    # Nothing more is asked with a key the service refuses.
    assert checks["batch"].found.startswith("not checked")
    assert sandbox.stats()["batch_submit_calls"] == 0


def test_no_key_fails_with_the_key_help_and_calls_nothing(
    tmp_path: Path, sandbox: SandboxControl
) -> None:
    write_tracks(tmp_path, 1)
    checks = doctor(make_settings(tmp_path, sandbox, key=None))
    assert checks["key"] == Check("key", "FAIL", KEY_HELP)
    assert checks["specs"].outcome == "ok"
    assert sandbox.stats()["credit_calls"] == 0


@pytest.mark.parametrize(
    ("balance", "outcome", "words"),
    [
        (30, "ok", "30 credits cover the plan's 30"),
        (20, "warn", "20 credits, the plan costs 30: submissions pause"),
        (10, "FAIL", "10 credits, less than one generation"),
    ],
)
def test_the_balance_against_the_plan(
    tmp_path: Path, sandbox: SandboxControl, balance: int, outcome: str, words: str
) -> None:
    write_tracks(tmp_path, 2)
    sandbox.configure(credits=balance)
    checks = doctor(make_settings(tmp_path, sandbox))
    assert checks["balance"].outcome == outcome
    assert words in checks["balance"].found


def test_the_plan_cost_is_what_plan_would_submit_now(
    tmp_path: Path, sandbox: SandboxControl
) -> None:
    """Tracks already generated cost nothing, and what they cost today counts
    against the daily budget: the cost is the plan's, not the specs'."""
    write_tracks(tmp_path, 2)
    Project(tmp_path, sandbox).sync()  # 30 credits spent today
    write_tracks(tmp_path, 4)
    settings = make_settings(tmp_path, sandbox, config="[submit]\ndaily_budget = 45\n")
    checks = doctor(settings)
    assert "cover the plan's 30" in checks["balance"].found
    assert checks["budget"].outcome == "warn"
    assert "more than the 15 left of daily_budget 45 today" in checks["budget"].found


def test_the_budget_warns_above_the_daily_budget_or_max_credits(
    tmp_path: Path, sandbox: SandboxControl
) -> None:
    write_tracks(tmp_path, 3)
    settings = make_settings(
        tmp_path, sandbox, config="\n[submit]\ndaily_budget = 30\n", max_credits=15
    )
    checks = doctor(settings)
    assert checks["budget"].outcome == "warn"
    assert "45 credits, more than daily_budget 30 (spread over 2 UTC days)" in (
        checks["budget"].found
    )
    assert "more than --max-credits 15" in checks["budget"].found


@pytest.mark.parametrize(
    ("cost", "daily", "spent", "ceiling", "outcome", "words"),
    [
        (45, None, 0, None, "ok", "submissions stop only at the balance"),
        (45, 45, 0, None, "ok", "fit daily_budget 45 (0 spent today)"),
        (45, None, 0, 45, "ok", "fit --max-credits 45"),
        (60, 45, 0, None, "warn", "spread over 2 UTC days"),
        (60, 0, 0, None, "warn", "never submitted"),
        (30, 45, 30, None, "warn", "more than the 15 left of daily_budget 45 today"),
        (30, 45, 60, None, "warn", "more than the 0 left"),
        (15, 45, 30, None, "ok", "fit daily_budget 45 (30 spent today)"),
        (60, None, 0, 30, "warn", "this run stops there"),
        (None, 45, 0, None, "warn", "cost is unknown"),
    ],
)
def test_check_budget(
    cost: int | None,
    daily: int | None,
    spent: int,
    ceiling: int | None,
    outcome: str,
    words: str,
) -> None:
    check = check_budget(cost, daily, ceiling, spent)
    assert (check.outcome, words in check.found) == (outcome, True), check


@pytest.mark.parametrize("status", [404, 405])
def test_a_missing_batch_endpoint_warns(
    tmp_path: Path, sandbox: SandboxControl, status: int
) -> None:
    write_tracks(tmp_path, 1)
    sandbox.configure(batch_disabled=status)
    report = asyncio.run(run_doctor(make_settings(tmp_path, sandbox)))
    batch = next(c for c in report.checks if c.name == "batch")
    assert batch.outcome == "warn"
    assert f"absent here (HTTP {status})" in batch.found
    assert "/sonic/create" in batch.found
    assert report.passed  # the daemon copes


# ---------------------------------------------------------------------------
# The clock: a forced Date header


def _probe_answering(date: str | None) -> Any:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/api/v1/sonic/batch"
        assert json.loads(request.content) == {"items": []}
        headers = {"Date": date} if date is not None else {}
        return httpx.Response(400, json={"type": "bad_request", "error": "items"}, headers=headers)

    async def probe() -> Any:
        async with MusicAPI(
            "https://api.example/api/v1", "k", transport=httpx.MockTransport(handler)
        ) as api:
            return await api.probe_batch_endpoint()

    return asyncio.run(probe())


@pytest.mark.parametrize(
    ("offset", "outcome"),
    [(0, "ok"), (-45, "ok"), (CLOCK_TOLERANCE + 30, "FAIL"), (-(CLOCK_TOLERANCE + 30), "FAIL")],
)
def test_the_clock_against_the_date_header(offset: float, outcome: str) -> None:
    now = float(int(time.time()))  # a Date header has whole seconds
    probe = _probe_answering(email.utils.formatdate(now + offset, usegmt=True))
    assert check_batch(probe).outcome == "ok"
    check = check_clock(probe.server_time, now)
    assert check.outcome == outcome, check
    if outcome == "FAIL":
        assert f"{-offset:+.0f} s off" in check.found
        assert "time sync" in check.todo


def test_an_empty_batch_without_an_answer_is_no_ambiguous_submit() -> None:
    """Nothing can be created by 0 items, so a lost answer is a plain fault (and a FAIL)."""

    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("no answer", request=request)

    async def probe() -> Any:
        async with MusicAPI(
            "https://api.example/api/v1", "k", transport=httpx.MockTransport(handler)
        ) as api:
            return await api.probe_batch_endpoint()

    with pytest.raises(TemporaryAPIError) as caught:
        asyncio.run(probe())
    check = check_batch(caught.value)
    assert check.outcome == "FAIL"
    assert "got no answer" in check.found


@pytest.mark.parametrize("date", [None, "yesterday-ish"])
def test_no_readable_date_header_is_a_warning(date: str | None) -> None:
    probe = _probe_answering(date)
    assert probe.server_time is None
    assert check_clock(probe.server_time, time.time()).outcome == "warn"


# ---------------------------------------------------------------------------
# The webhook receiver behind public_url


def _hook(port: int, public_port: int | None = None) -> WebhookSettings:
    from pydantic import SecretStr

    return WebhookSettings(
        host="127.0.0.1",
        port=port,
        public_url=f"http://127.0.0.1:{public_port or port}",
        secret=SecretStr(SECRET),
    )


def test_no_webhook_warns_about_double_spend() -> None:
    check = asyncio.run(check_webhook(None))
    assert check.outcome == "warn"
    assert "possible double spend at 0" in check.todo


def test_a_webhook_url_that_reaches_the_receiver_passes() -> None:
    """Nothing listens yet: doctor serves a receiver for the probe, then stops it."""
    port = free_port()
    check = asyncio.run(check_webhook(_hook(port)))
    assert check.outcome == "ok", check
    assert "doctor's own receiver" in check.found
    assert "401" in check.found


def test_a_running_receiver_is_probed_as_it_is() -> None:
    port = free_port()

    async def probe() -> Check:
        server = WebhookServer(
            WebhookReceiver(_hook(port), on_hint=lambda: None), "127.0.0.1", port
        )
        await server.start()
        try:
            return await check_webhook(_hook(port))
        finally:
            await server.stop()

    check = asyncio.run(probe())
    assert check.outcome == "ok", check
    assert "already running there" in check.found


def test_a_public_url_that_reaches_nothing_fails() -> None:
    check = asyncio.run(check_webhook(_hook(free_port(), public_port=free_port())))
    assert check.outcome == "FAIL"
    assert "cannot be reached" in check.found
    assert "webhook.listen 127.0.0.1" in check.todo


def test_a_public_url_that_reaches_something_else_fails(sandbox: SandboxControl) -> None:
    sandbox_port = httpx.URL(sandbox.base_url).port
    check = asyncio.run(check_webhook(_hook(free_port(), public_port=sandbox_port)))
    assert check.outcome == "FAIL"
    assert "not a reconciler receiver's 401" in check.found


# ---------------------------------------------------------------------------
# The command


def test_the_command_exits_0_when_all_pass_and_1_otherwise(
    tmp_path: Path, sandbox: SandboxControl
) -> None:
    project = Project(tmp_path, sandbox)
    project.write_spec("set.yaml", [track("a", "calm")])
    proc = project.cli("doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0].startswith("ok    specs")
    assert "all checks pass: 7 ok, 1 warning, 0 failures" in proc.stdout

    proc = project.cli("doctor", "--json", "--specs", str(tmp_path / "nowhere"))
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["schema"] == 1
    assert report["passed"] is False
    failed = [c["name"] for c in report["checks"] if c["outcome"] == "FAIL"]
    assert failed == ["specs"]


def test_live_without_yes_and_without_a_tty_refuses_and_spends_nothing(
    tmp_path: Path, sandbox: SandboxControl
) -> None:
    project = Project(tmp_path, sandbox)
    proc = subprocess.run(
        [*project.args("doctor"), "--live"],
        env=project.env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "pass --yes" in proc.stderr
    stats = sandbox.stats()
    assert stats["batch_submit_calls"] == 0
    assert stats["tasks_created"] == 0
    assert stats["credit_calls"] == 0


# ---------------------------------------------------------------------------
# --live, end to end


def live(project: Project, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    proc = project.cli("doctor", "--live", "--yes", "--json", *extra, timeout=120)
    return proc, json.loads(proc.stdout)


def stored_files(report: dict[str, Any]) -> Iterator[Path]:
    folder = Path(report["live_folder"])
    return (p for p in sorted(folder.iterdir()) if p.suffix in (".json", ".txt"))


def test_live_follows_one_generation_and_keeps_every_answer(
    tmp_path: Path, sandbox: SandboxControl
) -> None:
    project = Project(tmp_path, sandbox)
    project.write_spec("set.yaml", [track("a", "calm")])
    proc, report = live(project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["live submit"]["outcome"] == "ok"
    assert "not in the ledger" in checks["live submit"]["found"]
    assert checks["live generation"]["outcome"] == "ok"
    assert "decodes as" in checks["live audio"]["found"]
    assert checks["live batch_submit"]["found"] == "documented (1 answer)"
    assert checks["live batch_poll"]["outcome"] == "ok"
    assert "15 credits" in proc.stderr  # the stated cost
    stats = sandbox.stats()
    assert stats["tasks_created"] == 1
    assert stats["credits_charged"] == 15
    # Every answer is on disk, as the service sent it, without the key.
    folder = Path(report["live_folder"])
    assert folder.parent == project.state / "doctor"
    index = json.loads((folder / "index.json").read_text())
    names = [a["file"] for a in index["answers"]]
    assert names[0] == "002-batch_submit-200.json"
    assert any("batch_poll" in n for n in names)
    submit = json.loads((folder / names[0]).read_text())
    assert submit["tasks"][0]["task_id"] == index["task_id"]
    assert (folder / "001-batch_submit-request.json").exists()
    for path in stored_files(report):
        assert sandbox.key not in path.read_text()
    # The generation is not in the ledger: plan still wants the track.
    assert project.cli("plan").returncode == 2


def test_live_says_when_the_submit_answer_is_lost(tmp_path: Path, sandbox: SandboxControl) -> None:
    project = Project(tmp_path, sandbox)
    # The first batch request is the preflight's empty one.
    sandbox.configure(faults=[{"kind": "drop_response", "at": [2], "endpoints": ["batch_submit"]}])
    proc, report = live(project)
    assert proc.returncode == 1
    submit = next(c for c in report["checks"] if c["name"] == "live submit")
    assert submit["outcome"] == "FAIL"
    assert "the answer was lost" in submit["found"]
    assert "may exist" in submit["found"]


def test_live_fails_when_the_generation_fails(tmp_path: Path, sandbox: SandboxControl) -> None:
    project = Project(tmp_path, sandbox)
    sandbox.configure(faults=[{"kind": "task_failed", "at": [1], "error": "upstream broke"}])
    proc, report = live(project)
    assert proc.returncode == 1
    end = next(c for c in report["checks"] if c["name"] == "live generation")
    assert end["outcome"] == "FAIL"
    assert "upstream broke" in end["found"]
    assert "refunds" in end["found"]


def test_live_follows_by_task_polls_when_the_batch_poll_cannot_tell(
    tmp_path: Path, sandbox: SandboxControl
) -> None:
    project = Project(tmp_path, sandbox)
    sandbox.configure(faults=[{"kind": "server_error", "rate": 1.0, "endpoints": ["batch_poll"]}])
    proc, report = live(project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["live generation"]["outcome"] == "ok"
    assert checks["live task_poll"]["outcome"] == "ok"  # the task endpoint told
    assert sandbox.stats()["task_polls"] >= 1


# What a one-item live check meets under each profile, beyond the expected shapes.
# The other profiles change only what a rejected item or a second item looks like.
UNDOCUMENTED = {
    "batch-poll-202": ("batch_poll", "202 not_ready"),
    "poll-no-index": ("batch_poll", "no index"),
    "poll-no-task-id": ("batch_poll", "entry without task id"),
    "succeeded-no-data": ("batch_poll", "succeeded without clips"),
    "poll-single-shape": ("batch_poll", "entries shaped like task polls"),
    "submit-id": ("batch_submit", "task id as id"),
    "submit-taskId": ("batch_submit", "task id as taskId"),
    "submit-bare": ("batch_submit", "task id as"),
    "numeric-batch-id": ("batch_submit", "numeric batch id"),
    "one-based-index": ("batch_submit", "1-based index"),
    "webhook-documented": ("webhook", "no task_id (matched by clip id)"),
    "webhook-x-signature": ("webhook", "older X-Signature scheme"),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_live_under_every_shape_profile(
    tmp_path: Path, sandbox: SandboxControl, shape: str
) -> None:
    sandbox.configure(shapes=[shape])
    project = Project(tmp_path, sandbox, extra_config=webhook_config(free_port()))
    proc, report = live(project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["live generation"]["outcome"] == "ok"
    assert checks["live audio"]["outcome"] == "ok"
    assert "all verified" in checks["live webhook"]["found"]
    index = json.loads((Path(report["live_folder"]) / "index.json").read_text())
    odd = {
        (a["endpoint"], a["shape"])
        for a in index["answers"]
        if a["shape"] not in ("documented", "expected")
    }
    assert not any(found.startswith("unreadable") for _, found in odd)
    if shape in UNDOCUMENTED:
        endpoint, words = UNDOCUMENTED[shape]
        assert any(e == endpoint and words in s for e, s in odd), odd
        assert checks[f"live {endpoint}"]["outcome"] == "warn"
        assert words in checks[f"live {endpoint}"]["found"]
    else:
        assert odd == set()
        assert all(c["outcome"] == "ok" for n, c in checks.items() if n.startswith("live"))
    assert sandbox.stats()["tasks_created"] == 1
    for path in stored_files(report):
        text = path.read_text()
        assert SECRET not in text
        assert sandbox.key not in text


def test_report_passes_only_without_failures() -> None:
    assert Report([Check("a", "ok", ""), Check("b", "warn", "")]).passed
    assert not Report([Check("a", "ok", ""), Check("b", "FAIL", "")]).passed
