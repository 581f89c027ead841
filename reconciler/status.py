"""The report behind ``reconciler status``: where every track stands.

Where it sits: the end of the flow. It only reads the ledger (opened read-only
in WAL mode, no lock), so it answers while a daemon or sync is writing. The
JSON form is a documented, stable schema (``SCHEMA_VERSION``; fields are only
ever added): see the README.
"""

from __future__ import annotations

import difflib
import os
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from reconciler.config import Settings
from reconciler.errors import UnknownNameError
from reconciler.layout import check_layout
from reconciler.ledger import Ledger
from reconciler.planning import CREDITS_PER_TASK, IN_FLIGHT, output_names, utc_day_start
from reconciler.words import plural

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
        close = difflib.get_close_matches(soundtrack, list(known), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UnknownNameError(f"no soundtrack {soundtrack!r} in the ledger{hint}")
    if name and name not in known[soundtrack]:
        close = difflib.get_close_matches(name, sorted(known[soundtrack]), n=3)
        hint = f" (did you mean {', '.join(f'{soundtrack}/{c}' for c in close)}?)" if close else ""
        raise UnknownNameError(f"no track {name!r} in soundtrack {soundtrack!r}{hint}")


def _output_drift(out_dir: Path, files: list[str], records: Mapping[str, tuple[int, int]]) -> str:
    """Why the written files no longer match the ledger ('' when they do): one stat each."""
    for f in files:
        try:
            st = os.stat(out_dir / f)
        except FileNotFoundError:
            return "output file deleted; the next pass restores it from the cache"
        except OSError:
            continue  # unreadable for this user: the writer will find out
        if (st.st_size, st.st_mtime_ns) != records[f]:
            return "output file changed; the next pass restores it from the cache"
    return ""


def _queued_reason(row: dict[str, Any], now: float, hold: str | None) -> str:
    if row["next_attempt"] and row["next_attempt"] > now:
        return f"retry at {_clock(row['next_attempt'])} after: {row['reason']}"
    if row["attempts"]:
        return f"retrying now after: {row['reason']}"
    return hold or row["reason"] or "waiting for the next batch"


def _track_state(
    row: dict[str, Any],
    files_ok: bool,
    spec_error: str | None,
    output_error: str | None,
    drift: str,
    now: float,
    hold: str | None,
) -> tuple[str, str | None]:
    if spec_error is not None:
        return "invalid", spec_error.splitlines()[0]
    if files_ok and drift:
        return "restoring", drift
    if files_ok:
        return "ready", None
    if output_error is not None:
        return "failed", f"cannot write the output: {output_error}"
    state = row["gstate"]
    if state == "parked":
        return "failed", row["reason"]
    if state == "queued":
        reason = _queued_reason(row, now, hold)
        return ("retrying" if row["attempts"] else "queued"), reason
    if state == "unknown":
        return "generating", "submit outcome unknown (answer lost); waiting for a callback"
    return "generating", None


def build_report(
    ledger: Ledger, settings: Settings, now: float, selector: str | None = None
) -> dict[str, Any]:
    """Everything ``status`` shows, as plain JSON-ready data."""
    spec_errors = ledger.spec_errors()
    output_errors: dict[str, str] = ledger.get("output_errors") or {}
    held: dict[str, str] = {}
    written: dict[str, tuple[int, int]] = {}
    for r in ledger.query("SELECT path, fingerprint, size, mtime_ns FROM outputs"):
        held[r["path"]] = r["fingerprint"]
        written[r["path"]] = (r["size"], r["mtime_ns"])
    rows = ledger.query(
        "SELECT t.soundtrack, t.name, t.fingerprint, t.clips, t.source, t.position, "
        "t.updated_at AS t_at, g.state AS gstate, g.reason, g.attempts, g.next_attempt, "
        "g.updated_at AS g_at "
        "FROM tracks t LEFT JOIN generations g ON g.fingerprint = t.fingerprint "
        "ORDER BY t.soundtrack, t.position"
    )
    if selector:
        known: dict[str, set[str]] = {}
        for r in rows:
            known.setdefault(r["soundtrack"], set()).add(r["name"])
        check_selector(known, selector)
    in_flight = sum(1 for r in rows if r["gstate"] in IN_FLIGHT)
    block = ledger.get("submit_block")
    hold = (
        f"held: {block}"
        if block
        else f"held: in-flight cap ({settings.max_in_flight} tasks at once)"
        if in_flight >= settings.max_in_flight
        else None
    )
    sel_st, _, sel_track = (selector or "").partition("/")
    tracks: list[dict[str, Any]] = []
    for r in rows:
        if sel_st and r["soundtrack"] != sel_st:
            continue
        if sel_track and r["name"] != sel_track:
            continue
        files = [f"{r['soundtrack']}/{n}" for n in output_names(r["name"], r["clips"])]
        files_ok = all(held.get(f) == r["fingerprint"] for f in files)
        output_error = next((output_errors[f] for f in files if f in output_errors), None)
        drift = _output_drift(settings.out_dir, files, written) if files_ok else ""
        state, reason = _track_state(
            r, files_ok, spec_errors.get(r["source"]), output_error, drift, now, hold
        )
        changed = max(r["t_at"] or 0.0, r["g_at"] or 0.0)
        tracks.append(
            {
                "soundtrack": r["soundtrack"],
                "track": r["name"],
                "state": state,
                "reason": reason,
                "age_seconds": round(max(0.0, now - changed), 1),
                "fingerprint": r["fingerprint"],
                "files": files,
                "source": r["source"],
            }
        )
    known_sources = {r["source"] for r in rows}
    invalid_files = [{"path": p, "error": e} for p, e in sorted(spec_errors.items())]
    # A file that was never valid has no tracks yet: show it as a row too.
    for p, e in sorted(spec_errors.items()):
        if p not in known_sources and not selector:
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
    counts = Counter(t["state"] for t in tracks)
    spent = CREDITS_PER_TASK * ledger.spent_since(utc_day_start(now))
    budget = settings.daily_budget
    batches = ledger.query("SELECT count(*) AS n FROM batches WHERE open = 1")[0]["n"]
    ambiguous = ledger.query("SELECT count(*) AS n FROM submits WHERE state = 'ambiguous'")[0]["n"]
    doubles = ledger.query("SELECT coalesce(sum(possible_double), 0) AS n FROM generations")[0]["n"]
    health = ledger.get("api_health") or {}
    return {
        "schema": SCHEMA_VERSION,
        "generated_at": _iso(now),
        "summary": {"tracks": len(tracks), **{s: counts.get(s, 0) for s in TRACK_STATES}},
        "tracks": tracks,
        "invalid_files": invalid_files,
        "batches_in_flight": batches,
        "credits": {
            "spent_today": spent,
            "daily_budget": budget,
            "budget_left": None if budget is None else max(0, budget - spent),
        },
        "submit_block": block,
        "specs_folder": _folder_state(settings.specs_dir),
        "layout_problems": check_layout(
            settings.specs_dir, settings.out_dir, settings.state_dir, writable=False
        ),
        "ambiguous_submits": ambiguous,
        "possible_double_spend": doubles,
        "last_pass": _iso(ledger.get("last_pass_at")),
        "api": {
            "last_success": _iso(health.get("last_success")),
            "last_error": _iso(health.get("last_error")),
            "last_error_message": health.get("last_error_message"),
            "batch_endpoint": "unsupported" if ledger.get("batch_unsupported") else "ok",
        },
    }


def _folder_state(path: Path) -> str:
    if path.is_dir():
        return "ok"
    return "missing" if not path.exists() else "not a folder"


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


def render(report: dict[str, Any], console: Console) -> None:
    # Rows are written as plain strings, with each state's colour rendered once:
    # rich's Text or Table measure and style every cell, which takes about half
    # a second (a Table, seconds) at 10,000 rows.
    header = ("SOUNDTRACK", "TRACK", "STATE", "AGE", "REASON")
    rows = [
        (t["soundtrack"], t["track"], t["state"], _age(t["age_seconds"]), t["reason"] or "")
        for t in report["tracks"]
    ]
    widths = [max([len(header[i]), *(len(r[i]) for r in rows)]) for i in range(4)]
    styled = {}
    for state, style in _STYLE.items():
        with console.capture() as cell:
            console.print(Text(state.ljust(widths[2]), style=style), end="")
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
    console.file.write("\n".join(lines) + "\n")
    s = report["summary"]
    counts = ", ".join(f"{s[k]} {k}" for k in TRACK_STATES if s[k])
    console.print(f"\n{plural(s['tracks'], 'track')}: {counts or 'none'}")
    c = report["credits"]
    budget = (
        f", budget left today {c['budget_left']}/{c['daily_budget']}"
        if c["daily_budget"] is not None
        else ""
    )
    console.print(
        f"batches in flight: {report['batches_in_flight']}; "
        f"credits spent today: {c['spent_today']}{budget}"
    )
    for problem in report["layout_problems"]:
        console.print(f"[red]folder layout: {problem}[/]", soft_wrap=True)
    if report["specs_folder"] != "ok":
        console.print(
            f"[yellow]the specs folder is {report['specs_folder']}: the last good specs stay "
            "in force[/]",
            soft_wrap=True,
        )
    if report["submit_block"]:
        console.print(f"[yellow]submissions paused: {report['submit_block']}[/]")
    if report["ambiguous_submits"] or report["possible_double_spend"]:
        console.print(
            f"[yellow]ambiguous submits: {report['ambiguous_submits']}; "
            f"possible double spend: {plural(report['possible_double_spend'], 'generation')}[/]"
        )
    api = report["api"]
    line = (
        f"last pass: {report['last_pass'] or 'never'}; "
        f"API last success: {api['last_success'] or '-'}"
    )
    if api["last_error"]:
        line += f"; last error {api['last_error']}: {api['last_error_message']}"
    console.print(line, soft_wrap=True)
    if api["batch_endpoint"] == "unsupported":
        console.print("[yellow]batch endpoint unavailable: submitting one create per track[/]")
