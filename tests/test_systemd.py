"""systemd: the notify protocol over a real datagram socket, the unit file, the example config.

The daemon runs as a subprocess with ``$NOTIFY_SOCKET`` pointing at an
``AF_UNIX``/``SOCK_DGRAM`` socket the test bound in ``tmp_path``, exactly what
systemd hands a ``Type=notify`` service, and the test reads what it says.

The unit file is checked with ``systemd-analyze`` (Debian/Ubuntu package
``systemd``): ``verify`` must print nothing and ``security --offline=true``
must score 2.0 or lower. ``verify`` insists that ``ExecStart=`` names an
existing executable, and the shipped file names the documented install path
``/opt/reconciler/bin/reconciler``; the test verifies a temporary copy with
that one path rewritten to this checkout's ``reconciler`` script.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from reconciler.config import Flags, load_settings
from reconciler.sandbox import SandboxControl
from reconciler.systemd import Notifier, watchdog_interval
from tests.daemonproc import DaemonProc, daemon_project
from tests.project import Project, track, wait_until

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "reconciler.service"
EXAMPLE_CONFIG = ROOT / "systemd" / "reconciler.toml"
INSTALLED_BINARY = "/opt/reconciler/bin/reconciler"
MAX_EXPOSURE = 2.0


class NotifySocket:
    """A bound datagram socket, read by a thread: (monotonic time, fields) per message."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append((time.monotonic(), fields))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def keys(self) -> list[str]:
        """Each message's first field, in arrival order (e.g. READY, STATUS, WATCHDOG)."""
        return [next(iter(fields)) for _, fields in self.messages]

    def with_key(self, key: str) -> list[tuple[float, dict[str, str]]]:
        return [(t, f) for t, f in self.messages if key in f]


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(str(tmp_path / "notify.sock"))
    yield s
    s.close()


# -- the protocol, in process ----------------------------------------------------------


def test_messages_reach_a_path_socket(notify: NotifySocket, tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "notify.sock"))
    assert n.enabled
    assert n.ready(status="starting")
    assert n.watchdog(status="1/2 ready,\nline two")
    assert n.stopping()
    wait_until(lambda: len(notify.messages) == 3, 5, "three datagrams")
    assert [f for _, f in notify.messages] == [
        {"READY": "1", "STATUS": "starting"},
        {"WATCHDOG": "1", "STATUS": "1/2 ready, line two"},
        {"STOPPING": "1"},
    ]
    n.close()


def test_messages_reach_an_abstract_socket() -> None:
    name = f"reconciler-test-{uuid.uuid4().hex}"
    s = NotifySocket("\0" + name)
    try:
        n = Notifier("@" + name)
        assert n.status("hello")
        wait_until(lambda: s.messages, 5, "a datagram")
        assert s.messages[0][1] == {"STATUS": "hello"}
        n.close()
    finally:
        s.close()


def test_reloading_carries_a_monotonic_timestamp(notify: NotifySocket, tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "notify.sock"))
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    wait_until(lambda: notify.messages, 5, "a datagram")
    fields = notify.messages[0][1]
    assert fields["RELOADING"] == "1"
    assert int(fields["MONOTONIC_USEC"]) >= before
    n.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    n = Notifier.from_env({})
    assert not n.enabled
    assert not n.ready()
    assert not Notifier.from_env({"NOTIFY_SOCKET": ""}).enabled


def test_an_absent_listener_is_logged_once_and_never_raises(tmp_path: Path) -> None:
    n = Notifier(str(tmp_path / "nobody.sock"))
    with capture_logs() as logs:
        assert not n.status("a")
        assert not n.status("b")
    assert [e["event"] for e in logs] == ["systemd.notify_failed"]
    with capture_logs() as logs:
        assert not Notifier("vsock:2:1234").enabled
    assert [e["event"] for e in logs] == ["systemd.unsupported_socket"]


@pytest.mark.parametrize(
    ("env", "pid", "expected"),
    [
        ({}, 10, None),
        ({"WATCHDOG_USEC": "0"}, 10, None),
        ({"WATCHDOG_USEC": "junk"}, 10, None),
        ({"WATCHDOG_USEC": "30000000"}, 10, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "10"}, 10, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "11"}, 10, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], pid: int, expected: float | None) -> None:
    assert watchdog_interval(env, pid) == expected


