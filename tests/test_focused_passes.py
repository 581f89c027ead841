"""Passes that cost what changed: a focused pass reads only the files it is told
changed, looks only at their soundtracks and at those with work left, and does
for them what a full pass does; the full pass catches whatever it was not told.

The scan is checked against a full scan of the same folder (pure, real files).
The passes run in process against the real sandbox and a real SQLite ledger,
so what a pass read and did is seen in its result, the ledger and the sandbox's
books; the daemon test runs ``reconciler run`` as a process and reads its log.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from itertools import groupby
from pathlib import Path

import pytest

from reconciler.config import Flags, load_settings
from reconciler.ledger import Ledger, spec_columns
from reconciler.ledger.work import file_tracks_from_json, last_good_from_row
from reconciler.musicapi import MusicAPI
from reconciler.planning import Desired, DesiredTrack, desired_state, file_tracks
from reconciler.reconciling import Focus, PassResult, Reconciler, converge, wait_for_due
from reconciler.sandbox import SandboxControl
from reconciler.specs import SpecScan, scan_specs
from tests.daemonproc import DaemonProc, daemon_project, stopped_within
from tests.project import Project, track, wait_until


def spec(name: str, *prompts: str, soundtrack: str | None = None) -> str:
    head = f"soundtrack: {soundtrack}\n" if soundtrack else ""
    body = "".join(
        f"  - name: t{i}\n    gpt_description_prompt: {p}\n" for i, p in enumerate(prompts)
    )
    return f"{head}defaults:\n  mv: sonic-v5\ntracks:\n{body}"


# -- the scan -----------------------------------------------------------------------------

START = {
    "a.yaml": spec("a", "harp"),
    "b.yaml": spec("b", "oboe"),
    "sub/c.yaml": spec("c", "tuba"),
    "bad.yaml": "tracks: [",
}

#: (what happens, the files written or deleted (None), the paths the watcher names)
CHANGES = [
    ("edit", {"b.yaml": spec("b", "oboe and strings")}, {"b.yaml"}),
    ("new file", {"d.yaml": spec("d", "flute")}, {"d.yaml"}),
    ("deleted file", {"a.yaml": None}, {"a.yaml"}),
    ("file in a subfolder", {"sub/c.yaml": spec("c", "tuba", "horn")}, {"sub/c.yaml"}),
    ("invalid file fixed without an event", {"bad.yaml": spec("bad", "kazoo")}, set()),
    ("valid file broken", {"b.yaml": "tracks: ["}, {"b.yaml"}),
    (
        "new file claims a soundtrack",
        {"e.yaml": spec("e", "gong", soundtrack="a")},
        {"e.yaml"},
    ),
    ("temp file named", {"a.yaml.swp": "junk"}, {"a.yaml.swp"}),
]


def summary(scan: SpecScan) -> tuple[object, ...]:
    return (
        scan.root_state,
        {p: (f.soundtrack, f.digest) for p, f in scan.files.items()},
        {p: str(e) for p, e in scan.errors.items()},
    )


@pytest.mark.parametrize(("what", "writes", "named"), CHANGES, ids=[c[0] for c in CHANGES])
def test_a_scan_of_the_changed_files_equals_a_full_scan(
    tmp_path: Path, what: str, writes: dict[str, str | None], named: set[str]
) -> None:
    for rel, text in START.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    before = scan_specs(tmp_path)
    for rel, text in writes.items():
        if text is None:
            (tmp_path / rel).unlink()
        else:
            (tmp_path / rel).write_text(text)
    reuse = dict(before.files)
    focused = scan_specs(tmp_path, reuse=reuse, changed=named, last_scan=before)
    assert summary(focused) == summary(scan_specs(tmp_path, reuse=reuse))


def test_a_file_changed_without_being_named_keeps_its_last_scan(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(spec("a", "harp"))
    (tmp_path / "b.yaml").write_text(spec("b", "oboe"))
    before = scan_specs(tmp_path)
    (tmp_path / "b.yaml").write_text(spec("b", "bassoon"))
    focused = scan_specs(tmp_path, changed={"a.yaml"}, last_scan=before)
    assert focused.files["b.yaml"] is before.files["b.yaml"], "b.yaml was not read"


# -- passes in process -------------------------------------------------------------------


@asynccontextmanager
async def reconciler(project: Project) -> AsyncIterator[Reconciler]:
    settings = load_settings(
        Flags(
            specs=project.specs,
            out=project.out,
            state=project.state,
            config=project.config,
            api_url=project.sandbox.base_url,
        ),
        env={"MUSICAPI_KEY": project.sandbox.key},
    )
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger.open(settings.ledger_target)
    try:
        async with MusicAPI(settings.api_url, settings.require_key()) as api:
            yield Reconciler(settings, ledger, api)
    finally:
        ledger.close()


async def focused_until_converged(rec: Reconciler, focus: Focus) -> list[PassResult]:
    """Passes as the daemon runs them between rescans: the first told what changed,
    the next ones told nothing (only work left brings them to a soundtrack)."""
    results = []
    for _ in range(60):
        results.append(await rec.run_pass(focus))
        focus = Focus()
        if results[-1].converged:
            return results
        await wait_for_due(rec, results[-1], asyncio.Event(), max_wait=0.5)
    raise AssertionError(f"not converged in focused passes: {results[-1]}")


def rows(project: Project, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(project.state / "ledger.sqlite3") as db:
        return db.execute(sql).fetchall()


def track_fingerprints(project: Project) -> dict[str, str]:
    return {
        f"{s}/{n}": fp
        for s, n, fp in rows(project, "SELECT soundtrack, name, fingerprint FROM tracks")
    }


@pytest.fixture
def project(tmp_path: Path, sandbox: SandboxControl) -> Project:
    project = Project(tmp_path, sandbox)
    project.write_spec("a.yaml", [track("t0", "harp"), track("t1", "lute")])
    project.write_spec("b.yaml", [track("t0", "oboe")])
    project.write_spec("c.yaml", [track("t0", "tuba")])
    return project


def test_a_focused_pass_converges_the_saved_file_and_reads_no_other(project: Project) -> None:
    asyncio.run(saved_file(project))


async def saved_file(project: Project) -> None:
    async with reconciler(project) as rec:
        assert (await converge(rec)).converged
        fps = track_fingerprints(project)
        audio = {rel: project.audio_sha256(rel) for rel in ("b/t0.mp3", "c/t0.mp3")}
        # Both change on disk; the watcher named only b.yaml.
        project.write_spec("b.yaml", [track("t0", "oboe and strings")])
        project.write_spec("c.yaml", [track("t0", "tuba and drums")])

        results = await focused_until_converged(rec, Focus(specs=frozenset({"b.yaml"})))
        first = results[0]
        assert (first.scope, first.specs_read, first.tracks_checked) == ("changed", 1, 1)
        assert all(r.scope == "changed" and r.total == 4 for r in results)
        assert results[-1].ready == 4
        now = track_fingerprints(project)
        assert now["b/t0"] != fps["b/t0"]
        assert {k: v for k, v in now.items() if k != "b/t0"} == {
            k: v for k, v in fps.items() if k != "b/t0"
        }, "c.yaml was not read, and a.yaml's tracks were not touched"
        assert project.audio_sha256("b/t0.mp3") != audio["b/t0.mp3"]
        assert project.audio_sha256("c/t0.mp3") == audio["c/t0.mp3"]
        assert project.stats()["tasks_created"] == 5

        # The full pass (the daemon's periodic rescan) catches what no one named.
        full = await converge(rec)
        assert full.scope == "full"
        assert full.converged
        assert project.audio_sha256("c/t0.mp3") != audio["c/t0.mp3"]
        assert project.stats()["tasks_created"] == 6


def test_deleted_outputs_come_back_in_the_pass_that_names_their_soundtrack(
    project: Project,
) -> None:
    asyncio.run(deleted_outputs(project))


async def deleted_outputs(project: Project) -> None:
    async with reconciler(project) as rec:
        assert (await converge(rec)).converged
        before = project.files()
        for rel in ("a/t1.mp3", "c/t0.mp3"):
            (project.out / rel).unlink()
        restored = await rec.run_pass(Focus(soundtracks=frozenset({"a"})))
        assert (restored.scope, restored.tracks_checked, restored.restored) == ("changed", 2, 1)
        assert project.files()["a/t1.mp3"][0] == before["a/t1.mp3"][0]
        assert not (project.out / "c" / "t0.mp3").exists(), "c was not looked at"
        full = await rec.run_pass()
        assert full.restored == 1
        assert project.files()["c/t0.mp3"][0] == before["c/t0.mp3"][0]
        assert project.stats()["tasks_created"] == 4, "restored from the cache"


def test_a_removed_file_prunes_its_outputs_in_a_focused_pass(project: Project) -> None:
    asyncio.run(removed_file(project))


async def removed_file(project: Project) -> None:
    async with reconciler(project) as rec:
        rec.settings = replace(rec.settings, prune=True)
        assert (await converge(rec)).converged
        (project.specs / "b.yaml").unlink()
        result = await rec.run_pass(Focus(specs=frozenset({"b.yaml"})))
        # The track and the soundtrack's two lists.
        assert (result.scope, result.pruned, result.total, result.ready) == ("changed", 3, 3, 3)
        assert not (project.out / "b" / "t0.mp3").exists()
        assert (project.out / "a" / "t0.mp3").exists()
        assert "b" not in {s for s, _ in rows(project, "SELECT soundtrack, name FROM tracks")}


# -- the daemon ----------------------------------------------------------------------------


def passes_after(d: DaemonProc, mark: int) -> Callable[[], list[dict[str, object]]]:
    return lambda: [e for e in d.events()[mark:] if e.get("event") == "pass.completed"]


def test_the_daemon_reads_only_the_saved_file(tmp_path: Path, sandbox: SandboxControl) -> None:
    project = daemon_project(tmp_path, sandbox)
    for name in ("a", "b", "c"):
        project.write_spec(f"{name}.yaml", [track("t0", f"{name} one"), track("t1", f"{name} two")])
    with DaemonProc(project) as d:
        d.converged()
        d.wait_event("pass.completed", lambda e: e["ready"] == 6 and e["in_flight"] == 0)
        mark = d.mark()
        events = rows(project, "SELECT max(id) FROM events")[0][0]
        path = project.specs / "b.yaml"
        path.write_text(path.read_text().replace("b two", "b two, louder"))
        d.wait_event(
            "pass.completed", lambda e: e["ready"] == 6 and e["in_flight"] == 0, after=mark
        )
        seen = passes_after(d, mark)()
        assert seen[0]["scope"] == "changed"
        assert (seen[0]["specs_read"], seen[0]["tracks_checked"]) == (1, 2)
        touched = rows(
            project,
            f"SELECT DISTINCT soundtrack FROM events WHERE id > {events} "
            "AND soundtrack IS NOT NULL",
        )
        assert touched == [("b",)]
        assert project.stats()["tasks_created"] == 7
        stopped_within(d, 5)


def test_a_folder_event_makes_the_next_pass_full(tmp_path: Path, sandbox: SandboxControl) -> None:
    project = daemon_project(tmp_path, sandbox)
    project.write_spec("a.yaml", [track("t0", "harp")])
    with DaemonProc(project) as d:
        d.converged()
        d.wait_event("pass.completed", lambda e: e["ready"] == 1 and e["in_flight"] == 0)
        mark = d.mark()
        (project.specs / "more").mkdir()
        project.write_spec("more/b.yaml", [track("t0", "oboe")])
        d.converged()
        wait_until(passes_after(d, mark), 10, "a pass")
        assert passes_after(d, mark)()[0]["scope"] == "full"
        assert os.path.exists(project.out / "b" / "t0.mp3")
        stopped_within(d, 5)


@pytest.mark.parametrize(
    ("sizes", "part", "expected"),
    [
        ([3, 2, 4], 1, [[3], [2], [4]]),
        ([3, 2, 4], 4, [[3, 2], [4]]),
        ([3, 2, 4], 100, [[3, 2, 4]]),
        ([1] * 5, 2, [[1, 1], [1, 1], [1]]),
        ([], 2, []),
    ],
)
def test_a_pass_writes_outputs_in_parts_of_whole_soundtracks(
    sizes: list[int], part: int, expected: list[list[int]]
) -> None:
    """The full pass reads and writes a part at a time; a soundtrack is never split
    (its lists are written from all its tracks)."""
    tracks = tuple(
        DesiredTrack(f"s{s}", f"t{i}", f"fp{s}-{i}", 1, f"s{s}.yaml", i)
        for s, n in enumerate(sizes)
        for i in range(n)
    )
    parts = list(Desired(tracks=tracks, requests={}).parts(part))
    shape = [[len(list(g)) for _, g in groupby(p.tracks, lambda t: t.soundtrack)] for p in parts]
    assert shape == expected
    assert tuple(t for p in parts for t in p.tracks) == tracks


def test_a_last_good_version_reads_back_as_the_tracks_it_was_built_from(
    tmp_path: Path,
) -> None:
    """A new process takes the fingerprints and tracks from the ledger instead
    of hashing every track again, and decodes the requests only when asked."""
    # Every field a track record carries set apart from its default, so a
    # field read into the wrong place shows.
    extra = "    variant: 3\n    clips: 2\n    album: Night Moves\n    artist: The Reconcilers\n"
    (tmp_path / "a.yaml").write_text(spec("a", "harp", "lute", "oboe") + extra)
    parsed = scan_specs(tmp_path).files["a.yaml"]
    assert parsed.tracks[-1].artist == "The Reconcilers"
    built = file_tracks("a.yaml", parsed)
    body, tracks = spec_columns(parsed)
    for read in (
        last_good_from_row("a.yaml", parsed.soundtrack, parsed.digest, tracks, body),
        # A row written before the compact tracks were: from the body alone.
        last_good_from_row("a.yaml", parsed.soundtrack, parsed.digest, None, body),
    ):
        assert read.tracks == built.tracks
        assert read.requests == built.requests
        assert read.spec == parsed
    # A body stored before fingerprints were is hashed when read.
    old = json.loads(body)
    for t in old["tracks"]:
        del t["fingerprint"]
    read = file_tracks_from_json("a.yaml", json.dumps(old))
    assert read.tracks == built.tracks


def test_the_compact_tracks_decode_no_request_until_one_is_asked_for(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(spec("a", "harp", "lute"))
    parsed = scan_specs(tmp_path).files["a.yaml"]
    _, tracks = spec_columns(parsed)
    # A body that cannot be decoded shows whether anything decoded it.
    read = last_good_from_row("a.yaml", "a", parsed.digest, tracks, "not json")
    desired = desired_state({"a.yaml": read.spec}, [], "ok", {}, {"a.yaml": read})
    assert [t.name for t in desired.tracks] == ["t0", "t1"]
    with pytest.raises(json.JSONDecodeError):
        desired.requests[desired.tracks[0].fingerprint]


def test_last_good_versions_an_older_reconciler_stored_get_compact_tracks_once(
    tmp_path: Path,
) -> None:
    (tmp_path / "a.yaml").write_text(spec("a", "harp", "lute"))
    parsed = scan_specs(tmp_path).files["a.yaml"]
    ledger = Ledger.open(tmp_path / "ledger.sqlite3")
    try:
        ledger.record_specs({"a.yaml": parsed}, {}, complete=True)
        columns = spec_columns(parsed)
        old = json.loads(columns[0])
        for t in old["tracks"]:
            del t["fingerprint"]
        ledger.db.execute("UPDATE spec_files SET body = ?, tracks = NULL", [json.dumps(old)])
        built = ledger.last_good_tracks()
        ledger.store_compact_tracks(built)
        assert ledger.db.execute("SELECT body, tracks FROM spec_files").fetchone() == columns
        assert ledger.last_good_tracks()["a.yaml"].tracks == built["a.yaml"].tracks
    finally:
        ledger.close()
