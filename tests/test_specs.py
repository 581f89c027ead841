"""Spec files → validated specs: formats, rules, error locations, safe reading, scanning."""

from __future__ import annotations

import hashlib
import json
import os
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest

from reconciler import specs
from reconciler.errors import SpecError
from reconciler.specs import (
    DEFAULT_MODELS,
    MAX_SPEC_BYTES,
    Look,
    Observation,
    SpecFile,
    TrackSpec,
    is_spec_candidate,
    load_spec_file,
    observe,
    parse_spec,
    scan_specs,
    stamp,
)

REPO_SPECS = Path(__file__).resolve().parent.parent / "specs"


def parse(text: str, path: str = "s.yaml") -> SpecFile:
    return parse_spec(f"specs/{path}", textwrap.dedent(text).encode(), path=path)


def problems(text: str | bytes, path: str = "s.yaml") -> list[str]:
    data = text if isinstance(text, bytes) else textwrap.dedent(text).encode()
    with pytest.raises(SpecError) as caught:
        parse_spec(f"specs/{path}", data, path=path)
    return [str(p) for p in caught.value.problems]


def requests(spec: SpecFile) -> list[dict[str, object]]:
    return [dict(t.request) for t in spec.tracks]


# --- the example folder ------------------------------------------------------


def test_example_folder_is_valid_and_covers_the_format() -> None:
    scan = scan_specs(REPO_SPECS)
    assert scan.root_state == "ok"
    assert scan.errors == {}
    tracks = [t for f in scan.files.values() for t in f.tracks]
    assert len(scan.files) >= 3
    assert len(tracks) >= 12
    suffixes = {Path(p).suffix for p in scan.files}
    assert {".toml", ".json"} <= suffixes
    assert suffixes & {".yaml", ".yml"}
    assert any(t.request["custom_mode"] is False for t in tracks)
    assert any(t.request["custom_mode"] and "[Verse]" in t.request["prompt"] for t in tracks)
    assert any(t.variant > 1 for t in tracks)
    assert any(t.clips == 2 for t in tracks)
    assert all("defaults" in (REPO_SPECS / p).read_text() for p in scan.files)


# --- canonical requests ------------------------------------------------------

LOFI = {
    "custom_mode": False,
    "mv": "sonic-v5",
    "gpt_description_prompt": "lofi beats",
    "make_instrumental": True,
    "style_weight": 1.0,
}
SONG = {
    "custom_mode": True,
    "mv": "sonic-v5",
    "prompt": "[Verse]\nla la",
    "title": "Song",
    "make_instrumental": True,
}

SAME_SPEC_WRITTEN_DIFFERENTLY = [
    (
        "s.yaml",
        """\
        soundtrack: st
        defaults:
          mv: sonic-v5
          make_instrumental: true
        tracks:
          - name: a
            gpt_description_prompt: lofi beats
            style_weight: 1
          - name: b
            title: Song
            prompt: |
              [Verse]
              la la
        """,
    ),
    (
        "s.yml",
        """\
        # comments, other key order, everything on the track, flow style
        tracks:
          - {style_weight: 1.0, make_instrumental: true, mv: sonic-v5,
             gpt_description_prompt: "  lofi beats  ", name: a, custom_mode: false}
          - prompt: "[Verse]\\nla la\\n"
            mv: sonic-v5       # trailing comment
            make_instrumental: true
            title: Song
            name: b
        soundtrack: st
        """,
    ),
    (
        "s.toml",
        """\
        soundtrack = "st"
        [defaults]
        mv = "sonic-v5"
        make_instrumental = true
        [[tracks]]
        name = "a"
        gpt_description_prompt = "lofi beats"
        style_weight = 1
        [[tracks]]
        name = "b"
        title = "Song"
        prompt = '''
        [Verse]
        la la'''
        """,
    ),
    (
        "s.json",
        """\
        {"tracks": [{"name": "a", "gpt_description_prompt": "lofi beats", "style_weight": 1,
                     "mv": "sonic-v5", "make_instrumental": true},
                    {"name": "b", "prompt": "[Verse]\\nla la", "title": "Song"}],
         "defaults": {"mv": "sonic-v5", "make_instrumental": true},
         "soundtrack": "st"}
        """,
    ),
]


@pytest.mark.parametrize(("path", "text"), SAME_SPEC_WRITTEN_DIFFERENTLY)
def test_format_order_comments_and_whitespace_do_not_change_the_request(
    path: str, text: str
) -> None:
    spec = parse(text, path)
    assert spec.soundtrack == "st"
    assert spec.path == path
    assert [t.name for t in spec.tracks] == ["a", "b"]
    assert requests(spec) == [LOFI, SONG]
    assert isinstance(spec.tracks[0].request["style_weight"], float)
    # planning fingerprints json.dumps(request, sort_keys=True); TrackSpec stays hashable
    assert json.dumps(spec.tracks[0].request, sort_keys=True)
    assert hash(spec)


REQUEST_CASES = [
    (
        "defaults merged under the track, the track wins",
        """\
        defaults: {mv: sonic-v4, tags: jazz, style_weight: 0.5}
        tracks:
          - {name: a, gpt_description_prompt: d, mv: sonic-v5}
        """,
        {
            "custom_mode": False,
            "mv": "sonic-v5",
            "gpt_description_prompt": "d",
            "tags": "jazz",
            "style_weight": 0.5,
        },
    ),
    (
        "null or empty text on the track unsets a default",
        """\
        defaults: {mv: sonic-v5, tags: jazz, negative_tags: rock, make_instrumental: true}
        tracks:
          - {name: a, gpt_description_prompt: d, tags: null, negative_tags: "",
             make_instrumental: ~}
        """,
        {"custom_mode": False, "mv": "sonic-v5", "gpt_description_prompt": "d"},
    ),
    (
        "lyrics on the track override a description from defaults",
        """\
        defaults: {mv: sonic-v5, gpt_description_prompt: d}
        tracks:
          - {name: a, prompt: words}
        """,
        {"custom_mode": True, "mv": "sonic-v5", "prompt": "words"},
    ),
    (
        "a description on the track overrides lyrics from defaults",
        """\
        defaults: {mv: sonic-v5, prompt: words}
        tracks:
          - {name: a, gpt_description_prompt: d}
        """,
        {"custom_mode": False, "mv": "sonic-v5", "gpt_description_prompt": "d"},
    ),
    (
        "explicit custom_mode keeps both texts",
        """\
        tracks:
          - {name: a, mv: sonic-v5, custom_mode: true, prompt: words, gpt_description_prompt: d}
        """,
        {"custom_mode": True, "mv": "sonic-v5", "prompt": "words", "gpt_description_prompt": "d"},
    ),
    (
        "every API field passes through; name, variant and clips stay out",
        """\
        tracks:
          - name: a
            mv: sonic-v4-5
            prompt: words
            title: T
            tags: pop
            negative_tags: metal
            make_instrumental: false
            vocal_gender: m
            style_weight: 0
            weirdness_constraint: 0.25
            variant: 3
            clips: 2
        """,
        {
            "custom_mode": True,
            "mv": "sonic-v4-5",
            "prompt": "words",
            "title": "T",
            "tags": "pop",
            "negative_tags": "metal",
            "make_instrumental": False,
            "vocal_gender": "m",
            "style_weight": 0.0,
            "weirdness_constraint": 0.25,
        },
    ),
    (
        "YAML scalars: yes, dates, 1:30 and 1e3 stay text (numbers only where 1.1 and 1.2 agree)",
        """\
        tracks:
          - {name: "007", mv: sonic-v5, gpt_description_prompt: yes, title: 2024-01-01, tags: 1:30,
             negative_tags: 1e3, style_weight: .5}
        """,
        {
            "custom_mode": False,
            "mv": "sonic-v5",
            "gpt_description_prompt": "yes",
            "title": "2024-01-01",
            "tags": "1:30",
            "negative_tags": "1e3",
            "style_weight": 0.5,
        },
    ),
]


