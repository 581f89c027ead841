"""Spec rules: plain data → a validated :class:`SpecFile`, with the MusicAPI's own rules.

Where it sits: the last step of the ``specs`` package, after ``formats``. The
result per file is a :class:`SpecFile` whose tracks carry the canonical create
request that ``planning`` fingerprints. Every problem becomes a
:class:`SpecProblem` naming file, line and field, collected into one
:class:`SpecError` per file; no other exception type escapes.

Validation is plain code rather than pydantic: the messages are the product
here (``unknown field 'promt' (did you mean 'prompt'?)``) and the hand-written
checks are both shorter than translating pydantic's error locations and
faster on the hot path (a cold plan parses thousands of files).
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from reconciler.errors import SpecError, SpecProblem
from reconciler.limits import (
    DEFAULT_MODELS,
    FIELD_LIMITS,
    TEXT_FIELDS,
    FieldLimits,
    limits_for,
    loosest,
)
from reconciler.specs.formats import _READERS, SPEC_SUFFIXES, _decode, _Doc, _field, _Loc

# The models before v4-5 have the API's shorter limits and no vocal_gender.
# The model list is configurable; any model not named here (a future one
# included) gets the newer rules, which is what the API does for new models.
_OLD_MODELS = frozenset({"sonic-v3-5", "sonic-v4"})

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}\Z")
_NAME_RULE = "1-64 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit"

# Create-request fields the reconciler sends, in the order requests are built.
_API_FIELDS = (
    "custom_mode",
    "mv",
    "prompt",
    "gpt_description_prompt",
    "title",
    "tags",
    "negative_tags",
    "make_instrumental",
    "vocal_gender",
    "style_weight",
    "weirdness_constraint",
)
# Tag-only fields: written into the output's ID3 tags, never sent, so they
# leave the fingerprint alone (like ``name`` and ``clips``).
_TAG_FIELDS = ("album", "artist")
_TRACK_FIELDS = ("name", *_API_FIELDS, "variant", "clips", *_TAG_FIELDS)
_DEFAULTS_FIELDS = tuple(f for f in _TRACK_FIELDS if f != "name")
_TOP_FIELDS = ("soundtrack", "defaults", "tracks")

#: Characters allowed in a tag-only field (ID3 frames have no practical limit).
_TAG_TEXT_LIMIT = 200

# YAML 1.1 spellings PyYAML would turn into booleans; we read YAML 1.2 style
# (they stay text) and point at the fix when one is used for a boolean field.
_YAML11_BOOLS = frozenset({"yes", "no", "on", "off", "y", "n"})


@dataclass(frozen=True, slots=True)
class TrackSpec:
    """One validated track: what to generate and under which name.

    ``request`` is the canonical create request (defaults merged, custom_mode
    resolved, text stripped, unset fields omitted): a plain dict so that
    ``json.dumps(request, sort_keys=True)`` works; treat it as read-only. It is
    left out of the hash so that a TrackSpec stays hashable.
    """

    name: str
    request: Mapping[str, Any] = field(hash=False)
    variant: int = 1
    clips: int = 1
    line: int = 1
    #: ID3 tags only (see ``_TAG_FIELDS``): None means the soundtrack / no artist.
    album: str | None = None
    artist: str | None = None


class SpecFile:
    """One valid spec file: a soundtrack and its tracks in file order. Immutable.

    ``tracks`` may be given as a function that returns them, called once on
    first use: a last good version read back from the ledger decodes its
    tracks (the create requests are most of its size) only when something
    asks for them, and a cold ``plan`` over unchanged files never does.
    """

    __slots__ = ("_tracks", "digest", "path", "soundtrack")

    path: str
    soundtrack: str
    digest: str
    _tracks: tuple[TrackSpec, ...] | Callable[[], tuple[TrackSpec, ...]]

    def __init__(
        self,
        path: str,
        soundtrack: str,
        tracks: tuple[TrackSpec, ...] | Callable[[], tuple[TrackSpec, ...]],
        digest: str,
    ) -> None:
        for name, value in (("path", path), ("soundtrack", soundtrack), ("digest", digest)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_tracks", tracks)

    @property
    def tracks(self) -> tuple[TrackSpec, ...]:
        tracks = self._tracks
        if callable(tracks):
            # Two threads may both decode: the same value, set twice.
            tracks = tracks()
            object.__setattr__(self, "_tracks", tracks)
        return tracks

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"SpecFile is immutable: cannot set {name!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SpecFile):
            return NotImplemented
        return (self.path, self.soundtrack, self.digest, self.tracks) == (
            other.path,
            other.soundtrack,
            other.digest,
            other.tracks,
        )

    def __hash__(self) -> int:
        return hash((self.path, self.soundtrack, self.digest))

    def __repr__(self) -> str:
        return (
            f"SpecFile(path={self.path!r}, soundtrack={self.soundtrack!r}, "
            f"tracks={self.tracks!r}, digest={self.digest!r})"
        )


def parse_spec(
    label: str,
    data: bytes,
    *,
    path: str,
    models: Sequence[str] = DEFAULT_MODELS,
    limits: FieldLimits = FIELD_LIMITS,
) -> SpecFile:
    """Validate one spec file's bytes; the format follows ``path``'s suffix.

    Pure: ``label`` is what problems print (``specs/study.yaml``), ``path`` the
    root-relative path stored in the result and used for the default
    soundtrack name. Raises :class:`SpecError` listing every problem found.
    """
    return _parse(label, data, path, models, limits)[0]


def _parse(
    label: str, data: bytes, path: str, models: Sequence[str], limits: FieldLimits
) -> tuple[SpecFile, int]:
    """parse_spec, also returning the line that names the soundtrack."""
    suffix = PurePosixPath(path).suffix.lower()
    reader = _READERS.get(suffix)
    if reader is None:
        known = ", ".join(SPEC_SUFFIXES)
        message = f"unsupported file type '{suffix}' (spec files end in {known})"
        raise SpecError([SpecProblem(label, None, None, message)])
    doc = reader(label, _decode(label, data))
    return _validate(label, path, doc, models, limits, hashlib.sha256(data).hexdigest())


# ---------------------------------------------------------------------------
# Validation: plain data → SpecFile


def _show(value: Any) -> str:
    """How a wrong value is named in a message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        short = value if len(value) <= 40 else value[:37] + "..."
        return f"text {short!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _unknown(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"
    return f"unknown field {key!r}{hint}"  # repr: escapes what could break the line


