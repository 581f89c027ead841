"""Daemon latency: from a saved spec file to its batch submit, and to its output file.

Starts the sandbox (``python -m reconciler.sandbox``) and ``reconciler run``
in processes of their own, with the default batching window (2 s) unless
told otherwise. Each trial saves one new spec file (one track, a fresh
prompt) and reads the daemon's JSON log: ``batch.submitted`` is the submit,
``track.ready`` for that file is the output on disk. Times run from just
before the write to the log line's timestamp (same machine, same clock).
Trials run one after another, each once the previous output is ready.

Then one burst: 50 files copied in at once; it reports the submit calls
(ceil(50/10) = 5 is the floor) and the time to the last submit.

Usage::

    uv run python bench/daemon_latency.py [--trials 20] [--window 2.0] [--poll 1.0]
        [--latency 1.0] [--webhook] [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from common import append_results, command_line

KEY = "bench-key"
BURST = 50


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spec(prompt: str) -> str:
    return (
        f"defaults:\n  mv: sonic-v5\ntracks:\n  - name: t\n    gpt_description_prompt: {prompt}\n"
    )


class Log:
    """The daemon's JSON log lines, read incrementally from its stderr file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[dict[str, Any]] = []
        self._offset = 0

    def refresh(self) -> None:
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        for line in data[:end].splitlines():
            if line.startswith(b"{"):
                self.events.append(json.loads(line))

    def wait(self, event: str, after: int, timeout: float, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.refresh()
            for e in self.events[after:]:
                if e["event"] == event and all(e.get(k) == v for k, v in match.items()):
                    return e
            time.sleep(0.005)
        raise TimeoutError(f"no {event} {match} within {timeout}s")


def stamp(event: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(p / 100 * len(ordered)) - 1)]


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    load = "{:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg())
    sandbox = subprocess.Popen(
        [sys.executable, "-m", "reconciler.sandbox", "--port", "0", "--key", KEY,
         "--latency", str(args.latency)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert sandbox.stdout is not None
    base_url = sandbox.stdout.readline().strip()
    specs, out, state = work / "specs", work / "tracks", work / "state"
    specs.mkdir()
    config = work / "reconciler.toml"
    text = f"[submit]\nbatch_window = {args.window}\n[poll]\ninterval = {args.poll}\n"
    if args.webhook:
        port = free_port()
        text += (
            f'[webhook]\nlisten = "127.0.0.1:{port}"\npublic_url = "http://127.0.0.1:{port}"\n'
            'secret = "bench-secret"\n'
        )
    config.write_text(text)
    log_path = work / "daemon.log"
    env = {**os.environ, "MUSICAPI_KEY": KEY}
    env.pop("NOTIFY_SOCKET", None)
    with log_path.open("wb") as log_file:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "run", "--specs", str(specs), "--out", str(out),
             "--state", str(state), "--config", str(config), "--api-url", base_url],
            env=env, stderr=log_file, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    log = Log(log_path)
    try:
        log.wait("pass.completed", 0, 30)
        to_submit: list[float] = []
        to_output: list[float] = []
        for i in range(args.trials):
            mark = len(log.events)
            t0 = time.time()
            (specs / f"trial-{i:03d}.yaml").write_text(spec(f"trial {i} {t0}"))
            submitted = log.wait("batch.submitted", mark, 60)
            ready = log.wait("track.ready", mark, 60, path=f"trial-{i:03d}/t.mp3")
            to_submit.append(stamp(submitted) - t0)
            to_output.append(stamp(ready) - t0)

        stats_before = httpx.get(base_url.removesuffix("/api/v1") + "/_sandbox/stats",
                                 headers={"Authorization": f"Bearer {KEY}"}).json()  # fmt: skip
        staging = work / "staging"
        staging.mkdir()
        for i in range(BURST):
            (staging / f"burst-{i:02d}.yaml").write_text(spec(f"burst {i}"))
        mark = len(log.events)
        t0 = time.time()
        for f in sorted(staging.iterdir()):
            shutil.copy(f, specs / f.name)
        submits = []
        accepted = 0
        while accepted < BURST:
            e = log.wait("batch.submitted", mark, 60)
            mark = log.events.index(e) + 1
            submits.append(stamp(e) - t0)
            accepted += e["accepted"]
        stats_after = httpx.get(base_url.removesuffix("/api/v1") + "/_sandbox/stats",
                                headers={"Authorization": f"Bearer {KEY}"}).json()  # fmt: skip
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(15)
        sandbox.terminate()
        sandbox.wait(10)
    return {
        "load_before": load,
        "to_submit": to_submit,
        "to_output": to_output,
        "burst_calls": stats_after["batch_submit_calls"] - stats_before["batch_submit_calls"],
        "burst_last_submit": max(submits),
        "burst_first_submit": min(submits),
    }


def report(results: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    sub, outp = results["to_submit"], results["to_output"]
    mode = "webhooks on" if args.webhook else f"polling every {args.poll:g} s, no webhooks"
    rows = [
        (f"saved file → batch submit, p50 / p95 ({len(sub)} trials)",
         f"{statistics.median(sub):.2f} s / {pct(sub, 95):.2f} s"),
        ("saved file → output file ready, p50 / p95",
         f"{statistics.median(outp):.2f} s / {pct(outp, 95):.2f} s"),
        (f"{BURST} files copied at once: batch submit calls",
         f"{results['burst_calls']} (at least {math.ceil(BURST / 10)}, "
         f"at most {math.ceil(BURST / 10) + 1} allowed)"),
        (f"{BURST} files: first / last submit after the copy began",
         f"{results['burst_first_submit']:.2f} s / {results['burst_last_submit']:.2f} s"),
    ]  # fmt: skip
    table = "\n".join(f"| {measure} | {figure} |" for measure, figure in rows)
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    return f"""
## Daemon latency: saved file → batch submit → output ({mode})

- Command: `{command}`
- Machine: {os.cpu_count()} CPUs (`nproc`), Python {platform.python_version()},
  {platform.system()} {platform.release()}; sandbox and daemon in processes of their own.
- Date: {today}; load average before the run {results["load_before"]} (the machine is shared).
  Batching window {args.window:g} s, sandbox generation time {args.latency:g} s.
  The submit waits out the window by design (a burst of saves shares batches); the output
  adds the generation time, {"the webhook's" if args.webhook else "up to one poll interval of"}
  wake-up, the download and the atomic write.

| measure | figure |
|---|---|
{table}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--window", type=float, default=2.0, help="submit.batch_window")
    parser.add_argument("--poll", type=float, default=1.0, help="poll.interval")
    parser.add_argument("--latency", type=float, default=1.0, help="sandbox generation time")
    parser.add_argument("--webhook", action="store_true", help="run the webhook receiver")
    parser.add_argument("--results", type=Path, help="append the figures to this Markdown file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="daemon-latency-") as tmp:
        results = run(args, Path(tmp))
    command = command_line("bench/daemon_latency.py")
    text = report(results, args, command)
    print(text)
    if args.results:
        append_results(args.results, text)


if __name__ == "__main__":
    main()