@pytest.mark.parametrize(("case", "text", "request_"), REQUEST_CASES)
def test_canonical_request(case: str, text: str, request_: dict[str, object]) -> None:
    assert requests(parse(text)) == [request_], case


def test_track_fields_outside_the_request() -> None:
    spec = parse(
        """\
        defaults: {mv: sonic-v5, clips: 2}
        tracks:
          - name: a
            gpt_description_prompt: d
          - name: b
            gpt_description_prompt: d
            variant: 2
            clips: 1
        """
    )
    assert spec.tracks == (
        TrackSpec("a", spec.tracks[0].request, variant=1, clips=2, line=3),
        TrackSpec("b", spec.tracks[1].request, variant=2, clips=1, line=5),
    )
    assert spec.tracks[0].request == spec.tracks[1].request


def test_soundtrack_and_digest() -> None:
    data = b"tracks: [{name: a, mv: sonic-v5, prompt: x}]\n"
    spec = parse_spec("specs/sub/late-night.yaml", data, path="sub/late-night.yaml")
    assert spec.soundtrack == "late-night"
    assert spec.path == "sub/late-night.yaml"
    assert spec.digest == hashlib.sha256(data).hexdigest()


def test_custom_model_list() -> None:
    text = b"tracks: [{name: a, mv: sonic-v9, prompt: x, vocal_gender: f}]"
    spec = parse_spec("s.yaml", text, path="s.yaml", models=("sonic-v9",))
    assert spec.tracks[0].request["mv"] == "sonic-v9"
    with pytest.raises(SpecError):
        parse_spec("s.yaml", text, path="s.yaml")


# --- rules: one problem each, exact text ---------------------------------------

MV = "known: " + ", ".join(DEFAULT_MODELS)
NAME_RULE = "use 1-64 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit"


def track(fields: str, mv: str = "mv: sonic-v5, ") -> str:
    """A one-track YAML spec, the track's fields on line 2."""
    return f"tracks:\n  - {{name: a, {mv}{fields}}}\n"


