"""Bad input: hostile and broken spec files dropped into a running daemon's folder.

One daemon runs with pruning on and a good soundtrack (``keep``) already
converged. Then hand-written bad files (every syntax, every kind of wrong
value, huge, binary, a FIFO, symlinks out of the folder, names that try to
leave the output folder, duplicates), a file rewritten while it is being
read, and a hundred hypothesis-generated files land in its folder. The
daemon must keep running and answering ``status``, report every bad file
with its file (and, where the problem has one, its line) in ``status --json``
and in its log, and prune or touch nothing of ``keep`` because of them.

The daily budget is spent by ``keep`` alone, so the valid files among the
generated ones queue rather than cost anything.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.sandbox import SandboxControl
from reconciler.specs import MAX_SPEC_BYTES, scan_specs
from tests.daemonproc import DaemonProc, daemon_project, expected_tracks
from tests.project import Project, track, wait_until
from tests.reliability.support import Figures, big_spec, log_time

KEEP = [track("a", "keep this harp"), track("b", "keep this oboe"), track("c", "keep this tuba")]
#: What the three ``keep`` tracks cost: nothing else may be generated.
BUDGET = 15 * len(KEEP)


@dataclass(frozen=True)
class Bad:
    """A bad file: its path in the specs folder, how to make it, what the report must say.

    ``line``: the problem is in the content, so the report names a line;
    file-level refusals (size, type, a symlink out) have no line to name.
    """

    rel: str
    make: Callable[[Path, Path], object]
    says: str
    line: bool = True


def text(content: str) -> Callable[[Path, Path], object]:
    return lambda path, outside: path.write_text(content)


def raw(content: bytes) -> Callable[[Path, Path], object]:
    return lambda path, outside: path.write_bytes(content)


def huge(path: Path, outside: Path) -> None:
    # A valid spec padded past the limit with comments: the size alone is wrong.
    body = "tracks:\n  - name: big\n    gpt_description_prompt: big\n"
    path.write_text(body + "# padding\n" * (MAX_SPEC_BYTES // 10 + 1))


def fifo(path: Path, outside: Path) -> None:
    os.mkfifo(path)


def link_out(path: Path, outside: Path) -> None:
    target = outside / "stolen.yaml"
    target.write_text("soundtrack: stolen\ntracks:\n  - name: s\n    gpt_description_prompt: s\n")
    path.symlink_to(target)


def laughs(levels: int = 9) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for n in range(1, levels):
        lines.append(f"l{n}: &l{n} [" + ", ".join([f"*l{n - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\ntracks: *l{levels - 1}\n"


HAND_WRITTEN = [
    Bad("yaml-syntax.yaml", text("tracks:\n  - name: a\n    prompt: [unclosed\n"), "YAML"),
    Bad("yaml-tabs.yaml", text("tracks:\n\t- name: a\n"), "tabs"),
    Bad("toml-syntax.toml", text('[[tracks]\nname = "a"\n'), "TOML"),
    Bad("json-syntax.json", text('{"tracks": [{"name": "a",}]}'), "JSON"),
    Bad(
        "wrong-types.yaml",
        text(
            "tracks:\n  - name: a\n    gpt_description_prompt: x\n    style_weight: high\n"
            "    make_instrumental: maybe\n    clips: 7\n  - name: 42\n"
            "    gpt_description_prompt: [1, 2]\n"
        ),
        "style_weight",
    ),
    Bad("not-a-list.json", text('{"tracks": {"name": "a"}}'), "must be a list"),
    Bad(
        "unknown-field.yaml",
        text("tracks:\n  - name: a\n    promt: hello\n"),
        "did you mean 'prompt'",
    ),
    Bad("unknown-model.toml", text('[[tracks]]\nname = "a"\nmv = "sonic-v9"\n'), "sonic-v9"),
    Bad("huge.yaml", huge, "too large", line=False),
    Bad("binary.yaml", raw(b"\x00\xff\xfe garbage \x89PNG\r\n\x1a\n" * 64), "binary.yaml:1"),
    Bad("utf16.json", raw('{"tracks": []}'.encode("utf-16")), "utf16.json"),
    Bad("empty.yaml", text(""), "empty", line=False),
    Bad("pipe.yaml", fifo, "not a regular file", line=False),
    Bad("escape.yaml", link_out, "outside the specs folder", line=False),
    Bad(
        "traversal.yaml",
        text("soundtrack: ../../etc\ntracks:\n  - name: ../passwd\n    prompt: x\n"),
        "soundtrack",
    ),
    Bad(
        "slash-name.json",
        text('{"tracks": [{"name": "a/b", "gpt_description_prompt": "x"}]}'),
        "name",
    ),
    Bad("Not A Name.yaml", text("tracks:\n  - name: a\n    prompt: x\n"), "soundtrack: not-a-name"),
    Bad(
        "dupes.yaml",
        text(
            "tracks:\n  - name: a\n    gpt_description_prompt: x\n"
            "  - name: a\n    gpt_description_prompt: y\n"
        ),
        "duplicate track name 'a'",
    ),
    # Sorts before keep.yaml and claims its soundtrack: the newcomer is the duplicate.
    Bad(
        "aaa-twin.yaml",
        text(
            "soundtrack: keep\ndefaults:\n  mv: sonic-v5\ntracks:\n  - name: a\n"
            "    gpt_description_prompt: hijack\n"
        ),
        "already defined by specs/keep.yaml",
    ),
    Bad("aliases.yaml", text(laughs()), "aliases"),
    Bad(
        "deep.json",
        text('{"tracks": ' + "[" * 50_000 + "]" * 50_000 + "}"),
        "too deeply",
        line=False,
    ),
    Bad("deep.yaml", text("".join("  " * i + f"k{i}:\n" for i in range(1_200))), "nesting depth"),
]


class Guarded:
    """The daemon with ``keep`` converged, and what must stay as it is."""

    def __init__(self, project: Project, daemon: DaemonProc) -> None:
        self.project = project
        self.daemon = daemon
        self.keep_files = self.keep()

    def keep(self) -> dict[str, tuple[str, int]]:
        return {k: v for k, v in self.project.files().items() if k.startswith("keep/")}

    def invalid(self) -> dict[str, str]:
        report = self.project.status()
        return {f["path"]: f["error"] for f in report["invalid_files"]}

    def settle(self, invalid: set[str], timeout: float = 60) -> dict[str, str]:
        """Wait until ``status`` reports exactly these invalid files."""
        found: dict[str, str] = {}

        def reported() -> bool:
            nonlocal found
            self.daemon.assert_running()
            found = self.invalid()
            # A file still settling is listed with a note, not yet its verdict.
            settling = any("is still changing" in error for error in found.values())
            return set(found) == invalid and not settling

        try:
            wait_until(reported, timeout, f"status to report {len(invalid)} invalid files")
        except AssertionError:
            raise AssertionError(
                f"missing {invalid - set(found)}, unexpected {set(found) - invalid}"
            ) from None
        return found

    def intact(self) -> None:
        self.daemon.assert_running()
        assert self.keep() == self.keep_files, "keep's outputs changed"
        assert not self.daemon.named("output.pruned")
        assert not (self.project.state / "trash").exists()


@pytest.fixture
def guarded(tmp_path: Path, sandbox: SandboxControl) -> Iterator[Guarded]:
    p = daemon_project(tmp_path, sandbox)
    p.config.write_text(
        p.config.read_text().replace("[submit]\n", f"[submit]\ndaily_budget = {BUDGET}\n")
    )
    p.write_spec("keep.yaml", KEEP)
    with DaemonProc(p, "--prune") as d:
        d.converged()
        g = Guarded(p, d)
        yield g
        g.intact()
        code, _ = d.stop()
        assert code == 0


def check_report(specs: Path, rel: str, error: str, *, line: bool) -> None:
    """Every problem names the file; a line, if named, is in the file; ``line``: one must be."""
    label = f"specs/{rel}"
    for problem in error.splitlines():
        assert problem.startswith(label), (rel, problem)
        match = re.match(rf"{re.escape(label)}:(\d+)[ :]", problem)
        assert match or not line, (rel, problem)
        if match:
            lines = (specs / rel).read_bytes().count(b"\n") + 1
            assert 1 <= int(match[1]) <= lines, (rel, problem)


def test_hand_written_bad_files_are_reported_and_change_nothing(
    guarded: Guarded, tmp_path: Path, figures: Figures
) -> None:
    p, d = guarded.project, guarded.daemon
    outside = tmp_path / "outside"
    outside.mkdir()
    # A folder symlinked in from outside is not followed at all (nothing to report).
    (outside / "linked").mkdir()
    (outside / "linked" / "theirs.yaml").write_text(
        "soundtrack: theirs\ntracks:\n  - name: t\n    gpt_description_prompt: t\n"
    )
    (p.specs / "linked").symlink_to(outside / "linked")
    mark = d.mark()
    for bad in HAND_WRITTEN:
        bad.make(p.specs / bad.rel, outside)
    found = guarded.settle({bad.rel for bad in HAND_WRITTEN})
    for bad in HAND_WRITTEN:
        assert bad.says in found[bad.rel], (bad.rel, found[bad.rel])
        check_report(p.specs, bad.rel, found[bad.rel], line=bad.line)
    logged = " ".join(
        str(e.get("problem")) for e in d.events()[mark:] if e["event"] == "spec.invalid"
    )
    for bad in HAND_WRITTEN:
        assert f"specs/{bad.rel}" in logged, f"{bad.rel} not in the log"
    report = p.status()
    soundtracks = {t["soundtrack"] for t in report["tracks"]}
    assert "theirs" not in soundtracks
    assert "stolen" not in soundtracks
    # keep is still keep's: three ready tracks, its own fingerprints.
    keep = [t for t in report["tracks"] if t["soundtrack"] == "keep"]
    want = expected_tracks_of(p, "keep.yaml")
    assert {t["track"]: t["fingerprint"] for t in keep} == want
    assert all(t["state"] == "ready" for t in keep)
    guarded.intact()
    figures.record("bad_input", "hand_written", files=len(HAND_WRITTEN), reported=len(found))


def expected_tracks_of(p: Project, rel: str) -> dict[str, str]:
    """track → fingerprint of one spec file, read on its own."""
    solo = p.root / "solo"
    solo.mkdir(exist_ok=True)
    (solo / Path(rel).name).write_bytes((p.specs / rel).read_bytes())
    (found,) = expected_tracks(solo).values()
    return found


# -- a file rewritten while the daemon reads it ------------------------------------------------


def test_a_file_changing_while_read_ends_in_its_last_version(guarded: Guarded) -> None:
    p = guarded.project
    path = p.specs / "churn.yaml"
    stop = threading.Event()
    versions = 0

    def version(n: int) -> str:
        return yaml.safe_dump(
            {
                "defaults": {"mv": "sonic-v5"},
                "tracks": [track(f"v{n}-{i}", f"churn {n} {i}" + " pad" * 50) for i in range(40)],
            }
        )

    def churn() -> None:
        nonlocal versions
        # Rewrite in place, in small pieces with pauses: readers see half-written
        # files, files that grow and shrink under them, and whole ones.
        while not stop.is_set():
            body = version(versions).encode()
            with path.open("wb") as f:
                for start in range(0, len(body), 512):
                    f.write(body[start : start + 512])
                    f.flush()
                    time.sleep(0.001)
            versions += 1

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        # Long enough for several passes to meet the file mid-write: it is
        # held back as still changing, or (read while written) refused as torn.
        wait_until(
            lambda: guarded.daemon.named("spec.settling") or guarded.daemon.named("spec.invalid"),
            30,
            "a pass meeting the file mid-write",
        )
        time.sleep(2.0)  # more churn; the wait above proves passes are meeting it
    finally:
        stop.set()
        writer.join()
    final = expected_tracks_of(p, "churn.yaml")

    def settled() -> bool:
        guarded.daemon.assert_running()
        report = p.status()
        churn = {
            t["track"]: t["fingerprint"] for t in report["tracks"] if t["soundtrack"] == "churn"
        }
        return churn == final and not report["invalid_files"]

    wait_until(settled, 30, "the last version of churn.yaml in force")
    assert versions > 3
    guarded.intact()


# -- generated files -------------------------------------------------------------------------

TEMPLATES = {
    ".yaml": (
        "defaults:\n  mv: sonic-v5\ntracks:\n  - name: one\n    gpt_description_prompt: generated\n"
        "  - name: two\n    title: Two\n    tags: dub, tape\n    prompt: |\n      [Verse]\n"
        "      words\n    clips: 2\n"
    ),
    ".toml": (
        '[defaults]\nmv = "sonic-v4-5"\n\n[[tracks]]\nname = "one"\n'
        'gpt_description_prompt = "generated"\n\n[[tracks]]\nname = "two"\nprompt = "words"\n'
        "style_weight = 0.5\n"
    ),
    ".json": (
        '{"defaults": {"mv": "sonic-v5"},\n "tracks": [\n  {"name": "one", '
        '"gpt_description_prompt": "generated"},\n  {"name": "two", "prompt": "words",'
        ' "vocal_gender": "f"}\n ]\n}\n'
    ),
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)


@st.composite
def spec_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """A file suffix and content: noise, or a valid template broken in one random way."""
    suffix = draw(st.sampled_from(sorted(TEMPLATES)))
    way = draw(st.sampled_from(["bytes", "text", "cut", "insert", "structure"]))
    template = TEMPLATES[suffix]
    if way == "bytes":
        return suffix, draw(st.binary(max_size=600))
    if way == "text":
        return suffix, draw(st.text(max_size=300)).encode("utf-8", "surrogatepass")
    if way == "cut":
        start = draw(st.integers(0, len(template)))
        end = draw(st.integers(start, len(template)))
        return suffix, (template[:start] + template[end:]).encode()
    if way == "insert":
        at = draw(st.integers(0, len(template)))
        junk = draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=8))
        return suffix, (template[:at] + junk + template[at:]).encode("utf-8", "surrogatepass")
    # Right syntax, data of any shape under the keys a spec has.
    doc = {
        "defaults": draw(json_values),
        "tracks": draw(st.lists(json_values, max_size=3) | json_values),
    }
    if suffix == ".yaml":
        return suffix, yaml.safe_dump(doc, allow_unicode=True).encode()
    return ".json", json.dumps(doc).encode()


def test_generated_files_are_each_reported_and_change_nothing(
    guarded: Guarded, figures: Figures
) -> None:
    p, d = guarded.project, guarded.daemon
    written: list[str] = []

    @settings(
        max_examples=100,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(spec_files())
    def drop(file: tuple[str, bytes]) -> None:
        suffix, content = file
        rel = f"gen/g{len(written):03d}{suffix}"
        (p.specs / rel).parent.mkdir(exist_ok=True)
        (p.specs / rel).write_bytes(content)
        written.append(rel)

    mark = d.mark()
    drop()
    # The daemon's verdicts must be the spec reader's, file for file.
    verdicts = scan_specs(p.specs)
    invalid = set(verdicts.errors)
    found = guarded.settle(invalid)
    for rel, error in found.items():
        check_report(p.specs, rel, error, line=False)
        assert error == str(verdicts.errors[rel])
    logged = " ".join(
        str(e.get("problem")) for e in d.events()[mark:] if e["event"] == "spec.invalid"
    )
    for rel in invalid:
        assert f"specs/{rel}" in logged, f"{rel} not in the log"
    with_line = sum(bool(re.match(r"specs/\S+:\d+[ :]", e)) for e in found.values())
    guarded.intact()
    figures.record(
        "bad_input",
        "generated",
        files=len(written),
        invalid=len(invalid),
        valid=len(written) - len(invalid),
        with_line=with_line,
    )


# -- 10,000 tracks in one file ---------------------------------------------------------------


def test_ten_thousand_tracks_in_one_file_are_accepted(
    tmp_path: Path, sandbox: SandboxControl, figures: Figures
) -> None:
    # A zero budget keeps the run about reading and recording, not generating.
    p = daemon_project(tmp_path, sandbox, poll=1.0)
    p.config.write_text(p.config.read_text().replace("[submit]\n", "[submit]\ndaily_budget = 0\n"))
    n = 10_000
    staged = p.root / "big.yaml"
    staged.write_text(big_spec(n))
    with DaemonProc(p) as d:
        d.wait_event("pass.completed")
        mark = d.mark()
        dropped = time.time()
        os.replace(staged, p.specs / "big.yaml")
        accepted = d.wait_event("pass.completed", lambda e: e["total"] == n, after=mark, timeout=60)
        latency = log_time(accepted) - dropped
        # Blocked by the budget, the daemon waits for the next day rather than
        # passing again; a rescan (a comment added to the file) costs a pass.
        costs = [accepted["seconds"]]
        for _ in range(3):
            mark = d.mark()
            with (p.specs / "big.yaml").open("a") as f:
                f.write("# touched\n")
            costs.append(d.wait_event("pass.completed", after=mark, timeout=60)["seconds"])
        report = p.status()
        assert report["summary"]["tracks"] == n
        assert report["summary"]["queued"] == n
        assert not report["invalid_files"]
        assert "budget" in (report["submit_block"] or "")
        code, _ = d.stop()
        assert code == 0
    figures.record(
        "bad_input",
        "ten_thousand",
        tracks=n,
        bytes=len(big_spec(n)),
        accept_seconds=round(latency, 2),
        pass_seconds=round(statistics.median(costs), 3),
    )
