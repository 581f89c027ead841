"""Spec reading rules the bad-input suite found wanting, pinned down in process.

``test_bad_input.py`` drops files into a running daemon; the rules behind
its failures are checked here directly on ``scan_specs``.
"""

from __future__ import annotations

from pathlib import Path

from reconciler.specs import scan_specs

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
