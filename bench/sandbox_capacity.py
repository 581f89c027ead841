"""Sandbox capacity: 1,000 tasks in flight and a steady request rate on loopback.

Starts the sandbox (``python -m reconciler.sandbox``) in its own process,
then, from this process:

1. submits 1,000 tasks as 100 batches of 10, with a generation time long
   enough that all of them stay in flight for the whole run;
2. offers an open-loop mix of batch polls, task polls and credit reads at a
   fixed rate (default 100 requests/s), and reports latency and the
   sandbox's CPU use;
3. drives closed-loop task polls from 16 concurrent connections to find the
   sustained maximum;
4. lets 100 short tasks finish and downloads their 200 clips (the first
   download of a clip synthesises and encodes it).

The load generator speaks HTTP/1.1 over raw asyncio streams with keep-alive:
a full client library costs more CPU per request than the sandbox does, and
on two cores it would measure itself.

Usage::

    uv run python bench/sandbox_capacity.py [--rate 100] [--seconds 10] [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from common import append_results

IN_FLIGHT = 1_000
BATCH = 10
CONNECTIONS = 16
KEY = "bench-key"


class Connection:
    """One keep-alive HTTP/1.1 connection; enough protocol for the sandbox's answers."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(reader, writer)

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: sandbox\r\nAuthorization: Bearer {KEY}\r\n"
        payload = b""
        if body is not None:
            payload = json.dumps(body).encode()
            head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + payload)
        status = int((await self.reader.readline()).split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


@dataclass
class Sample:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0

    def record(self, started: float, ok: bool) -> None:
        self.latencies.append(time.perf_counter() - started)
        self.errors += not ok

    def ms(self, *percentiles: float) -> str:
        ordered = sorted(self.latencies)
        picks = (ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] for p in percentiles)
        return " / ".join(f"{pick * 1000:.1f}" for pick in picks) + " ms"


def item(n: int) -> dict[str, Any]:
    return {"custom_mode": False, "mv": "sonic-v5", "gpt_description_prompt": f"bench track {n}"}


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Pool:
    """Idle connections handed out one request at a time."""

    def __init__(self, connections: list[Connection]) -> None:
        self.idle: asyncio.Queue[Connection] = asyncio.Queue()
        for connection in connections:
            self.idle.put_nowait(connection)

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        connection = await self.idle.get()
        try:
            return await connection.request(method, path, body)
        finally:
            self.idle.put_nowait(connection)


async def submit(pool: Pool, first: int, batches: int) -> list[dict[str, Any]]:
    async def one(b: int) -> dict[str, Any]:
        items = [item(first + b * BATCH + i) for i in range(BATCH)]
        status, body = await pool.request("POST", "/api/v1/sonic/batch", {"items": items})
        assert status == 200, body
        answer: dict[str, Any] = json.loads(body)
        return answer

    return list(await asyncio.gather(*(one(b) for b in range(batches))))


async def count_in_flight(pool: Pool, batch_ids: list[str]) -> int:
    """How many of the benchmark's tasks a batch poll reports as pending or running."""
    count = 0
    for batch_id in batch_ids:
        _, body = await pool.request("GET", f"/api/v1/sonic/batch?batch_id={batch_id}")
        count += sum(e["status"] in ("pending", "running") for e in json.loads(body)["tasks"])
    return count


async def open_loop(
    pool: Pool, batch_ids: list[str], task_ids: list[str], rate: float, seconds: float
) -> Sample:
    """Issue requests on a fixed schedule, whatever the previous ones are doing."""
    sample = Sample()

    async def one(n: int) -> None:
        if n % 4 == 0:
            path = f"/api/v1/sonic/batch?batch_id={batch_ids[n % len(batch_ids)]}"
        elif n % 4 == 3:
            path = "/api/v1/get-credits"
        else:
            path = f"/api/v1/sonic/task/{task_ids[n % len(task_ids)]}"
        started = time.perf_counter()
        status, _ = await pool.request("GET", path)
        sample.record(started, status in (200, 202))

    start = time.perf_counter()
    pending = []
    for n in range(int(rate * seconds)):
        delay = start + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        pending.append(asyncio.create_task(one(n)))
    await asyncio.gather(*pending)
    return sample


async def closed_loop(connections: list[Connection], task_ids: list[str], seconds: float) -> Sample:
    sample = Sample()
    deadline = time.perf_counter() + seconds

    async def worker(offset: int, connection: Connection) -> None:
        n = offset
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            status, _ = await connection.request("GET", f"/api/v1/sonic/task/{task_ids[n]}")
            sample.record(started, status in (200, 202))
            n = (n + len(connections)) % len(task_ids)

    await asyncio.gather(*(worker(i, c) for i, c in enumerate(connections)))
    return sample


