"""Running the sandbox: embedded (in a thread or the event loop) and as a command."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from reconciler.sandbox import SHAPES, FaultProfile, SandboxConfig, SandboxServer

URL_LINE = re.compile(r"^http://127\.0\.0\.1:(\d+)/api/v1$")


def test_threaded_server_binds_a_free_port_and_stops_quickly() -> None:
    before = set(threading.enumerate())
    with SandboxServer(SandboxConfig(key="k1")) as first, SandboxServer() as second:
        assert URL_LINE.match(first.base_url)
        assert first.port != second.port
        assert first.key == "k1"
        response = httpx.get(
            f"{first.base_url}/get-credits", headers={"Authorization": "Bearer k1"}
        )
        assert response.json() == {"credits": 100_000, "extra_credits": 0}
        assert first.state.counters.credit_calls == 1
        assert second.state.counters.credit_calls == 0
        started = time.monotonic()
    assert time.monotonic() - started < 2.0  # both, one after the other
    assert set(threading.enumerate()) == before
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{first.base_url}/get-credits")


def test_stopping_with_an_open_slow_request_is_quick_every_run() -> None:
    config = SandboxConfig(faults=_profile([{"kind": "slow", "every": 1, "delay": 60}]))
    server = SandboxServer(config)
    for run in (1, 2):  # a server object can be started again
        with server, httpx.Client(headers={"Authorization": f"Bearer {server.key}"}) as client:
            pending = threading.Thread(
                target=_swallow, args=(lambda: client.get(f"{server.base_url}/get-credits"),)
            )
            pending.start()
            deadline = time.monotonic() + 5
            while server.state.counters.credit_calls < run and time.monotonic() < deadline:
                time.sleep(0.01)
            started = time.monotonic()
        assert time.monotonic() - started < 1.0
        pending.join(5)
        assert not pending.is_alive()


def test_async_server_runs_in_the_current_loop() -> None:
    async def main() -> float:
        async with SandboxServer(SandboxConfig(latency=0)) as server:
            assert threading.active_count() == before
            headers = {"Authorization": f"Bearer {server.key}"}
            async with httpx.AsyncClient(base_url=server.base_url, headers=headers) as client:
                created = await client.post(
                    "/sonic/create",
                    json={"custom_mode": False, "mv": "sonic-v5", "gpt_description_prompt": "x"},
                )
                task = await client.get(f"/sonic/task/{created.json()['task_id']}")
                assert task.json()["code"] == 200
            started = time.monotonic()
        return time.monotonic() - started

    before = threading.active_count()
    assert asyncio.run(main()) < 1.0
    assert threading.active_count() == before


def test_a_taken_port_is_an_error() -> None:
    with SandboxServer() as server:
        taken = SandboxServer(SandboxConfig(port=server.port))
        with pytest.raises(OSError):
            taken.__enter__()


# -- the command ---------------------------------------------------------------------------


PROFILE = """
batch_disabled = 405

[[faults]]
kind = "reject"
at = [1]
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_command_prints_its_url_serves_and_exits_0_on_signal(tmp_path: Path, sig: int) -> None:
    profile = tmp_path / "faults.toml"
    profile.write_text(PROFILE)
    command = [sys.executable, "-m", "reconciler", "sandbox", "--port", "0", "--latency", "0.1"]
    command += ["--key", "cli-key", "--credits", "500", "--seed", "4", "--faults", str(profile)]
    command += ["--fault", '{kind = "rate_limited", at = [1], endpoints = ["credits"]}']
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = URL_LINE.match(line.strip())
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        base_url = line.strip()
        headers = {"Authorization": "Bearer cli-key"}
        with httpx.Client(base_url=base_url, headers=headers) as client:
            assert client.get("/get-credits").status_code == 429  # --fault
            assert client.get("/get-credits").json()["credits"] == 500  # --credits
            assert client.post("/sonic/batch", json={"items": []}).status_code == 405  # profile
            rejected = client.post(
                "/sonic/create",
                json={"custom_mode": False, "mv": "sonic-v5", "gpt_description_prompt": "x"},
            )
            assert rejected.json() == {"type": "forbidden", "error": "copyrighted"}  # profile
        proc.send_signal(sig)
        assert proc.wait(timeout=5) == 0
        assert proc.stdout.read() == ""  # exactly one line
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_command_rejects_a_bad_profile_naming_the_field(tmp_path: Path) -> None:
    profile = tmp_path / "faults.toml"
    profile.write_text('[[faults]]\nkind = "rate_limited"\nrate = 2\n')
    result = subprocess.run(
        [sys.executable, "-m", "reconciler", "sandbox", "--faults", str(profile)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "faults[0].rate: 2 is not from 0.0 to 1.0" in result.stderr
    assert result.stdout == ""


def _profile(rules: list[dict[str, object]]) -> FaultProfile:
    return FaultProfile.from_mapping({"faults": rules})


def _swallow(call: Callable[[], object]) -> None:
    with contextlib.suppress(httpx.HTTPError):
        call()


def test_command_serves_the_shapes_it_is_given() -> None:
    command = [sys.executable, "-m", "reconciler", "sandbox", "--latency", "0"]
    command += ["--shapes", "submit-bare", "--shapes", "numeric-batch-id,one-based-index"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert URL_LINE.match(line), (line, proc.stderr.read() if proc.poll() is not None else "")
        with httpx.Client(base_url=line, headers={"Authorization": "Bearer sandbox-key"}) as client:
            items = [{"custom_mode": False, "mv": "sonic-v5", "gpt_description_prompt": "x"}]
            batch = client.post("/sonic/batch", json={"items": items}).json()
            assert type(batch["batch_id"]) is int
            (task_id,) = batch["tasks"]
            assert isinstance(task_id, str)
            polled = client.get("/sonic/batch", params={"batch_id": str(batch["batch_id"])})
            assert polled.json()["tasks"][0]["index"] == 1
            config = client.get(line.removesuffix("/api/v1") + "/_sandbox/config").json()
            assert config["shapes"] == ["submit-bare", "numeric-batch-id", "one-based-index"]
            assert config["seed"] is None  # fresh ids per start
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_command_rejects_an_unknown_shape_naming_the_known_ones() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "reconciler", "sandbox", "--shapes", "submit-bare,submit-ids"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "--shapes: unknown shape 'submit-ids'" in result.stderr
    assert all(name in result.stderr for name in SHAPES)
    assert result.stdout == ""
