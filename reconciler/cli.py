"""Command-line entry point (stub while the package is assembled)."""

import click

from reconciler.sandbox.cli import sandbox


@click.group()
def main() -> None:
    """Make a folder of generated music converge to a folder of spec files."""


main.add_command(sandbox)