async def downloads(pool: Pool, connections: list[Connection]) -> tuple[Sample, float, float]:
    """Finish 100 tasks at once, then fetch their 200 clips over every connection."""
    await pool.request("POST", "/_sandbox/config", {"latency": 0})
    answers = await submit(pool, -10 * BATCH, 10)
    paths: asyncio.Queue[str] = asyncio.Queue()
    for answer in answers:
        for entry in answer["tasks"]:
            _, body = await pool.request("GET", f"/api/v1/sonic/task/{entry['task_id']}")
            for clip in json.loads(body)["data"]:
                paths.put_nowait(urlsplit(clip["audio_url"]).path)
    count = paths.qsize()
    sample = Sample()
    size = 0

    async def worker(connection: Connection) -> None:
        nonlocal size
        while not paths.empty():
            path = paths.get_nowait()
            started = time.perf_counter()
            status, body = await connection.request("GET", path)
            sample.record(started, status == 200)
            size += len(body)

    started = time.perf_counter()
    await asyncio.gather(*(worker(connection) for connection in connections))
    wall = time.perf_counter() - started
    return sample, count / wall, size / count / 1024


async def run(base_url: str, pid: int, rate: float, seconds: float) -> dict[str, Any]:
    url = urlsplit(base_url)
    assert url.hostname is not None
    assert url.port is not None
    load_before = " / ".join(f"{load:.2f}" for load in os.getloadavg())
    connections = [await Connection.open(url.hostname, url.port) for _ in range(CONNECTIONS)]
    pool = Pool(connections)
    try:
        started = time.perf_counter()
        answers = await submit(pool, 0, IN_FLIGHT // BATCH)
        submit_seconds = time.perf_counter() - started
        batch_ids = [answer["batch_id"] for answer in answers]
        task_ids = [entry["task_id"] for answer in answers for entry in answer["tasks"]]
        assert len(task_ids) == IN_FLIGHT

        cpu_before = cpu_seconds(pid)
        started = time.perf_counter()
        steady = await open_loop(pool, batch_ids, task_ids, rate, seconds)
        steady_cpu = (cpu_seconds(pid) - cpu_before) / (time.perf_counter() - started)

        cpu_before = cpu_seconds(pid)
        started = time.perf_counter()
        flat = await closed_loop(connections, task_ids, seconds)
        flat_wall = time.perf_counter() - started
        flat_cpu = (cpu_seconds(pid) - cpu_before) / flat_wall

        in_flight = await count_in_flight(pool, batch_ids)
        fetched, download_rate, download_kb = await downloads(pool, connections)
    finally:
        for connection in connections:
            connection.close()
    return {
        "load_before": load_before,
        "submit_seconds": submit_seconds,
        "steady": steady,
        "steady_cpu": steady_cpu,
        "flat": flat,
        "flat_rate": len(flat.latencies) / flat_wall,
        "flat_cpu": flat_cpu,
        "in_flight": in_flight,
        "downloads": fetched,
        "download_rate": download_rate,
        "download_kb": download_kb,
    }


def report(results: dict[str, Any], rate: float, seconds: float, command: str) -> str:
    steady: Sample = results["steady"]
    flat: Sample = results["flat"]
    fetched: Sample = results["downloads"]
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    today = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    rows = [
        ("tasks in flight", f"{results['in_flight']:,} (still pending/running after the runs)"),
        ("submitting them: 100 batch submits of 10", f"{results['submit_seconds']:.2f} s"),
        (f"offered load, open loop, {seconds:g} s", f"{rate:g} requests/s"),
        ("latency at that load, p50 / p95 / p99", steady.ms(50, 95, 99)),
        ("errors at that load", f"{steady.errors} of {len(steady.latencies)}"),
        ("sandbox CPU at that load", f"{results['steady_cpu'] * 100:.0f} % of one core"),
        (
            f"sustained task polls, closed loop, {CONNECTIONS} connections",
            f"{results['flat_rate']:,.0f} requests/s"
            f" (sandbox at {results['flat_cpu'] * 100:.0f} % of one core)",
        ),
        ("latency flat out, p50 / p95", flat.ms(50, 95)),
        (
            f"audio downloads, 200 clips, first fetch (synthesis + MP3 encoding),"
            f" {CONNECTIONS} connections",
            f"{results['download_rate']:.0f} clips/s, p50 / p95 {fetched.ms(50, 95)},"
            f" {results['download_kb']:.0f} KB each",
        ),
    ]
    table = "\n".join(f"| {measure} | {figure} |" for measure, figure in rows)
    return f"""
## Sandbox capacity

- Command: `{command}`
- Machine: {os.cpu_count()} CPUs (`nproc`), {cpu_model}, Python {platform.python_version()},
  {platform.system()} {platform.release()}. The sandbox runs in its own process; the load
  generator (raw asyncio HTTP/1.1, keep-alive) in this one, on the same cores.
- Date: {today}; load average before the run {results["load_before"]} (the machine is shared)
- Open-loop mix: 1/4 batch polls (10 tasks each), 1/2 single-task polls, 1/4 credit reads.

| measure | figure |
|---|---|
{table}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0, help="offered requests per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each load phase")
    parser.add_argument("--results", type=Path, help="append the figures to this Markdown file")
    args = parser.parse_args()

    command = [sys.executable, "-m", "reconciler.sandbox", "--port", "0", "--key", KEY]
    server = subprocess.Popen([*command, "--latency", "900"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        base_url = server.stdout.readline().strip()
        results = asyncio.run(run(base_url, server.pid, args.rate, args.seconds))
    finally:
        server.terminate()
        server.wait(10)
    invocation = " ".join(["uv run python bench/sandbox_capacity.py", *sys.argv[1:]])
    text = report(results, args.rate, args.seconds, invocation)
    print(text)
    if args.results:
        append_results(args.results, text)


if __name__ == "__main__":
    main()
