"""The systemd notify protocol (``sd_notify``), by hand.

Where it sits: beside the daemon loop, which is its only caller. Under
``Type=notify`` systemd hands the service a datagram socket in
``$NOTIFY_SOCKET``; the daemon says ``READY=1`` once the ledger is open and the
watcher runs, ``STATUS=...`` after each pass, ``WATCHDOG=1`` only from its main
loop, and ``STOPPING=1`` on SIGTERM. Outside systemd (no ``$NOTIFY_SOCKET``)
every call is a no-op.

Why by hand: the protocol is one ``sendto`` of ``KEY=value`` lines on an
``AF_UNIX``/``SOCK_DGRAM`` socket, and the PyPI ``sdnotify`` package has been
unmaintained since 2017.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

#: A datagram to a live systemd never blocks for long; this bounds a wedged receiver.
SEND_TIMEOUT = 1.0


def _address(value: str) -> str | None:
    """``$NOTIFY_SOCKET`` as a socket address: a path, or ``@name`` for the abstract namespace."""
    if value.startswith("/"):
        return value
    if value.startswith("@"):
        return "\0" + value[1:]
    return None  # e.g. "vsock:..." (systemd in a VM): not supported here


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``), None when not asked for.

    ``$WATCHDOG_PID``, when set, names the process the watchdog is meant for;
    any other process (a child that inherited the environment) must not ping.
    """
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    return int(usec) / 1_000_000 / 2


class Notifier:
    """Sends notify messages to systemd; a no-op without ``$NOTIFY_SOCKET``."""

    def __init__(self, notify_socket: str | None) -> None:
        self.log = structlog.get_logger("reconciler")
        self._address = _address(notify_socket) if notify_socket else None
        if notify_socket and self._address is None:
            self.log.warning("systemd.unsupported_socket", notify_socket=notify_socket)
        self._sock: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if env is None else env
        return cls(env.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields as one datagram; True when it went out."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.settimeout(SEND_TIMEOUT)
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            # systemd not listening must not take the daemon down; say it once.
            if not self._failed:
                self.log.warning("systemd.notify_failed", error=exc.strerror or str(exc))
            self._failed = True
            return False
        self._failed = False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={_one_line(text)}")

    def watchdog(self, status: str | None = None) -> bool:
        return self.send("WATCHDOG=1", *([f"STATUS={_one_line(status)}"] if status else []))

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd >= 253 (Type=notify-reload) pair it with READY=1.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    """STATUS= is a single line: a newline would start another field."""
    return " ".join(text.split())