# -- the daemon over a real socket -----------------------------------------------------


@pytest.fixture
def project(tmp_path: Path, sandbox: SandboxControl) -> Project:
    return daemon_project(tmp_path, sandbox)


def notify_env(tmp_path: Path, watchdog_usec: int | None = 1_000_000) -> dict[str, str]:
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    if watchdog_usec is not None:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    return env


def test_ready_status_watchdog_stopping_in_order(
    project: Project, notify: NotifySocket, tmp_path: Path
) -> None:
    project.write_spec("st.yaml", [track("a", "bagpipes"), track("b", "zither")])
    with DaemonProc(project, env=notify_env(tmp_path)) as d:
        d.converged()
        d.wait_event("pass.completed", lambda e: e["ready"] == 2 and e["in_flight"] == 0)
        idle_from = len(notify.messages)
        # Idle, the loop keeps pinging at half of WATCHDOG_USEC.
        wait_until(lambda: len(notify.messages) >= idle_from + 4, 10, "watchdog pings")
        code, took = d.stop()
    assert code == 0
    assert took < 5
    wait_until(lambda: notify.with_key("STOPPING"), 5, "STOPPING=1")
    keys = notify.keys()
    assert keys[0] == "READY"
    assert keys[-1] == "STOPPING"
    assert keys.count("READY") == 1
    assert set(keys[1:-1]) == {"WATCHDOG"}, "every pass reports WATCHDOG=1 with STATUS="
    final = notify.with_key("WATCHDOG")[-1][1]["STATUS"]
    assert re.fullmatch(r"2/2 ready, 0 in flight, 0 queued, 0 failed, last pass \d+s ago", final), (
        final
    )
    idle = [t for t, f in notify.messages[idle_from:] if "WATCHDOG" in f]
    assert max(b - a for a, b in itertools.pairwise(idle)) < 0.9


def test_status_without_a_watchdog(project: Project, notify: NotifySocket, tmp_path: Path) -> None:
    project.write_spec("st.yaml", [track("a", "banjo")])
    env = {**notify_env(tmp_path), "WATCHDOG_PID": "1"}  # meant for another process
    with DaemonProc(project, env=env) as d:
        d.converged()
        wait_until(lambda: notify.with_key("STATUS")[-1:] and "1/1 ready" in
                   notify.with_key("STATUS")[-1][1]["STATUS"], 10, "STATUS 1/1 ready")  # fmt: skip
        code, _ = d.stop()
    assert code == 0
    assert not notify.with_key("WATCHDOG")
    assert notify.keys()[0] == "READY"


def test_a_stuck_pass_sends_no_watchdog(
    project: Project, notify: NotifySocket, tmp_path: Path, sandbox: SandboxControl
) -> None:
    """A batch poll that hangs for 4 s holds the pass: no WATCHDOG=1 meanwhile."""
    sandbox.configure(
        faults=[{"kind": "slow", "delay": 4.0, "at": [1], "endpoints": ["batch_poll"]}]
    )
    project.write_spec("st.yaml", [track("a", "harmonium")])
    with DaemonProc(project, env=notify_env(tmp_path)) as d:
        d.converged(timeout=30)
        wait_until(lambda: len(notify.with_key("WATCHDOG")) >= 6, 10, "pings after the pass")
        code, _ = d.stop()
    assert code == 0
    times = [t for t, _ in notify.with_key("WATCHDOG")]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) > 3.5, f"pings went on during the stuck pass: {gaps}"
    assert gaps.index(max(gaps)) < len(gaps) - 2, "and resumed once it completed"


def test_sighup_tells_systemd_reloading_then_ready(
    project: Project, notify: NotifySocket, tmp_path: Path
) -> None:
    with DaemonProc(project, env=notify_env(tmp_path, None)) as d:
        d.wait_event("pass.completed")
        d.send(signal.SIGHUP)
        d.wait_event("config.reloaded")
        wait_until(lambda: notify.keys().count("READY") == 2, 5, "READY=1 after the reload")
        code, _ = d.stop()
    assert code == 0
    keys = notify.keys()
    assert keys.index("RELOADING") < len(keys) - 1 - keys[::-1].index("READY")


