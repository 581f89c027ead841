"""Hostile and random spec files: only SpecError ever escapes, valid specs round-trip."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.errors import SpecError
from reconciler.specs import DEFAULT_MODELS, SpecFile, parse_spec

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SUFFIXES = st.sampled_from([".yaml", ".yml", ".toml", ".json"])
FIELDS = [
    "soundtrack", "defaults", "tracks", "name", "mv", "custom_mode", "prompt",
    "gpt_description_prompt", "title", "tags", "negative_tags", "make_instrumental",
    "vocal_gender", "style_weight", "weirdness_constraint", "variant", "clips",
]  # fmt: skip


def toml_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\u{ord(m[0]):04x}", escaped) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else ("inf" if value > 0 else "-inf")
            if math.isinf(value)
            else repr(value)
        )
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value if v is not None) + "]"
    pairs = (f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items() if v is not None)
    return "{" + ", ".join(pairs) + "}"


def toml_dumps(data: dict[str, Any]) -> str:
    """A small TOML writer for the tests (the stdlib only reads TOML)."""
    root, tables, arrays = [], [], []
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, dict):
            tables.append(f"[{toml_string(key)}]")
            tables += [
                f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items() if v is not None
            ]
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for entry in value:
                arrays.append(f"[[{toml_string(key)}]]")
                arrays += [
                    f"{toml_string(k)} = {toml_value(v)}" for k, v in entry.items() if v is not None
                ]
        else:
            root.append(f"{toml_string(key)} = {toml_value(value)}")
    return "\n".join([*root, *tables, *arrays]) + "\n"


def dump(data: Any, suffix: str) -> bytes:
    if suffix == ".json":
        return json.dumps(data, indent=1).encode()
    if suffix == ".toml":
        return toml_dumps(data).encode()
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False).encode()


def parse_or_error(data: bytes, suffix: str) -> SpecFile | SpecError:
    try:
        return parse_spec("specs/f" + suffix, data, path="f" + suffix)
    except SpecError as exc:
        error = exc
    assert error.problems
    return error


# --- nothing but SpecError ---------------------------------------------------


@FUZZ
@given(st.binary(max_size=400), SUFFIXES)
def test_arbitrary_bytes(data: bytes, suffix: str) -> None:
    parse_or_error(data, suffix)


@FUZZ
@given(
    st.text(alphabet=st.sampled_from(list("-:[]{}\"'#&*!|>,. \n\tab0=\\\x00")), max_size=80),
    SUFFIXES,
)
def test_arbitrary_syntax(text: str, suffix: str) -> None:
    parse_or_error(text.encode(), suffix)


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["sonic-v5", "sonic-v4", "f", "yes", "x" * 450, "a-2", "../x"])
)
KEYS = st.sampled_from(FIELDS) | st.text(max_size=6)
TREES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=25,
)
SPEC_LIKE = st.fixed_dictionaries(
    {"tracks": st.lists(st.dictionaries(KEYS, TREES, max_size=6), max_size=4)},
    optional={"soundtrack": TREES, "defaults": st.dictionaries(KEYS, TREES, max_size=4)},
)


@FUZZ
@given(st.one_of(TREES, SPEC_LIKE), SUFFIXES)
def test_arbitrary_data_in_each_format(data: Any, suffix: str) -> None:
    if suffix == ".toml" and not isinstance(data, dict):
        data = {"tracks": data}
    parse_or_error(dump(data, suffix), suffix)


# --- valid specs round-trip, the same in every format ---------------------------

# PyYAML's emitter writes NEL and the Unicode line/paragraph separators raw, and
# YAML 1.1 readers fold them as line breaks: a dumper quirk, not a spec problem.
TEXT = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\x85\u2028\u2029"),
    min_size=1,
    max_size=40,
).filter(str.strip)
NEW_MODELS = [m for m in DEFAULT_MODELS if m not in ("sonic-v3-5", "sonic-v4")]


@st.composite
def valid_specs(draw: st.DrawFn) -> dict[str, Any]:
    defaults: dict[str, Any] = {}
    if draw(st.booleans()):
        defaults["mv"] = draw(st.sampled_from(NEW_MODELS))
    if draw(st.booleans()):
        defaults["make_instrumental"] = draw(st.booleans())
    if draw(st.booleans()):
        defaults["tags"] = draw(TEXT)
    tracks = []
    for i in range(draw(st.integers(1, 5))):
        entry: dict[str, Any] = {
            "name": f"t{i}-{draw(st.from_regex(r'[a-z0-9._-]{0,8}', fullmatch=True))}"
        }
        if "mv" not in defaults or draw(st.booleans()):
            entry["mv"] = draw(st.sampled_from(NEW_MODELS))
        entry["prompt" if draw(st.booleans()) else "gpt_description_prompt"] = draw(TEXT)
        optional = {
            "title": TEXT,
            "negative_tags": TEXT,
            "vocal_gender": st.sampled_from(["f", "m"]),
            "style_weight": st.floats(0, 1),
            "weirdness_constraint": st.integers(0, 1),
            "variant": st.integers(1, 2**40),
            "clips": st.sampled_from([1, 2]),
        }
        for key, values in optional.items():
            if draw(st.booleans()):
                entry[key] = draw(values)
        tracks.append(dict(draw(st.permutations(sorted(entry.items())))))
    spec: dict[str, Any] = {"tracks": tracks}
    if defaults:
        spec["defaults"] = defaults
    if draw(st.booleans()):
        spec["soundtrack"] = draw(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True))
    return spec


@FUZZ
@given(valid_specs())
def test_valid_specs_round_trip_in_every_format(spec: dict[str, Any]) -> None:
    parsed = {}
    for suffix in (".yaml", ".json", ".toml"):
        result = parse_or_error(dump(spec, suffix), suffix)
        assert isinstance(result, SpecFile), (suffix, result)
        parsed[suffix] = result
    first = parsed[".yaml"]
    for result in parsed.values():
        assert result.soundtrack == spec.get("soundtrack", "f")
        assert [(t.name, dict(t.request), t.variant, t.clips) for t in result.tracks] == [
            (t.name, dict(t.request), t.variant, t.clips) for t in first.tracks
        ]
    defaults = spec.get("defaults", {})
    for entry, track in zip(spec["tracks"], first.tracks, strict=True):
        assert track.name == entry["name"]
        assert track.request["mv"] == entry.get("mv", defaults.get("mv"))
        assert track.request["custom_mode"] is ("prompt" in entry)
        assert track.variant == entry.get("variant", 1)
        assert track.clips == entry.get("clips", 1)
        assert json.loads(json.dumps(track.request, sort_keys=True)) == track.request


@FUZZ
@given(valid_specs(), st.data())
def test_an_unknown_field_is_reported_at_its_line(
    spec: dict[str, Any], data: st.DataObject
) -> None:
    index = data.draw(st.integers(0, len(spec["tracks"]) - 1))
    spec["tracks"][index]["zz_unknown"] = 1
    for suffix in (".yaml", ".json", ".toml"):
        text = dump(spec, suffix)
        line = text[: text.index(b"zz_unknown")].count(b"\n") + 1
        result = parse_or_error(text, suffix)
        assert isinstance(result, SpecError)
        assert [(p.line, p.field) for p in result.problems] == [
            (line, f"tracks[{index}].zz_unknown")
        ], suffix