RULES = [
    # top level
    (
        "soundtrak: x\n" + track("prompt: x"),
        ["specs/s.yaml:1 soundtrak: unknown field 'soundtrak' (did you mean 'soundtrack'?)"],
    ),
    (
        "mv: sonic-v5\n" + track("prompt: x"),
        ["specs/s.yaml:1 mv: 'mv' is a track field: put it under `defaults` or in a track"],
    ),
    (
        "soundtrack: st\n",
        ["specs/s.yaml:1 tracks: missing 'tracks': list the soundtrack's tracks under it"],
    ),
    ("tracks: []\n", ["specs/s.yaml:1 tracks: is empty: add at least one track"]),
    ("tracks: {name: a}\n", ["specs/s.yaml:1 tracks: must be a list of tracks, not a mapping"]),
    (
        "tracks:\n  - just text\n",
        ["specs/s.yaml:2 tracks[0]: each track must be a mapping of fields, not text 'just text'"],
    ),
    (
        "- a\n- b\n",
        ["specs/s.yaml:1: the top level must be a mapping with a 'tracks' list, not a list"],
    ),
    (
        "defaults: [mv]\n" + track("prompt: x"),
        ["specs/s.yaml:1 defaults: must be a mapping of track fields, not a list"],
    ),
    (
        "defaults: {mv: sonic-v5, name: x, promt: y}\n" + track("prompt: x", mv=""),
        [
            "specs/s.yaml:1 defaults.name: 'name' cannot be in defaults: each track has its own",
            "specs/s.yaml:1 defaults.promt: unknown field 'promt' (did you mean 'prompt'?)",
        ],
    ),
    # soundtrack names
    (
        "soundtrack: Study Music\n" + track("prompt: x"),
        [f"specs/s.yaml:1 soundtrack: invalid soundtrack name 'Study Music': {NAME_RULE}"],
    ),
    (
        "soundtrack: 7\n" + track("prompt: x"),
        ["specs/s.yaml:1 soundtrack: soundtrack name must be text, not the number 7"],
    ),
    # track fields
    (
        track("promt: x"),
        [
            "specs/s.yaml:2 tracks[0]: needs lyrics in 'prompt' or a description in "
            "'gpt_description_prompt'",
            "specs/s.yaml:2 tracks[0].promt: unknown field 'promt' (did you mean 'prompt'?)",
        ],
    ),
    (
        track("prompt: x, zzz: 1"),
        [
            "specs/s.yaml:2 tracks[0].zzz: unknown field 'zzz' (known: name, custom_mode, mv, "
            "prompt, gpt_description_prompt, title, tags, negative_tags, make_instrumental, "
            "vocal_gender, style_weight, weirdness_constraint, variant, clips, album, artist)"
        ],
    ),
    ("tracks:\n  - {mv: sonic-v5, prompt: x}\n", ["specs/s.yaml:2 tracks[0]: missing 'name'"]),
    (
        "tracks:\n  - {name: null, mv: sonic-v5, prompt: x}\n",
        ["specs/s.yaml:2 tracks[0]: missing 'name'"],
    ),
    (
        track("prompt: x", mv=""),
        [
            f"specs/s.yaml:2 tracks[0]: missing 'mv': set the model on the track or in defaults "
            f"({MV[7:]})"
        ],
    ),
    (
        track("prompt: x", mv="mv: sonic-v9, "),
        [f"specs/s.yaml:2 tracks[0].mv: unknown model 'sonic-v9' ({MV})"],
    ),
    (
        track("prompt: x", mv="mv: [sonic-v5], "),
        [f"specs/s.yaml:2 tracks[0].mv: must be a model name, not a list ({MV})"],
    ),
    # modes
    (
        track("prompt: x, gpt_description_prompt: y"),
        [
            "specs/s.yaml:2 tracks[0]: both 'prompt' (lyrics, custom mode) and "
            "'gpt_description_prompt' (description mode) are set: keep one, or set custom_mode "
            "to choose"
        ],
    ),
    (
        track("custom_mode: true, gpt_description_prompt: y"),
        ["specs/s.yaml:2 tracks[0].custom_mode: is true, which needs lyrics in 'prompt'"],
    ),
    (
        track("custom_mode: false, prompt: x"),
        ["specs/s.yaml:2 tracks[0].custom_mode: is false, which needs 'gpt_description_prompt'"],
    ),
    (
        "defaults: {custom_mode: false}\n" + track("prompt: x"),
        [
            "specs/s.yaml:3 tracks[0].custom_mode: is false (set in defaults), which needs "
            "'gpt_description_prompt'"
        ],
    ),
    (
        track("prompt: '   '"),
        [
            "specs/s.yaml:2 tracks[0]: needs lyrics in 'prompt' or a description in "
            "'gpt_description_prompt'"
        ],
    ),
    # lengths
    (
        track("prompt: " + "x" * 3001, mv="mv: sonic-v4, "),
        [
            "specs/s.yaml:2 tracks[0].prompt: is 3001 characters long; sonic-v4 allows at most "
            "3000 (other models up to 5000)"
        ],
    ),
    (
        track("prompt: " + "x" * 5001),
        ["specs/s.yaml:2 tracks[0].prompt: is 5001 characters long; at most 5000 are allowed"],
    ),
    (
        track("gpt_description_prompt: " + "x" * 401),
        [
            "specs/s.yaml:2 tracks[0].gpt_description_prompt: is 401 characters long; "
            "at most 400 are allowed"
        ],
    ),
    (
        track("prompt: x, title: " + "x" * 80),
        ["specs/s.yaml:2 tracks[0].title: is 80 characters long; at most 79 are allowed"],
    ),
    (
        track("prompt: x, tags: " + "x" * 200, mv="mv: sonic-v3-5, "),
        [
            "specs/s.yaml:2 tracks[0].tags: is 200 characters long; sonic-v3-5 allows at most 199 "
            "(other models up to 1000)"
        ],
    ),
    (
        "defaults: {negative_tags: " + "x" * 200 + "}\n" + track("prompt: x", mv="mv: sonic-v4, "),
        [
            "specs/s.yaml:3 tracks[0].negative_tags: is 200 characters long (set in defaults); "
            "sonic-v4 allows at most 199 (other models up to 1000)"
        ],
    ),
    (
        track("prompt: x, negative_tags: " + "x" * 1001),
        [
            "specs/s.yaml:2 tracks[0].negative_tags: is 1001 characters long; "
            "at most 1000 are allowed"
        ],
    ),
    (
        track("prompt: x, title: 1999"),
        ["specs/s.yaml:2 tracks[0].title: must be text, not the number 1999 (put it in quotes)"],
    ),
    # vocal_gender
    (
        track("prompt: x, vocal_gender: female"),
        ["specs/s.yaml:2 tracks[0].vocal_gender: must be 'f' or 'm', not text 'female'"],
    ),
    (
        track("prompt: x, vocal_gender: f", mv="mv: sonic-v4, "),
        [
            "specs/s.yaml:2 tracks[0].vocal_gender: needs sonic-v4-5 or later; "
            "this track uses sonic-v4"
        ],
    ),
    # numbers and booleans
    (
        track("prompt: x, style_weight: 1.5"),
        ["specs/s.yaml:2 tracks[0].style_weight: must be a number from 0 to 1, not the number 1.5"],
    ),
    (
        track("prompt: x, weirdness_constraint: -0.1"),
        [
            "specs/s.yaml:2 tracks[0].weirdness_constraint: must be a number from 0 to 1, "
            "not the number -0.1"
        ],
    ),
    (
        track("prompt: x, style_weight: '0.5'"),
        ["specs/s.yaml:2 tracks[0].style_weight: must be a number from 0 to 1, not text '0.5'"],
    ),
    (
        track("prompt: x, style_weight: true"),
        ["specs/s.yaml:2 tracks[0].style_weight: must be a number from 0 to 1, not true"],
    ),
    (
        track("prompt: x, style_weight: .nan"),
        ["specs/s.yaml:2 tracks[0].style_weight: must be a number from 0 to 1, not the number nan"],
    ),
    (
        track("prompt: x, make_instrumental: yes"),
        [
            "specs/s.yaml:2 tracks[0].make_instrumental: must be true or false, not text 'yes' "
            "(write true or false, unquoted)"
        ],
    ),
    (
        track("prompt: x, make_instrumental: 'true'"),
        [
            "specs/s.yaml:2 tracks[0].make_instrumental: must be true or false, not text 'true' "
            "(write true or false, unquoted)"
        ],
    ),
    (
        track("prompt: x, custom_mode: 1"),
        ["specs/s.yaml:2 tracks[0].custom_mode: must be true or false, not the number 1"],
    ),
    (
        track("prompt: x, variant: 0"),
        ["specs/s.yaml:2 tracks[0].variant: must be a whole number from 1 up, not the number 0"],
    ),
    (
        track("prompt: x, variant: true"),
        ["specs/s.yaml:2 tracks[0].variant: must be a whole number from 1 up, not true"],
    ),
    (
        track("prompt: x, variant: 08"),
        ["specs/s.yaml:2 tracks[0].variant: must be a whole number from 1 up, not text '08'"],
    ),
    (
        track("prompt: x, variant: 1.5"),
        ["specs/s.yaml:2 tracks[0].variant: must be a whole number from 1 up, not the number 1.5"],
    ),
    (
        track("prompt: x, clips: 3"),
        [
            "specs/s.yaml:2 tracks[0].clips: must be 1 or 2 (clips kept of the task's two), "
            "not the number 3"
        ],
    ),
    (
        track("prompt: x, clips: true"),
        ["specs/s.yaml:2 tracks[0].clips: must be 1 or 2 (clips kept of the task's two), not true"],
    ),
]


@pytest.mark.parametrize(("text", "expected"), RULES)
def test_rule(text: str, expected: list[str]) -> None:
    assert problems(text) == expected


@pytest.mark.parametrize(
    "name", ["../x", "/abs", ".hidden", "Upper", "a b", "a/b", "", "-x", "a" * 65, "ü"]
)
def test_unsafe_track_names(name: str) -> None:
    text = f"tracks:\n  - name: {json.dumps(name)}\n    mv: sonic-v5\n    prompt: x\n"
    assert problems(text) == [f"specs/s.yaml:2 tracks[0].name: invalid name {name!r}: {NAME_RULE}"]


@pytest.mark.parametrize("name", ["a", "0", "a.b_c-d", "x" * 64, "track-2"])
def test_safe_track_names(name: str) -> None:
    assert parse(f"tracks: [{{name: '{name}', mv: sonic-v5, prompt: x}}]").tracks[0].name == name


