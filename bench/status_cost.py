"""The CPU cost of ``reconciler status`` while the daemon works, old code beside new.

For each size, writes the tracks as spec files of 100 tracks each, starts a
sandbox (in its own process, with a generation time far longer than the run,
so no task finishes) and ``reconciler run`` with every track allowed in
flight, and waits for the daemon's pass that counts every track in flight.
Then, with that daemon still running (it polls and passes every few seconds),
it runs ``reconciler status --json``, ``reconciler status`` (text, into a
pipe) and ``reconciler --version`` (start-up and imports: the floor under
every command) ``--runs`` times each, for this checkout and for ``--baseline`` (a
commit, exported with ``git archive`` into a temporary folder and put first
on ``PYTHONPATH``), interleaved so that both see the same load. Each figure
is that one child's user + system CPU time from ``os.wait4``: on a shared
machine, wall time measures the neighbours as much as the command, so it is
recorded but not the figure that counts.

Before measuring, the two versions' answers are compared (the JSON with its
clock-dependent fields removed, the text with its ages removed): the new
code must report the same thing.

Usage::

    uv run python bench/status_cost.py --results bench/RESULTS.md
    uv run python bench/status_cost.py --sizes 10000 --runs 5      # print only
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import (
    KEY,
    append_results,
    child_env,
    command_line,
    machine,
    median,
    passes,
    revision,
    sandbox,
    timed,
    today,
    write_config,
    write_specs,
)

ROOT = Path(__file__).resolve().parent.parent
TRACKS_PER_FILE = 100
CREDITS_PER_TASK = 15
#: Generation time: no task finishes while the commands are measured.
LATENCY = 3600.0
#: The daemon's poll interval: it keeps passing over the tracks meanwhile.
POLL_INTERVAL = 2.0
FORMS = {"json": ["status", "--json"], "text": ["status"]}
#: What is measured: both forms, and start-up plus the CLI's imports alone
#: (``--version``), the floor under every command.
MEASURED = {**FORMS, "floor": ["--version"]}
LABELS = {
    "json": "`status --json`",
    "text": "`status`",
    "floor": "`reconciler --version` (start-up floor)",
}


@dataclass
class Run:
    """One finished command: this child's CPU seconds and wall seconds."""

    cpu: float
    wall: float


def run_status(args: list[str], work: Path, code: Path | None) -> tuple[Run, str]:
    """``python -m reconciler ARGS`` in ``work``, from ``code`` (a checkout) or this one.

    Its figures, and what it wrote to stdout.
    """
    env = child_env(**({"PYTHONPATH": str(code)} if code else {}))
    # status exits 1 when a track failed: still a report to measure.
    wall, cpu, stdout = timed([sys.executable, "-m", "reconciler", *args], work, env, ok=(0, 1))
    return Run(cpu, wall), stdout


#: A clock time as status prints it (``2026-11-29T19:27:04+00:00``).
CLOCK = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?")


def _timeless(value: Any) -> Any:
    """``value`` with every age, clock time and ``*_at`` field left out."""
    if isinstance(value, dict):
        return {
            k: _timeless(v)
            for k, v in value.items()
            if not k.endswith(("_at", "age_seconds")) and k != "age"
        }
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    if isinstance(value, str):
        return CLOCK.sub("<time>", value)
    return value


def comparable_json(text: str) -> Any:
    """The report without its times: two folders synced a minute apart compare equal."""
    return _timeless(json.loads(text))


def comparable_text(text: str) -> str:
    """The text with runs of blanks made one, and ages (``42s``) and clock times removed."""
    text = CLOCK.sub("<time>", re.sub(r"[ \t]+", " ", text))
    return re.sub(r" \d+[smhd](?= |$)", "", text, flags=re.MULTILINE)


def check_same(work: Path, baseline: Path) -> None:
    """The baseline and this checkout say the same thing (ages aside)."""
    old, new = (run_status(FORMS["json"], work, code)[1] for code in (baseline, None))
    if comparable_json(old) != comparable_json(new):
        raise RuntimeError("status --json differs from the baseline's")
    old, new = (run_status(FORMS["text"], work, code)[1] for code in (baseline, None))
    if comparable_text(old) != comparable_text(new):
        raise RuntimeError("the text status differs from the baseline's")


def wait_all_in_flight(log: Path, tracks: int, daemon: subprocess.Popen[bytes]) -> float:
    """Seconds until the daemon logs a pass with every track in flight."""
    started = time.monotonic()
    while not any(p["in_flight"] == tracks for p in passes(log)):
        if daemon.poll() is not None or time.monotonic() - started > 900:
            raise RuntimeError(f"daemon: never had {tracks} tracks in flight; see {log}")
        time.sleep(0.5)
    return time.monotonic() - started


