"""``sync`` and ``plan``: the one-shot commands around the reconcile pass.

Where it sits: between the CLI and reconciling. ``run_sync`` gets its
reconciler from the composition root (``app.open_app``: state lock, ledger,
API client) and converges once with a progress bar on a terminal;
``make_plan`` is the dry run: the same scan and the pass's own
``planning.plan`` with no lock and no writes (the balance, when there is a
key, is its one API call).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import structlog

from reconciler import outputs as out
from reconciler.audio import AudioCache
from reconciler.config import Settings
from reconciler.errors import APIError, ReconcilerError
from reconciler.ledger import LOST_ANSWER_PARK, PlanRead, read_plan
from reconciler.ledger.work import RESUBMIT_REASON, split_expired
from reconciler.planning import (
    CREDITS_PER_TASK,
    IN_FLIGHT,
    DiskState,
    Limits,
    OutputFact,
    Snapshot,
    Suspension,
    affordable_tasks,
    desired_state,
    plan,
    utc_day_start,
)
from reconciler.specs import Observation, Settling, SpecFile, SpecScan, scan_specs
from reconciler.words import plural

#: Seconds ``plan`` waits at most for spec files to settle: a file saved
#: just before, with the default 2 s batching window, but not a long window.
SETTLE_WAIT = 5.0

if TYPE_CHECKING:
    from rich.console import Console

    from reconciler.reconciling import PassResult, Reconciler

# The reconcile pass, the API client and rich's progress bar are imported by
# the functions that use them: ``plan`` needs none of them but the API client,
# for the balance (with a key), and importing them took 0.14 s of a cold ``plan``.


async def run_sync(settings: Settings, console: Console) -> bool:
    """Converge once; True when every track is ready."""
    from reconciler.app import open_app

    async with open_app(settings) as app:
        result = await converge_with_progress(app.reconciler, console)
    # Not markup: a pause's reason is the service's own text.
    console.print(summary_line(result), soft_wrap=True, markup=False)
    return result.converged


async def converge_with_progress(rec: Reconciler, console: Console) -> PassResult:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from reconciler.reconciling import converge

    if not console.is_terminal:
        return await converge(rec)
    with Progress(
        TextColumn("[bold]tracks ready"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("sync", total=None, detail="")

        def progress(r: PassResult) -> None:
            bar.update(
                task,
                total=r.total,
                completed=r.ready,
                detail=f"{r.in_flight} in flight, {r.queued} queued",
            )

        return await converge(rec, progress=progress)


def summary_line(r: PassResult) -> str:
    parts = [f"{r.ready}/{plural(r.total, 'track')} ready"]
    if r.in_flight:
        parts.append(f"{r.in_flight} in flight")
    if r.queued - r.retrying:
        parts.append(f"{r.queued - r.retrying} queued")
    if r.retrying:
        parts.append(f"{r.retrying} retrying")
    if r.parked:
        parts.append(f"{r.parked} failed (see `reconciler status`)")
    if r.invalid_files:
        parts.append(plural(r.invalid_files, "invalid spec file"))
    if r.output_failures:
        parts.append(
            f"{plural(r.output_failures, 'output file')} could not be written (see the log)"
        )
    if r.blocked:
        parts.append(f"submissions paused: {r.blocked}")
    return ("converged: " if r.converged else "not converged: ") + ", ".join(parts)


def _disk_state(
    folder: out.OutputFolder, path: str, state: tuple[int, int] | None, sha: str
) -> DiskState:
    """An output whose (size, mtime_ns) is not the recorded one, by its content."""
    if state is None:
        return "missing"
    if out.sha256_file(folder.path(*path.split("/", 1))) == sha:
        return "ok"
    return "drifted"


async def account_balance(settings: Settings) -> int | None:
    """The account balance for ``plan`` (given a key), or None without an
    answer: the balance only adds a warning, so no answer is not an error."""
    from reconciler.app import api_client

    async with api_client(settings, max_attempts=1) as (_, api):
        try:
            return (await api.get_credits()).total
        except APIError as exc:
            structlog.get_logger("reconciler").warning("credits.unavailable", error=exc.message)
            return None


@contextmanager
def balance_ahead(settings: Settings) -> Iterator[Callable[[], int | None]]:
    """:func:`account_balance`, asked by a forked child process while ``plan``
    reads the ledger and stats the folders; the function yielded waits for it.

    A cold plan is CPU work, and Python runs one thread at a time: a thread
    asking for the balance would only take turns with the reads. The child
    imports the API client, sets up TLS and waits for the answer on another
    core (0.08 s of a cold plan at 50,000 tracks on two cores). Without
    ``fork``, or once threads run (a child gets only the forking one), it is
    asked first, in line.
    """
    if not settings.sandbox and settings.api_key is None:
        # ``plan`` must work offline and without a key: a CI gate on a pull
        # request has none.
        yield lambda: None
        return
    if not hasattr(os, "fork") or threading.active_count() > 1:
        import asyncio

        answer = asyncio.run(account_balance(settings))
        yield lambda: answer
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        _answer_balance(settings, read_end, write_end)
    os.close(write_end)
    answered: list[bytes] = []

    def result() -> int | None:
        if not answered:
            with os.fdopen(read_end, "rb") as pipe:
                answered.append(pipe.read())
            os.waitpid(pid, 0)
        return _balance_from(answered[0])

    try:
        yield result
    finally:
        if not answered:  # the plan failed first: its answer is not needed
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_end)


def _answer_balance(settings: Settings, read_end: int, write_end: int) -> NoReturn:
    """The child of ``balance_ahead``: ask, send the answer, and leave without
    the parent's exit handlers and buffers."""
    os.close(read_end)
    answer: tuple[str, object]
    try:
        import asyncio

        answer = ("balance", asyncio.run(account_balance(settings)))
    except ReconcilerError as exc:
        answer = ("error", exc)
    except BaseException as exc:  # reported by the parent, which goes on without it
        answer = ("crash", f"{type(exc).__name__}: {exc}")
    with os.fdopen(write_end, "wb") as pipe:
        pickle.dump(answer, pipe)
    os._exit(0)