NAME_CLASHES = [
    (
        "duplicate name",
        "tracks:\n  - {name: a, prompt: x}\n  - {name: b, prompt: y}\n  - {name: a, prompt: z}\n",
        ["specs/s.yaml:5 tracks[2].name: duplicate track name 'a' (also tracks[0], line 3)"],
    ),
    (
        "a track named like another's second clip, after it",
        "tracks:\n  - {name: a, prompt: x, clips: 2}\n  - {name: a-2, prompt: y}\n",
        [
            "specs/s.yaml:4 tracks[1].name: output file a-2.mp3 would also be written by "
            "tracks[0] 'a' (line 3); rename one of them"
        ],
    ),
    (
        "a second clip named like an earlier track",
        "tracks:\n  - {name: a-2, prompt: y}\n  - {name: a, prompt: x, clips: 2}\n",
        [
            "specs/s.yaml:4 tracks[1].name: output file a-2.mp3 would also be written by "
            "tracks[0] 'a-2' (line 3); rename one of them"
        ],
    ),
    (
        "clashes are found even when the tracks have other problems",
        "tracks:\n  - {name: a, prompt: x, mv: nope}\n  - {name: a, prompt: y}\n",
        [
            f"specs/s.yaml:3 tracks[0].mv: unknown model 'nope' ({MV})",
            "specs/s.yaml:4 tracks[1].name: duplicate track name 'a' (also tracks[0], line 3)",
        ],
    ),
]


@pytest.mark.parametrize(("case", "text", "expected"), NAME_CLASHES)
def test_name_clashes(case: str, text: str, expected: list[str]) -> None:
    assert problems("defaults: {mv: sonic-v5}\n" + text) == expected, case


def test_a_file_name_that_is_no_soundtrack_name_needs_soundtrack() -> None:
    text = "tracks: [{name: a, mv: sonic-v5, prompt: x}]\n"
    assert problems(text, "My Songs.yaml") == [
        f"specs/My Songs.yaml:1 soundtrack: the file name 'My Songs' is not a valid soundtrack "
        f"name ({NAME_RULE[4:]}): add `soundtrack: my-songs` or rename the file"
    ]
    assert parse("soundtrack: mine\n" + text, "My Songs.yaml").soundtrack == "mine"


def test_all_problems_of_a_file_at_once_sorted_by_line() -> None:
    found = problems(
        """\
        defaults:
          mv: sonic-v9
        tracks:
          - name: Bad
            prompt: x
          - name: ok
            promt: y
            clips: 5
        extra: 1
        """
    )
    assert found == [
        f"specs/s.yaml:2 defaults.mv: unknown model 'sonic-v9' ({MV})",
        f"specs/s.yaml:4 tracks[0].name: invalid name 'Bad': {NAME_RULE}",
        "specs/s.yaml:6 tracks[1]: needs lyrics in 'prompt' or a description in "
        "'gpt_description_prompt'",
        "specs/s.yaml:7 tracks[1].promt: unknown field 'promt' (did you mean 'prompt'?)",
        "specs/s.yaml:8 tracks[1].clips: must be 1 or 2 (clips kept of the task's two), "
        "not the number 5",
        "specs/s.yaml:9 extra: unknown field 'extra' (known: soundtrack, defaults, tracks)",
    ]


# --- each format: syntax errors and field lines ----------------------------------

FORMAT_ERRORS = [
    # YAML
    (
        "s.yaml",
        "tracks:\n  - name: a\n   mv: x\n",
        [
            "specs/s.yaml:3: invalid YAML: did not find expected '-' indicator "
            "(while parsing a block collection)"
        ],
    ),
    (
        "s.yaml",
        "tracks: [a\n",
        [
            "specs/s.yaml:2: invalid YAML: did not find expected ',' or ']' "
            "(while parsing a flow sequence)"
        ],
    ),
    (
        "s.yaml",
        "tracks:\n  - name: a\n    prompt: [Verse] la la\n",
        [
            "specs/s.yaml:3: invalid YAML: did not find expected key (while parsing a block "
            "mapping); text starting with [ or { must be quoted or written as a | block"
        ],
    ),
    (
        "s.yaml",
        "tracks:\n\t- name: a\n",
        [
            "specs/s.yaml:2: invalid YAML: found character that cannot start any token (while "
            "scanning for the next token); YAML indents with spaces, not tabs"
        ],
    ),
    (
        "s.yaml",
        "tracks: []\n---\ntracks: []\n",
        [
            "specs/s.yaml:2: invalid YAML: the file holds more than one YAML document (---); "
            "use one file each"
        ],
    ),
    (
        "s.yaml",
        "tracks:\n  - name: a\n    mv: sonic-v5\n    mv: sonic-v4\n    prompt: x\n",
        ["specs/s.yaml:4 tracks[0].mv: duplicate field 'mv' (first at line 3)"],
    ),
    (
        "s.yaml",
        "defaults: &d {mv: sonic-v5}\ntracks:\n  - &t {name: a, prompt: x}\n  - *t\n",
        ["specs/s.yaml:3 tracks[1]: YAML aliases (*name) are not supported; use `defaults`"],
    ),
    (
        "s.yaml",
        "tracks:\n  - {name: a, mv: sonic-v5, prompt: !!python/object:os.system x}\n",
        [
            "specs/s.yaml:2 tracks[0].prompt: YAML tag 'tag:yaml.org,2002:python/object:os.system' "
            "is not supported"
        ],
    ),
    (
        "s.yaml",
        "tracks:\n  - {? [a] : b}\n",
        ["specs/s.yaml:2 tracks[0]: field names must be plain text"],
    ),
    ("s.yaml", "# only a comment\n", ["specs/s.yaml: file is empty (it holds only comments)"]),
    (
        "s.yaml",
        "tracks: " + "[" * 20 + "]" * 20 + "\n",
        ["specs/s.yaml:1 tracks" + "[0]" * 16 + ": nested too deeply"],
    ),
    (
        "s.yaml",
        "tracks: [{name: a, mv: sonic-v5, variant: " + "9" * 5000 + ", prompt: x}]",
        ["specs/s.yaml:1 tracks[0].variant: number has too many digits"],
    ),
    (
        "s.yaml",
        "tracks: \x01\n",
        ["specs/s.yaml:1: invalid YAML: control characters are not allowed"],
    ),
    # TOML
    (
        "s.toml",
        "[[tracks]]\nname = 'a'\nmv = sonic\n",
        ["specs/s.toml:3: invalid TOML: Invalid value"],
    ),
    ("s.toml", "a = [1,\n", ["specs/s.toml:2: invalid TOML: Invalid value"]),
    (
        "s.toml",
        "[[tracks]]\nname = 'a'\nname = 'b'\n",
        ["specs/s.toml:3: invalid TOML: Cannot overwrite a value"],
    ),
    (
        "s.toml",
        "a = " + "[" * 2000 + "]" * 2000 + "\n",
        ["specs/s.toml: invalid TOML: nested too deeply"],
    ),
    (
        "s.toml",
        "a = 1\nb = " + "9" * 5000 + "\n",
        ["specs/s.toml:2: invalid TOML: a number has too many digits"],
    ),
    # JSON
    (
        "s.json",
        '{"tracks": [\n  {"name": "a",}\n]}',
        ["specs/s.json:2: invalid JSON: Expecting property name enclosed in double quotes"],
    ),
    (
        "s.json",
        '{"tracks": [{"name": "a", "mv": "sonic-v5",\n "prompt": "x",\n "prompt": "y"}]}',
        ["specs/s.json:3 tracks[0].prompt: duplicate field 'prompt' (first at line 2)"],
    ),
    ("s.json", "[" * 5000 + "]" * 5000, ["specs/s.json: invalid JSON: nested too deeply"]),
    (
        "s.json",
        '{"tracks": [],\n "x": ' + "9" * 5000 + "}",
        ["specs/s.json:2: invalid JSON: a number has too many digits"],
    ),
    (
        "s.json",
        '"just a string"',
        [
            "specs/s.json:1: the top level must be a mapping with a 'tracks' list, "
            "not text 'just a string'"
        ],
    ),
    # bytes
    ("s.yaml", b"", ["specs/s.yaml: file is empty"]),
    ("s.toml", b" \n\t\n", ["specs/s.toml: file is empty"]),
    (
        "s.json",
        b'{"tracks":\n\x00[]}',
        ["specs/s.json:2: holds NUL bytes: this is a binary file, not a UTF-8 text spec"],
    ),
    (
        "s.yaml",
        b"tracks:\n  - name: caf\xe9\n",
        ["specs/s.yaml:2: is not UTF-8 text (byte 0xe9); save it as UTF-8"],
    ),
    (
        "s.yaml",
        "\ufeff\ufefftracks: []".encode("utf-16"),
        ["specs/s.yaml:1: holds NUL bytes: this is a binary file, not a UTF-8 text spec"],
    ),
    (
        "s.txt",
        b"tracks: []",
        ["specs/s.txt: unsupported file type '.txt' (spec files end in .yaml, .yml, .toml, .json)"],
    ),
]


