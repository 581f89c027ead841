"""The PostgreSQL test server itself (tests/pgserver.py): what the PostgreSQL tests stand on.

A fresh database per test, reachable on loopback only, and no server left
running however the process that started it ends.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from tests.pgserver import INSTALL_HINT, PgServer, PgUnavailableError, find_bindir
from tests.project import wait_until

ROOT = Path(__file__).resolve().parent.parent


def test_each_test_gets_a_fresh_empty_database(pg_server: PgServer, pg_url: str) -> None:
    with psycopg.connect(pg_url) as conn:
        conn.execute("CREATE TABLE tracks (id BIGINT PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO tracks VALUES (1, 'a')")
    with pg_server.database() as other, psycopg.connect(other) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
        assert tables == []
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT name FROM tracks").fetchall() == [("a",)]


def test_a_dropped_database_is_gone_even_with_a_connection_left_open(pg_server: PgServer) -> None:
    with pg_server.database() as url:
        left_open = psycopg.connect(url)
        name = url.rsplit("/", 1)[1]
    with psycopg.connect(pg_server.url("postgres")) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchall()
    assert found == []
    left_open.close()


def test_the_server_listens_on_loopback_only_without_flushing(pg_url: str) -> None:
    assert pg_url.startswith("postgresql://postgres@127.0.0.1:")
    with psycopg.connect(pg_url) as conn:
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN ('listen_addresses', 'fsync')"
            ).fetchall()
        )
        version = conn.info.server_version
    assert settings == {"listen_addresses": "127.0.0.1", "fsync": "off"}
    assert version >= 150000


def test_a_killed_test_process_leaves_no_server_and_no_folder() -> None:
    # A pytest worker killed with SIGKILL runs no teardown: the watchdog must stop its server.
    owner = subprocess.Popen(
        [
            sys.executable, "-c",
            "import sys, time\n"
            "from tests.pgserver import PgServer\n"
            "server = PgServer.start()\n"
            "pid = (server.data / 'postmaster.pid').read_text().split()[0]\n"
            "print(pid, server.folder, flush=True)\n"
            "time.sleep(300)\n",
        ],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert owner.stdout is not None
    pid_text, folder = owner.stdout.readline().split()
    postmaster = int(pid_text)
    assert _alive(postmaster)
    owner.send_signal(signal.SIGKILL)
    owner.wait(timeout=10)
    owner.stdout.close()

    wait_until(lambda: not _alive(postmaster), timeout=30, what="the orphaned server to stop")
    wait_until(lambda: not Path(folder).exists(), timeout=30, what="its folder to be removed")


def test_without_postgresql_installed_the_error_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no pg_config, no initdb
    with pytest.raises(PgUnavailableError) as caught:
        find_bindir(debian_bindirs=str(tmp_path / "postgresql" / "*" / "bin"))
    assert INSTALL_HINT in str(caught.value)
    assert "apt-get install -y postgresql" in INSTALL_HINT


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0) until its parent reaps it; it is no server.
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
