"""The thin click layer: parse flags, call the package, map errors to exit codes.

Where it sits: the outermost edge. Nothing here decides policy; it resolves
``Settings`` (config.py), sets up logging, and calls sync/plan/status/...
Every ``ReconcilerError`` becomes one line on stderr and an exit code from the
contract in the README.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import json
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, ClassVar, ParamSpec, TypeVar

import click

from reconciler import __version__
from reconciler.config import Flags, Settings, load_settings
from reconciler.errors import ConfigError, ReconcilerError, SpecError
from reconciler.words import plural

P = ParamSpec("P")
R = TypeVar("R")


def _exits_on_errors(code: int) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Turn a ReconcilerError into one line on stderr and ``code``."""

    def deco(fn: Callable[P, R]) -> Callable[P, R]:
        @wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except ReconcilerError as exc:
                for line in str(exc).splitlines() or [""]:
                    click.echo(f"reconciler: {line}", err=True)
                sys.exit(code)

        return wrapper

    return deco


def max_credits_option(
    text: str = "Spend at most N credits in this run (possibly spent ones count).",
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--max-credits N``: the run's spending ceiling (sync, run; doctor checks it)."""
    return click.option("--max-credits", type=click.IntRange(min=0), default=None, help=text)


def folder_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options of every command that reads the ledger or the folders."""
    options = [
        click.option("--specs", type=click.Path(path_type=Path), help="Spec folder [specs]."),
        click.option("--out", type=click.Path(path_type=Path), help="Output folder [tracks]."),
        click.option(
            "--state", type=click.Path(path_type=Path), help="State folder [.reconciler]."
        ),
        click.option(
            "--ledger",
            metavar="URL",
            help="Ledger: postgresql://... (shared by replicas) or a SQLite file "
            "[STATE/ledger.sqlite3].",
        ),
        click.option(
            "--config", type=click.Path(path_type=Path, dir_okay=False), help="TOML config file."
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The folder options plus the API's: for the commands that may call it."""
    options = [
        click.option("--api-url", help="MusicAPI base URL."),
        click.option(
            "--sandbox",
            "use_sandbox",
            is_flag=True,
            help="Start the bundled MusicAPI emulator in-process and use it.",
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return folder_options(fn)


def _settings(
    specs: Path | None,
    out: Path | None,
    state: Path | None,
    config: Path | None,
    ledger: str | None = None,
    api_url: str | None = None,
    use_sandbox: bool = False,
    prune: bool | None = None,
    max_credits: int | None = None,
    ops_listen: str | None = None,
    *,
    logging: bool = True,
) -> Settings:
    settings = load_settings(
        Flags(
            specs=specs,
            out=out,
            state=state,
            ledger=ledger,
            config=config,
            api_url=api_url,
            sandbox=use_sandbox,
            prune=prune,
            max_credits=max_credits,
            ops_listen=ops_listen,
        )
    )
    if logging:
        # Imported only here: structlog (with rich) costs a tenth of a second,
        # which ``status``, logging nothing, does without.
        from reconciler import logs

        logs.configure(settings.log_level)
    return settings


class _LazyGroup(click.Group):
    """Loads the sandbox command only when asked for: it pulls in numpy, lameenc
    and the HTTP server, which would add most of a second to every command.
    The operator commands (cli_tools.py) load the same way, so each command
    imports only what it uses. ``--help`` lists them by the summary kept here
    (their docstring's first paragraph; a test holds the two equal)."""

    #: name → (module, attribute, summary)
    lazy: ClassVar[dict[str, tuple[str, str, str]]] = {
        "sandbox": (
            "reconciler.sandbox.cli",
            "sandbox",
            "Serve the MusicAPI emulator and print its base URL; stop on SIGTERM or SIGINT.",
        ),
        "describe": (
            "reconciler.cli_tools",
            "describe",
            "Everything about one track: spec, request, attempts, clips, files, events.",
        ),
        "events": (
            "reconciler.cli_tools",
            "events",
            "The ledger's event log, oldest first; --follow to keep watching it.",
        ),
        "suspend": (
            "reconciler.cli_tools",
            "suspend",
            "Stop new submissions (for one SOUNDTRACK or all); polls and downloads go on.",
        ),
        "resume": (
            "reconciler.cli_tools",
            "resume",
            "Lift a suspension (of one SOUNDTRACK, or every one); the next pass submits.",
        ),
        "trash": (
            "reconciler.cli_tools",
            "trash",
            "What prune moved aside: list it, or put a file back.",
        ),
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy:
            module, attr, _ = self.lazy[cmd_name]
            command: click.Command = getattr(importlib.import_module(module), attr)
            return command
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """As click lists commands, but the lazy ones by their summary, unloaded."""
        shown = {
            name: click.Command(name, help=self.lazy[name][2])
            if name in self.lazy
            else self.commands[name]
            for name in self.list_commands(ctx)
        }
        shown = {name: cmd for name, cmd in shown.items() if not cmd.hidden}
        limit = formatter.width - 6 - max(map(len, shown))
        with formatter.section("Commands"):
            formatter.write_dl([(n, cmd.get_short_help_str(limit)) for n, cmd in shown.items()])


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
# The version is given rather than looked up: importlib.metadata alone would
# cost ``--version`` more start-up than all the rest of it.
@click.version_option(version=__version__, prog_name="reconciler")
def main() -> None:
    """Make a folder of generated music converge to a folder of spec files."""


@main.command()
@common_options
@click.option(
    "--prune/--no-prune", default=None, help="Move outputs no spec asks for to the trash."
)
@max_credits_option()
@click.option("-v", "--verbose", is_flag=True, help="On a terminal, log every event too.")
@_exits_on_errors(1)
def sync(prune: bool | None, verbose: bool, max_credits: int | None, **opts: Any) -> None:
    """Reconcile until converged or stuck. Exit 0 when every track is ready."""
    import asyncio

    from rich.console import Console

    from reconciler import logs
    from reconciler.running import run_sync

    settings = _settings(prune=prune, max_credits=max_credits, **opts)
    if sys.stderr.isatty() and not verbose and settings.log_level == "info":
        # On a terminal the progress bar is the display; per-track lines
        # would scroll it away. Warnings and errors still show.
        logs.configure("warning")
    ok = asyncio.run(run_sync(settings, console=Console(stderr=True)))
    sys.exit(0 if ok else 1)


@main.command()
@common_options
@click.option(
    "--prune/--no-prune", default=None, help="Move outputs no spec asks for to the trash."
)
@max_credits_option()
@click.option(
    "--ops-listen",
    metavar="[HOST:]PORT",
    default=None,
    help="Serve /metrics, /healthz, /readyz and the dashboard here (a bare port: 127.0.0.1).",
)
@_exits_on_errors(1)
def run(prune: bool | None, max_credits: int | None, ops_listen: str | None, **opts: Any) -> None:
    """The daemon: watch the specs folder and reconcile until SIGTERM."""
    import asyncio

    from reconciler.daemon import run_daemon

    settings = _settings(prune=prune, max_credits=max_credits, ops_listen=ops_listen, **opts)

    def reload() -> Settings:
        """SIGHUP: the config file and environment again, under the same flags."""
        return _settings(prune=prune, max_credits=max_credits, ops_listen=ops_listen, **opts)

    sys.exit(asyncio.run(run_daemon(settings, reload=reload)))


def _without_cyclic_gc() -> None:
    """For a short command that builds many objects with no cycles, which the
    cyclic collector would only walk again and again as they grow, and once
    more at exit (a twentieth of a cold ``plan``): it runs without it, and
    the process ends right after."""
    gc.disable()
    atexit.register(gc.freeze)


def _echo_json(report: dict[str, Any]) -> None:
    # Indented for a person at a terminal; compact into a pipe, where the C
    # encoder writes 10,000 tracks in a tenth of the time the indenting one takes.
    # Written directly: click.echo would scan the whole text for ANSI codes,
    # which ``json.dumps`` never leaves in it.
    sys.stdout.write(json.dumps(report, indent=2 if sys.stdout.isatty() else None) + "\n")


@main.command()
@common_options
@click.option("--prune/--no-prune", default=None, help="Show what pruning would move.")
@max_credits_option("Plan as `sync --max-credits N` would run: at most N credits.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--save",
    "save_to",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also write the plan to this file, for `reconciler apply FILE`.",
)
@_exits_on_errors(1)
def plan(
    prune: bool | None,
    max_credits: int | None,
    as_json: bool,
    save_to: Path | None,
    **opts: Any,
) -> None:
    """Dry run: what the next pass submits now, holds back, reuses, restores, prunes.

    Exit 0 no changes, 2 changes.
    """
    # The plan's reads are some 300,000 objects at 50,000 tracks (rows, spec
    # versions, desired tracks), a sixth of a cold plan for the collector.
    _without_cyclic_gc()

    # Settings first: they set up logging, which imports structlog its own way (logs.py).
    settings = _settings(prune=prune, max_credits=max_credits, **opts)
    from reconciler.layout import require_layout
    from reconciler.running import balance_ahead, make_plan, render_plan

    # What the next pass would do is moot when the pass would refuse to run.
    require_layout(settings.specs_dir, settings.out_dir, settings.state_dir)
    with balance_ahead(settings) as balance:
        report = make_plan(
            settings,
            balance=balance,
            # The digests ``apply`` checks: only in what is saved or printed whole.
            digests=save_to is not None or as_json,
        )
    if report["specs_folder"] in ("missing", "unreadable"):
        # A CI gate must not pass on a mistyped --specs: "0 generations" would.
        raise ConfigError(
            f"the specs folder {settings.specs_dir} is {report['specs_folder']} "
            "(--specs, or `specs` in the config)"
        )
    # Like Terraform, no plan is saved from specs that do not all read: the
    # invalid file's tracks would be missing from it, and apply would carry
    # out a plan nobody meant.
    saving = save_to is not None and not report["invalid_files"]
    if saving:
        from reconciler.applying import save_plan

        assert save_to is not None
        save_plan(report, settings, save_to)
    if as_json:
        _echo_json(report)
    else:
        # Colours only at a terminal, where rich is imported; lines are never
        # wrapped, so a pipe or a log keeps one line per item.
        if sys.stdout.isatty():
            from rich.console import Console

            render_plan(report, Console(soft_wrap=True))
        else:
            render_plan(report)
        if saving:
            click.echo(f"plan saved to {save_to}: `reconciler apply {save_to}` carries it out")
    if report["invalid_files"]:
        if save_to is not None:
            click.echo(f"plan not saved to {save_to}: fix the invalid spec files first", err=True)
        sys.exit(1)
    sys.exit(2 if report["changes"] else 0)


@main.command()
@common_options
@click.argument("plan_file", metavar="FILE", type=click.Path(path_type=Path, dir_okay=False))
@_exits_on_errors(1)
def apply(plan_file: Path, **opts: Any) -> None:
    """Carry out a plan saved with `plan --save FILE`, or refuse if it no longer holds.

    Exit 0 every planned generation ready; 1 otherwise, or when it refuses.
    """
    import asyncio

    from rich.console import Console

    from reconciler.applying import apply_plan

    settings = _settings(**opts)
    ok = asyncio.run(apply_plan(settings, plan_file, Console(stderr=True, soft_wrap=True)))
    sys.exit(0 if ok else 1)


@main.command()
@common_options
@max_credits_option("Check the plan against this run ceiling too, as sync/run would apply it.")
@click.option(
    "--live", is_flag=True, help="Also spend one generation (15 credits) on the real answers."
)
@click.option("--yes", is_flag=True, help="With --live: spend without asking.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=600.0,
    show_default=True,
    help="With --live: seconds to follow the generation before giving up.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("-v", "--verbose", is_flag=True, help="Log every event too (stderr).")
@_exits_on_errors(1)
def doctor(
    max_credits: int | None,
    live: bool,
    yes: bool,
    timeout: float,
    as_json: bool,
    verbose: bool,
    **opts: Any,
) -> None:
    """Preflight without spending; --live spends one generation on the real answers.

    Exit 0 when every check passes (warnings allowed), 1 otherwise.
    """
    import asyncio

    from reconciler.doctor import render_line, report_json, run_doctor, summary_line

    if live and not yes and not sys.stdin.isatty():
        # Refused before any request: a script must say --yes to spend.
        click.echo(
            "reconciler: doctor --live spends 15 credits and asks first; "
            "run it on a terminal, or pass --yes",
            err=True,
        )
        sys.exit(1)
    settings = _settings(max_credits=max_credits, **opts)
    if not verbose:
        from reconciler import logs

        # The report says what each log line would; keep stderr for errors.
        logs.configure("error")

    def confirm(statement: str) -> bool:
        if yes:
            click.echo(statement, err=True)
            return True
        return click.confirm(f"{statement} Continue?", default=False, err=True)

    def emit(check: Any) -> None:
        if not as_json:
            click.echo(render_line(check))

    report = asyncio.run(
        run_doctor(settings, live=live, follow_for=timeout, confirm=confirm, emit=emit)
    )
    if as_json:
        _echo_json(report_json(report))
    else:
        click.echo(summary_line(report))
    sys.exit(0 if report.passed else 1)


@main.command()
@folder_options
@click.option("--json", "as_json", is_flag=True, help="The stable JSON schema (see README).")
@click.option("-w", "--watch", is_flag=True, help="Refresh until Ctrl-C (exit 0).")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    help="Seconds between refreshes with --watch.",
)
@click.argument("selector", required=False, metavar="[SOUNDTRACK[/TRACK]]")
@_exits_on_errors(1)
def status(as_json: bool, watch: bool, interval: float, selector: str | None, **opts: Any) -> None:
    """Where every track stands. Exit 1 when something failed or is invalid."""
    # The report is a tree of dicts, lists and strings (three per track): a
    # fifth of the work at 50,000 tracks for the collector.
    _without_cyclic_gc()

    from reconciler.status import build_report, failed

    settings = _settings(**opts, logging=False)
    if watch:
        from reconciler.cli_tools import watch_status

        watch_status(settings, selector, as_json=as_json, interval=interval)
        return
    report = build_report(settings, time.time(), selector)
    if as_json:
        _echo_json(report)
    elif sys.stdout.isatty():
        # Colours and the terminal's width: rich, imported only for a terminal.
        from rich.console import Console

        from reconciler.status import render

        render(report, Console())
    else:
        from reconciler.status import render

        render(report)
    sys.exit(1 if failed(report) else 0)


@main.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--specs", type=click.Path(path_type=Path), help="Spec folder when no PATH is given.")
@click.option("--config", type=click.Path(path_type=Path, dir_okay=False), help="TOML config file.")
@_exits_on_errors(1)
def validate(paths: tuple[Path, ...], specs: Path | None, config: Path | None) -> None:
    """Check spec files. Exit 0 when all are valid, 1 otherwise."""
    from reconciler.specs import load_spec_file, scan_specs

    settings = load_settings(Flags(specs=specs, config=config))
    targets = list(paths) or [settings.specs_dir]
    problems: list[str] = []
    n_files = n_tracks = bad_files = 0
    for target in targets:
        if target.is_dir():
            scan = scan_specs(target, models=settings.models, limits=settings.field_limits)
            if scan.root_state != "ok":
                problems.append(f"{target}: spec folder is {scan.root_state}")
            n_files += len(scan.files) + len(scan.errors)
            n_tracks += sum(len(f.tracks) for f in scan.files.values())
            problems += [str(p) for e in scan.errors.values() for p in e.problems]
            bad_files += len(scan.errors)
        elif not target.exists():
            problems.append(f"{target}: no such file or folder")
        else:
            n_files += 1
            try:
                spec = load_spec_file(
                    target.parent,
                    target,
                    models=settings.models,
                    limits=settings.field_limits,
                    label_root=str(target.parent),
                )
                n_tracks += len(spec.tracks)
            except SpecError as exc:
                problems += [str(p) for p in exc.problems]
                bad_files += 1
    for line in problems:
        click.echo(line)
    if problems:
        where = f" in {plural(bad_files, 'file')}" if bad_files else ""
        click.echo(f"{plural(len(problems), 'problem')}{where}", err=True)
        sys.exit(1)
    click.echo(f"{plural(n_files, 'file')}, {plural(n_tracks, 'track')}: valid", err=True)


@main.command()
@click.argument("tracks", nargs=-1, metavar="SOUNDTRACK[/TRACK]...")
@click.option("--failed", "all_failed", is_flag=True, help="Re-arm every parked failure.")
@folder_options
@_exits_on_errors(1)
def retry(tracks: tuple[str, ...], all_failed: bool, **opts: Any) -> None:
    """Make parked failures eligible again (works while the daemon runs)."""
    from reconciler.ledger import Ledger, reports
    from reconciler.status import check_selector

    if not tracks and not all_failed:
        raise click.UsageError("name tracks (SOUNDTRACK/TRACK or SOUNDTRACK) or pass --failed")
    settings = _settings(**opts)
    ledger = Ledger.open(settings.ledger_target)
    try:
        fps: list[str] = ledger.parked_fingerprints() if all_failed else []
        if tracks:
            known: dict[str, set[str]] = {}
            for soundtrack, track_name in reports.track_names(ledger):
                known.setdefault(soundtrack, set()).add(track_name)
            for name in tracks:
                check_selector(known, name)
                st, _, track = name.partition("/")
                fps += ledger.track_fingerprints(st, track or None)
        n = ledger.retry(dict.fromkeys(fps))
    finally:
        ledger.close()
    click.echo(f"re-armed {plural(n, 'generation')}; the next pass submits them")
