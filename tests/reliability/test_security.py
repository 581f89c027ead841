"""Security: the key stays secret through a faulty run, and no write leaves the output folder.

- The API key and the webhook secret never appear in the daemon's log, the
  output of any command (``status``, ``plan``, ``validate``, a ``sync``
  refused with 401), the ledger's bytes (database, WAL and shared-memory
  files of a daemon killed with SIGKILL, so the WAL is not checkpointed),
  the cache or the outputs, after a run under every kind of fault.
- Output paths: names that try to leave the output folder are refused
  before anything is written; symlinks planted in the output folder,
  pointing outside it, are never written through (an audio file, the
  playlist, ``tracks.json``, and a whole soundtrack folder), and a link put
  over a file that was already written is replaced, not followed.

Covered elsewhere, not repeated here: forged, stale, replayed and oversized
webhooks against a running daemon (``tests/test_webhooks.py``), and the unit
file's exposure score (``tests/test_systemd.py``; 1.1 with systemd 252).
"""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.sandbox import SandboxControl
from tests.daemonproc import DaemonProc, daemon_project, free_port
from tests.project import Project, track, wait_until
from tests.reliability.support import Figures, assert_outputs_whole, integrity

SECRET = "whsec-security-93c4e1"
WRONG_KEY = "sk-live-Wr0ngKeyThatMustNotLeak"


def faults() -> list[dict[str, object]]:
    """Faults whose error paths carry request details: 5xx pages, resets, drops, bad audio."""
    return [
        {"kind": "server_error", "rate": 0.1, "status": 502},
        {"kind": "server_error", "rate": 0.05, "status": 500, "body": "empty"},
        {"kind": "connection_reset", "every": 7},
        {"kind": "rate_limited", "rate": 0.05, "retry_after": 0.2},
        {"kind": "drop_response", "every": 2},
        {"kind": "reject", "at": [2], "type": "bad_request", "error": "prompt: rejected upstream"},
        {"kind": "task_failed", "rate": 0.2},
        {"kind": "audio_expired", "rate": 0.2},
        {"kind": "audio_truncated", "rate": 0.1},
        {"kind": "webhook_bad_signature", "rate": 0.3},
    ]


