"""API efficiency and wall time: ``reconciler sync`` against the naive SDK loops.

Converges N tracks against a sandbox with a fixed generation time, three ways,
each against a fresh sandbox in its own process:

- ``reconciler sync`` (a child process, as a user runs it), once per poll
  interval given (default 1 s and 2 s, tuned for wall time, and 5 s, the
  SDK's own default, so the two sides poll equally often);
- the official ``musicapi-sdk``: ``generate_and_wait`` for one track after the
  other, then downloading the first clip with httpx, as a user would write it.
  One track costs about one generation time, so N = 1,000 would take 83 min:
  this loop runs on a sample of tracks and its counts and wall time are scaled
  linearly to N (the table says so);
- the same function in a ``ThreadPoolExecutor(10)``, run on all N tracks.

Both SDK loops use the SDK's default ``PollOptions`` (a poll every 5 s).
Requests are the sandbox's own counters, so nothing is estimated on the
client side. Figures are medians over ``--runs``; ratios are computed within
each run, then their median is taken.

The download time in the wall-time target is measured too: the sequential
loop times each first fetch of a clip, and N times the mean is what fetching
all N files back to back over one connection costs.

Usage::

    uv run python bench/compare_naive.py --tracks 100 --runs 3
    uv run python bench/compare_naive.py --tracks 1000 --runs 3 --pool-runs 1
    uv run python bench/compare_naive.py --quick      # a try-out: 1 s generation, no write
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
from common import (
    KEY,
    command_line,
    machine,
    median,
    requests_of,
    revision,
    run_cli,
    sandbox,
    today,
    write_config,
    write_section,
    write_specs,
)
from musicapi import MusicAPI, SonicCreateParams

THREADS = 10
TRACKS_PER_FILE = 10


@dataclass
class Measure:
    """One approach in one run: request counters (scaled to N if sampled) and wall time."""

    counts: dict[str, float]
    wall: float
    #: Seconds each first download of a clip took (sequential loop only).
    download_seconds: list[float]

    @property
    def api_requests(self) -> float:
        """Requests to the API proper; downloads go to the audio CDN and cannot be batched."""
        return self.counts["total"] - self.counts["downloads"]


def run_reconciler(tracks: int, latency: float, poll_interval: float, workdir: Path) -> Measure:
    specs = workdir / "specs"
    write_specs(specs, tracks, max(1, tracks // TRACKS_PER_FILE))
    config = workdir / "reconciler.toml"
    # max_in_flight >= N: the cap must not hold back the first batches.
    write_config(config, poll_interval=poll_interval, max_in_flight=max(tracks, 200))
    with sandbox(latency) as sbx:
        log = workdir / "sync.log"
        run = run_cli(
            ["sync", "--config", str(config), "--specs", "specs", "--out", "out"],
            workdir,
            api_url=sbx.base_url,
            log=log,
        )
        stats = sbx.stats()
    if run.exit_code != 0 or stats["tasks_created"] != tracks:
        raise RuntimeError(
            f"reconciler sync exit {run.exit_code}, {stats['tasks_created']} tasks; see {log}"
        )
    return Measure({k: float(v) for k, v in requests_of(stats).items()}, run.wall, [])


def naive_track(client: MusicAPI, http: httpx.Client, n: int, out: Path) -> float:
    """What a user writes: generate, wait, download. Returns the download's seconds."""
    result = client.sonic.generate_and_wait(
        SonicCreateParams(
            custom_mode=False, mv="sonic-v5", gpt_description_prompt=f"bench track {n}"
        )
    )
    url = result.data[0].audio_url
    assert url, f"track {n}: no audio_url in a finished task"
    started = time.perf_counter()
    answer = http.get(url)
    answer.raise_for_status()
    seconds = time.perf_counter() - started
    (out / f"track-{n}.mp3").write_bytes(answer.content)
    return seconds


def run_naive(tracks: int, sample: int, threads: int, latency: float, workdir: Path) -> Measure:
    """The SDK loop on ``sample`` tracks, scaled linearly to ``tracks``."""
    out = workdir / "naive-out"
    out.mkdir(exist_ok=True)
    with sandbox(latency) as sbx:
        client = MusicAPI(KEY, base_url=sbx.base_url)
        with httpx.Client() as http:
            started = time.perf_counter()
            if threads == 1:
                seconds = [naive_track(client, http, n, out) for n in range(sample)]
            else:
                with ThreadPoolExecutor(threads) as pool:
                    seconds = list(
                        pool.map(lambda n: naive_track(client, http, n, out), range(sample))
                    )
            wall = time.perf_counter() - started
        stats = sbx.stats()
    if stats["tasks_created"] != sample:
        raise RuntimeError(f"naive loop: {stats['tasks_created']} tasks for {sample} tracks")
    scale = tracks / sample
    counts = {k: v * scale for k, v in requests_of(stats).items()}
    return Measure(counts, wall * scale, seconds)


