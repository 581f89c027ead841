"""Turn the figures the reliability tests recorded into their section of ``bench/RESULTS.md``.

Usage, from the repository root::

    export RELIABILITY_FIGURES=/tmp/figures.jsonl
    uv run pytest tests/reliability -m "slow or not slow" -n 0
    uv run python -m tests.reliability.figures "$RELIABILITY_FIGURES"

``-n 0`` runs the tests one at a time, as the figures' timings assume. The
tests append one JSON line per figure (``support.Figures``); the latest
line of each (section, name) wins, so a test run again replaces its own
figures. Only the section between the ``reliability`` markers is rewritten
(``bench.common.write_section``); the benchmarks' sections stay as they are.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import RESULTS, machine, write_section

ROOT = Path(__file__).resolve().parents[2]
SECTION = "reliability"
UNIT = ROOT / "systemd" / "reconciler.service"

#: Findings not fixed at the time of the run, and how the suite holds them.
OPEN_FINDINGS: tuple[str, ...] = ()
#: What the suite found that has been fixed since, with the commit that fixed it.
FIXED_FINDINGS = (
    "A new file naming an existing soundtrack (and sorting first) took it over: 7254264.",
    "A field or file name holding a newline split one spec problem over several lines: bed9c72.",
    "One 401 stopped a daemon's submissions until restart; a stuck task kept its track and "
    "`sync` waiting forever: 7f476f5.",
    "A poll pass cost O(tasks²) (about 300 s at 10,000 running tasks) and the text `status` "
    "took 3.9 s at 10,000 tracks: 9df80fc.",
    "A lost submit answer went out again only at the next rescan, not when its grace ended; "
    "an output that could not be written kept `sync` looping and the daemon logging it every "
    "poll interval: 4cd3afd; `status` gave no reason for it: c4286b3.",
    "At 10,000 tracks the text `status` cost 0.9 to 1.0 s of CPU (rich laid out 30,000 "
    "styled pieces) and `status --json` 0.6 to 0.8 s (the indenting encoder is pure Python), "
    "so the one-second target held only just: b6549bf.",
)


def latest(lines: Iterable[str]) -> dict[tuple[str, str], dict[str, Any]]:
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for line in lines:
        if line.strip():
            record = json.loads(line)
            found[(record["section"], record["name"])] = record
    return found


def exposure() -> str:
    """The unit file's exposure score, as ``systemd-analyze security --offline`` states it."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return "not measured (no `systemd-analyze` here)"
    proc = subprocess.run(
        [tool, "security", "--offline=true", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", proc.stdout)
    version = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False)
    release = version.stdout.split("(")[0].strip()
    return f"{match[1]} {match[2]} ({release})" if match else "could not be read"


def _n(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:,.2f}".rstrip("0").rstrip(".")


def faults_table(records: Mapping[tuple[str, str], dict[str, Any]]) -> str:
    rows = [
        "| fault (schedule in `test_faults.py`) | fired | ready / parked | API calls "
        "| per ready track | submits | polls | downloads | tasks (refunded) "
        "| paid twice / possible double spend |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (section, name), r in records.items():
        if section != "faults":
            continue
        rows.append(
            f"| {name} | {r['fired']} | {r['ready']} / {r['parked']} | {r['api_calls']} "
            f"| {_n(r['calls_per_ready_track'])} | {r['submit_calls']} | {r['polls']} "
            f"| {r['downloads']} | {r['tasks']} ({r['refunded_tasks']}) "
            f"| {r['paid_twice']} / {r['possible_double_spend']} |"
        )
    return "\n".join(rows)


def summary_table(records: Mapping[tuple[str, str], dict[str, Any]]) -> str:
    chaos = records[("chaos", "chaos")]
    faults = [r for (s, n), r in records.items() if s == "faults" and n != "mixed"]
    mixed = records[("faults", "mixed")]
    hand = records[("bad_input", "hand_written")]
    generated = records[("bad_input", "generated")]
    big = records[("bad_input", "ten_thousand")]
    secrets = records[("security", "secrets")]
    links = records[("security", "symlinks")]
    load = records[("load", "load")]
    poll = records[("load", "poll_pass")]
    per_track = [r["calls_per_ready_track"] for r in faults]
    kills = chaos["kills"]
    rows = [
        (
            "Chaos",
            "lost tracks (all ready at the end)",
            f"**{chaos['lost_tracks']}** of "
            f"{chaos['tracks']}, after {kills} SIGKILLs at random moments (seed "
            f"{chaos.get('seed', 'not recorded')}) under "
            f"{sum(chaos['faults_fired'].values())} injected faults; parked by the retry "
            f"policy (three tasks failed or stuck) and sent again by `retry --failed`: "
            f"{chaos.get('parked_by_design', 'not recorded')}",
        ),
        (
            "Chaos",
            "partial files under output names",
            "**0**: every MP3 decoded whole after "
            f"each kill ({_n(sum(chaos['ready_at_each_kill']))} checks); "
            "tracks ready at the kills: " + ", ".join(str(n) for n in chaos["ready_at_each_kill"]),
        ),
        (
            "Chaos",
            "fingerprints paid twice beyond `possible_double_spend`",
            f"**{chaos['unexplained']}**; {chaos['paid_twice']} paid twice, all counted by "
            f"`status` (possible double spend {chaos['possible_double_spend']}: it counts every "
            "resubmit after a lost answer, whether or not the lost submit had created tasks)",
        ),
        (
            "Chaos",
            "retries after an upstream failure (refunded, so not double spend)",
            f"{chaos['retried_after_failure']} of {chaos['failed_upstream_refunded']} failed tasks",
        ),
        ("Chaos", "`PRAGMA integrity_check`", f"ok after each of the {kills} kills and at the end"),
        (
            "Chaos",
            "time",
            f"{_n(chaos['chaos_seconds'])} s of kills, "
            f"{_n(chaos['total_seconds'])} s with the final `sync`; {_n(chaos['calls_per_track'])} "
            "API calls per track",
        ),
        (
            "Faults",
            "each kind alone: converges, or parks with the API's reason",
            f"{len(faults)} runs of 20 tracks, all as required (table below)",
        ),
        (
            "Faults",
            "all kinds mixed (daemon, webhooks on)",
            f"{mixed['ready']} ready, {mixed['parked']} parked with the API's reason (or after "
            "three upstream failures), "
            f"{mixed['fired']} faults fired, {_n(mixed['seconds'])} s",
        ),
        (
            "Faults",
            "credits charged only for accepted tasks",
            "in every run: charged = 15 x tasks created, refunded = 15 x upstream failures, "
            "net = 15 x tasks not refunded",
        ),
        (
            "Faults",
            "API calls per converged track",
            f"alone: {_n(min(per_track))} to {_n(max(per_track))} (median "
            f"{_n(statistics.median(per_track))}); mixed: {_n(mixed['calls_per_ready_track'])}; "
            "downloads included",
        ),
        (
            "Bad input",
            "hand-written bad files reported with file (and line)",
            f"{hand['reported']} of {hand['files']}; the daemon kept running, nothing pruned",
        ),
        (
            "Bad input",
            "hypothesis-generated files",
            f"{generated['files']} files: {generated['invalid']} reported invalid "
            f"({generated['with_line']} with a line), {generated['valid']} valid; "
            "each verdict the spec reader's own",
        ),
        (
            "Bad input",
            "10,000 tracks in one file (valid)",
            f"accepted {_n(big['accept_seconds'])} s after the save (batching window and debounce "
            f"included); a pass over it then takes {_n(big['pass_seconds'])} s",
        ),
        (
            "Security",
            "key and webhook secret in logs, command output, ledger (+ WAL), cache, outputs",
            f"**0** occurrences in {secrets['texts']} command outputs and logs and "
            f"{secrets['files']} files (a {_n(secrets['wal_bytes'] // 1024)} KiB WAL "
            "as SIGKILL left it)",
        ),
        (
            "Security",
            "symlinks planted in the output folder",
            f"{links['planted']} planted, "
            f"**{links['written_through']}** written through; names that leave the folder refused",
        ),
        (
            "Security",
            "forged, stale, replayed, oversized webhooks",
            "rejected, nothing changes (`tests/test_webhooks.py`, end to end)",
        ),
        ("Security", "unit file exposure (`systemd-analyze security --offline=true`)", exposure()),
        (
            "Load",
            f"{load['tracks']:,} tracks in flight: daemon memory",
            f"peak RSS **{_n(load['peak_rss_mib'])} MiB** (with all in flight "
            f"{_n(load['rss_in_flight_mib'])} MiB, at the end {_n(load['rss_end_mib'])} MiB)",
        ),
        (
            "Load",
            "`status` while the daemon works (the whole command, JSON and text)",
            f"answered all {load['status_calls']} times in each form; its CPU cost is "
            "measured by `bench/status_cost.py` (its own section), not asserted here",
        ),
        (
            "Load",
            "submitting, polling, downloading 10,000",
            f"all in flight {_n(load['all_in_flight_after'])} s after the start "
            f"({load['tracks'] // 10:,} submit calls), all ready after "
            f"{_n(load['converged_after'])} s (generation {_n(load['latency'])} s; "
            f"{load['downloads']:,} downloads, {load['batch_polls']:,} batch polls); a poll pass "
            f"over {poll['tasks']:,} running tasks: {_n(poll['gap'] - 2.0)} s "
            "(recorded, not asserted)",
        ),
    ]
    lines = ["| part | what is checked | measured |", "|---|---|---|"]
    lines += [f"| {part} | {what} | {value} |" for part, what, value in rows]
    return "\n".join(lines)


def render(records: Mapping[tuple[str, str], dict[str, Any]]) -> str:
    loads = [r["loadavg"][0] for r in records.values() if "loadavg" in r]
    when = datetime.fromtimestamp(max(r["at"] for r in records.values()), UTC)
    commits = ", ".join(sorted({r.get("commit") or "unknown" for r in records.values()}))
    hardware = machine().split(";")[0]
    findings = "\n".join(f"- {text}" for text in OPEN_FINDINGS) or "None at the time of the run."
    fixed = "\n".join(f"- {text}" for text in FIXED_FINDINGS)
    return f"""
## Reliability suite (`tests/reliability/`)

- Commands: the quick part runs with the rest, `uv run pytest` (or
  `uv run pytest tests/reliability`); the slow part (chaos, mixed faults,
  load) with `uv run pytest tests/reliability -m slow -n 0`. With
  `RELIABILITY_FIGURES=<file>` set, and `-n 0` (one test at a time), the
  tests record their figures;
  `uv run python -m tests.reliability.figures <file>` writes this section.
- Machine: {hardware}; 1-minute load average when the figures were taken
  {min(loads):.2f} to {max(loads):.2f} (the machine is shared).
- Commit measured: {commits}.
- Date: {when:%Y-%m-%d %H:%M} UTC. Every part runs real `reconciler`
  processes against the sandbox over loopback; the sandbox's own books (in
  process) are the judge of what was paid for.

{summary_table(records)}

### Faults: one kind at a time (20 tracks), and all mixed (100 tracks)

Alone, each kind runs `sync`, or the daemon where the name says so (and for
the webhook kinds); mixed runs the daemon with its webhook receiver.

`paid twice` counts fingerprints with more than one task that was not
refunded; each came from a submit whose answer was lost (a timeout or a
dropped response after the sandbox had created the tasks) or from a stuck
task given up on, and each is within what `status` reports as possible
double spend. That figure is larger where a 5xx or a reset lost the answer
before anything was created: the client cannot tell, so it counts those too.
A retry after an upstream failure is a second task, but the failed one is
refunded: it is in the `refunded` figure, not in `paid twice`.

{faults_table(records)}

### Open findings

{findings}

### Found by the suite and fixed

{fixed}
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("figures", type=Path, help="the file $RELIABILITY_FIGURES named")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    records = latest(args.figures.read_text().splitlines())
    write_section(SECTION, render(records), args.results)


if __name__ == "__main__":
    main()