def test_key_and_secret_never_leak_through_a_faulty_run(
    tmp_path: Path, sandbox: SandboxControl, figures: Figures
) -> None:
    port = free_port()
    hook = (
        f'\n[webhook]\nlisten = "127.0.0.1:{port}"\npublic_url = "http://127.0.0.1:{port}"\n'
        f'secret = "{SECRET}"\n'
    )
    p = daemon_project(tmp_path, sandbox, grace=2.0, extra=hook)
    p.write_spec("sec.yaml", [track(f"s{i}", f"secret keeper {i}") for i in range(12)])
    sandbox.configure(faults=faults())
    with DaemonProc(p) as d:

        def settled() -> bool:
            d.assert_running()
            summary = p.status()["summary"]
            return bool(summary["ready"] + summary["failed"] == 12)

        # The daemon's own count first, from its log (no process per look),
        # then what status says.
        d.wait_event("pass.completed", lambda e: e["ready"] + e["parked"] == 12, timeout=90)
        wait_until(settled, 30, "every track ready or parked")
        # Killed, not stopped: the WAL keeps the last writes un-checkpointed.
        d.send(signal.SIGKILL)
        assert d.proc is not None
        d.proc.wait(timeout=10)
    fired = p.stats()["faults_fired"]
    assert {"server_error", "connection_reset", "drop_response", "reject"} <= set(fired)
    wal = p.state / "ledger.sqlite3-wal"
    assert wal.exists(), "the kill left no WAL to look into"
    wal_bytes = wal.stat().st_size
    assert wal_bytes > 0
    # As the kill left them: the commands below check the WAL back in.
    killed = {f"{f} (as killed)": f.read_bytes() for f in sorted(p.state.rglob("*")) if f.is_file()}
    # The search below can find things: the prompts are there in plain text.
    assert b"secret keeper 3" in killed[f"{wal} (as killed)"]

    # A run with a wrong key: every call answers 401, which is logged with its reason.
    p.write_spec("more.yaml", [track("m", "more secrets")])
    sandbox.configure(faults=[])
    env = {**p.env(), "MUSICAPI_KEY": WRONG_KEY}
    refused = subprocess.run(
        [*p.args("sync")], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert refused.returncode == 1
    assert "401" in refused.stderr

    texts = {
        "daemon log": d.log_text(),
        "sync with a wrong key": refused.stdout + refused.stderr,
    }
    for command in (["status"], ["status", "--json"], ["plan"], ["plan", "--json"]):
        proc = p.cli(*command)
        texts[" ".join(command)] = proc.stdout + proc.stderr
    texts["validate"] = validate(p).stdout
    assert "rejected upstream" in texts["status --json"]  # the run did fail somewhere
    files = {
        str(f): f.read_bytes()
        for root in (p.state, p.out)
        for f in sorted(root.rglob("*"))
        if f.is_file()
    }
    files.update(killed)
    for secret in (sandbox.key, WRONG_KEY, SECRET):
        for what, text in texts.items():
            assert secret not in text, f"{secret!r} in {what}"
        for name, content in files.items():
            assert secret.encode() not in content, f"{secret!r} in {name}"
    figures.record(
        "security",
        "secrets",
        texts=len(texts),
        files=len(files),
        wal_bytes=wal_bytes,
        faults_fired=fired,
    )


def validate(p: Project) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "reconciler", "validate", "--specs", str(p.specs)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


# -- output paths --------------------------------------------------------------------------------


def digest_tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def project(tmp_path: Path, sandbox: SandboxControl) -> Project:
    return Project(tmp_path, sandbox)


ESCAPES = [
    ("dotdot.yaml", "soundtrack: ..\n", "soundtrack"),
    ("up.yaml", "soundtrack: ../up\n", "soundtrack"),
    ("abs.yaml", "soundtrack: /etc\n", "soundtrack"),
    ("name-up.yaml", "tracks:\n  - name: ../../x\n    prompt: x\n", "name"),
    ("name-abs.yaml", "tracks:\n  - name: /tmp/x\n    prompt: x\n", "name"),
    ("name-dot.yaml", "tracks:\n  - name: .hidden\n    prompt: x\n", "name"),
]


def test_names_that_leave_the_output_folder_are_refused(project: Project) -> None:
    before = digest_tree(project.root)
    for rel, head, _ in ESCAPES:
        body = head if "tracks" in head else head + "tracks:\n  - name: a\n    prompt: x\n"
        (project.specs / rel).write_text("defaults:\n  mv: sonic-v5\n" + body)
    proc = validate(project)
    assert proc.returncode == 1
    for rel, _, field in ESCAPES:
        assert re.search(rf"specs/{re.escape(rel)}:\d+ \S*{field}", proc.stdout), rel
    project.sync(expect=1)
    assert project.stats()["tasks_created"] == 0
    after = digest_tree(project.root)
    # The folder's ledger marker (ownership.MARKER) is bookkeeping, not a track.
    written = {
        k
        for k in after
        if k not in before
        and not k.startswith(("state/", "specs/"))
        and k != "tracks/.reconciler-ledger"
    }
    assert written == set(), written


def test_symlinks_in_the_output_folder_are_never_written_through(
    project: Project, tmp_path: Path, figures: Figures
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    victims = {name: outside / name for name in ("victim.mp3", "victim.m3u8", "victim.json")}
    for path in victims.values():
        path.write_bytes(b"precious, not reconciler's\n")
    before = digest_tree(outside)

    sec = project.out / "sec"
    sec.mkdir(parents=True)
    (sec / "a.mp3").symlink_to(victims["victim.mp3"])
    (sec / "b.mp3").symlink_to(outside / "dangling-target.mp3")
    (sec / "playlist.m3u8").symlink_to(victims["victim.m3u8"])
    (sec / "tracks.json").symlink_to(victims["victim.json"])
    project.write_spec(
        "sec.yaml", [track(n, f"link trap {n}") for n in ("a", "b", "c")], soundtrack="sec"
    )
    project.sync()
    assert digest_tree(outside) == before, "a write went through a symlink"
    assert not (outside / "dangling-target.mp3").exists()
    for name in ("a.mp3", "b.mp3", "c.mp3", "playlist.m3u8", "tracks.json"):
        assert not (sec / name).is_symlink(), name
    assert assert_outputs_whole(project.out) == 3
    # The planted link to an existing file is kept in the trash, as any file
    # in the way that reconciler did not write.
    trashed = [p for p in (project.state / "trash").rglob("a.mp3") if p.is_symlink()]
    assert len(trashed) == 1

    # A link put over a file reconciler wrote: restored by replacing the link.
    (sec / "c.mp3").unlink()
    (sec / "c.mp3").symlink_to(victims["victim.mp3"])
    project.sync()
    assert not (sec / "c.mp3").is_symlink()
    assert digest_tree(outside) == before
    assert assert_outputs_whole(project.out) == 3
    assert integrity(project.state) == "ok"
    figures.record("security", "symlinks", planted=5, written_through=0)


def test_a_soundtrack_folder_linked_outside_is_refused(
    tmp_path: Path, sandbox: SandboxControl, figures: Figures
) -> None:
    # The daemon: it must log the refusal once, keep running and serve the
    # other soundtrack.
    p = daemon_project(tmp_path, sandbox)
    outside = tmp_path / "outside"
    outside.mkdir()
    p.out.mkdir()
    (p.out / "linked").symlink_to(outside)
    p.write_spec("linked.yaml", [track("a", "into the void")], soundtrack="linked")
    p.write_spec("fine.yaml", [track("b", "right here")], soundtrack="fine")
    with DaemonProc(p) as d:
        failed = d.wait_event("output.failed", lambda e: e["path"] == "linked/a.mp3", timeout=30)
        assert "outside" in failed["error"]
        wait_until((p.out / "fine" / "b.mp3").is_file, 30, "the other soundtrack")
        # More passes, for another soundtrack: the refusal is not logged again.
        p.write_spec("more.yaml", [track("c", "and here")], soundtrack="more")
        wait_until((p.out / "more" / "c.mp3").is_file, 30, "a third soundtrack")
        assert len(d.named("output.failed")) == 1, "logged once, not every pass"
        d.assert_running()
        code, _ = d.stop()
        assert code == 0
    assert list(outside.iterdir()) == []
    states = {t["track"]: t["state"] for t in p.status()["tracks"]}
    assert states["b"] == "ready"
    assert states["a"] != "ready"


def linked_soundtrack(project: Project, tmp_path: Path) -> Path:
    """A spec for soundtrack ``linked``, whose output folder is a symlink out of
    the output folder; returns the folder it points to."""
    outside = tmp_path / "outside"
    outside.mkdir()
    project.out.mkdir()
    (project.out / "linked").symlink_to(outside)
    project.write_spec("linked.yaml", [track("a", "into the void")], soundtrack="linked")
    return outside


def test_sync_ends_when_an_output_cannot_be_written(project: Project, tmp_path: Path) -> None:
    outside = linked_soundtrack(project, tmp_path)
    # It stops after a pass or two (it used to loop for ever).
    proc = project.cli("sync", timeout=8)
    assert proc.returncode == 1
    assert "linked/a.mp3" in proc.stderr
    assert list(outside.iterdir()) == []


def test_status_says_why_an_output_cannot_be_written(project: Project, tmp_path: Path) -> None:
    linked_soundtrack(project, tmp_path)
    project.sync(expect=1)
    (a,) = project.status()["tracks"]
    assert a["state"] in ("failed", "retrying"), a
    assert "outside" in (a["reason"] or ""), a
