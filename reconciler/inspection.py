"""Read-only views of the ledger for operators: ``describe``, ``events``, ``status --watch``.

Where it sits: beside status.py at the end of the flow. Everything here reads
the ledger opened read-only (no lock, WAL), so it works while a daemon or
sync writes; nothing here writes anything. The reports are plain JSON-ready
data; the renderers turn them into text.
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from reconciler import outputs as out
from reconciler.config import Settings
from reconciler.errors import UnknownNameError
from reconciler.ledger import Ledger
from reconciler.ledger import reports as ledger_reports
from reconciler.planning import CREDITS_PER_TASK, output_names
from reconciler.status import build_report, render
from reconciler.words import did_you_mean

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``1d`` → seconds; ValueError otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration (examples: 90s, 15m, 2h, 1d)")
    return float(match[1]) * _UNITS[match[2]]


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def unknown_name(
    kind: str, name: str, known: Iterable[str], where: str = "the ledger"
) -> UnknownNameError:
    """The error for a name that is not there, with the closest known one."""
    return UnknownNameError(f"no {kind} {name!r} in {where}{did_you_mean(name, known)}")


def known_soundtracks(ledger: Ledger) -> set[str]:
    return ledger_reports.soundtracks(ledger)


def check_selector(ledger: Ledger, selector: str) -> tuple[str, str | None]:
    """``SOUNDTRACK`` or ``SOUNDTRACK/TRACK`` that the ledger knows, split in two."""
    soundtrack, _, track = selector.partition("/")
    if soundtrack not in known_soundtracks(ledger):
        raise unknown_name("soundtrack", soundtrack, known_soundtracks(ledger))
    if not track:
        return soundtrack, None
    names = [n for _, n in ledger_reports.track_names(ledger, soundtrack)]
    if track not in names:
        raise unknown_name("track", selector, (f"{soundtrack}/{n}" for n in names))
    return soundtrack, track


# -- describe ---------------------------------------------------------------------------


def describe_report(ledger: Ledger, settings: Settings, selector: str) -> dict[str, Any]:
    """Everything the ledger and the output folder know about one track."""
    soundtrack, name = check_selector(ledger, selector)
    if name is None:
        raise UnknownNameError(f"name one track as SOUNDTRACK/TRACK, not {selector!r}")
    t = ledger_reports.track_row(ledger, soundtrack, name)
    assert t is not None  # check_selector found it
    fp = t["fingerprint"]
    gen = ledger_reports.generation_row(ledger, fp)
    tasks = ledger_reports.task_rows(ledger, fp)
    clips = ledger_reports.clip_rows(ledger, fp)
    current_task = gen["task_id"] if gen else None
    return {
        "soundtrack": soundtrack,
        "track": name,
        "spec": _spec_location(ledger, settings.specs_dir, t["source"], name),
        "fingerprint": fp,
        "clips_wanted": t["clips"],
        "generation": None
        if gen is None
        else {
            "state": gen["state"],
            "reason": gen["reason"],
            "attempts": gen["attempts"],
            "possible_double_spend": gen["possible_double"],
            "created_at": iso(gen["created_at"]),
            "updated_at": iso(gen["updated_at"]),
        },
        "request": json.loads(gen["request"]) if gen else None,
        "attempts": _attempts(ledger, fp, tasks),
        "clips": [
            {
                "clip_id": c["clip_id"],
                "task_id": c["task_id"],
                "position": c["position"],
                "state": c["state"],
                "duration": c["duration"],
                "sha256": c["sha256"],
                "current": c["task_id"] == current_task,
            }
            for c in clips
        ],
        "outputs": _output_checks(ledger, settings.out_dir, soundtrack, name, t["clips"], fp),
        "events": _track_events(ledger, soundtrack, name, fp, [c["clip_id"] for c in clips]),
    }


def _spec_location(ledger: Ledger, specs_dir: Path, source: str, name: str) -> dict[str, Any]:
    """The file and line of the track's entry, and its ``variant`` (part of the fingerprint)."""
    row = ledger_reports.spec_file_row(ledger, source)
    entry: dict[str, Any] = {}
    error = None
    if row:
        error = row["error"]
        if row["body"]:
            body = json.loads(row["body"])
            entry = next((x for x in body["tracks"] if x["name"] == name), {})
    return {
        "file": str(specs_dir / source),
        "line": entry.get("line"),
        "variant": entry.get("variant"),
        "error": error.splitlines()[0] if error else None,
    }