def _name_problem(value: Any, what: str) -> str | None:
    if not isinstance(value, str):
        return f"{what} must be text, not {_show(value)}"
    if not _NAME_RE.match(value):
        return f"invalid {what} {value!r}: use {_NAME_RULE}"
    return None


# Each checker returns (value to use, problem); the value is normalised:
# text stripped (empty text counts as unset), numbers in [0, 1] as float.
_Checked = tuple[Any, str | None]


def _check_text(value: Any, limit: int) -> _Checked:
    if not isinstance(value, str):
        hint = " (put it in quotes)" if isinstance(value, int | float) else ""
        return None, f"must be text, not {_show(value)}{hint}"
    text = value.strip()
    if len(text) > limit:
        return None, f"is {len(text)} characters long; at most {limit} are allowed"
    return text or None, None


def _check_bool(value: Any) -> _Checked:
    if isinstance(value, bool):
        return value, None
    if isinstance(value, str) and value.lower() in _YAML11_BOOLS | {"true", "false"}:
        return None, f"must be true or false, not {_show(value)} (write true or false, unquoted)"
    return None, f"must be true or false, not {_show(value)}"


def _check_model(value: Any, models: Sequence[str]) -> _Checked:
    if isinstance(value, str) and value in models:
        return value, None
    known = ", ".join(models)
    if isinstance(value, str):
        return None, f"unknown model {value!r} (known: {known})"
    return None, f"must be a model name, not {_show(value)} (known: {known})"


def _check_gender(value: Any) -> _Checked:
    if value in ("f", "m") and isinstance(value, str):
        return value, None
    return None, f"must be 'f' or 'm', not {_show(value)}"


def _check_unit(value: Any) -> _Checked:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and math.isfinite(value) and 0 <= value <= 1:
        return float(value), None
    return None, f"must be a number from 0 to 1, not {_show(value)}"


def _check_variant(value: Any) -> _Checked:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value, None
    return None, f"must be a whole number from 1 up, not {_show(value)}"


def _check_clips(value: Any) -> _Checked:
    if isinstance(value, int) and not isinstance(value, bool) and value in (1, 2):
        return value, None
    return None, f"must be 1 or 2 (clips kept of the task's two), not {_show(value)}"


def _check_name(value: Any) -> _Checked:
    problem = _name_problem(value, "name")
    return (None if problem else value), problem


_CHECKS: dict[str, Callable[[Any], _Checked]] = {
    "name": _check_name,
    "custom_mode": _check_bool,
    "make_instrumental": _check_bool,
    "vocal_gender": _check_gender,
    "style_weight": _check_unit,
    "weirdness_constraint": _check_unit,
    "variant": _check_variant,
    "clips": _check_clips,
}


