"""The folder layout rule: one check, one plain message, in every command.

``check_layout`` is tested with real folders (table-driven); the commands
are tested as real CLI subprocesses against the sandbox, whose counters
prove that nothing was asked of the API before the refusal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from reconciler.layout import check_layout
from reconciler.sandbox import SandboxControl
from tests.project import Project, track

# (specs, out, state) relative to a fresh folder, and words each problem must contain.
CASES: list[tuple[str, str, str, list[str]]] = [
    ("specs", "tracks", "state", []),
    ("specs", "specs/tracks", "state", ["output folder", "inside the specs folder"]),
    ("specs", "specs", "state", ["same folder"]),
    ("tracks/specs", "tracks", "state", ["specs folder", "inside the output folder"]),
    ("specs", "tracks", "specs/.state", ["state folder", "inside the specs folder"]),
    ("specs", "a-file", "state", ["output folder", "is a file"]),
    ("specs", "a-file/tracks", "state", ["output folder", "cannot be created"]),
    ("specs", "tracks", "a-file", ["state folder", "is a file"]),
    ("specs", "tracks", "a-file/state", ["state folder", "cannot be created"]),
    ("specs", "new/deeper/tracks", "new/state", []),
]


@pytest.mark.parametrize(("specs", "out", "state", "expected"), CASES)
def test_check_layout_names_each_problem_once(
    tmp_path: Path, specs: str, out: str, state: str, expected: list[str]
) -> None:
    (tmp_path / "specs").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    problems = check_layout(tmp_path / specs, tmp_path / out, tmp_path / state)
    if not expected:
        assert problems == []
        return
    assert len(problems) == 1, problems
    for words in expected:
        assert words in problems[0]
    assert "law" not in problems[0]


def test_check_layout_lists_every_problem(tmp_path: Path) -> None:
    (tmp_path / "specs").mkdir()
    problems = check_layout(tmp_path / "specs", tmp_path / "specs/out", tmp_path / "specs/st")
    assert len(problems) == 2
    assert all(str(tmp_path / "specs") in p for p in problems)


def test_status_layout_check_leaves_out_permissions(tmp_path: Path) -> None:
    """An operator who may only read still sees a nesting problem, never a permission one."""
    (tmp_path / "specs").mkdir()
    (tmp_path / "a-file").write_text("")
    assert (
        check_layout(
            tmp_path / "specs", tmp_path / "a-file/x", tmp_path / "a-file/y", writable=False
        )
        == []
    )
    assert check_layout(tmp_path / "specs", tmp_path / "specs/x", tmp_path / "st", writable=False)


@pytest.fixture
def project(tmp_path: Path, sandbox: SandboxControl) -> Project:
    p = Project(tmp_path, sandbox)
    p.write_spec("study.yaml", [track("focus", "lofi beats")])
    return p


def api_requests(p: Project) -> int:
    s = p.stats()
    return int(s["batch_submit_calls"] + s["create_calls"] + s["credit_calls"] + s["batch_polls"])


@pytest.mark.parametrize(
    ("flag", "where"),
    [("--out", "specs/tracks"), ("--out", "a-file"), ("--state", "specs/state")],
)
def test_sync_run_and_plan_refuse_a_bad_layout_before_any_request(
    project: Project, flag: str, where: str
) -> None:
    (project.root / "a-file").write_text("not a folder")
    path = str(project.root / where)
    for command in ("sync", "run", "plan"):
        proc = project.cli(command, flag, path, timeout=30)
        assert proc.returncode == 1, (command, proc.stderr)
        first = proc.stderr.strip().splitlines()[0]
        assert first.startswith("reconciler: the "), first
        assert path in first
        assert "law" not in proc.stderr
    assert api_requests(project) == 0
    assert not list(project.root.rglob("*.mp3"))


def test_status_reports_layout_problems_and_exits_1(project: Project) -> None:
    project.sync()
    inner = str(project.specs / "tracks")
    proc = project.cli("status", "--json", "--out", inner)
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert len(report["layout_problems"]) == 1
    assert "inside the specs folder" in report["layout_problems"][0]
    text = project.cli("status", "--out", inner)
    assert text.returncode == 1
    assert "inside the specs folder" in " ".join(text.stdout.split())
    fine = project.cli("status", "--json")
    assert fine.returncode == 0
    assert json.loads(fine.stdout)["layout_problems"] == []


def test_specs_dot_with_the_output_inside_never_reads_tracks_json(project: Project) -> None:
    """The first-day report: `sync --specs .` with the output folder inside it."""
    proc = project.cli("sync", "--specs", str(project.root), "--out", str(project.out))
    assert proc.returncode == 1
    assert "inside the specs folder" in proc.stderr
    assert api_requests(project) == 0
