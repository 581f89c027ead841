"""Cold ``reconciler plan`` and the daemon's start-up peak RSS on converged folders.

The two figures of issue 11 that the full ``overhead.py`` run takes many
minutes to reach, measured alone and, with ``--baseline SRC``, against the
code in another source tree (``git archive`` of the older commit) in the same
run: the two alternate, one fresh process at a time, so a shared machine's
load falls on both alike.

For each size, on ``--fixtures``/N (folders ``overhead.py --fixtures`` kept):
one unmeasured ``sync`` per tree (a fresh sandbox, and the ledger at this
schema), one unmeasured ``plan`` per tree (bytecode cache), then
``--repeat`` rounds of a cold ``plan`` (wall time, peak RSS; the balance
asked of the sandbox), then as many of ``reconciler run`` until its
start-up pass (a full pass) has logged, whose ``VmHWM`` is the daemon's
peak RSS at that point. When this commit
migrates the ledger to a schema the baseline cannot read, give the baseline
its own copies of the folders (``--baseline-fixtures``; ``cp -a`` keeps the
mtimes).

    uv run python bench/plan_startup.py --sizes 10000,50000 --fixtures /tmp/incr/fx \\
        --baseline /tmp/base --section plan-startup
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import (
    KEY,
    CliRun,
    child_env,
    command_line,
    machine,
    median,
    memory_kb,
    passes,
    revision,
    run_cli,
    sandbox,
    today,
    write_section,
)


@dataclass
class Figures:
    """One tree's figures at one size."""

    plan: list[CliRun] = field(default_factory=list)
    startup_pass: list[float] = field(default_factory=list)
    daemon_peak_mb: list[float] = field(default_factory=list)


def using(tree: Path | None) -> None:
    """Make the child processes import ``reconciler`` from ``tree`` (None: this one)."""
    if tree is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = str(tree)


def daemon_startup(work: Path, api_url: str) -> tuple[float, float]:
    """(start-up pass seconds, VmHWM MiB) of ``reconciler run`` after its first pass."""
    log = work / "daemon.log"
    env = child_env(MUSICAPI_KEY=KEY, MUSICAPI_BASE_URL=api_url)
    with log.open("w") as stderr:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "run", "--config", str(work / "reconciler.toml")],
            cwd=work,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 600
        while not (done := passes(log)):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon: no start-up pass; see {log}")
            time.sleep(0.1)
        time.sleep(1.0)  # the pass's last ledger write
        peak = memory_kb(daemon.pid)["VmHWM"] / 1024
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    return float(done[0]["seconds"]), peak


def measure(
    works: dict[str, Path], trees: dict[str, Path | None], repeat: int
) -> dict[str, Figures]:
    """Each tree's figures, each on its own copy of the folder (``works``)."""
    figures = {name: Figures() for name in trees}
    with sandbox(0.5) as sbx:
        for name, tree in trees.items():
            using(tree)
            common = ["--config", str(works[name] / "reconciler.toml")]
            run = run_cli(["sync", *common], works[name], api_url=sbx.base_url)
            if run.exit_code != 0:
                raise RuntimeError(f"sync in {works[name]} exited {run.exit_code}")
            run_cli(["plan", *common], works[name], api_url=sbx.base_url)
        # The plans first, then the daemons: a daemon just stopped (its
        # writes flushed, its memory returned) slowed the plan run after it.
        for _ in range(repeat):
            for name, tree in trees.items():
                using(tree)
                work = works[name]
                # With an API that answers: the balance is part of a plan.
                run = run_cli(
                    ["plan", "--config", str(work / "reconciler.toml")], work, api_url=sbx.base_url
                )
                if run.exit_code != 0:
                    raise RuntimeError(f"plan in {work} exited {run.exit_code}: not converged")
                figures[name].plan.append(run)
                print(f"  {work} {name}: plan {run.wall:.2f} s {run.max_rss_mb:.0f} MB", flush=True)
        for _ in range(repeat):
            for name, tree in trees.items():
                using(tree)
                work = works[name]
                seconds, peak = daemon_startup(work, sbx.base_url)
                figures[name].startup_pass.append(seconds)
                figures[name].daemon_peak_mb.append(peak)
                print(
                    f"  {work} {name}: daemon start-up pass {seconds:.2f} s, peak {peak:.0f} MiB",
                    flush=True,
                )
    using(None)
    return figures


def report(
    results: dict[int, dict[str, Figures]], trees: dict[str, Path | None], args: argparse.Namespace
) -> str:
    sizes = sorted(results)
    header = "| measure | " + " | ".join(f"{n:,} tracks" for n in sizes) + " |"
    lines = [
        "## Cold `plan` and the daemon's start-up peak RSS (focused measurement)",
        "",
        f"- Command: `{args.command}` at commit {args.revision}",
        f"- Machine: {args.machine}",
        f"- Date: {args.started}; medians of {args.repeat} fresh processes per figure, "
        "the trees alternating one process at a time.",
        "- Cold `plan`: a new process, warm page cache, on a converged folder (nothing "
        "to do); its peak RSS is the child's `ru_maxrss`. Daemon: `reconciler run` "
        "until its start-up pass (a full pass, nothing to do) has logged; peak RSS "
        "is its `VmHWM` then.",
        "",
        header,
        "|---|" + "---:|" * len(sizes),
    ]
    for name in trees:
        label = f" ({name})" if len(trees) > 1 else ""
        rows = {
            f"cold `reconciler plan`{label} (target <= 1 s at 50,000)": [
                f"{median([r.wall for r in results[n][name].plan]):.2f} s" for n in sizes
            ],
            f"`plan` peak RSS{label}": [
                f"{median([r.max_rss_mb for r in results[n][name].plan]):.0f} MB" for n in sizes
            ],
            f"daemon start-up pass{label}": [
                f"{median(results[n][name].startup_pass):.2f} s" for n in sizes
            ],
            f"daemon peak RSS after it{label} (target <= 150 MiB at 50,000)": [
                f"{median(results[n][name].daemon_peak_mb):.0f} MiB" for n in sizes
            ],
        }
        lines += [f"| {k} | " + " | ".join(v) + " |" for k, v in rows.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[10_000, 50_000],
        help="numbers of tracks, comma-separated; each a folder under --fixtures",
    )
    parser.add_argument("--fixtures", type=Path, required=True, help="converged folders")
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per figure")
    parser.add_argument(
        "--baseline", type=Path, help="a source tree of older code, measured alongside"
    )
    parser.add_argument(
        "--baseline-fixtures",
        type=Path,
        help="the baseline's own converged folders (default: --fixtures), for when "
        "this commit migrates the ledger to a schema the baseline cannot read",
    )
    parser.add_argument("--section", help="write the table to this section of bench/RESULTS.md")
    args = parser.parse_args()
    args.command = command_line("bench/plan_startup.py")
    args.revision = revision()
    args.machine = machine()
    args.started = today()
    trees: dict[str, Path | None] = {"this commit": None}
    if args.baseline:
        trees = {"baseline": args.baseline.resolve(), **trees}
    roots = {"this commit": args.fixtures, "baseline": args.baseline_fixtures or args.fixtures}
    results = {
        n: measure({name: roots[name] / str(n) for name in trees}, trees, args.repeat)
        for n in args.sizes
    }
    text = report(results, trees, args)
    print(text)
    if args.section:
        write_section(args.section, text)


if __name__ == "__main__":
    main()
