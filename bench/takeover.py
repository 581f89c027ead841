"""Takeover: from a SIGKILL of the leading replica to the new leader's first pass and submit.

Starts the sandbox and two ``reconciler run`` replicas in processes of their
own, sharing one ledger (a SQLite file in the work folder, or ``--ledger
URL``), one specs folder and one output folder, each with its own state
folder. Each run waits for the leader to be converged and then a random part
of its renewal interval, saves a new spec file (one track) and SIGKILLs the
leader at once, before its batching window ends, so the work is left to the
follower. Times run from just before the kill to
the follower's ``lease.acquired`` log line (its first pass starts then) and
to its ``batch.submitted`` for the new file (same machine, same clock). A
fresh replica then replaces the killed one, so every run starts from two.

What to expect: the dead leader last renewed its lease up to ``lease / 3``
before the kill, and a follower tries the lease the moment it expires, so a
takeover lands between ``2/3`` of the lease and the lease after the kill;
the submit adds the new leader's start (a fresh reconciler, a full pass) and
what is left of the batching window.

Usage::

    uv run python bench/takeover.py [--runs 10] [--lease 15] [--window 2.0]
        [--ledger URL] [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import KEY, child_env, command_line, machine, revision, sandbox, today, write_section

#: The kill moments within the renewal cycle are drawn from this seed.
SEED = 13


class Replica:
    """One ``reconciler run`` process and its JSON log."""

    def __init__(self, work: Path, index: int, ledger: str, api_url: str) -> None:
        self.log = work / f"replica-{index}.log"
        args = ["--specs", "specs", "--out", "tracks", "--state", f"state-{index}"]
        args += ["--config", "reconciler.toml", "--ledger", ledger, "--api-url", api_url]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "reconciler", "run", *args],
                cwd=work,
                env=child_env(MUSICAPI_KEY=KEY),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and f'"{name}"' in line:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line still being written
                if event.get("event") == name:
                    found.append(event)
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(15)


def stamp(event: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def wait_for(what: str, find: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = find()
        if found:
            return found
        time.sleep(0.02)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


def leader_of(replicas: list[Replica]) -> Replica:
    """The live replica whose latest lease event is an acquisition."""

    def find() -> Replica | None:
        alive = [r for r in replicas if r.process.poll() is None]
        held = [r for r in alive if r.events("lease.acquired")]
        held.sort(key=lambda r: stamp(r.events("lease.acquired")[-1]))
        return held[-1] if held else None

    found: Replica = wait_for("a leader", find, 120)
    return found


def one_run(
    work: Path, replicas: list[Replica], n: int, lease: float, rng: random.Random
) -> tuple[float, float, float]:
    """(kill → lease.acquired, kill → batch.submitted, lease.acquired → first pass.completed)."""
    leader = leader_of(replicas)
    follower = next(r for r in replicas if r is not leader and r.process.poll() is None)
    wait_for(
        "the leader to converge",
        lambda: (
            leader.events("pass.completed")
            and leader.events("pass.completed")[-1]["in_flight"] == 0
        ),
        120,
    )
    # The kill at a random moment of the leader's renewal cycle, not right
    # after the renewal that precedes each pass (which the wait above ends on).
    time.sleep(rng.uniform(0, lease / 3))
    taken_before = len(follower.events("lease.acquired"))
    submits_before = len(follower.events("batch.submitted"))
    (work / "specs" / f"run-{n:03d}.yaml").write_text(
        f"defaults:\n  mv: sonic-v5\ntracks:\n  - name: t\n"
        f"    gpt_description_prompt: takeover run {n}\n"
    )
    killed = time.time()
    leader.process.send_signal(signal.SIGKILL)
    leader.process.wait(10)
    acquired = wait_for(
        "the follower to take the lease",
        lambda: follower.events("lease.acquired")[taken_before:],
        4 * lease + 30,
    )[0]
    submitted = wait_for(
        "the new leader's submit",
        lambda: follower.events("batch.submitted")[submits_before:],
        60,
    )[0]
    first_pass = wait_for(
        "the new leader's first pass",
        lambda: [e for e in follower.events("pass.completed") if stamp(e) >= stamp(acquired)],
        60,
    )[0]
    return (
        stamp(acquired) - killed,
        stamp(submitted) - killed,
        stamp(first_pass) - stamp(acquired),
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--lease", type=float, default=15.0)
    parser.add_argument("--window", type=float, default=2.0, help="[submit] batch_window")
    parser.add_argument("--ledger", help="a postgresql:// URL (default: a shared SQLite file)")
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    started_machine = machine()
    with tempfile.TemporaryDirectory(prefix="takeover-") as tmp, sandbox(latency=1.0) as box:
        work = Path(tmp)
        (work / "specs").mkdir()
        (work / "reconciler.toml").write_text(
            f"[submit]\nbatch_window = {args.window}\n\n[poll]\ninterval = 1.0\n\n"
            f"[ha]\nlease = {args.lease}\n"
        )
        ledger = args.ledger or str(work / "shared" / "ledger.sqlite3")
        replicas = [Replica(work, i, ledger, box.base_url) for i in range(2)]
        taken: list[float] = []
        submitted: list[float] = []
        first_pass: list[float] = []
        rng = random.Random(SEED)
        try:
            for n in range(args.runs):
                t, s, p = one_run(work, replicas, n, args.lease, rng)
                taken.append(t)
                submitted.append(s)
                first_pass.append(p)
                print(f"run {n + 1}: lease taken {t:.2f} s, submitted {s:.2f} s", flush=True)
                replicas.append(Replica(work, len(replicas), ledger, box.base_url))
        finally:
            for r in replicas:
                r.stop()
    backend = "PostgreSQL" if args.ledger else "one SQLite file"
    text = f"""
## Takeover after SIGKILL of the leader (lease {args.lease:g} s, {backend})

- Command: `{command_line("bench/takeover.py")}`
- Commit: {revision()}; date: {today()}
- Machine: {started_machine}
- Two replicas, sandbox generation 1 s, batching window {args.window:g} s; each run saves one
  spec file and SIGKILLs the leader at once (at a random point of its renewal interval),
  so the follower submits it. Expected: the lease is taken between 2/3 of the lease
  and the lease after the kill.

| measure ({args.runs} runs) | p50 | p95 | min | max |
|---|---|---|---|---|
| kill → new leader holds the lease (its first pass starts) | {statistics.median(taken):.2f} s | {percentile(taken, 0.95):.2f} s | {min(taken):.2f} s | {max(taken):.2f} s |
| kill → new leader's first submit | {statistics.median(submitted):.2f} s | {percentile(submitted, 0.95):.2f} s | {min(submitted):.2f} s | {max(submitted):.2f} s |
| new leader's first pass (full: recovery, whole specs folder) | {statistics.median(first_pass):.2f} s | {percentile(first_pass, 0.95):.2f} s | {min(first_pass):.2f} s | {max(first_pass):.2f} s |
"""  # noqa: E501
    print(text)
    if args.results:
        write_section(
            f"takeover-{args.lease:g}-{'pg' if args.ledger else 'sqlite'}", text, args.results
        )


if __name__ == "__main__":
    main()
