"""What a pass costs on a PostgreSQL ledger against the SQLite one, at 10,000 tracks.

Writes N description-mode tracks as spec files of 10 tracks each, twice, and
converges each copy once with ``reconciler sync`` against one sandbox in its
own process: one on the default SQLite ledger in its state folder, the other
on ``--ledger postgresql://...``, a database on a PostgreSQL server this
script starts for the run (``tests/pgserver.py``: the machine's PostgreSQL
from ``initdb``, on 127.0.0.1, with PostgreSQL's own durable defaults, fsync
and synchronous commit on, as a user would run it). Then, in fresh
processes, alternating the backends run by run so the machine's load falls on
both alike, it measures on each converged folder:

- a no-change ``reconciler sync``: a full pass (scan every spec file, plan,
  read the ledger) that finds nothing to do and sends no request (checked
  against the sandbox's counters);
- ``reconciler status --json``.

For each: wall time, the command's own CPU (``os.wait4``), and on PostgreSQL
also the server's CPU over the command (the postmaster's own and reaped
children's time plus its live children's, from ``/proc``). Medians of
``--repeat`` runs; the ratios PostgreSQL / SQLite are of medians measured in
this one run.

Usage::

    uv run python bench/ledger_backends.py                  # 10,000 tracks, writes RESULTS.md
    uv run python bench/ledger_backends.py --tracks 1000 --repeat 3 --quick  # no write
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# The repository's root, for the test suite's PostgreSQL server (tests/pgserver.py).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg
from common import (
    KEY,
    child_env,
    command_line,
    machine,
    median,
    requests_of,
    revision,
    sandbox,
    timed,
    today,
    write_config,
    write_section,
    write_specs,
)

from tests.pgserver import PgServer

TRACKS_PER_FILE = 10
CREDITS_PER_TASK = 15
BACKENDS = ("sqlite", "postgresql")
#: PostgreSQL as installed: durable (its defaults), quiet in its log.
DURABLE = {"log_min_messages": "warning"}


@dataclass
class Figures:
    """One backend's measurements."""

    backend: str
    work: Path
    ledger: list[str]
    converge_wall: float = 0.0
    sync_wall: list[float] = field(default_factory=list)
    sync_cpu: list[float] = field(default_factory=list)
    sync_server_cpu: list[float] = field(default_factory=list)
    sync_requests: list[int] = field(default_factory=list)
    status_wall: list[float] = field(default_factory=list)
    status_cpu: list[float] = field(default_factory=list)
    status_server_cpu: list[float] = field(default_factory=list)
    ledger_mb: float = 0.0


def server_cpu(server: PgServer | None) -> float:
    """CPU seconds the PostgreSQL server has used so far: the postmaster's own and its
    reaped children's, plus its live children's (each connection is a child process)."""
    if server is None:
        return 0.0
    tick = os.sysconf("SC_CLK_TCK")
    postmaster = int((server.data / "postmaster.pid").read_text().split()[0])

    def fields(pid: int) -> list[str]:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()

    own = fields(postmaster)
    total = sum(int(x) for x in own[11:15])  # utime, stime, cutime, cstime
    for child in Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split():
        try:
            total += sum(int(x) for x in fields(int(child))[11:13])
        except FileNotFoundError:  # reaped meanwhile: counted in cutime next time
            continue
    return total / tick


def run(
    figures: Figures, command: list[str], api_url: str, server: PgServer | None
) -> tuple[float, float, float, str]:
    """One measured command on one backend: wall, own CPU, server CPU, stdout."""
    env = child_env(MUSICAPI_KEY=KEY, MUSICAPI_BASE_URL=api_url)
    argv = [sys.executable, "-m", "reconciler", *command, *figures.ledger]
    argv += ["--config", str(figures.work / "reconciler.toml")]
    before = server_cpu(server)
    wall, cpu, stdout = timed(argv, figures.work, env, ok=(0,))
    return wall, cpu, server_cpu(server) - before, stdout


