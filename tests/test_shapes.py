"""End to end against every answer shape the service may use for batches.

The live service documents only the batch submit's top-level keys; the
sandbox can answer in every plausible variant (``reconciler sandbox
--shapes``). For each, passes against the sandbox must converge, or park
only the refused item with the service's words, and the sandbox's books must
show no generation paid twice (no answer is lost here, so possible double
spend stays 0) and every track holding its own item's song. Every shape runs
in process (``tests/inprocess.py``); the combinations, which between them
use most shapes, and the refusal a person must act on also run as a real
``sync`` (CLI subprocess, real SQLite file, real files) against the real
sandbox over loopback.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from reconciler.sandbox import SHAPES, SandboxControl, SandboxServer
from reconciler.sandbox.state import SandboxState
from tests.daemonproc import DaemonProc, daemon_project, free_port
from tests.inprocess import World
from tests.project import Project, track, wait_until

BATCH_SHAPES = [s for s in SHAPES if not s.startswith("webhook-")]
#: Shapes about refused items: the service refuses one (moderation) once.
REFUSING = {"rejected-omitted", "rejection-message-only"}
CASES = [
    *[(s,) for s in BATCH_SHAPES],
    # Positions shift when a refused item is left out and nothing has an index.
    ("submit-no-index", "rejected-omitted"),
    # 1-based indexes with an item left out fit both bases: only the clips'
    # echo of the request can say whose each task is.
    ("one-based-index", "rejected-omitted"),
    ("submit-bare", "numeric-batch-id", "poll-no-task-id", "batch-poll-202"),
    ("submit-taskId", "poll-no-index", "succeeded-no-data"),
]
#: The cases that also run as a real ``sync``: every combination, and a refusal that parks.
SUBPROCESS_CASES = [c for c in CASES if len(c) > 1 or c == ("rejection-message-only",)]
REFUSAL = "copyrighted lyrics"


@pytest.fixture
def project(tmp_path: Path, sandbox: SandboxControl) -> Project:
    return Project(tmp_path, sandbox)


def prompts(n: int) -> list[str]:
    return [f"kalimba loop number {i}" for i in range(n)]


def own_songs(out: Path, specs: Path, sandbox: SandboxState) -> None:
    """Every written track's clip comes from a task created for its own prompt."""
    doc = yaml.safe_load((specs / "mix.yaml").read_text())
    spec = {t["name"]: t["gpt_description_prompt"] for t in doc["tracks"]}
    listing = json.loads((out / "mix" / "tracks.json").read_text())
    assert listing["tracks"]
    for entry in listing["tracks"]:
        task, _ = sandbox._clip_index[entry["clip_id"]]
        assert task.item["gpt_description_prompt"] == spec[entry["track"]], entry


def shape_faults(shapes: tuple[str, ...]) -> list[dict[str, object]]:
    """The one-off refusal of the third item, for the shapes about refused items."""
    if not REFUSING & set(shapes):
        return []
    return [{"kind": "reject", "at": [3], "type": "forbidden", "error": REFUSAL}]


@pytest.mark.parametrize("shapes", CASES, ids="+".join)
def test_passes_under_every_batch_shape(tmp_path: Path, shapes: tuple[str, ...]) -> None:
    tracks = [track(f"t{i}", p) for i, p in enumerate(prompts(12))]
    mix = yaml.safe_dump({"defaults": {"mv": "sonic-v5"}, "tracks": tracks}, sort_keys=False)
    world = World(tmp_path, {"mix.yaml": mix})
    try:
        world.configure(shapes=list(shapes), faults=shape_faults(shapes))
        final = world.run()[-1]
        # As under sync below: a refusal that keeps its words parks the item;
        # one left out of the answer is simply sent again.
        parks = "rejection-message-only" in shapes
        stats = world.sandbox.stats()
        assert max(stats["tasks_by_fingerprint"].values()) == 1, "a generation paid twice"
        doubles = world.ledger.query("SELECT sum(possible_double) AS n FROM generations")
        assert doubles[0]["n"] == 0
        assert stats["tasks_created"] == (11 if parks else 12)
        assert (final.ready, final.parked) == (stats["tasks_created"], int(parks))
        if parks:
            (parked,) = world.ledger.query(
                "SELECT t.name, g.reason FROM tracks t JOIN generations g "
                "ON g.fingerprint = t.fingerprint WHERE g.state = 'parked'"
            )
            assert parked["name"] == "t2"
            assert REFUSAL in parked["reason"]
        own_songs(world.settings.out_dir, world.settings.specs_dir, world.sandbox)
    finally:
        world.close()