@dataclass
class Run:
    reconciler: dict[float, Measure]  # by poll interval
    sequential: Measure
    pool: Measure | None


def one_run(args: argparse.Namespace, with_pool: bool) -> Run:
    with tempfile.TemporaryDirectory(prefix="bench-naive-") as tmp:
        root = Path(tmp)
        reconciler = {}
        for interval in args.poll_intervals:
            workdir = root / f"reconciler-{interval:g}"
            workdir.mkdir()
            reconciler[interval] = run_reconciler(args.tracks, args.latency, interval, workdir)
            print(
                f"  reconciler, poll {interval:g} s: {reconciler[interval].wall:.1f} s", flush=True
            )
        sample = min(args.tracks, args.sample)
        sequential = run_naive(args.tracks, sample, 1, args.latency, root)
        print(f"  sequential ({sample} tracks): {sequential.wall:.1f} s scaled", flush=True)
        pool = (
            run_naive(args.tracks, args.tracks, THREADS, args.latency, root) if with_pool else None
        )
        if pool:
            print(f"  pool of {THREADS}: {pool.wall:.1f} s", flush=True)
    return Run(reconciler, sequential, pool)


def fmt(value: float) -> str:
    return f"{value:,.0f}"


def table(header: Sequence[str], align: str, rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table; the first column is left-aligned, the others ``align``."""
    rule = "|".join(["---"] + [align] * (len(header) - 1))
    lines = ["| " + " | ".join(header) + " |", f"|{rule}|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def figures(label: str, measures: Sequence[Measure]) -> list[str]:
    """One row of medians: submits, polls, credits, downloads, API requests, total, wall."""
    counts = [
        [m.counts["batch_submit_calls"] + m.counts["create_calls"] for m in measures],
        [m.counts["batch_polls"] + m.counts["task_polls"] for m in measures],
        [m.counts["credit_calls"] for m in measures],
        [m.counts["downloads"] for m in measures],
        [m.api_requests for m in measures],
        [m.counts["total"] for m in measures],
    ]
    wall = median([m.wall for m in measures])
    return [label, *(fmt(median(c)) for c in counts), f"{wall:,.1f} s"]


Pairs = list[tuple[Measure, Measure]]  # (naive, reconciler) measured in the same run


def ratio(pairs: Pairs, of: str) -> float:
    """Median over runs of naive ÷ reconciler for one figure."""

    def value(m: Measure) -> float:
        return m.api_requests if of == "api" else m.wall if of == "wall" else m.counts[of]

    return median([value(a) / value(b) for a, b in pairs])


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def report(args: argparse.Namespace, runs: Sequence[Run], started: str) -> str:
    n = args.tracks
    sample = min(n, args.sample)
    pool_runs = [(r, r.pool) for r in runs if r.pool is not None]

    rows = [
        figures(f"`reconciler sync`, poll every {i:g} s", [r.reconciler[i] for r in runs])
        for i in args.poll_intervals
    ]
    label = "SDK `generate_and_wait`, sequential"
    if sample < n:
        label += f" (**{sample} tracks measured, scaled x{n / sample:g} to N**)"
    rows.append(figures(label, [r.sequential for r in runs]))
    if pool_runs:
        label = f"SDK `generate_and_wait`, `ThreadPoolExecutor({THREADS})`"
        rows.append(figures(label, [pool for _, pool in pool_runs]))

    # Download time: N first fetches back to back, from the sequential loop's timings.
    per_download = median(
        [sum(r.sequential.download_seconds) / len(r.sequential.download_seconds) for r in runs]
    )
    floor = args.latency + per_download * n

    ratio_rows: list[list[str]] = []
    target_rows: list[list[str]] = []
    for i in args.poll_intervals:
        naive: dict[str, Pairs] = {"sequential": [(r.sequential, r.reconciler[i]) for r in runs]}
        if pool_runs:
            naive[f"pool of {THREADS}"] = [(pool, r.reconciler[i]) for r, pool in pool_runs]
        for name, pairs in naive.items():
            ratio_rows.append(
                [f"{name} ÷ reconciler (poll {i:g} s)"]
                + [f"{ratio(pairs, of):.1f}x" for of in ("total", "api", "wall")]
            )
        mine = [r.reconciler[i] for r in runs]
        submits = max(m.counts["batch_submit_calls"] + m.counts["create_calls"] for m in mine)
        wall = median([m.wall for m in mine])
        total = min(ratio(pairs, "total") for pairs in naive.values())
        api = min(ratio(pairs, "api") for pairs in naive.values())
        target_rows += [
            [
                f"poll {i:g} s",
                f"submit calls ≤ ceil(N/10) = {math.ceil(n / 10)}",
                f"{fmt(submits)} (worst run)",
                verdict(submits <= math.ceil(n / 10)),
            ],
            [
                f"poll {i:g} s",
                "≥ 10x fewer requests than each naive loop",
                f"{total:.1f}x total, {api:.1f}x API only",
                f"{verdict(total >= 10)} total, {verdict(api >= 10)} API only",
            ],
            [
                f"poll {i:g} s",
                f"wall ≤ 2 x (generation + download) = {2 * floor:.1f} s",
                f"{wall:.1f} s (median)",
                verdict(wall <= 2 * floor),
            ],
        ]

    # The fewest requests any client can send that downloads every clip once:
    # full batches of ten, each polled exactly once, when it is done.
    batches = math.ceil(n / 10)
    least = n + 2 * batches
    naive_total = median([r.sequential.counts["total"] for r in runs])
    pool_note = ""
    if pool_runs and len(pool_runs) < len(runs):
        pool_note = (
            f" The thread pool ran in {len(pool_runs)} of them (it takes about"
            f" N/{THREADS} x {args.latency:g} s); its ratios come from those runs."
        )
    header = ["approach", "submit calls", "poll calls", "credit calls", "downloads"]
    header += ["API requests (no downloads)", "total requests", "wall time"]
    ratio_header = ["naive ÷ reconciler, median of per-run ratios", "total requests"]
    ratio_header += ["API requests", "wall time"]
    targets = table(["reconciler", "target (issue 5)", "measured", "verdict"], "---", target_rows)
    return f"""
## API efficiency and wall time: N = {n:,} tracks, {args.latency:g} s generation

- Command: `{args.command}` at commit {args.revision}
- Machine: {machine()}
- Date: {started}; {len(runs)} run(s), medians shown.{pool_note}
- Each approach runs against a fresh sandbox process. `reconciler sync` runs as
  a child process (its wall time includes interpreter start-up) with
  `max_in_flight = {max(n, 200)}` and {TRACKS_PER_FILE} tracks per spec file.
  The SDK loops use the SDK's default poll interval (5 s) and download the
  first clip of each task with one shared `httpx.Client` (a reconciler track
  keeps one clip by default too).
- Download time in the wall-time target: {per_download * 1000:.1f} ms per first
  fetch (the sequential loop's mean, median over runs) x {n:,} =
  {per_download * n:.1f} s, so generation + download = {floor:.1f} s.

{table(header, "---:", rows)}

{table(ratio_header, "---:", ratio_rows)}

{targets}

Reading the targets: every approach downloads each of the {n:,} clips once,
and no API batches downloads. A client that submits {batches:,} full batches and
polls each exactly once still sends {n:,} + 2 x {batches:,} = {least:,} requests,
{naive_total / least:.1f}x fewer than the naive loops' {fmt(naive_total)}: a 10x
ratio of total requests cannot be reached by any client once downloads count.
Without downloads the ratio is what batching and probing buy: until a task
of batches sent together has finished, reconciler polls one of them per
interval (about ceil({args.latency:g} s / interval) probes for a burst), then each
batch once more, against two polls per task for the SDK (one at once, one
after its 5 s sleep).
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--tracks", type=int, default=100, help="N, the tracks to converge")
    parser.add_argument("--runs", type=int, default=3, help="runs; medians are reported")
    parser.add_argument(
        "--pool-runs", type=int, help="run the thread pool in only the first K runs (it is slow)"
    )
    parser.add_argument("--latency", type=float, default=5.0, help="sandbox generation time, s")
    parser.add_argument(
        "--sample", type=int, default=20, help="tracks the sequential loop runs before scaling"
    )
    parser.add_argument(
        "--poll-intervals",
        type=lambda text: [float(x) for x in text.split(",")],
        default=[1.0, 2.0, 5.0],
        help="reconciler poll intervals to try, comma-separated seconds",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 s generation, 1 run, at most 5 sequential tracks; no write",
    )
    args = parser.parse_args()
    args.command = command_line("bench/compare_naive.py")
    args.revision = revision()  # at the start: the tree may move during a long run
    if args.quick:
        args.latency, args.runs, args.sample = 1.0, 1, min(args.sample, 5)
    pool_runs = args.runs if args.pool_runs is None else args.pool_runs
    started = today()
    runs = []
    for k in range(args.runs):
        print(f"run {k + 1} of {args.runs}, N = {args.tracks}", flush=True)
        runs.append(one_run(args, with_pool=k < pool_runs))
    text = report(args, runs, started)
    print(text)
    if not args.quick:
        write_section(f"compare_naive-{args.tracks}", text)


if __name__ == "__main__":
    main()
