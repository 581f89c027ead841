"""Overhead: what reconciler costs once the music is made, at 1,000 to 50,000 tracks.

For each size, writes the tracks as spec files of 10 tracks each (10,000
tracks are 1,000 files), converges them once with ``reconciler sync`` against
a fast sandbox in its own process (recording how long that takes and what it
sends), then measures, each in a fresh process as a person or a timer unit
would run it:

- ``reconciler plan`` on the converged folder (exit code 0: nothing to do);
- a no-op ``reconciler sync``: its wall time, its peak RSS and every request
  it sends (the sandbox's counters before and after; a converged pass should
  send none);
- ``reconciler status --json``;
- interpreter start-up plus imports (``reconciler --version``), the floor
  under every command;
- the daemon (``reconciler run``) on the converged folder: its start-up pass
  (a full rescan that finds nothing to do), its CPU while idle for
  ``--idle`` seconds and the requests it sends meanwhile, a warm no-op pass
  after one spec file is saved again unchanged, the pass after one track's
  prompt is edited (it submits that one generation) and the passes until
  its new file is written, the pass that brings back one deleted output,
  and its peak RSS (``VmHWM``) at the end. Each of these passes logs how many
  spec files it read and how many tracks it looked at.

"Cold" here means a new process with a warm page cache: dropping the cache
needs root. Peak RSS is ``ru_maxrss`` of that one child (``os.wait4``); the
daemon's comes from ``/proc/<pid>/status`` while it runs.

``--profile DIR`` also runs plan and the no-op sync under cProfile at each
size and prints the top functions (the ``.prof`` files stay in DIR).

``--fixtures DIR`` keeps each converged folder in ``DIR/<tracks>`` and
measures there again next time instead of converging anew (50,000 tracks
take many minutes to converge); the first converge's figures are kept with
it. The measurements leave it converged (the edited track is generated).

Usage::

    uv run python bench/overhead.py                     # 1,000, 10,000 and 50,000 tracks
    uv run python bench/overhead.py --sizes 1000,10000 --profile /tmp/prof
    uv run python bench/overhead.py --quick             # 1,000 tracks, no write
    uv run python bench/overhead.py --fixtures /var/tmp/overhead
"""

from __future__ import annotations

import argparse
import io
import json
import pstats
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    KEY,
    CliRun,
    Sandbox,
    child_env,
    command_line,
    cpu_seconds,
    machine,
    median,
    memory_kb,
    passes,
    requests_of,
    revision,
    run_cli,
    sandbox,
    today,
    write_config,
    write_section,
    write_specs,
)

TRACKS_PER_FILE = 10
CREDITS_PER_TASK = 15


@dataclass
class Daemon:
    """The figures of one ``reconciler run`` on a converged folder."""

    startup_pass: float
    warm_pass: float
    #: The warm pass's ``specs_read`` and ``tracks_checked``.
    warm_scope: tuple[int, int]
    #: The pass after one track's prompt changed, and all passes until its file is written.
    edit_pass: float
    edit_passes: list[float]
    edit_scope: tuple[int, int]
    #: The pass that restores one deleted output.
    restore_pass: float
    idle_seconds: float
    idle_cpu: float
    idle_requests: int
    peak_rss_mb: float
    rss_mb: float


@dataclass
class Size:
    """The figures for one number of tracks."""

    tracks: int
    files: int
    converge: CliRun
    #: None for a folder converged outside this script (``--fixtures``).
    converge_requests: dict[str, int] | None
    startup: list[float]
    plan: list[CliRun]
    noop: list[CliRun]
    noop_requests: list[dict[str, int]]
    status: list[float]
    daemon: Daemon
    ledger_mb: float


def ok(run: CliRun, expected: int, what: str, log: Path | None = None) -> CliRun:
    if run.exit_code != expected:
        where = f"; see {log}" if log else ""
        raise RuntimeError(f"{what}: exit code {run.exit_code}, expected {expected}{where}")
    return run


