"""The folder layout rule: specs, outputs and state in places that cannot hurt each other.

Where it sits: before anything else in ``sync``, ``run``, ``plan`` and
``status`` (and in each pass just before it submits). A generation is paid
for before its audio can be written, so nothing may be submitted while the
output folder cannot take it; and a folder nested in the specs folder would be
read as specs (``tracks.json``) or wake the daemon with its own writes. The
rule lives here once so every command says the same thing in the same words.
"""

from __future__ import annotations

import os
from pathlib import Path

from reconciler.errors import ConfigError


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or "/")


def _can_write(folder: Path) -> bool:
    # Creating and renaming entries needs write and search permission on the folder.
    return os.access(folder, os.W_OK | os.X_OK)


def _folder_problem(path: Path, what: str, flag: str, *, writable: bool) -> str | None:
    if path.exists():
        if not path.is_dir():
            return (
                f"the {what} folder {path} is a file, not a folder; "
                f"move the file away or choose another {what} folder ({flag})"
            )
        if writable and not _can_write(path):
            return (
                f"the {what} folder {path} is not writable by this user; "
                "fix its permissions, run as the user who owns it, "
                f"or choose another {what} folder ({flag})"
            )
        return None
    parent = _nearest_existing(path.absolute().parent)
    if writable and (not parent.is_dir() or not _can_write(parent)):
        return (
            f"the {what} folder {path} does not exist and cannot be created "
            f"({parent} is not a writable folder); create it, or choose another "
            f"{what} folder ({flag})"
        )
    return None


def check_layout(
    specs_dir: Path, out_dir: Path, state_dir: Path, *, writable: bool = True
) -> list[str]:
    """Every problem with where the three folders are, one plain sentence each.

    An empty list means the layout is fine. ``writable=False`` leaves out
    whether this user can write the output and state folders: ``status``
    runs as an operator who only reads, while the service user writes.
    """
    specs = specs_dir.resolve()
    out = out_dir.resolve()
    state = state_dir.resolve()
    problems: list[str] = []
    if out == specs:
        problems.append(
            f"the output folder {out_dir} and the specs folder {specs_dir} are the same folder; "
            "use two separate folders side by side (--out, or `out` in the config)"
        )
    elif _inside(out, specs):
        problems.append(
            f"the output folder {out_dir} is inside the specs folder {specs_dir}, so its "
            "tracks.json files would be read as specs; move it next to the specs folder "
            "(--out, or `out` in the config)"
        )
    elif _inside(specs, out):
        problems.append(
            f"the specs folder {specs_dir} is inside the output folder {out_dir}; "
            "keep the two folders side by side (--specs/--out, or `specs`/`out` in the config)"
        )
    if _inside(state, specs):
        problems.append(
            f"the state folder {state_dir} is inside the specs folder {specs_dir}, so the "
            "ledger's own writes would look like spec changes; move it out "
            "(--state, or `state` in the config)"
        )
    for path, what, flag in ((out_dir, "output", "--out"), (state_dir, "state", "--state")):
        problem = _folder_problem(path, what, flag, writable=writable)
        if problem:
            problems.append(problem)
    return problems


def require_layout(specs_dir: Path, out_dir: Path, state_dir: Path) -> None:
    """Refuse to start (``ConfigError``, one line per problem) unless the layout is fine."""
    problems = check_layout(specs_dir, out_dir, state_dir)
    if problems:
        raise ConfigError("\n".join(problems))
