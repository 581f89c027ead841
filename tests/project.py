"""A throwaway reconciler project for integration tests: folders, config, CLI runs.

Every command runs as a real subprocess of the CLI (``python -m reconciler``)
against the real sandbox server, with a real SQLite ledger and real files.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from reconciler.sandbox import SandboxControl

FAST_CONFIG = """
[poll]
interval = 0.1
rescan_interval = 5

[submit]
batch_window = 0.2
ambiguous_grace = 1.0

[retry]
backoff_initial = 0.1
backoff_cap = 1.0
request_timeout = 5.0

[api]
# The loopback sandbox needs no politeness; the token bucket has its own tests.
max_requests_per_second = 200
"""

#: Commands that only read or write the ledger and so take no API options.
OFFLINE_COMMANDS = ("status", "retry", "describe", "events")

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float = 5.0, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds.

    Looks every 10 ms at first, then less often (up to every 100 ms): a
    predicate that reads a log or scans a folder costs CPU the tests running
    beside this one need.
    """
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(pause)
        pause = min(pause * 1.5, 0.1)


def track(name: str, prompt: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "gpt_description_prompt": prompt, **fields}


class Project:
    def __init__(self, root: Path, sandbox: SandboxControl, extra_config: str = "") -> None:
        self.root = root
        self.sandbox = sandbox
        self.specs = root / "specs"
        self.out = root / "tracks"
        self.state = root / "state"
        self.config = root / "reconciler.toml"
        self.specs.mkdir(parents=True, exist_ok=True)
        self.config.write_text(FAST_CONFIG + extra_config)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MUSICAPI", "RECONCILER"))}
        env["MUSICAPI_KEY"] = self.sandbox.key
        return env

    def args(self, command: str) -> list[str]:
        args = [
            sys.executable, "-m", "reconciler", command,
            "--specs", str(self.specs), "--out", str(self.out), "--state", str(self.state),
            "--config", str(self.config),
        ]  # fmt: skip
        # These never call the API, so they take no --api-url.
        if command not in OFFLINE_COMMANDS:
            args += ["--api-url", self.sandbox.base_url]
        return args

    def cli(
        self, command: str, *extra: str, timeout: float = 90
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.args(command), *extra],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def sync(self, *extra: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        proc = self.cli("sync", *extra)
        assert proc.returncode == expect, proc.stderr[-3000:]
        return proc

    def status(self, *extra: str) -> dict[str, Any]:
        proc = self.cli("status", "--json", *extra)
        assert proc.returncode in (0, 1), proc.stderr
        data: dict[str, Any] = json.loads(proc.stdout)
        return data

    def write_spec(
        self,
        filename: str,
        tracks: list[dict[str, Any]],
        soundtrack: str | None = None,
        defaults: dict[str, Any] | None = None,
    ) -> Path:
        doc: dict[str, Any] = {}
        if soundtrack:
            doc["soundtrack"] = soundtrack
        doc["defaults"] = {"mv": "sonic-v5", **(defaults or {})}
        doc["tracks"] = tracks
        path = self.specs / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def files(self) -> dict[str, tuple[str, int]]:
        """Every file under the output folder: relative path → (sha256, mtime_ns)."""
        return {
            p.relative_to(self.out).as_posix(): (
                hashlib.sha256(p.read_bytes()).hexdigest(),
                p.stat().st_mtime_ns,
            )
            for p in sorted(self.out.rglob("*"))
            if p.is_file()
        }

    def audio_sha256(self, rel: str) -> str:
        """sha256 of an output's audio without its ID3v2 tag: what the cache holds."""
        return hashlib.sha256(strip_id3v2((self.out / rel).read_bytes())).hexdigest()

    def stats(self) -> dict[str, Any]:
        return self.sandbox.stats()


def strip_id3v2(data: bytes) -> bytes:
    """The MPEG stream after a leading ID3v2 tag (size: four 7-bit bytes)."""
    if data[:3] != b"ID3":
        return data
    size = 0
    for byte in data[6:10]:
        size = (size << 7) | (byte & 0x7F)
    return data[10 + size :]