def _attempts(ledger: Ledger, fp: str, tasks: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each submit that carried ``fp``, with the task it created, oldest first.

    A batch submit names its batch, so its task is the one in that batch; a
    single create's task is the first batchless one created after it. Tasks
    no submit accounts for were claimed by a webhook after a lost answer.
    """
    submits = ledger_reports.submit_rows(ledger, fp)
    outcomes = ledger_reports.verdict_events(ledger, fp)
    unmatched = list(tasks)
    found: list[dict[str, Any]] = []
    for s in submits:
        task = None
        if s["state"] == "answered":
            task = next(
                (
                    k
                    for k in unmatched
                    if (s["batch_id"] is not None and k["batch_id"] == s["batch_id"])
                    or (s["batch_id"] is None and k["batch_id"] is None and k["at"] >= s["at"])
                ),
                None,
            )
        if task is not None:
            unmatched.remove(task)
        found.append(_attempt(s, task, outcomes))
    found += [_attempt(None, k, outcomes) for k in unmatched]
    return found


def _attempt(
    submit: dict[str, Any] | None, task: dict[str, Any] | None, outcomes: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    credits: int | None
    if task is not None:
        credits = CREDITS_PER_TASK
        outcome = task["state"] + (f": {task['error']}" if task["error"] else "")
    elif submit is None:
        credits, outcome = None, "unknown"
    elif submit["state"] == "intent":
        credits, outcome = None, "submitting (no answer yet)"
    elif submit["state"] == "ambiguous":
        # Perhaps charged: only a callback naming its task would tell.
        credits, outcome = None, f"answer lost: {submit['error']}"
    elif submit["state"] == "not_sent":
        credits, outcome = 0, f"not sent: {submit['error']}"
    else:
        said = next((o for o in outcomes if o["at"] >= submit["at"]), None)
        if said is None:
            credits, outcome = None, "answered, but no task recorded for it"
        else:
            reason = json.loads(said["data"] or "{}").get("reason")
            credits, outcome = 0, f"rejected: {reason}"
    return {
        "submit_id": submit["id"] if submit else None,
        "kind": submit["kind"] if submit else "claimed by a webhook",
        "submitted_at": iso(submit["at"]) if submit else None,
        "batch_id": (submit["batch_id"] if submit else None)
        or (task["batch_id"] if task else None),
        "task_id": task["task_id"] if task else None,
        "task_created_at": iso(task["at"]) if task else None,
        "outcome": outcome,
        "credits": credits,
    }


def _output_checks(
    ledger: Ledger, out_dir: Path, soundtrack: str, name: str, clips: int, fp: str
) -> list[dict[str, Any]]:
    records = ledger.outputs()
    checks = []
    for filename in output_names(name, clips):
        rel = f"{soundtrack}/{filename}"
        path = out_dir / soundtrack / filename
        rec = records.get(rel)
        on_disk = out.file_state(path)
        same_stat = rec is not None and on_disk == (rec.size, rec.mtime_ns)
        # Hash only what the cheap check cannot vouch for.
        checksum_ok = None
        if rec is not None and on_disk is not None:
            checksum_ok = same_stat or out.sha256_file(path) == rec.sha256
        if rec is None:
            verdict = "not written yet"
        elif on_disk is None:
            verdict = "missing (restored from the cache at the next pass)"
        elif not checksum_ok:
            verdict = "changed on disk (restored at the next pass)"
        elif rec.fingerprint != fp:
            verdict = "holds an older generation (replaced when the new one is ready)"
        else:
            verdict = "ok"
        checks.append(
            {
                "path": str(path),
                "exists": on_disk is not None,
                "size": on_disk[0] if on_disk else None,
                "ledger_size": rec.size if rec else None,
                "size_mtime_match": same_stat,
                "checksum_ok": checksum_ok,
                "sha256": rec.sha256 if rec else None,
                "fingerprint_match": rec is not None and rec.fingerprint == fp,
                "verdict": verdict,
            }
        )
    return checks


def _track_events(
    ledger: Ledger, soundtrack: str, name: str, fp: str, clip_ids: Sequence[str]
) -> list[dict[str, Any]]:
    rows = ledger_reports.track_events(ledger, soundtrack, name, fp, clip_ids)
    return [event_json(r) for r in rows]


def render_describe(report: dict[str, Any], console: Console) -> None:
    # Only the labels are markup: a request's lyrics may hold "[verse]", an
    # error "[/x]", and rich would read them as tags.
    def line(label: str, value: object) -> None:
        console.print(
            f"[bold]{label + ':':<14}[/]{escape(str(value))}", soft_wrap=True, highlight=False
        )

    spec = report["spec"]
    where = f"{spec['file']}:{spec['line']}" if spec["line"] else spec["file"]
    line("Track", f"{report['soundtrack']}/{report['track']}")
    if spec["error"]:
        # The line is from the last good version, which stays in force.
        where += f"  (the file is invalid now, its last good version is in force: {spec['error']})"
    line("Spec", where)
    line("Fingerprint", f"{report['fingerprint']}  (the request below, variant {spec['variant']})")
    gen = report["generation"]
    if gen is not None:
        state = gen["state"] + (f" ({gen['reason']})" if gen["reason"] else "")
        line("Generation", f"{state}, since {gen['updated_at']}")
        if gen["possible_double_spend"]:
            line("Double spend", f"possibly, {gen['possible_double_spend']} time(s)")
    line("Clips wanted", report["clips_wanted"])
    console.print("[bold]Request:[/]")
    for key, value in sorted((report["request"] or {}).items()):
        console.print(
            f"  {key}: {json.dumps(value, ensure_ascii=False)}", soft_wrap=True, markup=False
        )
    console.print("[bold]Attempts:[/]" + ("" if report["attempts"] else " none"))
    for a in report["attempts"]:
        credits = "?" if a["credits"] is None else str(a["credits"])
        ids = ", ".join(
            f"{k} {a[k + '_id']}" for k in ("submit", "batch", "task") if a[k + "_id"] is not None
        )
        when = a["submitted_at"] or a["task_created_at"] or "-"
        console.print(
            f"  {when}  {a['kind']}  {ids}  → {a['outcome']}  credits {credits}",
            soft_wrap=True,
            highlight=False,
        )
    console.print("[bold]Clips:[/]" + ("" if report["clips"] else " none"))
    for c in report["clips"]:
        duration = "-" if c["duration"] is None else f"{c['duration']:.1f}s"
        mark = "" if c["current"] else "  (earlier task)"
        console.print(
            f"  {c['clip_id']}  #{c['position']}  {c['state']}  {duration}  "
            f"sha256 {(c['sha256'] or '-')[:16]}{mark}",
            soft_wrap=True,
            highlight=False,
        )
    console.print("[bold]Outputs:[/]")
    for o in report["outputs"]:
        console.print(
            f"  {o['path']}  {o['verdict']}", soft_wrap=True, highlight=False, markup=False
        )
    console.print("[bold]Events:[/]" + ("" if report["events"] else " none"))
    for e in report["events"]:
        console.print("  " + event_line(e), soft_wrap=True, highlight=False, markup=False)


# -- events ------------------------------------------------------------------------------


def event_json(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "at": iso(row["at"]),
        "event": row["event"],
        "soundtrack": row["soundtrack"],
        "track": row["track"],
        "fingerprint": row["fingerprint"],
        "data": json.loads(row["data"]) if row["data"] else {},
    }


def event_line(e: dict[str, Any]) -> str:
    """``time  event  soundtrack/track  key=value ...``: one line, grep-friendly."""
    if e["soundtrack"] and e["track"]:
        who = f"{e['soundtrack']}/{e['track']}"
    elif e["soundtrack"]:
        who = e["soundtrack"]
    elif e["fingerprint"]:
        who = e["fingerprint"][:12]
    else:
        who = "-"
    data = " ".join(
        f"{k}={json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v}"
        for k, v in e["data"].items()
    )
    return f"{e['at']}  {e['event']}  {who}  {data}".rstrip()


class EventReader:
    """Reads the ``events`` table by id, so following it costs one indexed query a tick."""

    def __init__(
        self, ledger: Ledger, selector: str | None = None, since: float | None = None
    ) -> None:
        self.ledger = ledger
        self.last_id = 0
        self.since = since
        self.soundtrack: str | None = None
        self.track: str | None = None
        if selector:
            self.soundtrack, self.track = check_selector(ledger, selector)

    def new(self) -> list[dict[str, Any]]:
        rows = ledger_reports.events_after(
            self.ledger, self.last_id, self.since, self.soundtrack, self.track
        )
        if rows:
            self.last_id = rows[-1]["id"]
        return [event_json(r) for r in rows]


def follow(
    reader: EventReader,
    emit: Callable[[dict[str, Any]], None],
    *,
    interval: float,
    forever: bool,
) -> None:
    """Emit what is there; with ``forever``, keep emitting new events until interrupted."""
    while True:
        for e in reader.new():
            emit(e)
        if not forever:
            return
        time.sleep(interval)


# -- status --watch ----------------------------------------------------------------------


def _stable(report: dict[str, Any]) -> str:
    """The report without what changes by itself (ages, the clock): a change detector."""
    tracks = [{k: v for k, v in t.items() if k != "age_seconds"} for t in report["tracks"]]
    return json.dumps({**report, "generated_at": None, "tracks": tracks}, sort_keys=True)


def _rendered(report: dict[str, Any], like: Console) -> Text:
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        width=like.width,
        force_terminal=like.is_terminal,
        color_system=like.color_system,  # type: ignore[arg-type]
    )
    render(report, console)
    return Text.from_ansi(buffer.getvalue().rstrip("\n"))


def reports(
    ledger: Ledger, settings: Settings, selector: str | None, interval: float
) -> Iterator[dict[str, Any]]:
    """A fresh status report every ``interval`` seconds, for ever."""
    while True:
        yield build_report(settings, time.time(), selector)
        time.sleep(interval)


def watch(
    ledger: Ledger,
    settings: Settings,
    selector: str | None,
    console: Console,
    *,
    interval: float,
    emit_json: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """``status --watch``: a live table on a terminal; into a pipe, a new table per change.

    With ``emit_json``, each changed report goes to it instead, terminal or not.
    """
    if console.is_terminal and emit_json is None:
        with Live(console=console, auto_refresh=False) as live:
            for report in reports(ledger, settings, selector, interval):
                live.update(_rendered(report, console), refresh=True)
        return
    last = None
    for report in reports(ledger, settings, selector, interval):
        key = _stable(report)
        if key == last:
            continue
        last = key
        if emit_json is not None:
            emit_json(report)
            continue
        console.print(f"--- {iso(time.time())}", highlight=False)
        render(report, console)
        console.file.flush()