@pytest.mark.parametrize(("path", "text", "expected"), FORMAT_ERRORS)
def test_format_errors(path: str, text: str | bytes, expected: list[str]) -> None:
    data = text if isinstance(text, bytes) else text.encode()
    assert problems(data, path) == expected


# The same mistakes in each format: tracks[1] (0-based) has an unknown model on line 9
# and an unknown field on line 10; the defaults have a bad number on line 3.
LOCATED = {
    "s.yaml": """\
        soundtrack: st
        defaults:
          style_weight: 2
          mv: sonic-v5
        tracks:
          - name: a
            prompt: x
          - name: b
            mv: sonic-v9
            promt: y
        """,
    "s.toml": """\
        soundtrack = "st"
        [defaults]
        style_weight = 2
        mv = "sonic-v5"
        [[tracks]]
        name = "a"
        prompt = "x"
        [[tracks]]
        mv = "sonic-v9"
        promt = "y"
        name = "b"
        """,
    "s.json": """\
        {"soundtrack": "st",
         "defaults": {
           "style_weight": 2,
           "mv": "sonic-v5"},
         "tracks": [
           {"name": "a",
            "prompt": "x"},
           {"name": "b",
            "mv": "sonic-v9",
            "promt": "y"}]}
        """,
}


@pytest.mark.parametrize("path", sorted(LOCATED))
def test_problem_lines_in_each_format(path: str) -> None:
    assert problems(LOCATED[path], path) == [
        f"specs/{path}:3 defaults.style_weight: must be a number from 0 to 1, not the number 2",
        f"specs/{path}:8 tracks[1]: needs lyrics in 'prompt' or a description in "
        "'gpt_description_prompt'",
        f"specs/{path}:9 tracks[1].mv: unknown model 'sonic-v9' ({MV})",
        f"specs/{path}:10 tracks[1].promt: unknown field 'promt' (did you mean 'prompt'?)",
    ]


# Where each track's entry starts, in the layouts people use.
TRACK_LINES = [
    # a "-" alone on its line: the entry starts with its first field
    ("s.yaml", "tracks:\n\n  - name: a\n    prompt: x\n  -\n    name: b\n    prompt: y\n", [3, 6]),
    (
        "s.toml",
        '[[tracks]]\nname = "a"\nprompt = """\n[[tracks]]\nname = "fake"\n"""\n'
        '[[tracks]] # second\nname = "b"\nprompt = "y"\n',
        [1, 7],
    ),
    (
        "s.toml",
        'tracks = [\n  {name = "a", prompt = "x"},\n\n  {name = "b", prompt = "[1]"},\n]\n',
        [2, 4],
    ),
    ("s.toml", 'tracks = [{name = "a", prompt = "x"}, {name = "b", prompt = "y"}]\n', [1, 1]),
    (
        "s.json",
        '{"tracks": [\n {"name": "a", "prompt": "x"},\n\n {"name": "b",\n "prompt": "y"}]}',
        [2, 4],
    ),
]


@pytest.mark.parametrize(("path", "text", "lines"), TRACK_LINES)
def test_track_lines(path: str, text: str, lines: list[int]) -> None:
    # No track names a model: each is invalid, and its problem lands on its first line.
    assert [problem.split()[0] for problem in problems(text, path)] == [
        f"specs/{path}:{line}" for line in lines
    ]
    # With defaults appended (TOML, YAML) the same tracks are valid and carry those lines.
    if path != "s.json":
        defaults = (
            '\n[defaults]\nmv = "sonic-v5"\n' if path == "s.toml" else "defaults: {mv: sonic-v5}\n"
        )
        spec = parse_spec(path, (text + defaults).encode(), path=path)
        assert [t.line for t in spec.tracks] == lines


# --- candidates ---------------------------------------------------------------

CANDIDATES = [
    ("study.yaml", True),
    ("study.yml", True),
    ("study.toml", True),
    ("study.json", True),
    ("sub/dir/study.YAML", True),
    ("Study.Json", True),
    ("study.txt", False),
    ("study", False),
    ("study.yaml~", False),
    ("study.yaml.swp", False),
    ("study.yaml.swx", False),
    (".study.yaml.swp", False),
    ("study.yaml.tmp", False),
    ("study.tmp.yaml", False),
    ("study.bak.json", False),
    ("study.ORIG.toml", False),
    ("study.part.yml", False),
    ("study.yaml.part", False),
    ("#study.yaml#", False),
    ("#study.yaml", False),
    (".#study.yaml", False),
    ("4913", False),
    (".study.yaml", False),
    (".git/study.yaml", False),
    ("sub/.hidden/study.yaml", False),
]


@pytest.mark.parametrize(("path", "expected"), CANDIDATES)
def test_spec_candidates(path: str, expected: bool) -> None:
    assert is_spec_candidate(Path(path)) is expected
    assert is_spec_candidate(path) is expected


# --- reading files --------------------------------------------------------------

GOOD = b"tracks: [{name: a, mv: sonic-v5, prompt: x}]\n"


def read_problem(root: Path, rel: str) -> str:
    with pytest.raises(SpecError) as caught:
        load_spec_file(root, root / rel)
    [problem] = caught.value.problems
    return str(problem)