def repeated(args: list[str], work: Path, repeat: int, api_url: str | None = None) -> list[CliRun]:
    """``repeat`` measured runs of a command that must exit 0, after one warm-up run."""
    runs = [ok(run_cli(args, work, api_url=api_url), 0, " ".join(args)) for _ in range(repeat + 1)]
    return runs[1:]


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def measure(
    tracks: int,
    repeat: int,
    latency: float,
    idle: float,
    profile: Path | None,
    fixtures: Path | None,
) -> Size:
    files = max(1, tracks // TRACKS_PER_FILE)
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        work = fixtures / str(tracks) if fixtures else Path(tmp)
        config = work / "reconciler.toml"
        common = ["--config", str(config)]
        credits = 2 * CREDITS_PER_TASK * tracks
        kept = work / "converged.json"
        with sandbox(latency, credits=credits) as sbx:
            if kept.exists():
                print(f"{tracks:,} tracks in {files:,} files: converged before, in {work}")
                figures = json.loads(kept.read_text())
                converge = CliRun(**figures["converge"])
                converge_requests = figures.get("requests")
                # A fresh sandbox knows none of the tasks: a pass that polls an
                # old one would be told it is gone. A converged folder polls none.
                # One unmeasured sync brings an older ledger to this schema
                # (plan and status read it without migrating).
                ok(run_cli(["sync", *common], work, api_url=sbx.base_url), 0, "sync")
            else:
                shutil.rmtree(work, ignore_errors=True)
                write_specs(work / "specs", tracks, files)
                # Everything in flight at once, polled often, as fast as the
                # loopback sandbox answers (the default 4 requests per second
                # is the real service's): converging is set-up here.
                write_config(config, poll_interval=latency, max_in_flight=tracks, rate=1000)
                print(f"{tracks:,} tracks in {files:,} files: converging", flush=True)
                log = work / "converge.log"
                converge = ok(
                    run_cli(["sync", *common], work, api_url=sbx.base_url, log=log),
                    0,
                    "sync",
                    log,
                )
                converge_requests = requests_of(sbx.stats())
                if fixtures:
                    figures = {"converge": vars(converge), "requests": converge_requests}
                    kept.write_text(json.dumps(figures))
            print(f"  converged in {converge.wall:.1f} s", flush=True)
            # One unmeasured run of each command first: it fills the bytecode cache.
            startup = [r.wall for r in repeated(["--version"], work, repeat)]
            # With an API that answers: the balance is part of a plan.
            plan = repeated(["plan", *common], work, repeat, api_url=sbx.base_url)
            noop, noop_requests = [], []
            for _ in range(repeat):
                before = requests_of(sbx.stats())
                run = run_cli(["sync", *common], work, api_url=sbx.base_url)
                noop.append(ok(run, 0, "no-op sync"))
                noop_requests.append(delta(before, requests_of(sbx.stats())))
            status = [r.wall for r in repeated(["status", "--json"], work, repeat)]
            daemon = measure_daemon(work, common, sbx, idle)
            print(
                f"  daemon: start-up pass {daemon.startup_pass:.2f} s, "
                f"warm pass {daemon.warm_pass * 1000:.0f} ms {daemon.warm_scope}, "
                f"edit pass {daemon.edit_pass * 1000:.0f} ms {daemon.edit_scope}, "
                f"restore pass {daemon.restore_pass * 1000:.0f} ms, "
                f"idle CPU {daemon.idle_cpu:.2%}, peak RSS {daemon.peak_rss_mb:.0f} MiB",
                flush=True,
            )
            if profile:
                profile_commands(tracks, work, common, sbx, profile)
            ledger_mb = (work / ".reconciler" / "ledger.sqlite3").stat().st_size / 2**20
    print(f"  plan {median([r.wall for r in plan]):.2f} s", flush=True)
    return Size(
        tracks,
        files,
        converge,
        converge_requests,
        startup,
        plan,
        noop,
        noop_requests,
        status,
        daemon,
        ledger_mb,
    )


def wait_for_pass(log: Path, count: int, daemon: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Block until the daemon has logged ``count`` passes; the last of them."""
    deadline = time.monotonic() + 900
    while len(done := passes(log)) < count:
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"daemon: no pass {count}; see {log}")
        time.sleep(0.1)
    return done[count - 1]


def wait_for_converged(log: Path, after: int, daemon: subprocess.Popen[bytes]) -> int:
    """Block until a pass beyond the first ``after`` finds everything ready; its number."""
    count = after
    while True:
        count += 1
        done = wait_for_pass(log, count, daemon)
        if done["ready"] == done["total"] and not done["in_flight"] and not done["queued"]:
            return count


def scope(done: dict[str, Any]) -> tuple[int, int]:
    return int(done.get("specs_read", -1)), int(done.get("tracks_checked", -1))


def measure_daemon(work: Path, common: Sequence[str], sbx: Sandbox, idle: float) -> Daemon:
    """Start ``reconciler run`` on the converged folder and watch it from outside."""
    log = work / "daemon.log"
    env = child_env(MUSICAPI_KEY=KEY, MUSICAPI_BASE_URL=sbx.base_url)
    with log.open("w") as stderr:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "run", *common],
            cwd=work,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        first = wait_for_pass(log, 1, daemon)
        if first["ready"] != first["total"] or first["written"]:
            raise RuntimeError(f"daemon: the start-up pass was not a no-op: {first}")
        time.sleep(1.0)  # the pass's last ledger write and log line
        cpu, requests, started = cpu_seconds(daemon.pid), requests_of(sbx.stats()), time.monotonic()
        time.sleep(idle)
        idle_cpu = (cpu_seconds(daemon.pid) - cpu) / (time.monotonic() - started)
        idle_requests = requests_of(sbx.stats())["total"] - requests["total"]
        # Saved again unchanged: the watcher wakes the daemon for a pass over a
        # converged folder, in a process that is warm.
        spec = min((work / "specs").glob("*.yaml"))
        spec.write_bytes(spec.read_bytes())
        warm = wait_for_pass(log, 2, daemon)
        # One track's prompt changed: that generation is submitted, polled,
        # downloaded and written, each in a pass of its own.
        text = spec.read_text()
        edited = re.sub(
            r"(gpt_description_prompt: bench track \d+)[^\n]*",
            lambda m: f"{m.group(1)} edited {time.time_ns()}",
            text,
            count=1,
        )
        spec.write_text(edited)
        last = wait_for_converged(log, 2, daemon)
        edits = passes(log)[2:last]
        # One output deleted: the output folder's watcher brings it back.
        victim = min((work / "tracks" / "bench-00001").glob("*.mp3"))
        victim.unlink()
        restore = wait_for_pass(log, last + 1, daemon)
        if not victim.exists() or not restore["restored"]:
            raise RuntimeError(f"daemon: {victim} not restored; see {log}")
        memory = memory_kb(daemon.pid)
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    return Daemon(
        startup_pass=float(first["seconds"]),
        warm_pass=float(warm["seconds"]),
        warm_scope=scope(warm),
        edit_pass=float(edits[0]["seconds"]),
        edit_passes=[float(e["seconds"]) for e in edits],
        edit_scope=scope(edits[0]),
        restore_pass=float(restore["seconds"]),
        idle_seconds=idle,
        idle_cpu=idle_cpu,
        idle_requests=idle_requests,
        peak_rss_mb=memory["VmHWM"] / 1024,
        rss_mb=memory["VmRSS"] / 1024,
    )


def profile_commands(
    tracks: int, work: Path, common: Sequence[str], sbx: Sandbox, out: Path
) -> None:
    """Run plan and a no-op sync under cProfile and print where the time goes."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("plan", "sync"):
        prof = out / f"{name}-{tracks}.prof"
        cprofile = ["-m", "cProfile", "-o", str(prof)]
        run_cli([name, *common], work, api_url=sbx.base_url, python_args=cprofile)
        text = io.StringIO()
        pstats.Stats(str(prof), stream=text).sort_stats("cumulative").print_stats(25)
        print(f"--- cProfile: {name}, {tracks:,} tracks ({prof}) ---\n{text.getvalue()}")


def seconds(values: Sequence[float]) -> str:
    return f"{median(values):.2f} s"


def report(sizes: Sequence[Size], args: argparse.Namespace, started: str) -> str:
    def row(label: str, cells: Sequence[str]) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    def noop_requests(size: Size) -> str:
        worst = max(size.noop_requests, key=lambda d: d["total"])
        sent = {k: v for k, v in worst.items() if v and k != "total"}
        if not sent:
            return "0"
        return f"{worst['total']} (" + ", ".join(f"{k} {v}" for k, v in sent.items()) + ")"

    header = "| measure | " + " | ".join(f"{s.tracks:,} tracks" for s in sizes) + " |"
    rule = "|---|" + "---:|" * len(sizes)
    rows = [
        row("spec files", [f"{s.files:,}" for s in sizes]),
        row("start-up floor: `reconciler --version`", [seconds(s.startup) for s in sizes]),
        row(
            "cold `reconciler plan` (target <= 1 s at 50,000)",
            [seconds([r.wall for r in s.plan]) for s in sizes],
        ),
        row("`plan` peak RSS", [f"{median([r.max_rss_mb for r in s.plan]):.0f} MB" for s in sizes]),
        row("no-op `reconciler sync`, wall", [seconds([r.wall for r in s.noop]) for s in sizes]),
        row("no-op `sync`, requests sent (worst run)", [noop_requests(s) for s in sizes]),
        row(
            "no-op `sync`, peak RSS",
            [f"{median([r.max_rss_mb for r in s.noop]):.0f} MB" for s in sizes],
        ),
        row("`reconciler status --json`", [seconds(s.status) for s in sizes]),
        row(
            "daemon: start-up pass (full rescan, nothing to do)",
            [f"{s.daemon.startup_pass:.2f} s" for s in sizes],
        ),
        row(
            "daemon: warm no-op pass, one file saved unchanged (target <= 50 ms at 50,000)",
            [f"{s.daemon.warm_pass * 1000:.0f} ms" for s in sizes],
        ),
        row(
            "the same pass: spec files read, tracks looked at",
            [f"{s.daemon.warm_scope[0]:,}, {s.daemon.warm_scope[1]:,}" for s in sizes],
        ),
        row(
            "daemon: pass after one track's prompt is edited (submits it)",
            [f"{s.daemon.edit_pass * 1000:.0f} ms" for s in sizes],
        ),
        row(
            "the same pass: spec files read, tracks looked at",
            [f"{s.daemon.edit_scope[0]:,}, {s.daemon.edit_scope[1]:,}" for s in sizes],
        ),
        row(
            "daemon: passes until the edited track's file is written (slowest)",
            [
                f"{len(s.daemon.edit_passes)} ({max(s.daemon.edit_passes) * 1000:.0f} ms)"
                for s in sizes
            ],
        ),
        row(
            "daemon: pass restoring one deleted output",
            [f"{s.daemon.restore_pass * 1000:.0f} ms" for s in sizes],
        ),
        row(
            f"daemon: CPU while idle, {args.idle:g} s (target < 1 %)",
            [f"{s.daemon.idle_cpu:.2%} of one core" for s in sizes],
        ),
        row("daemon: requests while idle", [str(s.daemon.idle_requests) for s in sizes]),
        row(
            "daemon: peak RSS (target <= 150 MiB at 50,000)",
            [f"{s.daemon.peak_rss_mb:.0f} MiB" for s in sizes],
        ),
        row("daemon: RSS at the end", [f"{s.daemon.rss_mb:.0f} MiB" for s in sizes]),
        row("first converge: `sync` wall", [f"{s.converge.wall:,.1f} s" for s in sizes]),
        row("first converge: requests (submits, polls)", [converge_requests(s) for s in sizes]),
        row("first converge: peak RSS", [f"{s.converge.max_rss_mb:.0f} MB" for s in sizes]),
        row("ledger size after converging", [f"{s.ledger_mb:.1f} MB" for s in sizes]),
    ]
    fixtures = (
        " The converged folders were kept from an earlier run (`--fixtures`):\n"
        "  the first-converge rows are that run's."
        if args.fixtures
        else ""
    )
    return f"""
## Overhead: plan, no-op sync, the daemon and memory from 1,000 to 50,000 tracks

- Command: `{args.command}` at commit {args.revision}
- Machine: {machine()}
- Date: {started}; medians of {args.repeat} fresh processes per figure (the
  first converge runs once).
- Spec files of {TRACKS_PER_FILE} description-mode tracks each, every track its own
  fingerprint. Converged once against a sandbox in its own process with a
  {args.latency:g} s generation time, `poll.interval = {args.latency:g}` and
  `max_in_flight` = N.{fixtures}
- "Cold" is a new process with a warm page cache. Peak RSS is the child's
  `ru_maxrss`; the daemon's is `VmHWM` from `/proc`, read after its idle
  window and its warm passes (so it includes its start-up full pass). The
  daemon runs with the same config (polls every {args.latency:g} s, rescan
  every 300 s, 2 s batching window); its pass times are the `seconds` of its
  `pass.completed` log lines (one pass each, not medians).
- The machine is shared with other work (see the load average): figures
  move between runs by tens of percent; medians are of fresh processes.

{header}
{rule}
{chr(10).join(rows)}
"""


def converge_requests(size: Size) -> str:
    r = size.converge_requests
    if r is None:
        return "not recorded"
    submits = r["batch_submit_calls"] + r["create_calls"]
    polls = r["batch_polls"] + r["task_polls"]
    return f"{r['total']:,} ({submits:,}, {polls:,})"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[1_000, 10_000, 50_000],
        help="numbers of tracks, comma-separated",
    )
    parser.add_argument("--repeat", type=int, default=5, help="fresh processes per figure")
    parser.add_argument("--latency", type=float, default=0.5, help="sandbox generation time, s")
    parser.add_argument("--idle", type=float, default=60.0, help="daemon idle window, s")
    parser.add_argument("--profile", type=Path, help="also profile plan and sync into this folder")
    parser.add_argument("--quick", action="store_true", help="1,000 tracks, 2 repeats; no write")
    parser.add_argument(
        "--fixtures", type=Path, help="keep converged folders here and measure them again"
    )
    parser.add_argument(
        "--section",
        default="overhead",
        help="the section of bench/RESULTS.md to write (one per set of sizes measured apart)",
    )
    args = parser.parse_args()
    args.command = command_line("bench/overhead.py")
    args.revision = revision()  # at the start: the tree may move during a long run
    if args.quick:
        args.sizes, args.repeat, args.idle = [1_000], 2, 5.0
    started = today()
    sizes = []
    for tracks in args.sizes:
        t = time.perf_counter()
        sizes.append(
            measure(tracks, args.repeat, args.latency, args.idle, args.profile, args.fixtures)
        )
        print(f"  {tracks:,} tracks measured in {time.perf_counter() - t:.0f} s", flush=True)
    text = report(sizes, args, started)
    print(text)
    if not args.quick:
        write_section(args.section, text)


if __name__ == "__main__":
    main()
