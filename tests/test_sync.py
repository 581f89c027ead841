"""`reconciler sync`, `plan`, `status` and `retry` end to end.

Real CLI subprocesses against the real sandbox over loopback, a real SQLite
ledger and real files; the sandbox's counters prove what was paid for.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from reconciler.audio import probe_audio
from reconciler.errors import LedgerError
from reconciler.ledger import Ledger
from reconciler.sandbox import SandboxControl
from tests.project import FAST_CONFIG, Project, track, wait_until


@pytest.fixture
def project(tmp_path: Path, sandbox: SandboxControl) -> Project:
    return Project(tmp_path, sandbox)


def three_soundtracks(p: Project, n: int = 23) -> None:
    """n distinct tracks over three files, one lyrics track with two clips."""
    p.write_spec("study.yaml", [track(f"focus-{i}", f"lofi beats {i}") for i in range(10)])
    p.write_spec(
        "gym.yaml",
        [track(f"run-{i}", f"drum and bass {i}") for i in range(n - 11)],
        soundtrack="gym-mix",
    )
    p.write_spec(
        "songs.yaml",
        [
            {
                "name": "night-drive",
                "title": "Night Drive",
                "prompt": "[Verse]\nCity lights",
                "clips": 2,
            }
        ],
    )


def submits(p: Project) -> int:
    s = p.stats()
    return int(s["batch_submit_calls"] + s["create_calls"])


def test_first_sync_fills_batches_and_writes_valid_outputs(project: Project) -> None:
    three_soundtracks(project, 23)
    project.sync()
    stats = project.stats()
    assert stats["batch_submit_calls"] == math.ceil(23 / 10)
    assert stats["tasks_created"] == 23
    assert stats["create_calls"] == 0
    assert stats["task_polls"] == 0, "batches are polled as a whole, never task by task"
    files = project.files()
    mp3s = [f for f in files if f.endswith(".mp3")]
    assert len(mp3s) == 24  # 22 one-clip tracks + night-drive with two clips
    assert "songs/night-drive-2.mp3" in files
    for name in mp3s:
        assert probe_audio(project.out / name) > 0
    for soundtrack in ("study", "gym-mix", "songs"):
        assert f"{soundtrack}/playlist.m3u8" in files
        assert f"{soundtrack}/tracks.json" in files
    playlist = (project.out / "study" / "playlist.m3u8").read_text()
    assert playlist.startswith("#EXTM3U\n")
    assert [line for line in playlist.splitlines() if line.endswith(".mp3")] == [
        f"focus-{i}.mp3" for i in range(10)
    ]
    report = project.status()
    assert report["summary"]["ready"] == 23
    assert report["summary"]["tracks"] == 23
    assert report["credits"]["spent_today"] == 23 * 15


def test_second_sync_submits_nothing_and_touches_no_file(project: Project) -> None:
    three_soundtracks(project, 12)
    project.sync()
    before, files = project.stats(), project.files()
    ledger_mtime = (project.state / "ledger.sqlite3").stat().st_mtime_ns
    project.sync()
    after = project.stats()
    assert submits(project) == before["batch_submit_calls"] + before["create_calls"]
    assert after["batch_polls"] == before["batch_polls"]
    assert after["downloads"] == before["downloads"]
    assert project.files() == files
    assert (project.state / "ledger.sqlite3").stat().st_mtime_ns == ledger_mtime


def test_editing_one_prompt_submits_exactly_one_generation(project: Project) -> None:
    three_soundtracks(project, 12)
    project.sync()
    created = project.stats()["tasks_created"]
    tracks = [track(f"focus-{i}", f"lofi beats {i}") for i in range(10)]
    tracks[3] = track("focus-3", "lofi beats with rain")
    project.write_spec("study.yaml", tracks)
    old = project.files()["study/focus-3.mp3"][0]
    project.sync()
    assert project.stats()["tasks_created"] == created + 1
    assert project.files()["study/focus-3.mp3"][0] != old


def test_renames_moves_and_copies_reuse_audio(project: Project) -> None:
    three_soundtracks(project, 12)
    project.sync()
    paid = submits(project)
    audio = project.files()["study/focus-0.mp3"][0]
    # Rename the file, rename a track, reformat (key order, comments), and copy a
    # track into a brand-new soundtrack in a subfolder.
    (project.specs / "study.yaml").unlink()
    tracks = [track(f"focus-{i}", f"lofi beats {i}") for i in range(1, 10)]
    tracks.insert(0, {"gpt_description_prompt": "lofi beats 0", "name": "opening"})
    path = project.write_spec("renamed.yaml", tracks, soundtrack="study")
    path.write_text("# reformatted\n" + path.read_text())
    project.write_spec(
        "sub/copies.yaml", [track("same-as-focus-1", "lofi beats 1")], soundtrack="copies"
    )
    project.sync()
    assert submits(project) == paid
    files = project.files()
    assert files["study/opening.mp3"][0] == audio
    # The same audio, tagged for its own soundtrack.
    assert files["copies/same-as-focus-1.mp3"][0] != files["study/focus-1.mp3"][0]
    assert project.audio_sha256("copies/same-as-focus-1.mp3") == project.audio_sha256(
        "study/focus-1.mp3"
    )


def test_deleted_and_corrupted_outputs_are_restored_from_the_cache(project: Project) -> None:
    three_soundtracks(project, 12)
    project.sync()
    paid, downloads = submits(project), project.stats()["downloads"]
    files = project.files()
    (project.out / "study" / "focus-1.mp3").unlink()
    (project.out / "study" / "focus-2.mp3").write_bytes(b"not audio at all")
    plan = project.cli("plan")
    assert plan.returncode == 2
    assert "restore" in plan.stdout
    project.sync()
    assert submits(project) == paid
    assert project.stats()["downloads"] == downloads
    now = project.files()
    assert now["study/focus-1.mp3"][0] == files["study/focus-1.mp3"][0]
    assert now["study/focus-2.mp3"][0] == files["study/focus-2.mp3"][0]


def test_plan_shows_cost_and_exit_codes(project: Project) -> None:
    three_soundtracks(project, 12)
    proc = project.cli("plan")
    assert proc.returncode == 2, proc.stderr
    assert "12 generations to submit in 2 calls, 180 credits" in " ".join(proc.stdout.split())
    assert project.stats()["batch_submit_calls"] == 0, "plan is a dry run"
    project.sync()
    assert project.cli("plan").returncode == 0
    (project.specs / "broken.yaml").write_text("tracks: [\n")
    assert project.cli("plan").returncode == 1


def test_invalid_file_keeps_last_good_version_and_prunes_nothing(project: Project) -> None:
    three_soundtracks(project, 12)
    project.sync()
    files = project.files()
    (project.specs / "study.yaml").write_text("tracks:\n  - name: focus-0\n    mv: sonic-v9\n")
    proc = project.sync("--prune", expect=1)
    assert "study.yaml:3 tracks[0].mv" in proc.stderr
    assert project.files() == files
    report = project.status()
    assert {t["state"] for t in report["tracks"] if t["soundtrack"] == "study"} == {"invalid"}
    assert report["invalid_files"][0]["path"] == "study.yaml"
    assert project.cli("status").returncode == 1


def test_empty_specs_folder_prunes_nothing(project: Project) -> None:
    three_soundtracks(project, 12)
    project.sync()
    files = project.files()
    for f in project.specs.iterdir():
        f.unlink()
    project.cli("sync", "--prune")
    assert project.files() == files


def test_prune_is_opt_in_and_moves_to_trash(project: Project) -> None:
    three_soundtracks(project, 12)
    project.sync()
    project.write_spec("study.yaml", [track(f"focus-{i}", f"lofi beats {i}") for i in range(9)])
    project.sync()
    assert "study/focus-9.mp3" in project.files(), "prune is off by default"
    project.sync("--prune")
    assert "study/focus-9.mp3" not in project.files()
    trashed = list((project.state / "trash").rglob("focus-9.mp3"))
    assert len(trashed) == 1
    # A file reconciler never wrote is never pruned.
    (project.out / "study" / "mine.mp3").write_bytes(b"a person's file")
    project.sync("--prune")
    assert (project.out / "study" / "mine.mp3").read_bytes() == b"a person's file"


def test_rejected_items_are_parked_with_the_reason_until_retry(project: Project) -> None:
    project.sandbox.configure(
        faults=[{"kind": "reject", "at": [2], "type": "forbidden", "error": "copyrighted"}]
    )
    project.write_spec("study.yaml", [track(f"focus-{i}", f"lofi beats {i}") for i in range(4)])
    proc = project.sync(expect=1)
    assert "1 failed" in proc.stderr
    report = project.status()
    failed = [t for t in report["tracks"] if t["state"] == "failed"]
    assert len(failed) == 1
    assert "copyrighted" in failed[0]["reason"]
    assert project.stats()["credits_charged"] == 3 * 15, "rejected items are not charged"
    again = project.cli("sync")
    assert again.returncode == 1, "a parked failure is not retried on its own"
    assert project.stats()["batch_submit_calls"] == 1
    project.sandbox.configure(faults=[])
    assert project.cli("retry", f"study/{failed[0]['track']}").returncode == 0
    project.sync()
    assert project.status()["summary"]["ready"] == 4


def test_falls_back_to_single_creates_without_a_batch_endpoint(project: Project) -> None:
    project.sandbox.configure(batch_disabled=404)
    project.write_spec("study.yaml", [track(f"focus-{i}", f"lofi beats {i}") for i in range(3)])
    project.sync()
    stats = project.stats()
    assert stats["create_calls"] == 3
    assert stats["batch_polls"] == 0
    assert stats["task_polls"] >= 3
    assert project.status()["api"]["batch_endpoint"] == "unsupported"


def batch_unsupported(project: Project) -> bool:
    try:
        ledger = Ledger.open(project.state / "ledger.sqlite3", readonly=True)
    except LedgerError:
        return False  # not made yet
    try:
        return bool(ledger.get("batch_unsupported"))
    finally:
        ledger.close()


def test_a_run_against_a_mistyped_url_does_not_turn_batching_off_at_the_right_one(
    project: Project,
) -> None:
    project.write_spec("study.yaml", [track(f"focus-{i}", f"lofi beats {i}") for i in range(3)])
    wrong = project.sandbox.base_url.replace("/api/v1", "/v1")
    # Against the wrong URL every request is a 404: sync keeps trying, so it
    # is stopped once it has found the batch endpoint missing there.
    mistyped = subprocess.Popen(
        [*project.args("sync"), "--api-url", wrong],
        env=project.env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: batch_unsupported(project), 30, "the batch endpoint found missing")
    finally:
        mistyped.kill()
        mistyped.wait()
    project.sync()
    stats = project.stats()
    # Batches, not creates (a loaded machine may time one batch out and resend it).
    assert stats["create_calls"] == 0
    assert stats["batch_submit_calls"] >= 1
    assert project.status()["api"]["batch_endpoint"] == "ok"


def test_expired_audio_url_is_fetched_again_after_a_fresh_poll(project: Project) -> None:
    project.sandbox.configure(faults=[{"kind": "audio_expired", "at": [1, 2]}])
    project.write_spec("study.yaml", [track(f"focus-{i}", f"lofi beats {i}") for i in range(3)])
    project.sync()
    stats = project.stats()
    assert stats["faults_fired"]["audio_expired"] == 2
    assert stats["tasks_created"] == 3


def test_daily_budget_stops_submissions_but_not_downloads(project: Project) -> None:
    project.config.write_text(
        project.config.read_text().replace("[submit]\n", "[submit]\ndaily_budget = 45\n")
    )
    project.write_spec("study.yaml", [track(f"focus-{i}", f"lofi beats {i}") for i in range(5)])
    proc = project.sync(expect=1)
    assert project.stats()["tasks_created"] == 3
    assert "daily budget" in proc.stderr
    report = project.status()
    assert report["summary"]["ready"] == 3
    assert "daily budget" in report["submit_block"]
    assert report["credits"]["budget_left"] == 0


def test_account_balance_limits_submissions(project: Project) -> None:
    project.sandbox.configure(credits=30)
    project.write_spec("study.yaml", [track(f"focus-{i}", f"lofi beats {i}") for i in range(4)])
    project.sync(expect=1)
    assert project.stats()["tasks_created"] == 2
    assert "balance" in project.status()["submit_block"]


def test_lost_submit_response_is_never_retried_blindly(project: Project) -> None:
    project.sandbox.configure(faults=[{"kind": "drop_response", "at": [1]}])
    project.write_spec("study.yaml", [track(f"focus-{i}", f"lofi beats {i}") for i in range(3)])
    project.sync()
    report = project.status()
    assert report["ambiguous_submits"] == 1
    by_fp = project.stats()["tasks_by_fingerprint"]
    doubles = sum(n - 1 for n in by_fp.values())
    # The sandbox processed the dropped submit: every item was paid twice, and
    # status says exactly that, after waiting the grace period.
    assert doubles == report["possible_double_spend"] == 3


def test_validate_names_file_line_and_field(project: Project) -> None:
    (project.specs / "bad.yaml").write_text(
        "defaults:\n  mv: sonic-v5\ntracks:\n  - name: ok\n    gpt_description_prompt: x\n"
        "  - name: Bad Name\n    gpt_description_prompt: y\n"
    )
    # validate takes no API flags, so it is run directly.
    proc = subprocess.run(
        [sys.executable, "-m", "reconciler", "validate", "--specs", str(project.specs)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "bad.yaml:6 tracks[1].name" in proc.stdout


def test_missing_key_is_one_clear_line(project: Project) -> None:
    env = project.env()
    del env["MUSICAPI_KEY"]
    proc = subprocess.run(
        project.args("sync"), env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert "MUSICAPI_KEY" in proc.stderr


def test_never_valid_file_shows_in_status_and_goes_when_deleted(project: Project) -> None:
    three_soundtracks(project, 12)
    (project.specs / "typo.yaml").write_text("tracks:\n  - name: x\n    promt: hi\n")
    project.sync(expect=1)
    report = project.status()
    assert [f["path"] for f in report["invalid_files"]] == ["typo.yaml"]
    assert "promt" in report["invalid_files"][0]["error"]
    (project.specs / "typo.yaml").unlink()
    project.sync()
    assert project.status()["invalid_files"] == []


def test_status_answers_while_sync_writes(project: Project) -> None:
    # Generation takes 4 s: a status process started on a busy machine (a
    # second or more) must still find both batches in flight.
    project.sandbox.configure(latency=4.0)
    project.write_spec("study.yaml", [track(f"focus-{i}", f"lofi beats {i}") for i in range(15)])
    proc = subprocess.Popen(project.args("sync"), env=project.env(), stderr=subprocess.DEVNULL)
    try:
        # The sandbox counts a submit when it arrives, the ledger when its
        # answer does: wait for status itself to see both batches in flight.
        def both_in_flight() -> bool:
            proc = project.cli("status", "--json")
            if not proc.stdout:  # no ledger yet: sync has only just started
                return False
            report = json.loads(proc.stdout)
            return report["batches_in_flight"] == 2 and report["summary"]["generating"] == 15

        wait_until(both_in_flight, 30, "status to show both batches in flight")
    finally:
        assert proc.wait(timeout=60) == 0


def test_lost_cache_is_fetched_again_without_a_new_generation(project: Project) -> None:
    three_soundtracks(project, 12)
    project.sync()
    paid, downloads = submits(project), project.stats()["downloads"]
    audio = project.files()["study/focus-1.mp3"][0]
    for cached in (project.state / "cache").rglob("*.mp3"):
        cached.unlink()
    (project.out / "study" / "focus-1.mp3").unlink()
    project.sync()
    assert submits(project) == paid
    assert project.stats()["downloads"] == downloads + 1
    assert project.files()["study/focus-1.mp3"][0] == audio


def test_batches_sent_together_are_probed_until_one_shows_progress(project: Project) -> None:
    # 50 tracks in one pass are 5 batches sent within a poll interval; generation
    # takes 1.5 s and reconciler polls every 0.3 s. Polling every batch each time
    # would cost 5 x 5 = 25 polls; probing one batch per interval until a task in
    # it finishes costs the probe's ~5 polls plus one for each sibling.
    config = project.config.read_text()
    project.config.write_text(config.replace("interval = 0.1", "interval = 0.3"))
    project.sandbox.configure(latency=1.5)
    for f in range(5):
        project.write_spec(
            f"set-{f}.yaml", [track(f"t{f}-{i}", f"probe {f} {i}") for i in range(10)]
        )
    project.sync()
    stats = project.stats()
    assert stats["batch_submit_calls"] == 5
    assert project.status()["summary"]["ready"] == 50
    assert 5 <= stats["batch_polls"] <= math.ceil(1.5 / 0.3) + 1 + 4, stats["batch_polls"]


def test_the_quick_start_loop_converges_after_an_edit(tmp_path: Path) -> None:
    """`sync --sandbox`, edit a prompt, `sync --sandbox` again: each start brings up
    a new in-process sandbox, whose ids must never be mistaken for the old ones."""
    root = tmp_path / "quick"
    shutil.copytree(Path(__file__).parent.parent / "specs", root / "specs")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MUSICAPI", "RECONCILER"))}

    def sync() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "reconciler", "sync", "--sandbox"],
            cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    first = sync()
    assert first.returncode == 0, first.stderr[-2000:]
    study = root / "specs" / "study-session.yaml"
    study.write_text(study.read_text().replace("warm vinyl crackle", "soft rain on glass", 1))
    second = sync()
    assert second.returncode == 0, second.stderr[-2000:]
    assert "converged" in second.stderr
    report = json.loads(
        subprocess.run(
            [sys.executable, "-m", "reconciler", "status", "--json"],
            cwd=root, env=env, capture_output=True, text=True, timeout=60, check=False,
        ).stdout
    )  # fmt: skip
    assert report["summary"]["ready"] == report["summary"]["tracks"]
    assert report["possible_double_spend"] == 0


def log_events(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]


def test_sync_on_an_untouched_folder_reads_every_file_at_once(project: Project) -> None:
    # A window longer than the CLI's timeout: had sync waited for it, it would not finish.
    project.config.write_text(FAST_CONFIG.replace("batch_window = 0.2", "batch_window = 600"))
    three_soundtracks(project)
    hour_ago = time.time() - 3600
    for path in project.specs.iterdir():
        os.utime(path, (hour_ago, hour_ago))
    events = log_events(project.sync())
    assert [e for e in events if e["event"] == "spec.settling"] == []
    assert project.stats()["tasks_created"] == 23


def test_sync_waits_out_the_window_of_a_file_just_written(project: Project) -> None:
    # Longer than the CLI takes to start, so the file is young at its first
    # pass: 4 s was not, once, with four workers at load average 11.
    project.config.write_text(FAST_CONFIG.replace("batch_window = 0.2", "batch_window = 8"))
    project.write_spec("study.yaml", [track("focus", "lofi beats")])
    events = [e["event"] for e in log_events(project.sync())]
    assert events.count("spec.settling") == 1
    # Held back on the first pass, read when the window ended: one wait, not a busy loop.
    assert events[: events.index("batch.submitted")].count("pass.completed") <= 3
    assert project.stats()["tasks_created"] == 1


def test_plan_reads_settling_files_as_they_are_and_notes_them(project: Project) -> None:
    project.config.write_text(FAST_CONFIG.replace("batch_window = 0.2", "batch_window = 600"))
    project.write_spec("new.yaml", [track("a", "harp")])
    old = project.write_spec("old.yaml", [track("b", "oboe")])
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    proc = project.cli("plan", "--json")
    assert proc.returncode == 2, proc.stderr
    report = json.loads(proc.stdout)
    assert report["settling"] == ["new.yaml"]
    assert sorted(t for item in report["submit"] for t in item["tracks"]) == ["new/a", "old/b"]
    assert "settling  new.yaml" in project.cli("plan").stdout


def test_plan_waits_for_a_file_just_saved_to_settle_as_a_pass_does(project: Project) -> None:
    project.config.write_text(FAST_CONFIG.replace("batch_window = 0.2", "batch_window = 1.5"))
    project.write_spec("new.yaml", [track("a", "harp")])
    proc = project.cli("plan", "--json")
    assert proc.returncode == 2, proc.stderr
    report = json.loads(proc.stdout)
    assert report["settling"] == []
    assert [item["tracks"] for item in report["submit"]] == [["new/a"]]


def test_plan_prune_counts_every_file_it_moves(project: Project) -> None:
    three_soundtracks(project, 12)
    project.sync()
    (project.specs / "gym.yaml").unlink()
    (project.specs / "songs.yaml").unlink()
    plan = project.cli("plan", "--prune", "--json")
    assert plan.returncode == 2
    announced = json.loads(plan.stdout)["prune"]
    assert "gym-mix/playlist.m3u8" in announced
    assert "songs/tracks.json" in announced
    before = set(project.files())
    text = project.cli("plan", "--prune")
    assert f"{len(announced)} files pruned" in text.stdout
    project.sync("--prune")
    moved = before - set(project.files())
    assert sorted(moved) == sorted(announced)


def test_plan_with_a_missing_specs_folder_fails(project: Project) -> None:
    three_soundtracks(project, 3)
    proc = project.cli("plan", "--specs", str(project.root / "typo"))
    assert proc.returncode == 1
    assert proc.stderr.strip() == (
        f"reconciler: the specs folder {project.root / 'typo'} is missing "
        "(--specs, or `specs` in the config)"
    )


def test_plan_lines_are_never_wrapped_into_a_pipe(project: Project) -> None:
    long_track = "a-track-with-a-name-long-enough-to-pass-eighty-columns-on-its-own"[:64]
    project.write_spec("s.yaml", [track(long_track, "lofi")], soundtrack="a-long-soundtrack-name")
    proc = project.cli("plan")
    lines = proc.stdout.splitlines()
    submit = [line for line in lines if line.startswith("+ submit")]
    assert len(submit) == 1
    assert long_track in submit[0]
    assert submit[0].endswith(")")
    assert lines[1:] == [
        "1 generation to submit in 1 call, 15 credits; 0 reused, 0 restored, 0 files pruned; "
        "0 in flight",
        "account balance: 100000 credits",
    ]


def test_validate_counts_in_plain_english(project: Project) -> None:
    def validate() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "reconciler", "validate", "--specs", str(project.specs)],
            capture_output=True,
            text=True,
            check=False,
        )

    project.write_spec("one.yaml", [track("a", "lofi")])
    assert validate().stderr.strip() == "1 file, 1 track: valid"
    (project.specs / "two.yaml").write_text("tracks:\n  - {name: b, mv: sonic-v9, prompt: x}\n")
    assert validate().stderr.strip().splitlines()[-1] == "1 problem in 1 file"
    (project.specs / "one.yaml").unlink()
    (project.specs / "two.yaml").unlink()
    project.specs.rmdir()
    missing = validate()
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1] == "1 problem"