def measure(tracks: int, runs: int, baseline: Path) -> dict[str, dict[str, list[Run]]]:
    """``runs`` measured ``status`` runs per version and form, beside a working daemon."""
    with tempfile.TemporaryDirectory(prefix="bench-status-") as tmp:
        work = Path(tmp)
        write_specs(work / "specs", tracks, max(1, tracks // TRACKS_PER_FILE))
        write_config(work / "reconciler.toml", poll_interval=POLL_INTERVAL, max_in_flight=tracks)
        with sandbox(LATENCY, credits=CREDITS_PER_TASK * tracks) as sbx:
            log = work / "daemon.log"
            env = child_env(MUSICAPI_KEY=KEY, MUSICAPI_BASE_URL=sbx.base_url)
            with log.open("w") as stderr:
                daemon = subprocess.Popen(
                    [sys.executable, "-m", "reconciler", "run", "--config", "reconciler.toml"],
                    cwd=work,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )
            try:
                took = wait_all_in_flight(log, tracks, daemon)
                print(f"{tracks:,} tracks in flight after {took:.0f} s", flush=True)
                # Unmeasured first runs fill each version's bytecode cache.
                check_same(work, baseline)
                found: dict[str, dict[str, list[Run]]] = {
                    version: {form: [] for form in MEASURED} for version in ("baseline", "new")
                }
                for _ in range(runs):
                    for version, code in (("baseline", baseline), ("new", None)):
                        for form, args in MEASURED.items():
                            found[version][form].append(run_status(args, work, code)[0])
                if daemon.poll() is not None:
                    raise RuntimeError(f"the daemon stopped while measured; see {log}")
            finally:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(60)
    return found


def export(commit: str, into: Path) -> None:
    """The ``reconciler`` package as it was at ``commit``, under ``into``."""
    archive = subprocess.run(
        ["git", "archive", commit, "reconciler"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)


def cell(values: list[Run]) -> str:
    cpu = [r.cpu for r in values]
    return f"**{median(cpu):.2f} s** ({min(cpu):.2f}-{max(cpu):.2f})"


def report(
    sizes: dict[int, dict[str, dict[str, list[Run]]]], args: argparse.Namespace, started: str
) -> str:
    rows = []
    for tracks, found in sizes.items():
        for form in MEASURED:
            old, new = found["baseline"][form], found["new"][form]
            rows.append(
                f"| {tracks:,} | {LABELS[form]} "
                f"| {cell(old)} | {cell(new)} "
                f"| {median([r.wall for r in old]):.2f} s / {median([r.wall for r in new]):.2f} s |"
            )
    return f"""
## `status` CPU beside a working daemon: {args.baseline} against {args.revision}

- Command: `{args.command}`
- Commits measured: {args.baseline} (baseline) and {args.revision} (new).
- Machine: {machine()}
- Date: {started}. Medians (min-max) of {args.runs} runs per cell, each a fresh
  process's user + system CPU (`os.wait4`); the two versions alternate, beside
  one `reconciler run` with every track in flight (sandbox generation time
  {LATENCY:g} s, poll interval {POLL_INTERVAL:g} s), {TRACKS_PER_FILE} tracks per spec
  file. Text output goes into a pipe. Both versions' answers compared equal
  (ages aside) before measuring.

| tracks | command | CPU, baseline | CPU, new | wall median, baseline / new |
|---:|---|---:|---:|---:|
{chr(10).join(rows)}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[10_000, 50_000],
        help="numbers of tracks, comma-separated",
    )
    parser.add_argument("--runs", type=int, default=7, help="measured runs per version and form")
    # The baseline reads the ledger this checkout's daemon writes, so it must
    # know its schema: fd92cf3 is the first commit of ledger v4.
    parser.add_argument("--baseline", default="fd92cf3", help="the commit to compare with")
    parser.add_argument("--results", type=Path, help="append the figures to this Markdown file")
    args = parser.parse_args()
    args.command = command_line("bench/status_cost.py")
    args.revision = revision()  # at the start: the tree may move during a long run
    started = today()
    sizes = {}
    with tempfile.TemporaryDirectory(prefix="bench-status-baseline-") as old:
        export(args.baseline, Path(old))
        for tracks in args.sizes:
            sizes[tracks] = measure(tracks, args.runs, Path(old))
    text = report(sizes, args, started)
    print(text)
    if args.results:
        append_results(args.results, text)


if __name__ == "__main__":
    main()
