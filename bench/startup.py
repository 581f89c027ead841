"""Start-up: how long the light commands take on a small folder, old code beside new.

Copies the example specs (``specs/``) into a temporary folder, converges it
once with ``reconciler sync --sandbox`` (the in-process emulator), then runs
each command ``--runs`` times as a fresh process of the installed entry point
(``.venv/bin/reconciler``, beside this Python; not ``uv run``, whose own
start-up would be most of the figure): ``--version``, ``--help``, ``status``
and ``status --json`` (into a pipe), ``status`` with a config file, and
``plan``. The same runs go to ``--baseline`` (a commit, exported with ``git
archive`` and put first on ``PYTHONPATH``, so the same entry point loads it),
interleaved so both versions see the same load. Before measuring, both
versions' ``status`` and ``status --json`` are compared (ages and clocks
aside): the new code must say the same thing.

Each run's wall time is measured from outside, and its user + system CPU time
from ``os.wait4``: on a shared machine wall time also measures the
neighbours. Bytecode is cached outside the repository (``common.child_env``),
as an installed copy has it; the first, unmeasured runs fill the cache.

Usage::

    uv run python bench/startup.py --results bench/RESULTS.md
    uv run python bench/startup.py --runs 10       # print only
"""

from __future__ import annotations

import argparse
import difflib
import math
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from common import (
    child_env,
    command_line,
    machine,
    median,
    revision,
    timed,
    today,
    write_section,
)
from status_cost import comparable_json, comparable_text, export

ROOT = Path(__file__).resolve().parent.parent
#: The installed entry point, as a user runs it.
ENTRY = Path(sys.executable).with_name("reconciler")
#: A config file that changes nothing but is read (and validated) all the same.
CONFIG = "[submit]\nmax_in_flight = 200\n"
COMMANDS = {
    "`reconciler --version`": ["--version"],
    "`reconciler --help`": ["--help"],
    "`reconciler status`": ["status"],
    "`reconciler status --json`": ["status", "--json"],
    "`reconciler status --config reconciler.toml`": ["status", "--config", "reconciler.toml"],
    "`reconciler plan`": ["plan"],
}
#: What both versions must print alike before they are measured. Not ``--help``:
#: commands added since the baseline list there (tests/test_startup.py checks
#: that the listing is the commands' own summaries).
SAME = {"status": ["status"], "status --json": ["status", "--json"]}


@dataclass
class Run:
    """One finished command: wall seconds and this child's CPU seconds."""

    wall: float
    cpu: float


def environment(code: Path | None) -> dict[str, str]:
    """No key, no API address, no settings from this shell: ``plan`` stays offline."""
    env = {k: v for k, v in child_env().items() if not k.startswith(("MUSICAPI", "RECONCILER"))}
    return env | ({"PYTHONPATH": str(code)} if code else {})


def run(args: list[str], work: Path, code: Path | None) -> tuple[Run, str]:
    """``reconciler ARGS`` in ``work`` from ``code`` (an export) or this checkout."""
    # plan exits 2 when there are changes.
    wall, cpu, stdout = timed([str(ENTRY), *args], work, environment(code), ok=(0, 2))
    return Run(wall, cpu), stdout


def converge(work: Path, code: Path | None) -> None:
    """The example specs, synced once against the in-process sandbox by ``code``.

    Each version syncs its own folder: an older version cannot read a ledger
    a newer one has migrated.
    """
    shutil.copytree(ROOT / "specs", work / "specs")
    (work / "reconciler.toml").write_text(CONFIG)
    proc = subprocess.run(
        [str(ENTRY), "sync", "--sandbox"],
        cwd=work,
        env=environment(code),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"sync --sandbox failed: {proc.stderr[-2000:]}")


def check_same(works: dict[Path | None, Path]) -> None:
    """Both versions print the same status (ages and clocks aside)."""
    for what, args in SAME.items():
        old, new = (run(args, work, code)[1] for code, work in works.items())
        if what == "status --json":
            same = comparable_json(old) == comparable_json(new)
        else:
            same = comparable_text(old) == comparable_text(new)
        if not same:
            diff = difflib.unified_diff(
                comparable_text(old).splitlines(), comparable_text(new).splitlines(), lineterm=""
            )
            raise RuntimeError(f"{what} differs from the baseline's:\n" + "\n".join(diff))


def measure(runs: int, baseline: Path) -> dict[str, dict[str, list[Run]]]:
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        works: dict[Path | None, Path] = {baseline: Path(tmp) / "baseline", None: Path(tmp) / "new"}
        for code, work in works.items():
            converge(work, code)
            for args in COMMANDS.values():  # unmeasured: fill the bytecode caches
                run(args, work, code)
        check_same(works)
        found: dict[str, dict[str, list[Run]]] = {
            version: {label: [] for label in COMMANDS} for version in ("baseline", "new")
        }
        for _ in range(runs):
            for version, code in (("baseline", baseline), ("new", None)):
                for label, args in COMMANDS.items():
                    found[version][label].append(run(args, works[code], code)[0])
    return found


def p95(values: list[float]) -> float:
    """The nearest-rank 95th percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def report(found: dict[str, dict[str, list[Run]]], args: argparse.Namespace, started: str) -> str:
    rows = []
    for label in COMMANDS:
        cells = []
        for version in ("baseline", "new"):
            runs = found[version][label]
            wall = [r.wall for r in runs]
            cells.append(
                f"{ms(median(wall))} / {ms(p95(wall))} | {ms(median([r.cpu for r in runs]))}"
            )
        rows.append(f"| {label} | {' | '.join(cells)} |")
    entry = ENTRY.relative_to(ROOT) if ENTRY.is_relative_to(ROOT) else ENTRY
    return f"""
## Start-up: the light commands on a small folder, {args.baseline} against {args.revision}

- Command: `{args.command}`
- Commits measured: {args.baseline} (baseline) and {args.revision} (new).
- Machine: {machine()}
- Date: {started}. {args.runs} runs per command and version, alternating, each
  a fresh process of the entry point `{entry}`
  (not `uv run`, which adds its own start-up), bytecode cached as in an install.
  The folder: the example specs (`specs/`, 14 tracks) after one `sync --sandbox`; output
  into a pipe; no key and no config file unless named. Both versions' status
  (text and JSON) compared equal before measuring. Wall: milliseconds from outside,
  median / p95 (nearest rank); CPU: the child's user + system milliseconds
  (`os.wait4`), median.

| command | wall, baseline | CPU, baseline | wall, new | CPU, new |
|---|---:|---:|---:|---:|
{chr(10).join(rows)}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30, help="measured runs per command")
    parser.add_argument("--baseline", default="a7a8407", help="the commit to compare with")
    parser.add_argument("--results", type=Path, help="write the 'startup' section of this file")
    args = parser.parse_args()
    if not ENTRY.exists():
        parser.error(f"no entry point at {ENTRY}: run with the project's Python (uv run)")
    args.command = command_line("bench/startup.py")
    args.revision = revision()
    started = today()
    with tempfile.TemporaryDirectory(prefix="bench-startup-baseline-") as old:
        export(args.baseline, Path(old))
        found = measure(args.runs, Path(old))
    text = report(found, args, started)
    print(text)
    if args.results:
        write_section("startup", text, args.results)


if __name__ == "__main__":
    main()