def _balance_from(data: bytes) -> int | None:
    """The child's answer: a balance, an error to raise as if asked in line,
    or none (a warning, as for no answer from the service)."""
    try:
        kind, value = pickle.loads(data)  # noqa: S301  (from our own child)
    except (pickle.UnpicklingError, EOFError, ValueError):
        kind, value = "crash", "the child asking for it ended without an answer"
    if kind == "error":
        assert isinstance(value, ReconcilerError)
        raise value
    if kind == "crash":
        structlog.get_logger("reconciler").warning("credits.unavailable", error=value)
        return None
    assert value is None or isinstance(value, int)
    return value


def cost_warnings(
    cost: int, *, balance: int | None, budget: int | None, spent_today: int
) -> list[str]:
    """What ``plan`` says when the queued work costs more than a ceiling allows."""
    found = []
    if budget is not None and cost > budget - spent_today:
        left = max(0, budget - spent_today)
        found.append(
            f"costs {cost} credits, more than the {left} left of today's budget "
            f"({spent_today}/{budget} spent): the rest waits for tomorrow"
        )
    if balance is not None and cost > balance:
        found.append(
            f"costs {cost} credits, more than the account's balance of {balance}: "
            "submissions stop when it runs out"
        )
    return found


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _iso(t: float | None) -> str | None:
    if t is None or not math.isfinite(t):
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def make_plan(
    settings: Settings,
    balance: int | Callable[[], int | None] | None = None,
    *,
    only: frozenset[str] | None = None,
    now: float | None = None,
    digests: bool = True,
) -> dict[str, Any]:
    """The dry run behind ``reconciler plan``: no lock, no writes.

    It reads the snapshot a pass reads (generations, suspension, today's
    spending, and the output files) and calls the pass's own
    ``planning.plan``; ``balance`` is the account's, when the caller could ask
    for it (from ``balance_ahead``, waited for once the reads are done).
    ``only`` restricts it as ``apply`` restricts its passes.
    ``digests`` adds what ``apply`` compares (``specs_digest``, ``ledger_digest``).
    """
    now = time.time() if now is None else now
    folder = out.OutputFolder(settings.out_dir)
    spent_from = utc_day_start(now)
    read = read_plan(
        settings.ledger_target, spent_from, folder.changed, now - settings.ambiguous_grace
    ) or PlanRead({}, {}, {}, {}, {}, {}, Suspension(), 0)
    # With the fingerprints stored beside them: hashing 50,000 tracks
    # again would be most of a cold plan.
    built = read.last_good
    last_good = {p: f.spec for p, f in built.items()}
    scan = _settled_scan(settings, last_good, read.stamps)
    desired = desired_state(scan.files, scan.errors.keys(), scan.root_state, last_good, built)
    gens, records, clips, suspension = read.generations, read.outputs, read.clips, read.suspension
    # The pass's first step: lost-answer items past their grace period go out
    # again (and may pay twice) or are parked for a person.
    again, lost = split_expired(read.expired, settings.max_resubmits)
    for fp in again:
        gens[fp] = gens[fp]._replace(state="queued", next_attempt=0.0, reason=RESUBMIT_REASON)
    for fp in lost:
        gens[fp] = gens[fp]._replace(state="parked", reason=LOST_ANSWER_PARK)
    spent_today = CREDITS_PER_TASK * read.spent
    # Every output as recorded is as written; only a changed one is looked at.
    facts = {p: OutputFact(p, fp or "", "ok", False) for p, fp, _, _ in records.values()}
    cache = AudioCache(settings.state_dir / "cache")
    for p, (state, clip, sha256) in read.changed.items():
        disk = _disk_state(folder, p, state, sha256)
        if disk == "ok":
            continue  # touched, not changed
        # The cache only matters for a file to restore. It holds the raw
        # audio; the output is that plus its tags (tags.py).
        fingerprint = records[p][1] or ""
        kept = clips.get(fingerprint, [])
        raw = kept[clip - 1].sha256 if clip is not None and len(kept) >= clip else None
        facts[p] = OutputFact(p, fingerprint, disk, cached=raw is not None and cache.has(raw))
    if callable(balance):
        balance = balance()
    # A new ``sync`` starts unpaused and has spent nothing in its run yet.
    allowance = affordable_tasks(
        spent_today=spent_today,
        daily_budget=settings.daily_budget,
        balance=balance,
        max_credits=settings.max_credits,
    )
    snapshot = Snapshot(
        generations=gens,
        in_flight=sum(1 for g in gens.values() if g.state in IN_FLIGHT),
        allowance=allowance,
        suspension=suspension,
        outputs=facts,
        only=only,
    )
    decided = plan(desired, snapshot, now, Limits(settings.max_in_flight, prune=settings.prune))
    # The tracks of what the plan names: at 50,000 tracks and nothing to do,
    # none of them.
    resubmit = set(again)
    unknown = [fp for fp in decided.waiting if gens[fp].state == "unknown"]
    named = {
        *decided.submit,
        *(h.fingerprint for h in decided.held),
        *decided.parked,
        *unknown,
    }
    by_fp: dict[str, list[str]] = {}
    for t in desired.tracks if named else ():
        if t.fingerprint in named:
            by_fp.setdefault(t.fingerprint, []).append(f"{t.soundtrack}/{t.name}")
    held = [
        {
            "fingerprint": h.fingerprint,
            "tracks": by_fp[h.fingerprint],
            "reason": h.reason,
            "detail": h.detail,
            "until": _iso(h.until),
        }
        for h in decided.held
    ]
    queued = CREDITS_PER_TASK * (
        len(decided.submit) + len(decided.held) - len(decided.held_by("suspended"))
    )
    report: dict[str, Any] = {
        "submit": [
            {"fingerprint": fp, "tracks": by_fp[fp], "again": fp in resubmit}
            for fp in decided.submit
        ],
        "batches": [list(b) for b in decided.batches],
        "held": held,
        # A track whose task is still in flight is written when it ends: it
        # counts as in flight, not as audio to reuse.
        "reuse": [
            f"{t.soundtrack}/{t.name}"
            for t in decided.reuse
            if gens[t.fingerprint].state not in IN_FLIGHT
        ],
        "restore": list(decided.restore),
        "prune": list(decided.prune),
        "failed": [{"fingerprint": fp, "tracks": by_fp[fp]} for fp in decided.parked],
        "in_flight": len(decided.waiting),
        "unknown": [{"fingerprint": fp, "tracks": by_fp[fp]} for fp in unknown],
        "suspended": {
            **suspension.to_json(),
            "held": [item for item in held if item["reason"] == "suspended"],
        },
        "credits": decided.cost,
        "credits_queued": queued,
        "budget": {"daily_budget": settings.daily_budget, "spent_today": spent_today},
        "balance": balance,
        "allowance": {"tasks": allowance.tasks, "limit": allowance.limit},
        "warnings": cost_warnings(
            queued, balance=balance, budget=settings.daily_budget, spent_today=spent_today
        ),
        "submit_calls": len(decided.batches),
        "invalid_files": {path: str(e) for path, e in scan.errors.items()},
        "settling": sorted(scan.settling),
        "specs_folder": scan.root_state,
        "changes": decided.changes,
    }
    if digests:
        # What the plan was computed from, so ``apply`` can tell what changed:
        # a tenth of a cold plan at 50,000 tracks, only paid for where read.
        wanted = set(desired.fingerprints())
        report["specs_digest"] = _digest(
            [desired.tracks, desired.stale, sorted(scan.errors), sorted(scan.settling)]
        )
        report["ledger_digest"] = _digest(
            [
                sorted(
                    (g.fingerprint, g.state, g.attempts, g.next_attempt)
                    for fp, g in gens.items()
                    if fp in wanted
                ),
                sorted((f.path, f.fingerprint, f.disk, f.cached) for f in facts.values()),
                suspension.to_json(),
                spent_today,
                snapshot.in_flight,
            ]
        )
    return report