def test_load_spec_file_labels_and_paths(tmp_path: Path) -> None:
    root = tmp_path / "specs"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.yaml").write_bytes(GOOD)
    assert load_spec_file(root, root / "sub" / "a.yaml").path == "sub/a.yaml"
    assert load_spec_file(root, Path("sub/a.yaml")).soundtrack == "a"
    (root / "sub" / "a.yaml").write_bytes(b"tracks: []\n")
    assert (
        read_problem(root, "sub/a.yaml")
        == "specs/sub/a.yaml:1 tracks: is empty: add at least one track"
    )
    with pytest.raises(SpecError) as caught:
        load_spec_file(root, root / "sub/a.yaml", label_root="my/specs")
    assert caught.value.problems[0].file == "my/specs/sub/a.yaml"


def test_refuses_symlink_out_of_root_but_follows_one_inside(tmp_path: Path) -> None:
    root = tmp_path / "specs"
    root.mkdir()
    (tmp_path / "outside.yaml").write_bytes(GOOD)
    (root / "real.yaml").write_bytes(GOOD)
    (root / "out.yaml").symlink_to(tmp_path / "outside.yaml")
    (root / "in.yaml").symlink_to("real.yaml")
    assert read_problem(root, "out.yaml") == (
        f"specs/out.yaml: points to {tmp_path / 'outside.yaml'}, outside the specs folder"
    )
    assert load_spec_file(root, root / "in.yaml").soundtrack == "in"


def test_refuses_special_oversized_binary_and_missing_files(tmp_path: Path) -> None:
    root = tmp_path / "specs"
    root.mkdir()
    os.mkfifo(root / "fifo.yaml")
    (root / "dir.yaml").mkdir()
    (root / "big.yaml").write_bytes(b"#" * (MAX_SPEC_BYTES + 1))
    (root / "max.yaml").write_bytes(GOOD + b"#" * (MAX_SPEC_BYTES - len(GOOD)))
    (root / "bin.json").write_bytes(bytes(range(256)))
    assert read_problem(root, "fifo.yaml") == "specs/fifo.yaml: is not a regular file"
    assert read_problem(root, "dir.yaml") == "specs/dir.yaml: is not a regular file"
    assert read_problem(root, "big.yaml") == (
        f"specs/big.yaml: is too large ({MAX_SPEC_BYTES + 1} bytes; "
        f"spec files may be at most {MAX_SPEC_BYTES} bytes)"
    )
    assert load_spec_file(root, root / "max.yaml").tracks[0].name == "a"
    assert read_problem(root, "bin.json") == (
        "specs/bin.json:1: holds NUL bytes: this is a binary file, not a UTF-8 text spec"
    )
    assert read_problem(root, "gone.yaml") == (
        "specs/gone.yaml: cannot be read: No such file or directory"
    )


def test_a_file_changing_while_read_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "specs"
    root.mkdir()
    spec = root / "a.yaml"
    spec.write_bytes(GOOD)
    real_read = os.read
    saves = [b"# another editor save\n"]

    def read_then_append(fd: int, n: int) -> bytes:
        chunk = real_read(fd, n)
        if saves:
            with spec.open("ab") as more:
                more.write(saves.pop())
        return chunk

    with mock.patch("os.read", read_then_append):
        assert read_problem(root, "a.yaml") == (
            "specs/a.yaml: is changing while being read; it will be read again on the next pass"
        )
    assert load_spec_file(root, spec).tracks[0].name == "a"


# --- scanning the folder ----------------------------------------------------------


def test_scan_states(tmp_path: Path) -> None:
    assert scan_specs(tmp_path / "missing").root_state == "missing"
    (tmp_path / "file").write_bytes(GOOD)
    assert scan_specs(tmp_path / "file").root_state == "unreadable"
    empty = tmp_path / "empty"
    (empty / ".git").mkdir(parents=True)
    (empty / ".git" / "x.yaml").write_bytes(GOOD)
    (empty / "notes.txt").write_bytes(b"hi")
    (empty / "a.yaml~").write_bytes(GOOD)
    assert scan_specs(empty) == specs.SpecScan("empty", {}, {})


def test_an_unlistable_subfolder_makes_the_scan_unreadable(tmp_path: Path) -> None:
    # Its tracks are unknown, not gone: "unreadable" keeps the planner from pruning them.
    # (chmod cannot lock root out, and CI runs as root: the refusal is simulated.)
    (tmp_path / "a.yaml").write_bytes(GOOD)
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "b.yaml").write_bytes(GOOD)
    real_scandir = os.scandir

    def scandir(path: str) -> object:
        if path.endswith("locked"):
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    with mock.patch("os.scandir", scandir):
        scan = scan_specs(tmp_path)
    assert scan.root_state == "unreadable"
    assert set(scan.files) == {"a.yaml"}
    with mock.patch("os.scandir", scandir):
        assert scan_specs(tmp_path / "locked").root_state == "unreadable"


def test_scan_reads_valid_and_invalid_files_sorted(tmp_path: Path) -> None:
    root = tmp_path / "specs"
    (root / "sub").mkdir(parents=True)
    (root / "b.yaml").write_bytes(GOOD)
    (root / "sub" / "c.json").write_bytes(
        b'{"tracks": [{"name": "a", "mv": "sonic-v5", "prompt": "x"}]}'
    )
    (root / "a.toml").write_bytes(b'[[tracks]]\nname = "a"\nmv = "sonic-v5"\npromt = "x"\n')
    (root / ".hidden.yaml").write_bytes(b"broken: [")
    (root / "b.yaml.swp").write_bytes(b"broken: [")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "d.yaml").write_bytes(GOOD)
    (root / "linked").symlink_to(tmp_path / "elsewhere")  # symlinked folders are not followed
    scan = scan_specs(root)
    assert scan.root_state == "ok"
    assert list(scan.files) == ["b.yaml", "sub/c.json"]
    assert list(scan.errors) == ["a.toml"]
    assert [str(p) for p in scan.errors["a.toml"].problems] == [
        "specs/a.toml:1 tracks[0]: needs lyrics in 'prompt' or a description in "
        "'gpt_description_prompt'",
        "specs/a.toml:4 tracks[0].promt: unknown field 'promt' (did you mean 'prompt'?)",
    ]


