"""The report behind ``reconciler status``: where every track stands.

Where it sits: the end of the flow. It only reads the ledger (opened read-only
in WAL mode, no lock, one transaction through ``ledger.read_status``), so it
answers while a daemon or sync is writing. The JSON form is a documented,
stable schema (``SCHEMA_VERSION``; fields are only ever added): see the README.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler.config import Settings
from reconciler.errors import UnknownNameError
from reconciler.layout import check_layout
from reconciler.ledger import StatusRead, StatusRow, read_status
from reconciler.planning import CREDITS_PER_TASK, Suspension, output_names, utc_day_start
from reconciler.words import did_you_mean, plural

if TYPE_CHECKING:
    from rich.console import Console

SCHEMA_VERSION = 1
TRACK_STATES = ("ready", "restoring", "generating", "queued", "retrying", "failed", "invalid")


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%H:%M:%S")


def check_selector(known: Mapping[str, set[str]], selector: str) -> None:
    """Raise ``UnknownNameError`` unless ``SOUNDTRACK[/TRACK]`` names something in ``known``.

    ``known`` maps each soundtrack to its track names. The message suggests
    the closest names, like a spec error does for a field.
    """
    soundtrack, _, name = selector.partition("/")
    if soundtrack not in known:
        raise UnknownNameError(
            f"no soundtrack {soundtrack!r} in the ledger{did_you_mean(soundtrack, known)}"
        )
    if name and name not in known[soundtrack]:
        tracks = {f"{soundtrack}/{t}" for t in known[soundtrack]}
        raise UnknownNameError(
            f"no track {name!r} in soundtrack {soundtrack!r}{did_you_mean(selector, tracks)}"
        )


def _output_drift(
    out_dir: str, files: list[str], written: Mapping[str, tuple[str | None, int, int]]
) -> str:
    """Why the written files no longer match the ledger ('' when they do): one stat each."""
    for f in files:
        try:
            # A string path: building Path objects would double the cost at 10,000 files.
            st = os.stat(f"{out_dir}/{f}")
        except FileNotFoundError:
            return "output file deleted; the next pass restores it from the cache"
        except OSError:
            continue  # unreadable for this user: the writer will find out
        if (st.st_size, st.st_mtime_ns) != written[f][1:]:
            return "output file changed; the next pass restores it from the cache"
    return ""


def _queued_reason(
    reason: str | None,
    attempts: int | None,
    next_attempt: float | None,
    now: float,
    hold: str | None,
) -> str:
    if next_attempt and next_attempt > now:
        return f"retry at {_clock(next_attempt)} after: {reason}"
    if attempts or next_attempt:
        return f"retrying now after: {reason}"
    return hold or reason or "waiting for the next batch"


_PAID_UNNAMED = (
    "submit answer lost, and a signed callback proves a task exists but does not name it; "
    "not sent again (`reconciler retry` would pay again)"
)


def _track_state(
    row: StatusRow,
    files_ok: bool,
    spec_error: str | None,
    output_error: str | None,
    drift: str,
    now: float,
    hold: str | None,
    short: str | None,
) -> tuple[str, str | None]:
    *_, gstate, reason, attempts, next_attempt, paid_hint = row
    if spec_error is not None:
        return "invalid", spec_error.splitlines()[0]
    if files_ok and drift:
        return "restoring", drift
    if files_ok:
        return "ready", None
    if output_error is not None:
        return "failed", f"cannot write the output: {output_error}"
    if short is not None:
        return "failed", short
    if gstate == "parked":
        return "failed", reason
    if gstate == "queued":
        why = _queued_reason(reason, attempts, next_attempt, now, hold)
        # A retry time without an attempt counted: the submit was turned away
        # (a 429), or the account was short; retrying all the same.
        return ("retrying" if attempts or next_attempt else "queued"), why
    if gstate == "unknown":
        if paid_hint:
            return "generating", _PAID_UNNAMED
        return "generating", "submit outcome unknown (answer lost); waiting for a callback"
    return "generating", None


def _folder_state(path: Path) -> str:
    if path.is_dir():
        return "ok"
    return "missing" if not path.exists() else "not a folder"


def build_report(settings: Settings, now: float, selector: str | None = None) -> dict[str, Any]:
    """Everything ``status`` shows, as plain JSON-ready data."""
    sel_st, _, sel_track = (selector or "").partition("/")
    read = read_status(settings.ledger_target, utc_day_start(now), (sel_st, sel_track))
    if selector and not read.tracks:
        known: dict[str, set[str]] = {}
        for soundtrack, name in read.names:
            known.setdefault(soundtrack, set()).add(name)
        check_selector(known, selector)
    spec_errors = read.spec_errors
    facts = read.facts
    output_errors: dict[str, str] = facts.get("output_errors") or {}
    short: dict[str, str] = facts.get("short_generations") or {}
    written = read.outputs
    block = facts.get("submit_block")
    hold = (
        f"held: {block}"
        if block
        else f"held: in-flight cap ({settings.max_in_flight} tasks at once)"
        if read.in_flight >= settings.max_in_flight
        else None
    )
    suspension = Suspension.from_json(facts.get("suspended"))
    out_dir = facts.get("out_dir") or os.fspath(settings.out_dir.absolute())
    counts = dict.fromkeys(TRACK_STATES, 0)
    tracks: list[dict[str, Any]] = []
    # Once per track: the tests that cannot apply (no outputs held, no output
    # errors, no invalid files) are skipped rather than run 10,000 times.
    for row in read.tracks:
        soundtrack, name, fingerprint, clips, source, changed = row[:6]
        files = [f"{soundtrack}/{n}" for n in output_names(name, clips)]
        files_ok = bool(written) and all(
            (held := written.get(f)) is not None and held[0] == fingerprint for f in files
        )
        output_error = (
            next((output_errors[f] for f in files if f in output_errors), None)
            if output_errors
            else None
        )
        state, why = _track_state(
            row,
            files_ok,
            spec_errors.get(source) if spec_errors else None,
            output_error,
            _output_drift(out_dir, files, written) if files_ok else "",
            now,
            hold,
            short.get(fingerprint) if short else None,
        )
        if state in ("queued", "retrying") and suspension.covers(soundtrack):
            why = "suspended"
        counts[state] += 1
        tracks.append(
            {
                "soundtrack": soundtrack,
                "track": name,
                "state": state,
                "reason": why,
                "age_seconds": round(max(0.0, now - changed), 1),
                "fingerprint": fingerprint,
                "files": files,
                "source": source,
            }
        )
    invalid_files = [{"path": p, "error": e} for p, e in sorted(spec_errors.items())]
    if spec_errors and not selector:
        # A file that was never valid has no tracks yet: show it as a row too.
        known_sources = {row[4] for row in read.tracks}
        for p, e in sorted(spec_errors.items()):
            if p not in known_sources:
                counts["invalid"] += 1
                tracks.append(
                    {
                        "soundtrack": p,
                        "track": "-",
                        "state": "invalid",
                        "reason": e.splitlines()[0],
                        "age_seconds": 0.0,
                        "fingerprint": None,
                        "files": [],
                        "source": p,
                    }
                )
    spent = CREDITS_PER_TASK * read.spent
    budget = settings.daily_budget
    leader, last_leader, replicas = _replication(read, settings.lease, now)
    health = facts.get("api_health") or {}
    return {
        "schema": SCHEMA_VERSION,
        "generated_at": _iso(now),
        "summary": {"tracks": len(tracks), **counts},
        "tracks": tracks,
        "invalid_files": invalid_files,
        "batches_in_flight": read.open_batches,
        "credits": {
            "spent_today": spent,
            "daily_budget": budget,
            "budget_left": None if budget is None else max(0, budget - spent),
        },
        "submit_block": block,
        "suspended": suspension.to_json(),
        "specs_folder": _folder_state(settings.specs_dir),
        "specs_path": str(settings.specs_dir),
        "layout_problems": check_layout(
            settings.specs_dir, settings.out_dir, settings.state_dir, writable=False
        ),
        "ambiguous_submits": read.ambiguous_submits,
        "possible_double_spend": read.possible_double_spend,
        # Answers read in a shape other than the documented one, by endpoint
        # and shape (also logged once each, with the raw body).
        "unexpected_shapes": facts.get("unexpected_shapes") or {},
        "orphan_tasks": read.orphans,
        "leader": leader,
        "last_leader": last_leader,
        "replicas": replicas,
        "last_pass": _iso(facts.get("last_pass_at")),
        "api": {
            "last_success": _iso(health.get("last_success")),
            "last_error": _iso(health.get("last_error")),
            "last_error_message": health.get("last_error_message"),
            "batch_endpoint": "unsupported" if facts.get("batch_unsupported") else "ok",
        },
    }


def _replication(
    read: StatusRead, lease: float, now: float
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[dict[str, Any]]]:
    """Who leads, who led last, and the replicas seen, by the ledger's clock
    when it keeps one (PostgreSQL), else this host's; see :func:`replication`."""
    return replication(read.lease, read.replicas, lease, read.now if read.now is not None else now)


