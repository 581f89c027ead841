"""The report behind ``reconciler status``: where every track stands.

Where it sits: the end of the flow. It only reads the ledger (opened read-only
in WAL mode, no lock), so it answers while a daemon or sync is writing. The
JSON form is a documented, stable schema (``SCHEMA_VERSION``; fields are only
ever added): see the README.
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from reconciler.config import Settings
from reconciler.ledger import Ledger
from reconciler.planning import CREDITS_PER_TASK, output_names, utc_day_start

if TYPE_CHECKING:
    from rich.console import Console

SCHEMA_VERSION = 1
TRACK_STATES = ("ready", "generating", "queued", "retrying", "failed", "invalid")


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _track_state(
    gstate: str | None,
    reason: str | None,
    attempts: int | None,
    files_ok: bool,
    spec_error: str | None,
    output_error: str | None,
) -> tuple[str, str | None]:
    if spec_error is not None:
        return "invalid", spec_error.splitlines()[0]
    if files_ok:
        return "ready", None
    if output_error is not None:
        return "failed", f"cannot write the output: {output_error}"
    if gstate == "parked":
        return "failed", reason
    if gstate == "queued":
        if attempts:
            return "retrying", reason
        return "queued", reason
    if gstate == "unknown":
        return "generating", "submit outcome unknown (answer lost); waiting for a callback"
    return "generating", None


def _files_ok(files: list[str], fingerprint: str, held: dict[str, str]) -> bool:
    """Whether the ledger says every output file of a track holds its fingerprint.

    Only tracks that pass this can be ready, so a check of the files
    themselves (still there, size and mtime as recorded) belongs here.
    """
    return all(held.get(f) == fingerprint for f in files)


def build_report(settings: Settings, now: float, selector: str | None = None) -> dict[str, Any]:
    """Everything ``status`` shows, as plain JSON-ready data."""
    sel_st, _, sel_track = (selector or "").partition("/")
    read = Ledger.read_status(settings.ledger_path, utc_day_start(now), (sel_st, sel_track))
    spec_errors = read.spec_errors
    output_errors: dict[str, str] = read.facts.get("output_errors") or {}
    held = read.outputs
    counts = dict.fromkeys(TRACK_STATES, 0)
    tracks: list[dict[str, Any]] = []
    # Once per track: the tests that cannot apply (no outputs held, no output
    # errors, no invalid files) are skipped rather than run 10,000 times.
    for (
        soundtrack,
        name,
        fingerprint,
        clips,
        source,
        changed,
        gstate,
        reason,
        attempts,
    ) in read.tracks:
        files = [f"{soundtrack}/{n}" for n in output_names(name, clips)]
        output_error = (
            next((output_errors[f] for f in files if f in output_errors), None)
            if output_errors
            else None
        )
        state, why = _track_state(
            gstate,
            reason,
            attempts,
            bool(held) and _files_ok(files, fingerprint, held),
            spec_errors.get(source) if spec_errors else None,
            output_error,
        )
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
    health = read.facts.get("api_health") or {}
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
        "submit_block": read.facts.get("submit_block"),
        "ambiguous_submits": read.ambiguous_submits,
        "possible_double_spend": read.possible_double_spend,
        "last_pass": _iso(read.facts.get("last_pass_at")),
        "api": {
            "last_success": _iso(health.get("last_success")),
            "last_error": _iso(health.get("last_error")),
            "last_error_message": health.get("last_error_message"),
            "batch_endpoint": "unsupported" if read.facts.get("batch_unsupported") else "ok",
        },
    }


def failed(report: dict[str, Any]) -> bool:
    s = report["summary"]
    return bool(s["failed"] or s["invalid"])


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
    "queued": "blue",
    "retrying": "yellow",
    "failed": "red",
    "invalid": "red",
}


def render(report: dict[str, Any], console: Console) -> None:
    from rich.text import Text  # here: the JSON form never imports rich

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
    # rich highlights numbers in the lines below with a set of regular
    # expressions; into a pipe it writes no colours, so that is skipped there.
    print_line = partial(console.print, highlight=console.is_terminal)
    s = report["summary"]
    counts = ", ".join(f"{s[k]} {k}" for k in TRACK_STATES if s[k])
    print_line(f"\n{s['tracks']} tracks: {counts or 'none'}")
    c = report["credits"]
    budget = (
        f", budget left today {c['budget_left']}/{c['daily_budget']}"
        if c["daily_budget"] is not None
        else ""
    )
    print_line(
        f"batches in flight: {report['batches_in_flight']}; "
        f"credits spent today: {c['spent_today']}{budget}"
    )
    if report["submit_block"]:
        print_line(f"[yellow]submissions paused: {report['submit_block']}[/]")
    if report["ambiguous_submits"] or report["possible_double_spend"]:
        print_line(
            f"[yellow]ambiguous submits: {report['ambiguous_submits']}; "
            f"possible double spend: {report['possible_double_spend']} generation(s)[/]"
        )
    api = report["api"]
    line = (
        f"last pass: {report['last_pass'] or 'never'}; "
        f"API last success: {api['last_success'] or '-'}"
    )
    if api["last_error"]:
        line += f"; last error {api['last_error']}: {api['last_error_message']}"
    print_line(line, soft_wrap=True)
    if api["batch_endpoint"] == "unsupported":
        print_line("[yellow]batch endpoint unavailable: submitting one create per track[/]")
