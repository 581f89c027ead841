"""Config files as a person writes them: every mistake named, with a suggestion, and logging levels.

``load_settings`` is called directly on real files (table-driven); the debug
level is checked on a real ``sync`` subprocess against the sandbox.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import structlog

from reconciler import logs
from reconciler.config import Flags, load_settings
from reconciler.errors import ConfigError
from reconciler.sandbox import SandboxControl
from tests.project import Project, track


def config_error(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(Flags(config=path), env={})
    lines = str(err.value).splitlines()
    assert all(line.startswith(f"{path}: ") for line in lines)
    return [line.removeprefix(f"{path}: ") for line in lines]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[submit]\nbatch_windw = 2\n",
            "submit.batch_windw: unknown key (did you mean 'batch_window'?)",
        ),
        ("log_levl = 'debug'\n", "log_levl: unknown key (did you mean 'log_level'?)"),
        ("[pol]\ninterval = 3\n", "pol: unknown key (did you mean 'poll'?)"),
        ("[submit]\nzzz = 1\n", "submit.zzz: unknown key"),
        (
            "log_level = 'verbose'\n",
            "log_level: 'verbose' is not a log level (one of debug, info, warning, error)",
        ),
        ("log_level = 'warn'\n", "log_level: 'warn' is not a log level (did you mean 'warning'?)"),
        (
            "[submit]\nmax_in_flight = 0\n",
            "submit.max_in_flight: must be greater than or equal to 1, got 0",
        ),
    ],
)
def test_one_mistake_is_named_with_a_suggestion(tmp_path: Path, text: str, expected: str) -> None:
    assert config_error(tmp_path, text) == [expected]


def test_every_mistake_in_the_file_is_listed(tmp_path: Path) -> None:
    problems = config_error(
        tmp_path,
        "log_level = 'loud'\n[submit]\nbatch_windw = 3\ndaily_budget = 'lots'\n"
        "[retry]\nbackoff_cap = -1\n",
    )
    assert len(problems) == 4
    wheres = sorted(p.split(":")[0] for p in problems)
    assert wheres == ["log_level", "retry.backoff_cap", "submit.batch_windw", "submit.daily_budget"]
    assert not any("Extra inputs" in p for p in problems)


@pytest.mark.parametrize("level", ["debug", "info", "warning", "error"])
def test_every_documented_log_level_is_accepted(tmp_path: Path, level: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f"log_level = '{level}'\n")
    assert load_settings(Flags(config=path), env={}).log_level == level


def test_stamina_retries_are_logged_as_our_own_event() -> None:
    stream = io.StringIO()
    logs.configure("info", stream=stream, json=True)
    try:
        structlog.get_logger("stamina").warning(
            "stamina.retry_scheduled",
            callable="<context block>",
            args=(),
            kwargs={},
            retry_num=2,
            caused_by="TemporaryAPIError('HTTP 503')",
            wait_for=1.5,
            waited_so_far=0.5,
        )
    finally:
        logs.configure("info")
    line = json.loads(stream.getvalue())
    assert line["event"] == "api.retry_scheduled"
    assert (line["attempt"], line["wait"]) == (2, 1.5)
    assert "503" in line["error"]
    assert "<context block>" not in stream.getvalue()


def test_debug_level_shows_the_decisions_of_a_pass(tmp_path: Path, sandbox: SandboxControl) -> None:
    project = Project(tmp_path, sandbox)
    project.write_spec("study.yaml", [track("a", "lofi"), track("b", "lofi 2")])
    info = project.sync()
    assert '"level": "debug"' not in info.stderr
    project.write_spec("study.yaml", [track("a", "lofi"), track("c", "lofi 3")])
    project.config.write_text("log_level = 'debug'\n" + project.config.read_text())
    debug = project.sync()
    events = [json.loads(x) for x in debug.stderr.splitlines() if x.startswith("{")]
    due = [e for e in events if e["event"] == "submit.due"]
    assert due
    assert due[0]["level"] == "debug"
    assert (due[0]["queued"], due[0]["due"]) == (1, 1)
    assert any(e["event"] == "poll.due" for e in events)


@pytest.mark.parametrize(
    ("text", "field", "value"),
    [
        ("[submit]\nbatch_window = '2.5'\n", "batch_window", 2.5),
        ("[submit]\nbatch_window = 1\n", "batch_window", 1.0),
        ("[submit]\nmax_in_flight = 20.0\n", "max_in_flight", 20),
        ("[submit]\nmax_in_flight = ' 5 '\n", "max_in_flight", 5),
        ("[submit]\nmax_in_flight = '1_000'\n", "max_in_flight", 1000),
        ("[prune]\nenabled = 'yes'\n", "prune", True),
        ("[prune]\nenabled = 0\n", "prune", False),
        ("models = []\n", "models", load_settings(Flags(), env={}).models),
    ],
)
def test_values_as_people_write_them_are_read(
    tmp_path: Path, text: str, field: str, value: object
) -> None:
    """What the file's checks accepted before they were plain code, they still accept."""
    path = tmp_path / "config.toml"
    path.write_text(text)
    assert getattr(load_settings(Flags(config=path), env={}), field) == value


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[submit]\nmax_in_flight = 1.5\n", "submit.max_in_flight: must be a valid integer"),
        ("[submit]\nbatch_window = 'soon'\n", "submit.batch_window: must be a valid number"),
        ("[prune]\nenabled = 'maybe'\n", "prune.enabled: must be a valid boolean"),
        ("models = 'sonic-v5'\n", "models: must be a list of strings, got 'sonic-v5'"),
        ("submit = 3\n", "submit: expected a [submit] table, got 3"),
        ("[limits]\nsonic-v5 = 3\n", "limits.sonic-v5: expected a [limits.sonic-v5] table"),
        ("[limits.sonic-v5]\npromt = 9\n", "limits.sonic-v5.promt: unknown key (did you mean"),
        ("[poll]\ninterval = 4000\n", "poll.interval: must be less than or equal to 3600"),
    ],
)
def test_a_wrong_value_is_named_with_what_it_must_be(
    tmp_path: Path, text: str, expected: str
) -> None:
    [problem] = config_error(tmp_path, text)
    assert problem.startswith(expected)
