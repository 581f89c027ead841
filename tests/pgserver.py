"""A throwaway PostgreSQL server for the tests and the benchmarks that need one.

The PostgreSQL ledger is tested against a real server, not a stand-in: this
module runs the machine's own PostgreSQL (15, Debian's ``postgresql``
package) from ``initdb`` in a fresh temporary folder, started with
``pg_ctl``, listening on 127.0.0.1 only on a free port (and on a unix socket
in that folder), with durability switched off because its data is thrown
away. ``tests/conftest.py`` starts one per pytest worker (``pg_server``) and
hands each test a fresh empty database (``pg_url``).

Nothing is left behind however the run ends: a watchdog process, in a
session of its own, holds the read end of a pipe whose write end only this
process has. When this process closes it, exits or is killed (SIGKILL
included), the watchdog reads end-of-file, stops the server and removes the
folder. Stopping is that one path, never a second one.

As root, PostgreSQL refuses to run, so ``initdb`` and ``pg_ctl`` run as the
``postgres`` system user (``runuser``), in a folder owned by that user.

Run as a script (``python tests/pgserver.py watch BINDIR FOLDER``) this file
is that watchdog.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType

import psycopg
from psycopg import sql

#: What a machine without PostgreSQL needs, said wherever the server cannot start.
INSTALL_HINT = (
    "The PostgreSQL tests need a PostgreSQL 15 server installed on this machine "
    "(initdb and pg_ctl; they run it themselves in a temporary folder, on 127.0.0.1). "
    "On Debian or Ubuntu: `apt-get install -y postgresql` (as root); "
    "`.ci/run` installs it where it is missing."
)
#: The user PostgreSQL runs as when the tests run as root (Debian's package creates it).
SYSTEM_USER = "postgres"
#: The superuser the servers are made with, whoever runs them; trust auth, loopback only.
SUPERUSER = "postgres"
#: Settings of a test server, whose data is thrown away: nothing is flushed to
#: disk, and memory is kept small since every pytest worker runs its own server.
#: A benchmark passes its own (``PgServer.start(settings=...)``).
SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    "max_connections": "100",
    "log_min_messages": "warning",
}
#: Where Debian installs each major version's server programs.
DEBIAN_BINDIRS = "/usr/lib/postgresql/*/bin"
#: The longest folder a unix socket is put in: ``/.s.PGSQL.65535`` must still fit.
SOCKET_FOLDER_MAX = 90
#: Bound on each pg_ctl step (start waits for the server to accept connections).
STEP_TIMEOUT = 60


class PgUnavailableError(RuntimeError):
    """PostgreSQL is not installed here, or its server could not be started."""


def find_bindir(debian_bindirs: str = DEBIAN_BINDIRS) -> Path:
    """The folder with ``initdb`` and ``pg_ctl``: ``pg_config --bindir``, Debian's layout, PATH."""
    candidates: list[Path] = []
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True
        ).stdout.strip()
        candidates.append(Path(out))
    # Debian puts the server's programs under a versioned folder; newest first.
    candidates += [
        Path(p)
        for p in sorted(
            glob.glob(debian_bindirs),
            key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
            reverse=True,
        )
    ]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    for folder in candidates:
        if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file():
            return folder
    raise PgUnavailableError(f"initdb and pg_ctl were not found. {INSTALL_HINT}")


