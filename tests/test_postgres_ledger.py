"""The PostgreSQL ledger end to end: the real CLI against the sandbox, the ledger on a
real PostgreSQL server (``pg_url``) instead of the SQLite file in the state folder.

The ledger's transitions run on both backends in tests/test_ledger.py; this is
what a user does: ``sync --ledger postgresql://...``, then ``status``,
``describe`` and ``events`` with the same ``--ledger``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psycopg
import pytest

from reconciler.sandbox import SandboxControl
from tests.project import Project

EXAMPLES = Path(__file__).resolve().parent.parent / "specs"


@pytest.fixture
def project(tmp_path: Path, sandbox: SandboxControl) -> Project:
    project = Project(tmp_path, sandbox)
    shutil.copytree(EXAMPLES, project.specs, dirs_exist_ok=True)
    return project


def test_sync_on_a_postgresql_ledger_converges_the_examples_and_status_reads_them(
    project: Project, pg_url: str
) -> None:
    project.sync("--ledger", pg_url)

    report = project.status("--ledger", pg_url)
    summary = report["summary"]
    assert summary["tracks"] > 0
    assert summary["ready"] == summary["tracks"], summary
    assert report["possible_double_spend"] == 0
    created = project.stats()["tasks_created"]
    assert created > 0
    # The ledger is the database, not a file beside the audio cache.
    assert not (project.state / "ledger.sqlite3").exists()
    with psycopg.connect(pg_url) as conn:
        ((tracks,),) = conn.execute("SELECT count(*) FROM tracks").fetchall()
    assert tracks == summary["tracks"]
    files = project.files()
    assert len(files) >= summary["tracks"]

    # The other readers of the ledger read it there too.
    described = project.cli("describe", "study-session/rainy-library", "--ledger", pg_url)
    assert described.returncode == 0, described.stderr
    assert "tracks/study-session/rainy-library.mp3  ok" in described.stdout
    events = project.cli("events", "--json", "study-session/rainy-library", "--ledger", pg_url)
    assert events.returncode == 0, events.stderr
    names = [json.loads(line)["event"] for line in events.stdout.splitlines()]
    assert names[0] == "track.desired"
    assert "output.written" in names

    # A second sync on the converged folder reads the same ledger: nothing is paid again.
    project.sync("--ledger", pg_url)
    assert project.stats()["tasks_created"] == created
    assert project.files() == files


def test_plan_reads_a_postgresql_ledger_before_and_after_a_sync(
    project: Project, pg_url: str
) -> None:
    """``plan`` reads the ledger in one read-only snapshot of its own, on either backend."""
    first = project.cli("plan", "--json", "--ledger", pg_url)
    assert first.returncode == 2, first.stderr  # nothing synced yet: every track to submit
    tracks = {t for item in json.loads(first.stdout)["submit"] for t in item["tracks"]}
    assert "study-session/rainy-library" in tracks

    project.sync("--ledger", pg_url)
    again = project.cli("plan", "--json", "--ledger", pg_url)
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert (report["submit"], report["restore"], report["reuse"]) == ([], [], [])

    # A deleted output is restored from the cache, which the plan reads the clip for.
    (project.out / "study-session" / "rainy-library.mp3").unlink()
    restore = project.cli("plan", "--json", "--ledger", pg_url)
    assert restore.returncode == 2, restore.stderr
    assert json.loads(restore.stdout)["restore"] == ["study-session/rainy-library.mp3"]
