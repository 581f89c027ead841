"""Shared pieces of the benchmarks: a sandbox in its own process, spec folders,
running the ``reconciler`` CLI as a child process, and writing a script's own
section of ``bench/RESULTS.md`` in place.

The sandbox and the CLI run as separate processes, as a user would run them,
so the benchmark process measures them from outside and never competes with
them for the GIL.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

KEY = "bench-key"
#: Bytecode cache for the child processes, outside the repository. Without one
#: (PYTHONDONTWRITEBYTECODE=1 is set on some machines) every command compiles
#: its imports from source, about 0.6 s of start-up that an installed copy
#: does not pay.
PYCACHE = Path(tempfile.gettempdir()) / "reconciler-bench-pycache"
RESULTS = Path(__file__).with_name("RESULTS.md")
#: Counters of ``GET /_sandbox/stats`` that are requests a client sent.
REQUEST_COUNTERS = (
    "batch_submit_calls",
    "create_calls",
    "batch_polls",
    "task_polls",
    "credit_calls",
    "downloads",
)


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a sandbox or CLI process: this one's, with bytecode cached."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPYCACHEPREFIX": str(PYCACHE), **extra}


def machine() -> str:
    """One line: cores, CPU model, Python, OS; the machine may be shared, so the load too."""
    cpu_model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} CPUs (`nproc`), {cpu_model}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}; load average at the start {load}"
    )


def revision() -> str:
    """The commit measured, marked when the package has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=False
        ).stdout.strip()

    dirty = git("status", "--porcelain", "--", "reconciler")
    return git("rev-parse", "--short", "HEAD") + (" with local changes" if dirty else "")


def today() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def command_line(script: str) -> str:
    return " ".join(["uv run python", script, *sys.argv[1:]])


@dataclass
class Sandbox:
    """A sandbox process and how to reach it."""

    process: subprocess.Popen[str]
    base_url: str  # ends in /api/v1

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/api/v1")

    def stats(self) -> dict[str, Any]:
        answer = httpx.get(
            f"{self.root}/_sandbox/stats", headers={"Authorization": f"Bearer {KEY}"}
        )
        answer.raise_for_status()
        stats: dict[str, Any] = answer.json()
        return stats


@contextmanager
def sandbox(latency: float, credits: int = 100_000) -> Iterator[Sandbox]:
    """A fresh sandbox in its own process; its counters start at zero."""
    command = [
        sys.executable,
        "-m",
        "reconciler.sandbox",
        "--port",
        "0",
        "--key",
        KEY,
        "--latency",
        str(latency),
        "--credits",
        str(credits),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert process.stdout is not None
        base_url = process.stdout.readline().strip()
        if not base_url.startswith("http://"):
            raise RuntimeError(f"sandbox did not start (exit code {process.wait(10)})")
        yield Sandbox(process, base_url)
    finally:
        process.terminate()
        process.wait(10)


def requests_of(stats: Mapping[str, Any]) -> dict[str, int]:
    """The request counters of a stats answer, plus their total."""
    counts = {name: int(stats[name]) for name in REQUEST_COUNTERS}
    counts["total"] = sum(counts.values())
    return counts


def write_specs(root: Path, tracks: int, files: int) -> None:
    """``tracks`` description-mode tracks spread evenly over ``files`` YAML files.

    Every prompt differs, so every track is its own fingerprint (one generation each).
    """
    root.mkdir(parents=True, exist_ok=True)
    per_file, extra = divmod(tracks, files)
    n = 0
    for f in range(files):
        lines = [f"soundtrack: bench-{f:05d}\n", "defaults:\n  mv: sonic-v5\n", "tracks:\n"]
        for _ in range(per_file + (f < extra)):
            lines.append(f"  - name: t{n:06d}\n    gpt_description_prompt: bench track {n}\n")
            n += 1
        (root / f"bench-{f:05d}.yaml").write_text("".join(lines))


def write_config(
    path: Path, *, poll_interval: float, max_in_flight: int, rate: float | None = None
) -> None:
    """``rate``: ``[api] max_requests_per_second``, when not the default (4)."""
    text = f"[submit]\nmax_in_flight = {max_in_flight}\n\n[poll]\ninterval = {poll_interval}\n"
    if rate is not None:
        text += f"\n[api]\nmax_requests_per_second = {rate:g}\n"
    path.write_text(text)


@dataclass
class CliRun:
    """One finished ``reconciler`` command: exit code, wall time, peak RSS, stdout."""

    exit_code: int
    wall: float
    max_rss_mb: float
    stdout: str


def run_cli(
    args: Sequence[str],
    workdir: Path,
    *,
    api_url: str | None = None,
    log: Path | None = None,
    python_args: Sequence[str] = (),
) -> CliRun:
    """Run ``python [PYTHON_ARGS] -m reconciler ARGS`` in ``workdir``, measured from outside.

    ``os.wait4`` gives this one child's resource use (``getrusage(RUSAGE_CHILDREN)``
    would mix in every earlier child, the sandbox included).
    """
    env = child_env(MUSICAPI_KEY=KEY, **({"MUSICAPI_BASE_URL": api_url} if api_url else {}))
    with (log or Path(os.devnull)).open("w") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, *python_args, "-m", "reconciler", *args],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        assert process.stdout is not None
        stdout = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        # Reaped by hand; tell Popen so it does not try again.
        process.returncode = os.waitstatus_to_exitcode(status)
    # ru_maxrss is in KiB on Linux.
    return CliRun(process.returncode, wall, usage.ru_maxrss / 1024, stdout)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def write_section(name: str, text: str, results: Path = RESULTS) -> None:
    """Put ``text`` between this section's markers in ``results``, in place or appended.

    Other sections of the file are left as they are: several scripts share it.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text.strip()}\n{end}\n"
    current = results.read_text() if results.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(current):
        updated = pattern.sub(lambda _: block, current, count=1)
    else:
        updated = current.rstrip("\n") + "\n\n" + block
    results.write_text(updated)


def append_results(results: Path, text: str) -> None:
    """Append a run's figures to the results file, creating it with its heading."""
    if not results.exists():
        results.write_text("# Benchmark results\n")
    with results.open("a") as out:
        out.write(text)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kb(pid: int) -> dict[str, int]:
    """Peak and current RSS (``VmHWM``, ``VmRSS``, KiB) and thread count of a live process."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "Threads"):
            found[key] = int(value.split()[0])
    return found


def passes(log: Path) -> list[dict[str, Any]]:
    """The daemon's ``pass.completed`` log lines so far."""
    return [
        json.loads(line)
        for line in log.read_text().splitlines()
        if line.startswith("{") and '"pass.completed"' in line
    ]


def timed(
    argv: list[str], cwd: Path, env: dict[str, str], ok: tuple[int, ...]
) -> tuple[float, float, str]:
    """Run ``argv`` to its end: wall seconds, its own CPU seconds (``os.wait4``), stdout.

    Wall time on a shared machine also measures the neighbours; the child's
    user + system time does not. An exit code outside ``ok`` raises.
    """
    started = time.perf_counter()
    process = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert process.stdout is not None
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped by hand
    if process.returncode not in ok:
        raise RuntimeError(f"{' '.join(argv)} in {cwd}: exit code {process.returncode}")
    return wall, usage.ru_utime + usage.ru_stime, stdout
