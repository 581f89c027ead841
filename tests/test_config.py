"""Config files as a person writes them: every mistake named, with a suggestion, and logging levels.

``load_settings`` is called directly on real files (table-driven), which is
also where flag > environment > config file > default is checked, key by key;
the debug level is checked on a real ``sync`` subprocess against the sandbox.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog

from reconciler import logs
from reconciler.config import CREDENTIAL_NAME, DEFAULT_API_URL, Flags, Settings, load_settings
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


# -- flag > environment > config file > default ----------------------------------------


@dataclass(frozen=True)
class Layered:
    """One setting as each source gives it, and how to read it back from ``Settings``.

    ``file`` is a line of the config file; ``values`` what each source must
    yield, in the order flag, environment, file, default. A source the
    setting does not have is None.
    """

    id: str
    flag: dict[str, Any] | None
    env: dict[str, str] | None
    file: str
    values: tuple[object, object, object, object]
    read: Callable[[Settings], object]


LAYERS = ("flag", "environment", "config file", "default")


def layered_cases(conf_dir: Path) -> list[Layered]:
    return [
        Layered(
            "specs",
            {"specs": Path("/flag/specs")},
            {"RECONCILER_SPECS": "/env/specs"},
            'specs = "file-specs"',
            # A relative path in the file is relative to the file's folder.
            (Path("/flag/specs"), Path("/env/specs"), conf_dir / "file-specs", Path("specs")),
            lambda s: s.specs_dir,
        ),
        Layered(
            "out",
            {"out": Path("/flag/out")},
            {"RECONCILER_OUT": "/env/out"},
            'out = "/file/out"',
            (Path("/flag/out"), Path("/env/out"), Path("/file/out"), Path("tracks")),
            lambda s: s.out_dir,
        ),
        Layered(
            "state",
            {"state": Path("/flag/state")},
            {"RECONCILER_STATE": "/env/state"},
            'state = "/file/state"',
            (Path("/flag/state"), Path("/env/state"), Path("/file/state"), Path(".reconciler")),
            lambda s: s.state_dir,
        ),
        Layered(
            "ledger",
            {"ledger": "postgresql://flag@127.0.0.1/db"},
            {"RECONCILER_LEDGER": "postgresql://env@127.0.0.1/db"},
            'ledger = "shared/ledger.sqlite3"',
            (
                "postgresql://flag@127.0.0.1/db",
                "postgresql://env@127.0.0.1/db",
                # A SQLite file named in the file is relative to the file's folder.
                str(conf_dir / "shared" / "ledger.sqlite3"),
                None,
            ),
            lambda s: s.ledger,
        ),
        Layered(
            "api_url",
            {"api_url": "http://127.0.0.1:1/flag/"},
            {"MUSICAPI_BASE_URL": "http://127.0.0.1:2/env"},
            'api_url = "http://127.0.0.1:3/file"',
            (
                "http://127.0.0.1:1/flag",
                "http://127.0.0.1:2/env",
                "http://127.0.0.1:3/file",
                DEFAULT_API_URL,
            ),
            lambda s: s.api_url,
        ),
        Layered(
            "api key",
            None,
            {"MUSICAPI_KEY": "env-key"},
            'api_key_file = "key.txt"',
            (None, "env-key", "file-key", None),
            lambda s: s.api_key.get_secret_value() if s.api_key else None,
        ),
        Layered(
            "prune",
            # The flag turns off what the file turns on.
            {"prune": False},
            None,
            "[prune]\nenabled = true",
            (False, None, True, False),
            lambda s: s.prune,
        ),
        Layered(
            "max_credits",
            {"max_credits": 30},
            None,
            "",
            (30, None, None, None),
            lambda s: s.max_credits,
        ),
        Layered(
            "ops listen",
            {"ops_listen": "9401"},
            None,
            '[ops]\nlisten = "127.0.0.1:9402"',
            (("127.0.0.1", 9401), None, ("127.0.0.1", 9402), None),
            lambda s: s.ops_listen,
        ),
    ]


#: (setting, source) for every source a setting has; the default always.
LAYERED = [
    pytest.param(case.id, top, id=f"{case.id}-{LAYERS[top]}")
    for case in layered_cases(Path())
    for top in range(len(LAYERS))
    if case.values[top] is not None or top == len(LAYERS) - 1
]


@pytest.mark.parametrize(("case_id", "top"), LAYERED)
def test_the_highest_source_given_wins(tmp_path: Path, case_id: str, top: int) -> None:
    """Every source at ``top`` and below is given: the one at ``top`` decides."""
    case = next(c for c in layered_cases(tmp_path) if c.id == case_id)
    (tmp_path / "key.txt").write_text("file-key\n")
    config = tmp_path / "reconciler.toml"
    config.write_text(case.file + "\n" if top <= 2 else "")
    flags = dict(case.flag or {}) if top <= 0 else {}
    env = dict(case.env or {}) if top <= 1 else {}
    settings = load_settings(Flags(config=config, **flags), env=env)
    assert case.read(settings) == case.values[top]


def test_the_config_flag_wins_over_the_variable_naming_another_file(tmp_path: Path) -> None:
    flagged = tmp_path / "flagged.toml"
    flagged.write_text("log_level = 'error'\n")
    named = tmp_path / "named.toml"
    named.write_text("log_level = 'debug'\n")
    env = {"RECONCILER_CONFIG": str(named)}
    assert load_settings(Flags(config=flagged), env=env).log_level == "error"
    assert load_settings(Flags(), env=env).log_level == "debug"
    assert load_settings(Flags(), env={}).log_level == "info"


def test_the_key_variable_wins_over_a_systemd_credential_which_wins_over_the_file(
    tmp_path: Path,
) -> None:
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / CREDENTIAL_NAME).write_text("credential-key\n")
    (tmp_path / "key.txt").write_text("file-key\n")
    config = tmp_path / "reconciler.toml"
    config.write_text('api_key_file = "key.txt"\n')

    def key(env: dict[str, str]) -> str | None:
        settings = load_settings(Flags(config=config), env=env)
        return settings.api_key.get_secret_value() if settings.api_key else None

    both = {"MUSICAPI_KEY": "env-key", "CREDENTIALS_DIRECTORY": str(creds)}
    assert key(both) == "env-key"
    assert key({"CREDENTIALS_DIRECTORY": str(creds)}) == "credential-key"
    assert key({}) == "file-key"


def test_an_empty_variable_counts_as_not_set(tmp_path: Path) -> None:
    config = tmp_path / "reconciler.toml"
    config.write_text('out = "/file/out"\napi_url = "http://127.0.0.1:3/file"\n')
    settings = load_settings(
        Flags(config=config), env={"RECONCILER_OUT": "", "MUSICAPI_BASE_URL": ""}
    )
    assert (settings.out_dir, settings.api_url) == (Path("/file/out"), "http://127.0.0.1:3/file")


@pytest.mark.parametrize("sandbox", [False, True])
def test_the_poll_interval_comes_from_the_file_else_suits_the_api(
    tmp_path: Path, sandbox: bool
) -> None:
    """Unconfigured, the bundled sandbox is polled every second and the real API every 15 s."""
    config = tmp_path / "reconciler.toml"
    config.write_text("[poll]\ninterval = 4\n")
    assert load_settings(Flags(config=config, sandbox=sandbox), env={}).poll_interval == 4
    default = load_settings(Flags(sandbox=sandbox), env={}).poll_interval
    assert default == (1.0 if sandbox else 15.0)


@pytest.mark.parametrize(
    ("flag", "env", "file", "expected"),
    [
        ("", None, None, "--ledger: empty"),
        (None, "mysql://db/x", None, "RECONCILER_LEDGER: expected a postgresql:// URL"),
        (
            None,
            None,
            'ledger = "mysql://db/x"',
            "reconciler.toml: ledger: expected a postgresql://",
        ),
    ],
)
def test_a_wrong_ledger_is_named_where_it_was_given(
    tmp_path: Path, flag: str | None, env: str | None, file: str | None, expected: str
) -> None:
    config = tmp_path / "reconciler.toml"
    config.write_text(file or "")
    with pytest.raises(ConfigError, match=expected):
        load_settings(
            Flags(config=config, ledger=flag), env={"RECONCILER_LEDGER": env} if env else {}
        )
