"""One ledger per output folder, and a state folder's own ledger never shared.

A new user's ordinary mistakes with replicas, which would otherwise spend
twice: a writer started without ``--ledger`` beside a folder another ledger
keeps (it would submit every track again, then fight over the files), and a
replica naming the ledger of a state folder whose daemon takes no lease.
Real CLI subprocesses against the sandbox; what was paid is the sandbox's own
count.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from reconciler.sandbox import SandboxControl
from tests.daemonproc import DaemonProc
from tests.project import Project, track


def two_state_folders(tmp_path: Path, sandbox: SandboxControl) -> tuple[Project, Project]:
    """Two projects over the same specs and output folder, each with its own state folder."""
    a = Project(tmp_path, sandbox)
    b = Project(tmp_path, sandbox)
    b.state = tmp_path / "state-b"
    a.write_spec("mix.yaml", [track("one", "calm piano"), track("two", "warm synth")])
    return a, b


def test_a_second_ledger_is_refused_an_output_folder_and_spends_nothing(
    tmp_path: Path, sandbox: SandboxControl
) -> None:
    a, b = two_state_folders(tmp_path, sandbox)
    a.sync()
    paid = a.stats()["tasks_created"]
    before = a.files()

    proc = b.sync(expect=1)

    assert "kept by another ledger" in proc.stderr
    assert str(a.state.resolve() / "ledger.sqlite3") in proc.stderr
    assert "--ledger" in proc.stderr
    assert b.stats()["tasks_created"] == paid
    assert a.files() == before
    marker = json.loads((a.out / ".reconciler-ledger").read_text())
    assert marker["ledger"] == str(a.state.resolve() / "ledger.sqlite3")


def test_the_same_ledger_named_explicitly_keeps_the_folder(
    tmp_path: Path, sandbox: SandboxControl
) -> None:
    a, b = two_state_folders(tmp_path, sandbox)
    a.sync()
    paid = a.stats()["tasks_created"]

    b.sync("--ledger", str(a.state / "ledger.sqlite3"))

    assert b.stats()["tasks_created"] == paid


def test_a_ledger_recreated_in_its_place_takes_the_folder_over(
    tmp_path: Path, sandbox: SandboxControl
) -> None:
    a, _ = two_state_folders(tmp_path, sandbox)
    a.sync()
    first = json.loads((a.out / ".reconciler-ledger").read_text())["ledger_id"]
    shutil.rmtree(a.state)  # the state folder is lost; the outputs stay

    proc = a.sync()

    assert "outputs.adopted" in proc.stdout + proc.stderr
    assert json.loads((a.out / ".reconciler-ledger").read_text())["ledger_id"] != first


def test_a_replica_may_not_name_the_ledger_of_a_running_lone_daemon(
    tmp_path: Path, sandbox: SandboxControl
) -> None:
    a, b = two_state_folders(tmp_path, sandbox)
    with DaemonProc(a) as daemon:
        daemon.converged()
        paid = a.stats()["tasks_created"]

        proc = b.sync("--ledger", str(a.state / "ledger.sqlite3"), expect=1)

        assert "takes no lease" in proc.stderr
        assert str(a.state.resolve()) in proc.stderr
        assert b.stats()["tasks_created"] == paid


def test_a_lone_writer_is_refused_a_ledger_replicas_lead(
    tmp_path: Path, sandbox: SandboxControl
) -> None:
    a, b = two_state_folders(tmp_path, sandbox)
    shared = tmp_path / "shared" / "ledger.sqlite3"
    b.state = tmp_path / "shared"  # the shared file is this folder's own ledger
    with DaemonProc(a, "--ledger", str(shared)) as replica:
        replica.converged()
        paid = a.stats()["tasks_created"]

        proc = b.sync(expect=1)

        assert "leads it" in proc.stderr
        assert f"--ledger {shared}" in proc.stderr
        assert b.stats()["tasks_created"] == paid