def test_scan_reuses_unchanged_files_by_digest(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_bytes(GOOD)
    (tmp_path / "b.yaml").write_bytes(GOOD)
    first = scan_specs(tmp_path)
    (tmp_path / "b.yaml").write_bytes(GOOD + b"# edited\n")
    stale = SpecFile("a.yaml", "a", (), "0" * 64)
    second = scan_specs(tmp_path, reuse=first.files)
    assert second.files["a.yaml"] is first.files["a.yaml"]
    assert second.files["b.yaml"] is not first.files["b.yaml"]
    assert second.files["b.yaml"].tracks == first.files["b.yaml"].tracks
    assert scan_specs(tmp_path, reuse={"a.yaml": stale}).files["a.yaml"] == first.files["a.yaml"]
    with mock.patch.object(specs.files, "_parse", side_effect=AssertionError("parsed again")):
        assert scan_specs(tmp_path, reuse=second.files).files == second.files


def later(seconds: float) -> Callable[[], int]:
    """A wall clock ``seconds`` ahead: the scan reads as if that much later."""
    return lambda: time.time_ns() + int(seconds * 1e9)


def test_a_file_read_too_young_to_be_sure_of_gets_a_stamp_that_never_matches(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.yaml"
    path.write_bytes(GOOD)
    now = stamp(path.stat())
    # Just written: a write in the same timestamp tick would go unseen.
    young = scan_specs(tmp_path).stamps["a.yaml"]
    assert young == now + specs.YOUNG
    old = scan_specs(tmp_path, wall_ns=later(specs.RACY_NS / 1e9 + 1)).stamps["a.yaml"]
    assert old == now
    # The same file, seen again when older, is no change to record.
    assert specs.same_file(young, old)
    # A young stamp never matches: the file is read again, even unchanged.
    files = scan_specs(tmp_path).files
    with (
        mock.patch.object(os, "open", side_effect=AssertionError("read")),
        pytest.raises(AssertionError, match="read"),
    ):
        scan_specs(tmp_path, reuse=files, stamps={"a.yaml": young})
    (tmp_path / "b.yaml").write_bytes(b"tracks: [")
    assert "b.yaml" not in scan_specs(tmp_path, wall_ns=later(10)).stamps, "invalid: no stamp"


def test_a_stamped_file_is_not_read_again_until_it_is_written(tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    path.write_bytes(GOOD)
    first = scan_specs(tmp_path, wall_ns=later(10))
    # Another version under the same path: returned only if the file is not read.
    read = first.files["a.yaml"]
    other = SpecFile(read.path, read.soundtrack, read.tracks, "0" * 64)
    with mock.patch.object(os, "open", side_effect=AssertionError("read again")):
        trusted = scan_specs(tmp_path, reuse={"a.yaml": other}, stamps=first.stamps)
    assert trusted.files["a.yaml"] is other
    assert trusted.stamps == first.stamps
    # Edited in place to the same size, its mtime then set back as it was:
    # the ctime (which no tool sets back) and so the stamp change.
    before = path.stat()
    path.write_bytes(GOOD.replace(b"prompt: x", b"prompt: y"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    if after.st_ctime_ns == before.st_ctime_ns:
        pytest.skip("file times here are coarser than this test's two writes")
    again = scan_specs(tmp_path, reuse={"a.yaml": other}, stamps=first.stamps)
    assert again.files["a.yaml"] is not other
    assert again.files["a.yaml"].digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_soundtrack_defined_twice_keeps_the_first_file(tmp_path: Path) -> None:
    root = tmp_path / "specs"
    root.mkdir()
    (root / "a.yaml").write_bytes(b"soundtrack: study\n" + GOOD)
    (root / "b.json").write_bytes(
        b'{\n "tracks": [{"name": "z", "mv": "sonic-v5", "prompt": "x"}],\n "soundtrack": "study"}'
    )
    (root / "study.yaml").write_bytes(GOOD)
    for reuse in (None, scan_specs(root).files):
        scan = scan_specs(root, reuse=reuse)
        assert list(scan.files) == ["a.yaml"]
        assert {rel: [str(p) for p in e.problems] for rel, e in scan.errors.items()} == {
            "b.json": [
                "specs/b.json:3 soundtrack: soundtrack 'study' is already defined by "
                "specs/a.yaml; give this file another `soundtrack:` name"
            ],
            "study.yaml": [
                "specs/study.yaml:1 soundtrack: soundtrack 'study' is already defined by "
                "specs/a.yaml; give this file another `soundtrack:` name"
            ],
        }


@pytest.mark.parametrize(
    ("path", "text", "expected"),
    [
        (
            "s.yaml",
            "defaults: &d\n  mv: sonic-v5\ntracks:\n  - name: a\n    prompt: x\n    prompt: y\n"
            "    mv: sonic-v9\n  - name: B\n    <<: *d\n    prompt: z\n",
            [
                "specs/s.yaml:6 tracks[0].prompt: duplicate field 'prompt' (first at line 5)",
                "specs/s.yaml:7 tracks[0].mv: unknown model 'sonic-v9'",
                "specs/s.yaml:8 tracks[1].name: invalid name 'B'",
                "specs/s.yaml:9 tracks[1].<<: YAML aliases (*name) are not supported",
            ],
        ),
        (
            "s.yaml",
            "tracks:\n  - name: a\n    mv: sonic-v9\n    prompt: x\n"
            "tracks:\n  - name: b\n    mv: sonic-v5\n",
            [
                "specs/s.yaml:3 tracks[0].mv: unknown model 'sonic-v9'",
                "specs/s.yaml:5 tracks: duplicate field 'tracks' (first at line 1)",
            ],
        ),
        (
            "s.json",
            '{"tracks": [{"name": "a",\n "name": "b",\n "mv": "nope", "prompt": "x"}]}',
            [
                "specs/s.json:2 tracks[0].name: duplicate field 'name' (first at line 1)",
                "specs/s.json:3 tracks[0].mv: unknown model 'nope'",
            ],
        ),
    ],
)
def test_duplicate_keys_and_aliases_do_not_hide_the_other_problems(
    path: str, text: str, expected: list[str]
) -> None:
    found = problems(text, path)
    assert len(found) == len(expected), found
    for line, start in zip(found, expected, strict=True):
        assert line.startswith(start), (line, start)


@pytest.mark.parametrize(
    ("path", "suggested"),
    [
        ("café.yaml", "cafe"),
        ("Study Session.yaml", "study-session"),
        ("日本.yaml", "my-soundtrack"),
    ],
)
def test_a_file_name_that_is_no_soundtrack_name_gets_a_sensible_suggestion(
    path: str, suggested: str
) -> None:
    found = problems("tracks:\n  - {name: a, mv: sonic-v5, prompt: x}\n", path)
    assert len(found) == 1
    assert f"add `soundtrack: {suggested}` or rename the file" in found[0]


def test_an_invalid_file_keeps_its_soundtrack_from_a_newcomer(tmp_path: Path) -> None:
    """a.yaml broken, b.yaml naming a.yaml's soundtrack: b is reported, not silently ignored."""
    root = tmp_path / "specs"
    root.mkdir()
    (root / "a.yaml").write_text(
        "soundtrack: mix\ntracks:\n  - {name: a, mv: sonic-v5, prompt: x}\n"
    )
    first = scan_specs(root)
    assert list(first.files) == ["a.yaml"]
    (root / "a.yaml").write_text("soundtrack: mix\ntracks: [\n")
    (root / "b.yaml").write_text(
        "soundtrack: mix\ntracks:\n  - {name: b, mv: sonic-v5, prompt: y}\n"
    )
    second = scan_specs(root, reuse=first.files)
    assert second.files == {}
    assert sorted(second.errors) == ["a.yaml", "b.yaml"]
    assert "soundtrack 'mix' is already defined by specs/a.yaml" in str(second.errors["b.yaml"])
    # Once a.yaml is fixed under another name, b.yaml takes the soundtrack.
    (root / "a.yaml").write_text(
        "soundtrack: other\ntracks:\n  - {name: a, mv: sonic-v5, prompt: x}\n"
    )
    third = scan_specs(root, reuse=first.files)
    assert sorted(third.files) == ["a.yaml", "b.yaml"]
    assert third.errors == {}


def test_the_incumbent_keeps_its_soundtrack_when_an_invalid_file_once_named_it(
    tmp_path: Path,
) -> None:
    root = tmp_path / "specs"
    root.mkdir()
    (root / "b.yaml").write_text(
        "soundtrack: mix\ntracks:\n  - {name: b, mv: sonic-v5, prompt: y}\n"
    )
    (root / "a.yaml").write_text(
        "soundtrack: mine\ntracks:\n  - {name: a, mv: sonic-v5, prompt: x}\n"
    )
    first = scan_specs(root)
    read = first.files["a.yaml"]
    stale = {**first.files, "a.yaml": SpecFile(read.path, "mix", read.tracks, read.digest)}
    (root / "a.yaml").write_text("tracks: [\n")
    second = scan_specs(root, reuse=stale)
    assert list(second.files) == ["b.yaml"]
    assert list(second.errors) == ["a.yaml"]


# --- waiting for a file to stop changing -------------------------------------

#: A fixed mtime, so the stability tests need no real clock: "now" is T + offset.
T = 1_800_000_000.0
WINDOW = 2.0


def look(size: int = 10, age: float = 0.0, digest: str = "d1") -> Look:
    """A file of ``size`` bytes last modified ``age`` seconds before T."""
    return Look(size, int((T - age) * 1e9), digest)


def seen(look: Look, since: float, last_read: float = T - 0.5) -> Observation:
    return Observation(look, since, last_read)


# previous observation, this look (read at T), stable at T, ready at
STABILITY = [
    ("first sight, written long ago: read at once", None, look(age=60), True, T - 58),
    ("first sight, written exactly a window ago", None, look(age=WINDOW), True, T),
    ("first sight, written a second ago: a whole window", None, look(age=1), False, T + 2),
    ("first sight, written just now", None, look(age=0), False, T + 2),
    ("first sight, mtime in the future", None, look(age=-30), False, T + 2),
    ("unchanged for a window", seen(look(age=9), T - 2), look(age=9), True, T),
    ("unchanged for less than a window", seen(look(age=9), T - 1.5), look(age=9), False, T + 0.5),
    ("unchanged since an old first sight", seen(look(age=60), T - 60), look(age=60), True, T - 58),
    ("grew (the second chunk)", seen(look(10, age=1), T - 1), look(25, age=0.5), False, T + 2),
    ("touched: same bytes, new mtime", seen(look(age=9), T - 9), look(age=0), False, T + 2),
    (
        "rewritten in the same size and tick",
        seen(look(age=0.2), T - 0.2, T - 0.1),
        look(age=0.2, digest="d2"),
        False,
        T + 2,
    ),
    (
        "saved once, a window before this read, after the last one",
        seen(look(age=90), T - 90, T - 5),
        look(25, age=3),
        True,
        T - 1,
    ),
    (
        "changed and given an mtime older than the last read (cp -p)",
        seen(look(10, age=1), T - 1, T - 0.5),
        look(25, age=600),
        False,
        T + 2,
    ),
]


@pytest.mark.parametrize(
    ("case", "previous", "now_look", "stable", "ready_at"),
    STABILITY,
    ids=[c[0] for c in STABILITY],
)
def test_a_file_is_stable_once_unchanged_for_the_window(
    case: str, previous: Observation | None, now_look: Look, stable: bool, ready_at: float
) -> None:
    after = observe(previous, now_look, T, WINDOW)
    assert (after.look, after.seen) == (now_look, T)
    assert after.since + WINDOW == pytest.approx(ready_at)
    assert (after.since + WINDOW <= T) is stable


def test_without_a_window_every_file_is_stable() -> None:
    assert observe(None, look(age=0), T, 0.0).since == T
    assert observe(seen(look(10), T - 1), look(25), T, 0.0).since == T


def write_at(path: Path, data: bytes, age: float) -> None:
    path.write_bytes(data)
    ns = int((T - age) * 1e9)
    os.utime(path, ns=(ns, ns))


def test_scan_holds_back_a_changing_file_until_its_window_ends(tmp_path: Path) -> None:
    write_at(tmp_path / "old.yaml", GOOD, age=3600)
    write_at(tmp_path / "new.yaml", GOOD, age=0.5)
    first = scan_specs(tmp_path, settle=specs.Settling({}, T, WINDOW))
    assert list(first.files) == ["old.yaml"]
    assert first.errors == {}
    assert first.settling == {
        "new.yaml": f"{tmp_path.name}/new.yaml: is still changing; "
        "it is read once it has been unchanged for 2 s"
    }
    assert first.settled_by == T + WINDOW

    # The second chunk arrives before the window ends: the window starts again.
    write_at(tmp_path / "new.yaml", GOOD + b"# second chunk\n", age=-1)
    second = scan_specs(tmp_path, settle=specs.Settling(first.observed, T + 1, WINDOW))
    assert list(second.settling) == ["new.yaml"]
    assert second.settled_by == T + 1 + WINDOW

    third = scan_specs(tmp_path, settle=specs.Settling(second.observed, T + 2.9, WINDOW))
    assert list(third.settling) == ["new.yaml"]
    fourth = scan_specs(tmp_path, settle=specs.Settling(third.observed, T + 3, WINDOW))
    assert list(fourth.files) == ["new.yaml", "old.yaml"]
    assert fourth.settling == {}
    assert fourth.settled_by is None
    assert fourth.files["new.yaml"].digest == hashlib.sha256(GOOD + b"# second chunk\n").hexdigest()


def test_scan_without_hold_reads_settling_files_and_notes_them(tmp_path: Path) -> None:
    write_at(tmp_path / "new.yaml", GOOD, age=0.5)
    scan = scan_specs(tmp_path, settle=specs.Settling({}, T, WINDOW, hold=False))
    assert list(scan.files) == ["new.yaml"]
    assert list(scan.settling) == ["new.yaml"]


def test_a_settling_file_that_does_not_parse_is_not_an_error_yet(tmp_path: Path) -> None:
    write_at(tmp_path / "half.yaml", b"tracks: [{name: a, mv: sonic-v5, pro", age=0)
    scan = scan_specs(tmp_path, settle=specs.Settling({}, T, WINDOW))
    assert (scan.files, scan.errors, list(scan.settling)) == ({}, {}, ["half.yaml"])
    later = scan_specs(tmp_path, settle=specs.Settling(scan.observed, T + WINDOW, WINDOW))
    assert list(later.errors) == ["half.yaml"]
