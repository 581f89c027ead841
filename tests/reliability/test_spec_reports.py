"""Spec reading rules the bad-input suite found wanting, pinned down in process.

``test_bad_input.py`` drops files into a running daemon; these are the two
rules behind its failures, checked directly on ``scan_specs`` and
``parse_spec``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.errors import SpecError
from reconciler.specs import parse_spec, scan_specs

BODY = "defaults:\n  mv: sonic-v5\ntracks:\n  - name: a\n    gpt_description_prompt: {}\n"


def test_a_newcomer_naming_a_soundtrack_is_the_duplicate(tmp_path: Path) -> None:
    (tmp_path / "keep.yaml").write_text("soundtrack: keep\n" + BODY.format("mine"))
    first = scan_specs(tmp_path)
    assert set(first.files) == {"keep.yaml"}
    (tmp_path / "aaa.yaml").write_text("soundtrack: keep\n" + BODY.format("theirs"))
    # Without history the first by path wins; with it, the file that had it.
    assert set(scan_specs(tmp_path).errors) == {"keep.yaml"}
    later = scan_specs(tmp_path, reuse=first.files)
    assert set(later.files) == {"keep.yaml"}
    assert list(later.errors) == ["aaa.yaml"]
    error = str(later.errors["aaa.yaml"])
    assert error.startswith(f"{tmp_path.name}/aaa.yaml:1 soundtrack: ")
    assert "already defined by" in error


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("unknown.json", b'{"tracks": [{"name": "a", "x\\ny\\u2028z": 1}]}'),
        ("duplicate.json", b'{"tracks": [], "a\\nb": 1, "a\\nb": 2}'),
        ("duplicate.yaml", b'tracks: []\n"a\\nb": 1\n"a\\nb": 2\n'),
        ("nested.yaml", b'tracks:\n  - name: a\n    "p\\rq": 1\n'),
    ],
)
def test_each_problem_stays_on_one_line(name: str, data: bytes) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(f"specs/{name}", data, path=name)
    lines = str(caught.value).splitlines()
    assert len(lines) == len(caught.value.problems), lines
    assert all(line.startswith(f"specs/{name}:") for line in lines), lines


def test_a_file_name_with_a_newline_stays_on_one_line(tmp_path: Path) -> None:
    (tmp_path / "new\nline.yaml").write_text("soundtrack: fine\ntracks: 3\n")
    error = str(scan_specs(tmp_path).errors["new\nline.yaml"])
    assert error.splitlines() == [error]
    assert error.startswith(repr(f"{tmp_path.name}/new\nline.yaml") + ":2 tracks:")
