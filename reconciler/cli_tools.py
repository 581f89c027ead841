"""Operator commands: ``describe``, ``events``, ``suspend``, ``resume``, ``trash``, ``status -w``.

Where it sits: the outermost edge, beside cli.py, which loads these commands
only when one is asked for. Like cli.py, nothing here decides policy: the
readers are in inspection.py, the suspension rule in planning.py, the trash
in outputs.py. None of these commands takes the state lock, so they all work
while a daemon runs; ``suspend``, ``resume`` write the ledger like ``retry``.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import click
from rich.console import Console

from reconciler import outputs as out
from reconciler.cli import _echo_json, _exits_on_errors, _settings, folder_options
from reconciler.config import Settings
from reconciler.inspection import (
    EventReader,
    describe_report,
    event_line,
    follow,
    iso,
    known_soundtracks,
    parse_duration,
    render_describe,
    unknown_name,
    watch,
)
from reconciler.ledger import Ledger

#: How often ``events --follow`` asks the ledger for new events.
FOLLOW_INTERVAL = 0.5


@contextmanager
def _until_stopped() -> Iterator[None]:
    """Run until Ctrl-C or SIGTERM, then exit 0: stopping a follower is not an error."""

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except KeyboardInterrupt:
        sys.exit(0)
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _reading(settings: Settings) -> Iterator[Ledger]:
    ledger = Ledger.open(settings.ledger_target, readonly=True)
    try:
        yield ledger
    finally:
        ledger.close()


def watch_status(
    settings: Settings, selector: str | None, *, as_json: bool, interval: float
) -> None:
    """``status --watch``: refresh until Ctrl-C/SIGTERM, exit 0."""
    with _reading(settings) as ledger, _until_stopped():
        emit = (lambda doc: click.echo(json.dumps(doc, ensure_ascii=False))) if as_json else None
        watch(ledger, settings, selector, Console(), interval=interval, emit_json=emit)


@click.command()
@folder_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.argument("selector", metavar="SOUNDTRACK/TRACK")
@_exits_on_errors(1)
def describe(selector: str, as_json: bool, **opts: Any) -> None:
    """Everything about one track: spec, request, attempts, clips, files, events."""
    settings = _settings(**opts)
    with _reading(settings) as ledger:
        report = describe_report(ledger, settings, selector)
    if as_json:
        _echo_json(report)
    else:
        render_describe(report, Console())


def _since(_ctx: click.Context, _param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return time.time() - parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command()
@folder_options
@click.option(
    "-f", "--follow", "keep_following", is_flag=True, help="Keep printing new events until Ctrl-C."
)
@click.option(
    "--since",
    callback=_since,
    metavar="DURATION",
    help="Only events of the last DURATION (90s, 15m, 2h, 1d).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.argument("selector", required=False, metavar="[SOUNDTRACK[/TRACK]]")
@_exits_on_errors(1)
def events(
    keep_following: bool, since: float | None, as_json: bool, selector: str | None, **opts: Any
) -> None:
    """The ledger's event log, oldest first; --follow to keep watching it."""
    settings = _settings(**opts)

    def emit(e: dict[str, Any]) -> None:
        click.echo(json.dumps(e, ensure_ascii=False) if as_json else event_line(e))

    with _reading(settings) as ledger, _until_stopped():
        reader = EventReader(ledger, selector, since)
        follow(reader, emit, interval=FOLLOW_INTERVAL, forever=keep_following)


def _suspension_target(ledger: Ledger, settings: Settings, soundtrack: str | None) -> None:
    """An unknown soundtrack is an error: a typo must not suspend nothing silently."""
    if soundtrack is None:
        return
    from reconciler.specs import scan_specs

    # Soundtracks not synced yet count too: a new one can be held back before
    # its first pass. So do suspended ones whose spec has gone, to resume them.
    known = known_soundtracks(ledger) | ledger.suspension().soundtracks
    known |= {
        f.soundtrack for f in scan_specs(settings.specs_dir, models=settings.models).files.values()
    }
    if soundtrack not in known:
        raise unknown_name("soundtrack", soundtrack, known, where="the ledger or the specs folder")