def replication(
    lease_row: Sequence[Any] | None, replica_rows: Iterable[Sequence[Any]], lease: float, at: float
) -> tuple[dict[str, Any] | None, dict[str, Any] | None, list[dict[str, Any]]]:
    """``leader``, ``last_leader`` and ``replicas`` of ``status --json``, at ``at``.

    ``leader`` only while the lease is unexpired: a process that was killed,
    stopped or cannot reach the ledger leads no more once its lease ends, and
    then it is ``last_leader``, with when its lease ended and whether it was
    handed back (``released``) or ran out. Both are None when no replica ever
    held the lease (one daemon on its own ledger). A replica whose heartbeat
    is older than one lease is ``stale`` and its role ``unknown``; only the
    holder of the unexpired lease has the role ``leader``, whatever another
    process last reported. Replicas silent for three leases are left out.
    """
    leader = last = None
    holder = None
    if lease_row is not None:
        holder, host, pid, since, renewed_at, expires_at, token = lease_row
        term = {"host": host, "pid": pid, "since": _iso(since), "token": token}
        if expires_at > at:
            leader = {
                **term,
                "lease_age_seconds": round(max(0.0, at - renewed_at), 1),
                # Always false now that an expired lease is last_leader; kept for readers.
                "expired": False,
            }
        else:
            holder = None
            last = {
                **term,
                "ended": _iso(expires_at),
                "ended_seconds_ago": round(max(0.0, at - expires_at), 1),
                # Lease.release ends the lease where it was last renewed.
                "released": expires_at <= renewed_at,
            }
    replicas = []
    for who, host, pid, reported, started, seen in replica_rows:
        age = max(0.0, at - seen)
        if age > 3 * lease:
            continue
        stale = age > lease
        role = reported
        if who == holder:
            role = "leader"
        elif stale or reported == "leader":
            role = "unknown"
        replicas.append(
            {
                "host": host,
                "pid": pid,
                "role": role,
                "started": _iso(started),
                "seen_seconds_ago": round(age, 1),
                "stale": stale,
            }
        )
    return leader, last, replicas