def _check(key: str, value: Any, models: Sequence[str], limits: FieldLimits) -> _Checked:
    if value is None:  # an explicit null unsets the field, defaults included
        return None, None
    if key == "mv":
        return _check_model(value, models)
    if key in _TAG_FIELDS:
        return _check_text(value, _TAG_TEXT_LIMIT)
    if key in TEXT_FIELDS:
        # The model may not be known yet (it can come from defaults): the
        # loosest limit here, the model's own once the track is merged.
        return _check_text(value, loosest(key, limits))
    return _CHECKS[key](value)


_INVALID = object()  # a field given with a bad value: reported once, skipped after


class _Validator:
    def __init__(self, label: str, doc: _Doc, models: Sequence[str], limits: FieldLimits) -> None:
        self.label = label
        self.doc = doc
        self.models = models
        self.limits = limits
        self.problems: list[SpecProblem] = []
        self.named: list[tuple[int, str, int]] = []  # (track index, name, clips)

    def problem(self, loc: _Loc, message: str, line: int | None = None) -> None:
        # At or under a refused value, or about the entry that holds it (a
        # track "needs a prompt" whose prompt was refused): already said.
        if any(loc[: len(r)] == r or (loc and r[: len(loc)] == loc) for r in self.doc.refused):
            return
        line = self.doc.line(loc) if line is None else line
        self.problems.append(SpecProblem(self.label, line, _field(loc), message))

    def fields(self, loc: _Loc, entry: dict[str, Any], known: Sequence[str]) -> dict[str, Any]:
        """Check each field of a track or of defaults on its own."""
        values: dict[str, Any] = {}
        for key, raw in entry.items():
            if key not in known:
                if key == "name":
                    message = "'name' cannot be in defaults: each track has its own"
                else:
                    message = _unknown(key, known)
                self.problem((*loc, key), message)
                continue
            value, problem = _check(key, raw, self.models, self.limits)
            if problem:
                self.problem((*loc, key), problem)
                value = _INVALID
            values[key] = value
        return values

    def track(self, index: int, entry: Any, defaults: dict[str, Any]) -> TrackSpec | None:
        loc: _Loc = ("tracks", index)
        if not isinstance(entry, dict):
            self.problem(loc, f"each track must be a mapping of fields, not {_show(entry)}")
            return None
        before = len(self.problems)
        own = self.fields(loc, entry, _TRACK_FIELDS)
        merged = {**defaults, **own}
        name = own.get("name")
        if name is None:  # absent or null
            self.problem(loc, "missing 'name'")
        elif name is not _INVALID:
            clips = merged.get("clips")
            self.named.append((index, name, clips if isinstance(clips, int) else 1))

        def where(key: str) -> tuple[_Loc, str]:
            """The field's location, and a note when its value came from defaults."""
            return (*loc, key), "" if key in own else " (set in defaults)"

        # A text mode chosen on the track overrides the other mode from defaults.
        if merged.get("prompt") is not None and merged.get("gpt_description_prompt") is not None:
            if "prompt" in own and "gpt_description_prompt" not in own:
                del merged["gpt_description_prompt"]
            elif "gpt_description_prompt" in own and "prompt" not in own:
                del merged["prompt"]
        mode = merged.get("custom_mode")
        prompt = merged.get("prompt")
        description = merged.get("gpt_description_prompt")
        if _INVALID not in (mode, prompt, description):
            if mode is None:
                if prompt is not None and description is not None:
                    self.problem(
                        loc,
                        "both 'prompt' (lyrics, custom mode) and 'gpt_description_prompt' "
                        "(description mode) are set: keep one, or set custom_mode to choose",
                    )
                elif prompt is None and description is None:
                    self.problem(
                        loc, "needs lyrics in 'prompt' or a description in 'gpt_description_prompt'"
                    )
                merged["custom_mode"] = prompt is not None
            elif mode and prompt is None:
                at, note = where("custom_mode")
                self.problem(at, f"is true{note}, which needs lyrics in 'prompt'")
            elif not mode and description is None:
                at, note = where("custom_mode")
                self.problem(at, f"is false{note}, which needs 'gpt_description_prompt'")

        model = merged.get("mv")
        if model is None:
            known = ", ".join(self.models)
            self.problem(loc, f"missing 'mv': set the model on the track or in defaults ({known})")
        elif model is not _INVALID:
            for key, limit in limits_for(model, self.limits).items():
                value = merged.get(key)
                if isinstance(value, str) and len(value) > limit:
                    at, note = where(key)
                    self.problem(
                        at,
                        f"is {len(value)} characters long{note}; {model} allows at most {limit}"
                        f" (other models up to {loosest(key, self.limits)})",
                    )
        if model in _OLD_MODELS and merged.get("vocal_gender") not in (None, _INVALID):
            at, note = where("vocal_gender")
            self.problem(at, f"needs sonic-v4-5 or later{note}; this track uses {model}")

        if len(self.problems) > before:
            return None
        request = {k: merged[k] for k in _API_FIELDS if merged.get(k) is not None}
        return TrackSpec(
            name=str(name),
            request=request,
            variant=merged.get("variant") or 1,
            clips=merged.get("clips") or 1,
            line=self.doc.line(loc),
            album=merged.get("album"),
            artist=merged.get("artist"),
        )

    def names(self) -> None:
        """Track names are unique, and so are the output files they produce.

        Every track with a valid name takes part, even one invalid otherwise,
        so that a clash is reported together with the other problems.
        """
        outputs: dict[str, tuple[int, str]] = {}  # file stem -> (track index, its name)
        for index, name, clips in self.named:
            stems = [name, f"{name}-2"] if clips == 2 else [name]
            for n, stem in enumerate(stems):
                taken = outputs.get(stem)
                if taken is None:
                    outputs[stem] = (index, name)
                    continue
                other, other_name = taken
                line = self.doc.line(("tracks", other))
                if n == 0 and other_name == name:
                    message = f"duplicate track name '{name}' (also tracks[{other}], line {line})"
                else:
                    message = (
                        f"output file {stem}.mp3 would also be written by tracks[{other}] "
                        f"'{other_name}' (line {line}); rename one of them"
                    )
                self.problem(("tracks", index, "name"), message)

    def soundtrack(self, data: dict[str, Any], path: str) -> str | None:
        if "soundtrack" in data:
            problem = _name_problem(data["soundtrack"], "soundtrack name")
            if problem:
                self.problem(("soundtrack",), problem)
                return None
            return str(data["soundtrack"])
        stem = PurePosixPath(path).stem
        if _NAME_RE.match(stem):
            return stem
        slug = _slug(stem)
        self.problem(
            ("soundtrack",),
            f"the file name {stem!r} is not a valid soundtrack name ({_NAME_RULE}): "
            f"add `soundtrack: {slug}` or rename the file",
            line=1,
        )
        return None