def measure(args: argparse.Namespace) -> list[Figures]:
    files = max(1, args.tracks // TRACKS_PER_FILE)
    credits = 2 * CREDITS_PER_TASK * args.tracks * len(BACKENDS)
    with (
        tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp,
        PgServer.start(settings=DURABLE) as server,
        sandbox(args.latency, credits=credits) as sbx,
    ):
        database = server.create_database()
        servers = {"sqlite": None, "postgresql": server}
        all_figures = [
            Figures("sqlite", Path(tmp) / "sqlite", []),
            Figures("postgresql", Path(tmp) / "postgresql", ["--ledger", server.url(database)]),
        ]
        for figures in all_figures:
            write_specs(figures.work / "specs", args.tracks, files)
            write_config(
                figures.work / "reconciler.toml",
                poll_interval=args.latency,
                max_in_flight=args.tracks,
                rate=1000,
            )
            print(f"{figures.backend}: converging {args.tracks:,} tracks", flush=True)
            started = time.perf_counter()
            run(figures, ["sync"], sbx.base_url, None)
            figures.converge_wall = time.perf_counter() - started
            print(f"  converged in {figures.converge_wall:.1f} s", flush=True)
            # One unmeasured run of each: it fills the bytecode cache.
            run(figures, ["sync"], sbx.base_url, None)
            run(figures, ["status", "--json"], sbx.base_url, None)
        for i in range(args.repeat):
            # Alternate which backend goes first, so a load change hits both.
            for figures in all_figures if i % 2 == 0 else all_figures[::-1]:
                srv = servers[figures.backend]
                before = requests_of(sbx.stats())["total"]
                wall, cpu, scpu, _ = run(figures, ["sync"], sbx.base_url, srv)
                figures.sync_requests.append(requests_of(sbx.stats())["total"] - before)
                figures.sync_wall.append(wall)
                figures.sync_cpu.append(cpu)
                figures.sync_server_cpu.append(scpu)
                wall, cpu, scpu, stdout = run(figures, ["status", "--json"], sbx.base_url, srv)
                summary = json.loads(stdout)["summary"]
                if summary["ready"] != args.tracks:
                    raise RuntimeError(f"{figures.backend}: not converged: {summary}")
                figures.status_wall.append(wall)
                figures.status_cpu.append(cpu)
                figures.status_server_cpu.append(scpu)
            print(f"  round {i + 1} of {args.repeat} measured", flush=True)
        sqlite_file = all_figures[0].work / ".reconciler" / "ledger.sqlite3"
        all_figures[0].ledger_mb = sqlite_file.stat().st_size / 2**20
        with psycopg.connect(server.url(database)) as conn:
            # The ledger's tables with their indexes and TOAST, not the catalogs
            # every PostgreSQL database carries (about 7.5 MB).
            ((size,),) = conn.execute(
                "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'public' AND c.relkind = 'r'"
            ).fetchall()
            args.server_version = conn.execute("SHOW server_version").fetchall()[0][0]
        all_figures[1].ledger_mb = int(size) / 2**20
    if any(n for f in all_figures for n in f.sync_requests):
        raise RuntimeError("a no-change sync sent requests: the folders were not converged")
    return all_figures


def report(results: list[Figures], args: argparse.Namespace, started: str) -> str:
    sqlite, pg = results

    def row(label: str, a: float, b: float, unit: str) -> str:
        """Seconds shown as ``unit`` ("s" or "ms"), MB as they are."""
        ratio = f"{b / a:.2f}" if a else "-"
        if unit == "ms":
            return f"| {label} | {a * 1000:.0f} ms | {b * 1000:.0f} ms | {ratio} |"
        return f"| {label} | {a:,.2f} {unit} | {b:,.2f} {unit} | {ratio} |"

    m = median
    sync_total = [c + s for c, s in zip(pg.sync_cpu, pg.sync_server_cpu, strict=True)]
    status_total = [c + s for c, s in zip(pg.status_cpu, pg.status_server_cpu, strict=True)]
    rows = [
        row("no-change `sync`: wall", m(sqlite.sync_wall), m(pg.sync_wall), "s"),
        row("no-change `sync`: reconciler's CPU", m(sqlite.sync_cpu), m(pg.sync_cpu), "s"),
        f"| no-change `sync`: PostgreSQL server's CPU | - | {m(pg.sync_server_cpu):.2f} s | - |",
        row(
            "no-change `sync`: CPU, reconciler + server",
            m(sqlite.sync_cpu),
            m(sync_total),
            "s",
        ),
        row("`status --json`: wall", m(sqlite.status_wall), m(pg.status_wall), "ms"),
        row("`status --json`: reconciler's CPU", m(sqlite.status_cpu), m(pg.status_cpu), "ms"),
        f"| `status --json`: PostgreSQL server's CPU | - | "
        f"{m(pg.status_server_cpu) * 1000:.0f} ms | - |",
        row(
            "`status --json`: CPU, reconciler + server",
            m(sqlite.status_cpu),
            m(status_total),
            "ms",
        ),
        row("first converge: `sync` wall (once)", sqlite.converge_wall, pg.converge_wall, "s"),
        row(
            "ledger size after converging (PostgreSQL: its tables and indexes)",
            sqlite.ledger_mb,
            pg.ledger_mb,
            "MB",
        ),
    ]
    return f"""
## Ledger backends: a pass on PostgreSQL against SQLite at {args.tracks:,} tracks

- Command: `{args.command}` at commit {args.revision}
- Machine: {machine()}
- Date: {started}; medians of {args.repeat} fresh processes per figure, the
  two backends alternating run by run; ratios are PostgreSQL / SQLite.
- {args.tracks:,} description-mode tracks in spec files of {TRACKS_PER_FILE}, converged
  once per backend against one sandbox in its own process ({args.latency:g} s
  generation, `poll.interval = {args.latency:g}`, `max_in_flight` = N). SQLite:
  the default ledger file (WAL, `synchronous=NORMAL`). PostgreSQL
  {args.server_version}: a server started for the run on 127.0.0.1 with its
  defaults (fsync and synchronous commit on), reached over TCP, on the same disk.
- A no-change `sync` is a full pass over the converged folder; it sent no
  request to the sandbox in any run. The server's CPU is outside the
  `reconciler` process: the sum is what the pass costs the machine.

| measure | SQLite | PostgreSQL | ratio |
|---|---:|---:|---:|
{chr(10).join(rows)}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tracks", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5, help="fresh processes per figure")
    parser.add_argument("--latency", type=float, default=0.5, help="sandbox generation time, s")
    parser.add_argument("--quick", action="store_true", help="print only; do not write RESULTS.md")
    args = parser.parse_args()
    args.command = command_line("bench/ledger_backends.py")
    args.revision = revision()
    started = today()
    text = report(measure(args), args, started)
    print(text)
    if not args.quick:
        write_section("ledger-backends", text)


if __name__ == "__main__":
    main()
