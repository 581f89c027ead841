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

from reconciler.errors import LedgerError
from reconciler.ledger import Ledger
from reconciler.sandbox import SandboxControl
from tests.project import Project, wait_until

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
    # The sync held the ledger's lease while it ran and handed it back.
    assert report["leader"] is None
    assert report["last_leader"]["released"] is True
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


def with_password(url: str, password: str) -> str:
    """The same database, with a password in the URL (the test server trusts loopback)."""
    return url.replace("postgres@", f"postgres:{password}@", 1)


def drop_connections(url: str) -> None:
    """End every other session on ``url``'s database, as a server restart or a
    failover does, and wait until they are gone."""
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(url, autocommit=True) as admin:
        others = "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
        admin.execute(f"SELECT pg_terminate_backend(pid) FROM ({others}) AS s", [name])
        wait_until(lambda: not admin.execute(others, [name]).fetchall(), 10, "the sessions to end")


def test_a_dropped_connection_is_a_ledger_error_once_and_then_connected_again(
    pg_url: str,
) -> None:
    url = with_password(pg_url, "s3cret-pw")
    ledger = Ledger.open(url)
    try:
        ledger.put("answer", 41)
        drop_connections(pg_url)

        # The use that finds the connection gone fails, as a LedgerError naming
        # the ledger without its password, never as a driver error.
        with pytest.raises(LedgerError) as failed:
            ledger.get("answer")
        assert not isinstance(failed.value, psycopg.Error)
        message = str(failed.value)
        assert "postgres:***@127.0.0.1" in message
        assert "s3cret-pw" not in message

        # The next use connects again: reads and writes work without a restart.
        assert ledger.get("answer") == 41
        ledger.put("answer", 42)
        assert ledger.get("answer") == 42
    finally:
        ledger.close()


def test_a_write_cut_off_by_a_dropped_connection_is_refused_and_not_repeated(
    pg_url: str,
) -> None:
    """The transaction the connection died in is lost as a whole; the reconnect
    does not run it again (a submit intent not recorded is a submit not sent)."""
    ledger = Ledger.open(pg_url)
    try:

        def cut_off() -> None:
            with ledger.transaction():
                ledger.db.execute("INSERT INTO kv (key, value) VALUES ('intent', '1')")
                drop_connections(pg_url)
                ledger.db.execute("INSERT INTO kv (key, value) VALUES ('after', '1')")

        with pytest.raises(LedgerError):
            cut_off()
        assert ledger.get("intent") is None
        assert ledger.get("after") is None
        with ledger.transaction():
            ledger.db.execute("INSERT INTO kv (key, value) VALUES ('later', '1')")
        assert ledger.get("later") == 1
    finally:
        ledger.close()