def _slug(stem: str) -> str:
    """A valid soundtrack name close to a file name: 'Café Nights' → 'cafe-nights'."""
    # Accents are separated from their letters and dropped, so 'é' gives 'e', not nothing.
    ascii_text = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9._-]+", "-", ascii_text.lower()).strip("-._")[:64]
    return slug or "my-soundtrack"


def _validate(
    label: str, path: str, doc: _Doc, models: Sequence[str], limits: FieldLimits, digest: str
) -> tuple[SpecFile, int]:
    check = _Validator(label, doc, models, limits)
    check.problems.extend(doc.problems)
    data = doc.data
    if not isinstance(data, dict):
        message = f"the top level must be a mapping with a 'tracks' list, not {_show(data)}"
        raise SpecError([*doc.problems, SpecProblem(label, doc.line(()), None, message)])
    for key in data:
        if key not in _TOP_FIELDS:
            if key in _TRACK_FIELDS:
                message = f"'{key}' is a track field: put it under `defaults` or in a track"
            else:
                message = _unknown(key, _TOP_FIELDS)
            check.problem((key,), message)
    soundtrack = check.soundtrack(data, path)

    defaults: dict[str, Any] = {}
    raw_defaults = data.get("defaults")
    if isinstance(raw_defaults, dict):
        defaults = check.fields(("defaults",), raw_defaults, _DEFAULTS_FIELDS)
    elif raw_defaults is not None:
        check.problem(
            ("defaults",), f"must be a mapping of track fields, not {_show(raw_defaults)}"
        )

    raw_tracks = data.get("tracks")
    tracks: list[TrackSpec] = []
    if raw_tracks is None:
        check.problem(("tracks",), "missing 'tracks': list the soundtrack's tracks under it")
    elif not isinstance(raw_tracks, list):
        check.problem(("tracks",), f"must be a list of tracks, not {_show(raw_tracks)}")
    elif not raw_tracks:
        check.problem(("tracks",), "is empty: add at least one track")
    else:
        for index, entry in enumerate(raw_tracks):
            track = check.track(index, entry, defaults)
            if track is not None:
                tracks.append(track)
        check.names()

    if check.problems or soundtrack is None:  # (no soundtrack name is a problem too)
        check.problems.sort(key=lambda p: (p.line or 0, p.field or ""))
        raise SpecError(check.problems)
    spec = SpecFile(
        path=path,
        soundtrack=soundtrack,
        tracks=tuple(tracks),
        digest=digest,
    )
    return spec, doc.line(("soundtrack",)) if "soundtrack" in data else 1
