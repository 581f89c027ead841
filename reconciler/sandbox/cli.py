"""``reconciler sandbox``: serve the MusicAPI emulator until SIGTERM or SIGINT.

The thin click layer over :class:`~reconciler.sandbox.server.SandboxServer`:
flags become a :class:`~reconciler.sandbox.config.SandboxConfig`, the server
runs in this process's event loop, and the only thing written to stdout is
the base URL, one line, once the port is listening, so a script can read it
and start talking. The main CLI mounts this command with
``main.add_command(sandbox)``.
"""

from __future__ import annotations

import asyncio
import signal
import tomllib
from dataclasses import replace
from pathlib import Path

import click

from reconciler.sandbox.config import SandboxConfig
from reconciler.sandbox.faults import FaultProfile, FaultProfileError, FaultRule
from reconciler.sandbox.server import SandboxServer
from reconciler.sandbox.shapes import SHAPES, parse_shapes


def _rule(number: int, text: str) -> FaultRule:
    where = f"--fault #{number}"
    try:
        table = tomllib.loads(f"rule = {text}")["rule"]
    except tomllib.TOMLDecodeError as exc:
        raise FaultProfileError(f"{where}: not a TOML inline table: {exc}") from exc
    return FaultRule.from_mapping(table, where)


def _profile(
    faults_file: Path | None, rules: tuple[str, ...], batch_disabled: str | None
) -> FaultProfile:
    """The profile file (if any), with ``--fault`` rules appended and flags applied."""
    profile = FaultProfile.from_toml(faults_file) if faults_file else FaultProfile()
    extra = tuple(_rule(number, text) for number, text in enumerate(rules, 1))
    return replace(
        profile,
        faults=profile.faults + extra,
        batch_disabled=int(batch_disabled) if batch_disabled else profile.batch_disabled,
    )


async def _serve(config: SandboxConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with SandboxServer(config) as server:
        click.echo(server.base_url)  # click.echo flushes: the reader is waiting for this line
        await stop.wait()


@click.command("sandbox")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Port to listen on; 0 picks a free one.",
)
@click.option(
    "--latency",
    type=click.FloatRange(min=0),
    default=3.0,
    show_default=True,
    help="Generation time in seconds, from submit to the first finished clip.",
)
@click.option(
    "--clip-stagger",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Seconds the second clip of a task finishes after the first.",
)
@click.option(
    "--key", default="sandbox-key", show_default=True, help="The bearer key clients must send."
)
@click.option(
    "--credits",
    type=click.IntRange(min=0),
    default=100_000,
    show_default=True,
    help="Starting credit balance (a task costs 15).",
)
@click.option(
    "--faults",
    "faults_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Fault profile (TOML) to inject.",
)
@click.option(
    "--fault",
    "fault_rules",
    multiple=True,
    metavar="TABLE",
    help="One more fault rule as a TOML inline table: '{kind = \"rate_limited\", rate = 0.1}'.",
)
@click.option(
    "--batch-disabled",
    type=click.Choice(["404", "405"]),
    help="Answer /sonic/batch like a deployment without it.",
)
@click.option(
    "--shapes",
    "shape_names",
    multiple=True,
    metavar="NAME[,NAME...]",
    help=f"Answer in these shape profiles (repeatable): {', '.join(SHAPES)}.",
)
@click.option(
    "--seed",
    type=int,
    default=None,
    show_default="fresh ids per start",
    help="Seed for ids, audio and faults; ids repeat from one start to the next.",
)
def sandbox(
    *,
    host: str,
    port: int,
    latency: float,
    clip_stagger: float,
    key: str,
    credits: int,
    faults_file: Path | None,
    fault_rules: tuple[str, ...],
    batch_disabled: str | None,
    shape_names: tuple[str, ...],
    seed: int | None,
) -> None:
    """Serve the MusicAPI emulator and print its base URL; stop on SIGTERM or SIGINT."""
    try:
        profile = _profile(faults_file, fault_rules, batch_disabled)
    except FaultProfileError as exc:
        raise click.BadParameter(str(exc), param_hint="--faults/--fault") from exc
    try:
        shapes = parse_shapes(shape_names, "--shapes")
    except FaultProfileError as exc:
        raise click.UsageError(str(exc)) from exc  # the message already names --shapes
    config = SandboxConfig(
        host=host,
        port=port,
        latency=latency,
        clip_stagger=clip_stagger,
        key=key,
        credits=credits,
        faults=profile,
        seed=seed,
        shapes=shapes,
    )
    try:
        asyncio.run(_serve(config))
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from exc