def _settled_scan(
    settings: Settings, last_good: Mapping[str, SpecFile], stamps: Mapping[str, str]
) -> SpecScan:
    """The spec folder as the next pass reads it. A file written in the last
    batching window is read once it has stopped changing, as a pass waits for
    it, but ``plan`` waits no longer than ``SETTLE_WAIT``: one that settles
    later is read as it is now, and listed as settling."""
    give_up = time.time() + SETTLE_WAIT
    observed: Mapping[str, Observation] = {}
    while True:
        scan = scan_specs(
            settings.specs_dir,
            models=settings.models,
            limits=settings.field_limits,
            reuse=last_good,
            settle=Settling(observed, time.time(), settings.batch_window, hold=False),
            # A file not written since its last good version was read is not read again.
            stamps=stamps,
        )
        if scan.settled_by is None or scan.settled_by > give_up:
            return scan
        time.sleep(max(0.0, scan.settled_by - time.time()))
        observed = scan.observed


def render_plan(report: dict[str, Any], console: Console | None = None) -> None:
    """One line per item: first what the next pass submits now, then what it
    holds back; on ``console`` (a terminal: coloured) or, without one, plainly
    on stdout, where rich is never imported.

    Names and messages are never read as markup: a track may be called
    ``[live] set``, and an error may quote ``[/x]``.
    """
    lines: list[tuple[str, str | None, str]] = []

    def say(text: str, tag: str = "", style: str | None = None) -> None:
        lines.append((tag, style, text))

    for item in report["submit"]:
        again = "; again, its last submit's answer was lost: may pay twice" if item["again"] else ""
        say(
            f"{', '.join(item['tracks'])}  ({item['fingerprint'][:12]}{again})",
            "+ submit  ",
            "green",
        )
    for item in report["held"]:
        until = f" until {item['until']}" if item["until"] else ""
        say(f"{', '.join(item['tracks'])}  ({item['detail']}{until})", "# held    ", "yellow")
    for name in report["reuse"]:
        say(f"{name}  (audio already paid for)", "= reuse   ", "cyan")
    for path in report["restore"]:
        say(f"{path}  (from the cache, no generation)", "~ restore ", "cyan")
    for path in report["prune"]:
        say(f"{path}  (to the trash)", "- prune   ", "red")
    for item in report["unknown"]:
        say(
            f"{', '.join(item['tracks'])}  (submit answer lost: not sent again before "
            "`ambiguous_grace`, unless a callback or task claims it)",
            "? unknown ",
            "yellow",
        )
    for item in report["failed"]:
        say(f"{', '.join(item['tracks'])}  (`reconciler retry`)", "! failed  ", "yellow")
    for path, err in report["invalid_files"].items():
        say(f"{path}: {err}", "invalid   ", "red")
    for path in report["settling"]:
        say(f"{path}  (still changing: a pass reads it once it stops)", "settling  ", "yellow")
    if report["specs_folder"] != "ok":
        say(f"spec folder is {report['specs_folder']}: nothing is pruned", style="yellow")
    suspended = report["suspended"]
    if suspended["all"] or suspended["soundtracks"]:
        what = "everything" if suspended["all"] else ", ".join(suspended["soundtracks"])
        say(f"suspended: {what} (`reconciler resume` lifts it)", style="yellow")
    held = f"; {len(report['held'])} held back" if report["held"] else ""
    say(
        f"{plural(len(report['submit']), 'generation')} to submit in "
        f"{plural(report['submit_calls'], 'call')}, "
        f"{report['credits']} credits; {len(report['reuse'])} reused, "
        f"{len(report['restore'])} restored, {plural(len(report['prune']), 'file')} pruned; "
        f"{report['in_flight']} in flight{held}"
    )
    budget = report["budget"]
    if budget["daily_budget"] is not None:
        say(f"budget today: {budget['spent_today']}/{budget['daily_budget']} credits spent")
    if report["balance"] is not None:
        say(f"account balance: {report['balance']} credits")
    else:
        say(
            "account balance: unknown (no API key, or no answer): "
            "the balance may hold back more than this plan shows"
        )
    for warning in report["warnings"]:
        say(f"warning: {warning}", style="yellow")
    if console is None:
        sys.stdout.write("".join(f"{tag}{text}\n" for tag, _, text in lines))
        return
    from rich.text import Text

    for tag, style, text in lines:
        # A whole line in the tag's colour where there is no tag (a warning).
        console.print(Text.assemble((tag, style or ""), (text, "" if tag else style or "")))
