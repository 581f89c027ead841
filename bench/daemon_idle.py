"""Daemon idle cost: CPU, wake-ups and memory of a converged ``reconciler run``.

Starts the sandbox and ``reconciler run`` in processes of their own with the
default intervals (poll 15 s, rescan 300 s, batching window 2 s), lets the
daemon converge on ``--tracks`` tracks (default 100, in 10 spec files), then
watches it for ``--seconds`` (default 60) while nothing changes. From
``/proc/<pid>``: CPU time (utime + stime of every thread), context switches
(each is a wake-up: the watcher thread checks its stop flag every 100 ms,
the rest should sleep), peak and current RSS. From the sandbox: requests
during the idle window (a converged daemon sends none). From the state folder: bytes written.

Usage::

    uv run python bench/daemon_idle.py [--tracks 100] [--seconds 60] [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from common import append_results, command_line, cpu_seconds, memory_kb, passes

KEY = "bench-key"
COUNTERS = ("batch_submit_calls", "batch_polls", "task_polls", "credit_calls", "downloads")


def switches(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def state_bytes(state: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in state.rglob("*") if p.is_file()
    }


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    load = "{:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg())
    sandbox = subprocess.Popen(
        [sys.executable, "-m", "reconciler.sandbox", "--port", "0", "--key", KEY,
         "--latency", "1"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert sandbox.stdout is not None
    base_url = sandbox.stdout.readline().strip()
    root = base_url.removesuffix("/api/v1")

    def stats() -> dict[str, Any]:
        answer: dict[str, Any] = httpx.get(
            f"{root}/_sandbox/stats", headers={"Authorization": f"Bearer {KEY}"}
        ).json()
        return answer

    specs, out, state = work / "specs", work / "tracks", work / "state"
    specs.mkdir()
    per_file = max(1, args.tracks // 10)
    for f in range(0, args.tracks, per_file):
        lines = ["defaults:", "  mv: sonic-v5", "tracks:"]
        for i in range(f, min(f + per_file, args.tracks)):
            lines += [f"  - name: t{i}", f"    gpt_description_prompt: idle bench {i}"]
        (specs / f"set-{f:04d}.yaml").write_text("\n".join(lines) + "\n")
    log_path = work / "daemon.log"
    env = {**os.environ, "MUSICAPI_KEY": KEY}
    env.pop("NOTIFY_SOCKET", None)
    with log_path.open("wb") as log_file:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "run", "--specs", str(specs), "--out", str(out),
             "--state", str(state), "--api-url", base_url],
            env=env, stderr=log_file, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        started = time.monotonic()
        while True:
            events = passes(log_path)
            if events and events[-1]["ready"] == args.tracks and events[-1]["in_flight"] == 0:
                break
            if time.monotonic() - started > 300 or daemon.poll() is not None:
                raise RuntimeError(f"not converged:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.2)
        converge_seconds = time.monotonic() - started
        time.sleep(1.0)  # let the last pass's log line and WAL write settle
        before = (cpu_seconds(daemon.pid), switches(daemon.pid), stats(), state_bytes(state))
        lines_before = len(log_path.read_text().splitlines())
        t0 = time.monotonic()
        time.sleep(args.seconds)
        elapsed = time.monotonic() - t0
        after = (cpu_seconds(daemon.pid), switches(daemon.pid), stats(), state_bytes(state))
        lines_after = len(log_path.read_text().splitlines())
        memory = memory_kb(daemon.pid)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(15)
        sandbox.terminate()
        sandbox.wait(10)
    return {
        "load_before": load,
        "converge_seconds": converge_seconds,
        "cpu": (after[0] - before[0]) / elapsed,
        "cpu_seconds": after[0] - before[0],
        "wakeups": (after[1] - before[1]) / elapsed,
        "requests": {k: after[2][k] - before[2][k] for k in COUNTERS},
        "state_changed": sorted(k for k in after[3] if after[3][k] != before[3].get(k)),
        "log_lines": lines_after - lines_before,
        "memory": memory,
        "elapsed": elapsed,
    }


def report(results: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    mem = results["memory"]
    requests = sum(results["requests"].values())
    rows = [
        ("converged first (from start)", f"{results['converge_seconds']:.1f} s"),
        (f"CPU while idle, {results['elapsed']:.0f} s",
         f"{results['cpu'] * 100:.2f} % of one core ({results['cpu_seconds']:.2f} s CPU)"),
        ("context switches (all threads)", f"{results['wakeups']:.1f} per second"),
        ("API requests while idle", f"{requests} {results['requests']}"),
        ("files changed in the state folder while idle", str(len(results["state_changed"]))),
        ("log lines while idle", str(results["log_lines"])),
        ("RSS peak / now", f"{mem['VmHWM'] / 1024:.1f} MiB / {mem['VmRSS'] / 1024:.1f} MiB"),
        ("threads", str(mem["Threads"])),
    ]  # fmt: skip
    table = "\n".join(f"| {measure} | {figure} |" for measure, figure in rows)
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    return f"""
## Daemon idle cost ({args.tracks} tracks, converged)

- Command: `{command}`
- Machine: {os.cpu_count()} CPUs (`nproc`), Python {platform.python_version()},
  {platform.system()} {platform.release()}; sandbox and daemon in processes of their own.
- Date: {today}; load average before the run {results["load_before"]} (the machine is shared).
  Default intervals (poll 15 s, rescan 300 s, window 2 s), no webhooks.
  Figures from /proc/<pid>/stat and /proc/<pid>/task/*/status of the daemon.

| measure | figure |
|---|---|
{table}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tracks", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--results", type=Path, help="append the figures to this Markdown file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="daemon-idle-") as tmp:
        results = run(args, Path(tmp))
    command = command_line("bench/daemon_idle.py")
    text = report(results, args, command)
    print(text)
    if args.results:
        append_results(args.results, text)


if __name__ == "__main__":
    main()
