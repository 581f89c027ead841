"""What keeps start-up fast, held as behaviour: which libraries a command imports.

Speed itself is measured in ``bench/startup.py``, never here. A command that
reads nothing but the ledger (``--version``, ``--help``, ``status``) imports
only the standard library, click and the package's own light modules: each
library below costs tens of milliseconds before the command does anything.
The commands run as real subprocesses under ``python -X importtime``, which
names every module the process loads, on a ledger written by a real ``sync``
against the sandbox.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import io
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from reconciler import status
from reconciler.cli import _LazyGroup
from reconciler.config import Flags, Secret, load_settings
from reconciler.sandbox import SandboxControl, SandboxServer
from tests.project import Project, track

#: Libraries no light command may load (importlib.metadata: ``--version`` once did).
HEAVY = (
    "pydantic",
    "pydantic_core",
    "rich",
    "structlog",
    "httpx",
    "sqlite_utils",
    "yaml",
    "uvicorn",
    "starlette",
    "numpy",
    "lameenc",
    "mutagen",
    "stamina",
    "watchfiles",
    "prometheus_client",
    "importlib.metadata",
)


def run_importing(
    project: Project, *args: str
) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``reconciler ARGS`` (no config file unless named); its result and modules imported."""
    if args[0] == "status":
        args = (*args, "--specs", str(project.specs), "--out", str(project.out))
        args = (*args, "--state", str(project.state))
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "reconciler", *args],
        cwd=project.root,
        env=project.env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    modules = {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return proc, modules


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m in HEAVY or m.split(".")[0] in HEAVY)


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory, sandbox_server: SandboxServer) -> Project:
    sandbox = SandboxControl(sandbox_server.base_url, sandbox_server.key)
    sandbox.reset()  # what an earlier test configured (faults, credits) stays otherwise
    project = Project(tmp_path_factory.mktemp("startup"), sandbox)
    project.write_spec("album.yaml", [track("one", "calm piano"), track("two", "fast drums")])
    project.sync()
    return project


@pytest.mark.parametrize(
    "args",
    [("--version",), ("--help",), ("status",), ("status", "--json"), ("status", "--config")],
    ids=["version", "help", "status", "status-json", "status-config-file"],
)
def test_light_commands_import_no_heavy_library(synced: Project, args: tuple[str, ...]) -> None:
    if args[-1] == "--config":
        args = (*args, str(synced.config))
    proc, modules = run_importing(synced, *args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reconciler.cli" in modules  # the listing works: the CLI itself shows up
    assert heavy(modules) == []


def test_status_without_a_config_file_still_reports_the_tracks(synced: Project) -> None:
    proc, _ = run_importing(synced, "status", "--json")
    report = json.loads(proc.stdout)
    assert [(t["track"], t["state"]) for t in report["tracks"]] == [
        ("one", "ready"),
        ("two", "ready"),
    ]
    text, _ = run_importing(synced, "status")
    assert "2 tracks: 2 ready" in text.stdout


def test_version_is_the_installed_one(synced: Project) -> None:
    proc, _ = run_importing(synced, "--version")
    assert proc.stdout.strip() == f"reconciler, version {importlib.metadata.version('reconciler')}"


@pytest.mark.parametrize("name", sorted(_LazyGroup.lazy))
def test_help_lists_a_lazy_command_by_its_own_summary(name: str) -> None:
    module, attr, summary = _LazyGroup.lazy[name]
    command = getattr(importlib.import_module(module), attr)
    first_paragraph = inspect.cleandoc(command.help).split("\n\n")[0].replace("\n", " ")
    assert summary == first_paragraph


def test_plain_status_text_is_what_rich_writes_into_a_pipe(
    synced: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    proc, _ = run_importing(synced, "status", "--json")
    report = json.loads(proc.stdout)
    # Every warning line on, with text rich would read as markup.
    report |= {
        "layout_problems": ["out [tracks] is inside specs"],
        "specs_folder": "missing",
        "submit_block": "401 [unauthorized]",
        "suspended": {"all": True, "soundtracks": []},
        "ambiguous_submits": 1,
        "possible_double_spend": 2,
        "orphan_tasks": 3,
        "unexpected_shapes": {"poll: list": 4},
        "api": {
            "last_success": None,
            "last_error": "2026-01-01T00:00:00+00:00",
            "last_error_message": "[b]boom[/b]",
            "batch_endpoint": "unsupported",
        },
    }
    report["tracks"][0] |= {"state": "failed", "reason": "x" * 300}
    status.render(report)
    plain = capsys.readouterr().out
    piped = io.StringIO()
    status.render(report, Console(file=piped, width=80))
    assert plain == piped.getvalue()
    assert "submissions paused: 401 [unauthorized]" in plain
    assert "x" * 300 in plain  # a pipe gets every line whole
    assert not re.search(r"\[/?(red|yellow)?\]", plain)  # styles are not printed as text


def test_an_empty_config_file_changes_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "reconciler.toml"
    empty.write_text("")
    env = {"MUSICAPI_KEY": "k1"}
    without = load_settings(Flags(), env=env)
    assert load_settings(Flags(config=empty), env=env) == replace(without, config_file=empty)
    # Keys compare by value (a reload that changes the key restarts the client)
    # and never show.
    assert without.api_key == Secret("k1") != Secret("k2")
    assert "k1" not in repr(without)
    assert "k1" not in str(without.api_key)