# -- the unit file and the example config ----------------------------------------------


def unit_directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key, []).append(value)
    return found


def test_unit_file_has_the_directives_the_daemon_relies_on() -> None:
    d = unit_directives(UNIT.read_text())
    expected = {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "Restart": ["on-failure"],
        "LoadCredential": ["musicapi-key:/etc/reconciler/musicapi-key"],
        "StateDirectory": ["reconciler"],
        "StateDirectoryMode": ["0750"],
        "User": ["reconciler"],
        "Group": ["reconciler"],
        "UMask": ["0027"],
        "ProtectSystem": ["strict"],
        "ReadOnlyPaths": ["/srv/reconciler/specs"],
        "ReadWritePaths": ["/srv/reconciler/tracks"],
        "NoNewPrivileges": ["yes"],
        "CapabilityBoundingSet": [""],
    }
    for key, values in expected.items():
        assert d.get(key) == values, key
    assert d["ExecStart"] == [f"{INSTALLED_BINARY} run --config /etc/reconciler/reconciler.toml"]
    assert "WatchdogSec" in d
    assert "DynamicUser" not in d, "operators need the ledger under a stable group"


def test_example_config_loads_with_the_units_paths(tmp_path: Path) -> None:
    settings = load_settings(Flags(config=EXAMPLE_CONFIG), env={})
    d = unit_directives(UNIT.read_text())
    assert [str(settings.specs_dir)] == d["ReadOnlyPaths"]
    assert [str(settings.out_dir)] == d["ReadWritePaths"]
    assert settings.state_dir == Path("/var/lib") / d["StateDirectory"][0]
    assert settings.webhook is None
    # With the receiver section switched on (and its secret file present), it loads too.
    secret = tmp_path / "webhook-secret"
    secret.write_text("s3cret\n")
    text = re.sub(
        r"^# (\[webhook\]|\[ops\]|\w+ = .*)$", r"\1", EXAMPLE_CONFIG.read_text(), flags=re.M
    )
    text = text.replace("/run/credentials/reconciler.service/webhook-secret", str(secret))
    text = re.sub(r"^(api_key_file|daily_budget|models) = .*$", "", text, flags=re.M)
    config = tmp_path / "reconciler.toml"
    config.write_text(text)
    hooked = load_settings(Flags(config=config), env={})
    assert hooked.webhook is not None
    assert hooked.webhook.port == 8787
    assert hooked.webhook.secret.get_secret_value() == "s3cret"
    assert settings.ops_listen is None
    assert hooked.ops_listen == ("127.0.0.1", 9464)


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze not installed (apt package: systemd)")
    return path


def test_systemd_analyze_verify_prints_nothing(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    # verify requires ExecStart= to exist: point a copy at this checkout's script.
    script = Path(sys.executable).parent / "reconciler"
    assert script.is_file()
    unit = tmp_path / "reconciler.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_BINARY, str(script)))
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == ""


def test_systemd_analyze_security_exposure_is_at_most_2() -> None:
    analyze = _systemd_analyze()
    proc = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "SYSTEMD_COLORS": "0"},
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, proc.stdout


def test_the_documentation_the_unit_and_config_point_at_exists_and_is_installed() -> None:
    readme = (ROOT / "README.md").read_text()
    unit = (ROOT / "systemd" / "reconciler.service").read_text()
    match = re.search(r"^Documentation=file:///opt/reconciler/(\S+)$", unit, re.MULTILINE)
    assert match is not None
    installed_as = match.group(1)
    shared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"][
        "targets"
    ]["wheel"]["shared-data"]
    sources = [src for src, dest in shared.items() if dest == installed_as]
    assert sources == ["docs/systemd.md"]
    for text in (unit, (ROOT / "systemd" / "reconciler.toml").read_text(), readme):
        for ref in re.findall(r"docs/[\w.-]+\.md", text):
            assert (ROOT / ref).is_file(), ref
    assert "](docs/systemd.md)" in readme