def replication_line(report: Mapping[str, Any]) -> tuple[str, str | None] | None:
    """The plain ``status`` line about the replicas and its style; None without any."""
    leader, last = report["leader"], report.get("last_leader")
    replicas = report["replicas"]
    if leader is None and last is None and not replicas:
        return None
    if leader is not None:
        head = (
            f"leader: {leader['host']} pid {leader['pid']} since {leader['since']}, "
            f"lease renewed {leader['lease_age_seconds']:.0f}s ago"
        )
    elif last is not None:
        how = "released" if last["released"] else "expired"
        head = (
            f"no leader: {last['host']} pid {last['pid']} held the lease until "
            f"{last['ended']} ({how} {last['ended_seconds_ago']:.0f}s ago)"
        )
    else:
        head = "no leader yet"
    me = (leader["host"], leader["pid"]) if leader is not None else None
    others = [r for r in replicas if (r["host"], r["pid"]) != me]
    seen = [r for r in others if not r["stale"]]
    gone = [r for r in others if r["stale"]]
    line = head + f"; {plural(len(seen), 'other replica' if leader else 'replica')} seen"
    line += "".join(f", {r['host']} pid {r['pid']} ({r['role']})" for r in seen)
    line += "".join(
        f"; {r['host']} pid {r['pid']} not seen for {r['seen_seconds_ago']:.0f}s" for r in gone
    )
    return line, None if leader is not None else "yellow"


def failed(report: dict[str, Any]) -> bool:
    s = report["summary"]
    return bool(s["failed"] or s["invalid"] or report["layout_problems"])


def _age(seconds: float) -> str:
    if seconds < 90:
        return f"{int(seconds)}s"
    if seconds < 5400:
        return f"{int(seconds // 60)}m"
    if seconds < 172800:
        return f"{int(seconds // 3600)}h"
    return f"{int(seconds // 86400)}d"


_STYLE = {
    "ready": "green",
    "generating": "cyan",
    "restoring": "cyan",
    "queued": "blue",
    "retrying": "yellow",
    "failed": "red",
    "invalid": "red",
}