@click.command()
@folder_options
@click.argument("soundtrack", required=False)
@_exits_on_errors(1)
def suspend(soundtrack: str | None, **opts: Any) -> None:
    """Stop new submissions (for one SOUNDTRACK or all); polls and downloads go on."""
    settings = _settings(**opts)
    ledger = Ledger.open(settings.ledger_target)
    try:
        _suspension_target(ledger, settings, soundtrack)
        now = ledger.suspension().suspend(soundtrack)
        ledger.set_suspension(now, event="submit.suspended", soundtrack=soundtrack)
    finally:
        ledger.close()
    what = soundtrack or "every soundtrack"
    click.echo(
        f"suspended new submissions for {what}; polls and downloads go on "
        f"(`reconciler resume{' ' + soundtrack if soundtrack else ''}` lifts it)"
    )


@click.command()
@folder_options
@click.argument("soundtrack", required=False)
@_exits_on_errors(1)
def resume(soundtrack: str | None, **opts: Any) -> None:
    """Lift a suspension (of one SOUNDTRACK, or every one); the next pass submits."""
    settings = _settings(**opts)
    ledger = Ledger.open(settings.ledger_target)
    try:
        _suspension_target(ledger, settings, soundtrack)
        before = ledger.suspension()
        now = before.resume(soundtrack)
        if now != before:
            ledger.set_suspension(now, event="submit.resumed", soundtrack=soundtrack)
    finally:
        ledger.close()
    if soundtrack is not None and soundtrack not in before.soundtracks and not before.all:
        click.echo(f"{soundtrack} was not suspended")
    elif now.all:
        click.echo(
            f"resumed {soundtrack}, but every soundtrack stays suspended: "
            "`reconciler resume` with no name lifts that"
        )
    else:
        click.echo(f"resumed submissions for {soundtrack or 'every soundtrack'}")


@click.group()
def trash() -> None:
    """What prune moved aside: list it, or put a file back."""


def _trash_entries(settings: Settings) -> list[dict[str, Any]]:
    return [
        {
            "path": str(settings.out_dir / e.relative),
            "relative": e.relative,
            "trashed": str(e.trashed),
            "moved_at": iso(e.moved_at),
            "size": e.size,
            # The first pass after this empties it.
            "emptied_after": iso(e.moved_at + settings.prune_grace),
        }
        for e in out.Trash(settings.state_dir / "trash").entries()
    ]


@trash.command("list")
@folder_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_exits_on_errors(1)
def trash_list(as_json: bool, **opts: Any) -> None:
    """Every file prune moved to the trash: where it was, when, size, when it goes."""
    settings = _settings(**opts)
    entries = _trash_entries(settings)
    if as_json:
        _echo_json({"trash": entries})
        return
    if not entries:
        click.echo("the trash is empty")
        return
    header = ("PATH", "MOVED", "SIZE", "EMPTIED AFTER")
    rows = [(e["path"], e["moved_at"], str(e["size"]), e["emptied_after"]) for e in entries]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for r in [header, *rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@trash.command("restore")
@folder_options
@click.argument("path")
@_exits_on_errors(1)
def trash_restore(path: str, **opts: Any) -> None:
    """Put PATH (as `trash list` shows it) back; never overwrites an existing file."""
    settings = _settings(**opts)
    bin_ = out.Trash(settings.state_dir / "trash")
    entries = bin_.entries()
    wanted = Path(path).absolute()
    matches = [
        e
        for e in entries
        if path == e.relative
        or wanted in ((settings.out_dir / e.relative).absolute(), e.trashed.absolute())
    ]
    if not matches:
        listed = (str(settings.out_dir / e.relative) for e in entries)
        raise unknown_name("file", path, listed, where="the trash")
    # The same file pruned twice: the newest copy is the one a person means.
    dest = bin_.restore(matches[-1], settings.out_dir)
    click.echo(f"restored {dest}")
