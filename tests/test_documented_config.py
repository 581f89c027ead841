"""The defaults the README's config block and the example config show are the code's.

Each field states its default once (config.py); these listings restate them
for people, so they are read here, as text, and compared key by key.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from reconciler.config_file import SECTIONS, TOP, default

ROOT = Path(__file__).resolve().parent.parent
_SECTION = re.compile(r"^(?:# )?\[([\w.-]+)\]\s*(?:#.*)?$")
_KEY = re.compile(r"^(?:# )?(\w+) = (.+)$")
#: A comment's ``Default: <value>`` where the line below shows another value.
_STATED = re.compile(r"Default: (\"[^\"]*\"|[\d.]+)")


def documented(text: str) -> dict[tuple[str, str], object]:
    """(section, key) → the value a config listing shows, commented-out keys too.

    Where the comment above a key says ``Default: <value>``, that value is the
    documented default rather than the one the line sets.
    """
    found: dict[tuple[str, str], object] = {}
    section, notes = "", ""
    for line in (raw.strip() for raw in text.splitlines()):
        if heading := _SECTION.match(line):
            section, notes = heading.group(1), ""
        elif key := _KEY.match(line):
            stated = _STATED.search(notes)
            value = stated.group(1) if stated else key.group(2)
            found[section, key.group(1)] = tomllib.loads(f"v = {value}")["v"]
            notes = ""
        elif line.startswith("#"):
            notes += line
    return found


def readme_config() -> str:
    readme = (ROOT / "README.md").read_text()
    configuration = readme[readme.index("## Configuration") :]
    return configuration.split("```toml\n", 1)[1].split("```", 1)[0]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(readme_config(), id="README"),
        pytest.param((ROOT / "systemd" / "reconciler.toml").read_text(), id="systemd-example"),
    ],
)
def test_the_documented_config_shows_every_default_the_code_has(text: str) -> None:
    """Each key the README's config block and the example config show is one the
    file accepts; each with a default in the code shows that default (a key
    without one, like ``daily_budget`` or ``[webhook] listen``, shows an example);
    and no key with a default is left out. ``[limits.<model>]`` overrides the
    per-model table, whose values the README gives in prose."""
    shown = {k: v for k, v in documented(text).items() if not k[0].startswith("limits.")}
    schema = {("", key): check for key, (check, _) in TOP.items()}
    for section, table in SECTIONS.items():
        schema |= {(section, key): check for key, (check, _) in table.items()}
    assert sorted(set(shown) - set(schema)) == []
    wrong = {
        f"{section}.{key}".lstrip("."): (value, default(section, key))
        for (section, key), value in shown.items()
        if default(section, key) is not None
        and schema[section, key](value) != default(section, key)
    }
    assert wrong == {}
    missing = [k for k in schema if default(*k) is not None and k not in shown]
    assert missing == []