def render(report: dict[str, Any], console: Console | None = None) -> None:
    """The table and its summary lines, on ``console`` or, without one, plainly on stdout.

    A rich ``Console`` colours the states and cuts long reasons at a
    terminal's edge; without one (into a pipe or a file, where rich would add
    neither) rich is never imported, a third of the command's start-up.
    """
    # Rows are written as plain strings, with each state's colour rendered once:
    # rich's Text or Table measure and style every cell, which takes about half
    # a second (a Table, seconds) at 10,000 rows.
    header = ("SOUNDTRACK", "TRACK", "STATE", "AGE", "REASON")
    rows = [
        (t["soundtrack"], t["track"], t["state"], _age(t["age_seconds"]), t["reason"] or "")
        for t in report["tracks"]
    ]
    columns = list(zip(*rows, strict=True))[:4] if rows else [()] * 4
    widths = [max(len(h), *map(len, c)) for h, c in zip(header[:4], columns, strict=True)]
    styled = {state: state.ljust(widths[2]) for state in _STYLE}
    room = None
    file = sys.stdout
    if console is not None:
        from rich.text import Text

        file = console.file
        for state, style in _STYLE.items():
            with console.capture() as cell:
                console.print(Text(styled[state], style=style), end="")
            styled[state] = cell.get()
        # On a terminal a long reason is cut at the screen's edge rather than wrapped.
        room = console.width - sum(widths) - 8 if console.is_terminal else None
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)) + "  REASON"]
    for soundtrack, track, state, age, reason in rows:
        cut = reason if room is None or len(reason) <= room else reason[: max(0, room - 1)] + "…"
        lines.append(
            f"{soundtrack.ljust(widths[0])}  {track.ljust(widths[1])}  {styled[state]}  "
            f"{age.ljust(widths[3])}  {cut}".rstrip()
        )
    file.write("\n".join(lines) + "\n")

    def say(text: str, style: str | None = None) -> None:
        if console is None:
            file.write(text + "\n")
            return
        # rich highlights numbers with a set of regular expressions; into a
        # pipe it writes no colours, so that is skipped there. No markup or
        # emoji codes: a path or a message may hold "[x]" or ":x:".
        line = console.render_str(text, markup=False, emoji=False, highlight=console.is_terminal)
        if style:
            line.stylize(style)  # over the highlights: numbers stay bold, in the line's colour
        console.print(line, soft_wrap=True)

    s = report["summary"]
    counts = ", ".join(f"{s[k]} {k}" for k in TRACK_STATES if s[k])
    say(f"\n{plural(s['tracks'], 'track')}: {counts or 'none'}")
    c = report["credits"]
    budget = (
        f", budget left today {c['budget_left']}/{c['daily_budget']}"
        if c["daily_budget"] is not None
        else ""
    )
    say(
        f"batches in flight: {report['batches_in_flight']}; "
        f"credits spent today: {c['spent_today']}{budget}"
    )
    for problem in report["layout_problems"]:
        say(f"folder layout: {problem}", "red")
    if report["specs_folder"] != "ok":
        say(
            f"the specs folder {report['specs_path']} is {report['specs_folder']}: "
            "the last good specs stay in force",
            "yellow",
        )
    if report["submit_block"]:
        say(f"submissions paused: {report['submit_block']}", "yellow")
    suspended = report["suspended"]
    if suspended["all"] or suspended["soundtracks"]:
        what = "everything" if suspended["all"] else ", ".join(suspended["soundtracks"])
        say(f"submissions suspended: {what} (`reconciler resume`)", "yellow")
    if report["ambiguous_submits"] or report["possible_double_spend"]:
        say(
            f"ambiguous submits: {report['ambiguous_submits']}; "
            f"possible double spend: {plural(report['possible_double_spend'], 'generation')}",
            "yellow",
        )
    if report["orphan_tasks"]:
        say(
            f"{plural(report['orphan_tasks'], 'task')} the service named without "
            "saying whose (being matched, or held for you: see `reconciler events`)",
            "yellow",
        )
    shapes = report["unexpected_shapes"]
    if shapes:
        say(
            f"{plural(sum(shapes.values()), 'answer')} read in an undocumented shape "
            "(`status --json` lists them; `reconciler doctor --live` checks the fit)",
            "yellow",
        )
    replicas = replication_line(report)
    if replicas is not None:
        say(*replicas)
    api = report["api"]
    line = (
        f"last pass: {report['last_pass'] or 'never'}; "
        f"API last success: {api['last_success'] or '-'}"
    )
    if api["last_error"]:
        line += f"; last error {api['last_error']}: {api['last_error_message']}"
    say(line)
    if api["batch_endpoint"] == "unsupported":
        say("batch endpoint unavailable: submitting one create per track", "yellow")