@pytest.mark.parametrize("shapes", SUBPROCESS_CASES, ids="+".join)
def test_sync_under_batch_shapes(
    project: Project,
    sandbox: SandboxControl,
    sandbox_server: SandboxServer,
    shapes: tuple[str, ...],
) -> None:
    sandbox.configure(shapes=list(shapes), faults=shape_faults(shapes))
    project.write_spec("mix.yaml", [track(f"t{i}", p) for i, p in enumerate(prompts(12))])
    # A refusal that keeps its words parks the item; one left out of the
    # answer (the service's count says it was not created) is simply sent
    # again, and the one-off refusal does not repeat.
    parks = "rejection-message-only" in shapes

    project.sync(expect=1 if parks else 0)

    stats = sandbox.stats()
    report = project.status()
    assert max(stats["tasks_by_fingerprint"].values()) == 1, "a generation paid twice"
    assert report["possible_double_spend"] == 0
    assert stats["tasks_created"] == (11 if parks else 12)
    assert report["summary"]["ready"] == stats["tasks_created"]
    if parks:
        (failed,) = [t for t in report["tracks"] if t["state"] == "failed"]
        assert failed["track"] == "t2"
        assert REFUSAL in failed["reason"]
    own_songs(project.out, project.specs, sandbox_server.state)


WEBHOOK_SHAPES = [s for s in SHAPES if s.startswith("webhook-")]


@pytest.mark.parametrize("shape", WEBHOOK_SHAPES)
def test_webhooks_in_every_shape_drive_the_daemon(
    tmp_path: Path, sandbox: SandboxControl, shape: str
) -> None:
    port = free_port()
    hook = (
        f'\n[webhook]\nlisten = "127.0.0.1:{port}"\npublic_url = "http://127.0.0.1:{port}"\n'
        'secret = "whsec-shapes"\ntolerance = 60\n'
    )
    # Polls every 30 s: converging sooner proves the callbacks were understood.
    project = daemon_project(tmp_path, sandbox, poll=30.0, extra=hook)
    sandbox.configure(shapes=[shape])
    project.write_spec("mix.yaml", [track(f"t{i}", p) for i, p in enumerate(prompts(3))])
    with DaemonProc(project) as d:
        d.converged(timeout=20)
        assert not d.named("webhook.rejected")
        assert d.named("webhook.received")
        code, _ = d.stop()
        assert code == 0
    assert max(sandbox.stats()["tasks_by_fingerprint"].values()) == 1


def test_a_lost_answer_under_the_documented_webhook_body_is_never_paid_again(
    tmp_path: Path, sandbox: SandboxControl
) -> None:
    """The documented callback names no task: it still proves the lost submit
    created one, so it is held (and said so) instead of sent again."""
    port = free_port()
    hook = (
        f'\n[webhook]\nlisten = "127.0.0.1:{port}"\npublic_url = "http://127.0.0.1:{port}"\n'
        'secret = "whsec-shapes"\ntolerance = 60\n'
    )
    project = daemon_project(tmp_path, sandbox, poll=0.2, grace=1.0, extra=hook)
    sandbox.configure(
        shapes=["webhook-documented"],
        faults=[{"kind": "drop_response", "at": [1], "endpoints": ["batch_submit"]}],
    )
    spec = project.write_spec("mix.yaml", [track("only", "steel drums at dawn")])
    with DaemonProc(project) as d:
        d.wait_event("submit.ambiguous")
        d.wait_event("webhook.paid_unnamed")
        held_since = time.monotonic()
        # The grace period is the condition: past it, an unclaimed item would go
        # out again at the next pass, which a comment in the spec file starts.
        wait_until(lambda: time.monotonic() > held_since + 1.5, 5, "the grace period")
        mark = d.mark()
        spec.write_text(spec.read_text() + "# touched\n")
        d.wait_event("pass.completed", after=mark)
        code, _ = d.stop()
        assert code == 0
    assert sandbox.stats()["tasks_created"] == 1
    report = project.status()
    assert report["possible_double_spend"] == 0
    (row,) = report["tracks"]
    assert row["state"] == "generating"


def test_a_whole_batch_refused_for_one_item_parks_only_that_item(
    project: Project, sandbox: SandboxControl
) -> None:
    """The docs disagree on limits: a user who raised one locally sends an item
    the service refuses, and under this shape it refuses the whole batch."""
    project.config.write_text(project.config.read_text() + "\n[limits.sonic-v5]\ntitle = 200\n")
    sandbox.configure(shapes=["batch-400-one-bad"])
    tracks = [track(f"t{i}", p) for i, p in enumerate(prompts(10))]
    tracks[6]["title"] = "A title far longer than the service's own limit allows " * 2
    project.write_spec("mix.yaml", tracks)

    project.sync(expect=1)

    stats = sandbox.stats()
    assert stats["tasks_created"] == 9
    assert max(stats["tasks_by_fingerprint"].values()) == 1
    # Halves, then singles: a handful of calls, not one per item, never a loop.
    assert stats["batch_submit_calls"] <= 8
    report = project.status()
    (failed,) = [t for t in report["tracks"] if t["state"] == "failed"]
    assert failed["track"] == "t6"
    assert "title" in failed["reason"]
    assert report["summary"]["ready"] == 9