def _as_server_user() -> list[str]:
    """The command prefix that runs a PostgreSQL program as a user it accepts."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise PgUnavailableError(
            f"running as root, but there is no {SYSTEM_USER!r} system user to run "
            f"PostgreSQL as. {INSTALL_HINT}"
        ) from None
    return ["runuser", "-u", SYSTEM_USER, "--"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class PgServer:
    """One PostgreSQL server in its own temporary folder: ``with PgServer.start() as server``.

    ``url(name)`` is the ``postgresql://`` URL of a database on it; ``database()``
    creates a fresh empty one and drops it afterwards.
    """

    def __init__(self, settings: Mapping[str, str] = SETTINGS) -> None:
        self.settings = dict(settings)
        self.bindir = find_bindir()
        self.prefix = _as_server_user()
        self.folder = Path(tempfile.mkdtemp(prefix="reconciler-pg-"))
        if self.prefix:
            pwd_entry = pwd.getpwnam(SYSTEM_USER)
            os.chown(self.folder, pwd_entry.pw_uid, pwd_entry.pw_gid)
        self.data = self.folder / "data"
        self.log = self.folder / "server.log"
        self.port = 0
        self._names = itertools.count(1)
        self._admin: psycopg.Connection[tuple[object, ...]] | None = None
        # The watchdog is started before anything else exists in the folder, so
        # a failure anywhere below still ends with the folder removed.
        read_end, self._watch_pipe = os.pipe()
        self._watchdog = subprocess.Popen(
            [sys.executable, __file__, "watch", str(self.bindir), str(self.folder)],
            stdin=read_end,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(read_end)

    @classmethod
    def start(cls, settings: Mapping[str, str] = SETTINGS) -> PgServer:
        """A new server, running and accepting connections; raises PgUnavailableError.

        ``settings``: ``postgresql.conf`` lines beyond the address, port and socket.
        """
        server = cls(settings)
        try:
            server._start()
        except BaseException:
            server.stop()
            raise
        return server

    def __enter__(self) -> PgServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix, *args],
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=STEP_TIMEOUT,
            check=False,
        )

    def _start(self) -> None:
        # C locale: text sorts by code point, as SQLite's default collation does.
        init = self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", SUPERUSER,
            "--auth=trust", "--no-sync", "--encoding=UTF8", "--locale=C",
        )  # fmt: skip
        if init.returncode != 0:
            raise PgUnavailableError(f"initdb failed:\n{init.stdout}{init.stderr}")
        settings = {
            **self.settings,
            "listen_addresses": "'127.0.0.1'",
            # The socket sits in the folder, never in a shared /var/run; a
            # socket path over the kernel's 107 bytes (a long TMPDIR) would
            # stop the server from starting, so then there is none (TCP only).
            "unix_socket_directories": (
                f"'{self.folder}'" if len(str(self.folder)) <= SOCKET_FOLDER_MAX else "''"
            ),
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        # A free port can be taken by another process before the server binds
        # it; a few fresh ports make that race harmless.
        for _ in range(5):
            self.port = _free_port()
            start = self._run(
                str(self.bindir / "pg_ctl"), "start", "-D", str(self.data), "-l", str(self.log),
                "-w", "-t", str(STEP_TIMEOUT), "-o", f"-p {self.port}",
            )  # fmt: skip
            if start.returncode == 0:
                break
        else:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise PgUnavailableError(f"pg_ctl start failed:\n{start.stdout}{start.stderr}\n{log}")
        self._admin = psycopg.connect(self.url("postgres"), autocommit=True)

    def shut_down(self, mode: str = "fast") -> None:
        """Stop the server, keeping its data and port, as an operator's
        ``pg_ctl stop -m MODE`` does: clients' connections are ended (``fast``:
        at once, each told so). ``start_again`` brings it back."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        stop = self._run(
            str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data), "-m", mode,
            "-w", "-t", str(STEP_TIMEOUT),
        )  # fmt: skip
        if stop.returncode != 0:
            raise PgUnavailableError(f"pg_ctl stop failed:\n{stop.stdout}{stop.stderr}")

    def start_again(self) -> None:
        """Start the server ``shut_down`` stopped, on the same port with the same data."""
        start = self._run(
            str(self.bindir / "pg_ctl"), "start", "-D", str(self.data), "-l", str(self.log),
            "-w", "-t", str(STEP_TIMEOUT), "-o", f"-p {self.port}",
        )  # fmt: skip
        if start.returncode != 0:
            raise PgUnavailableError(f"pg_ctl start failed:\n{start.stdout}{start.stderr}")
        self._admin = psycopg.connect(self.url("postgres"), autocommit=True)

    def url(self, database: str) -> str:
        """The ``postgresql://`` URL of ``database`` on this server, over TCP on 127.0.0.1."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """Create a new empty database and return its name."""
        assert self._admin is not None, "the server is not running"
        name = f"test_{next(self._names)}"
        self._admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending whatever connections a test left open to it."""
        assert self._admin is not None, "the server is not running"
        self._admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A fresh empty database for one test: its URL, dropped afterwards."""
        name = self.create_database()
        try:
            yield self.url(name)
        finally:
            self.drop_database(name)

    def stop(self) -> None:
        """Stop the server and remove its folder; waits until the watchdog has done both."""
        if self._admin is not None:
            self._admin.close()
            self._admin = None
        if self._watch_pipe >= 0:
            os.close(self._watch_pipe)
            self._watch_pipe = -1
        self._watchdog.wait(timeout=STEP_TIMEOUT * 2)


@contextlib.contextmanager
def throwaway_server() -> Iterator[PgServer]:
    """A server for tests: where PostgreSQL is missing the test fails, saying
    how to install it; it never skips."""
    import pytest

    try:
        server = PgServer.start()
    except PgUnavailableError as error:
        pytest.fail(str(error), pytrace=False)
    with server:
        yield server


def watch(bindir: Path, folder: Path) -> None:
    """Wait for end-of-file on stdin, then stop the server in ``folder`` and remove it."""
    with contextlib.suppress(OSError):
        sys.stdin.buffer.read()
    data = folder / "data"
    if (data / "postmaster.pid").exists():
        # Immediate: the data is thrown away, so no shutdown checkpoint is worth waiting for.
        subprocess.run(
            [*_as_server_user(), str(bindir / "pg_ctl"), "stop", "-D", str(data),
             "-m", "immediate", "-w", "-t", str(STEP_TIMEOUT)],
            cwd=folder, capture_output=True, timeout=STEP_TIMEOUT * 2, check=False,
        )  # fmt: skip
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "watch":
        watch(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(f"usage: {sys.argv[0]} watch BINDIR FOLDER")
