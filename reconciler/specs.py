"""Spec files → validated specs: the first step of every pass.

Data flows one way::

    spec files → validated specs → desired state → plan → submit → track
    → download → outputs → ledger → status

This module owns the first arrow. It finds the candidate files under the specs
folder, reads each one defensively (no symlinks out of the folder, no special
or oversized files, no half-written files, and for a pass none that is still
changing: see ``observe``), parses YAML, TOML or JSON into
plain data with the line of every field, and validates that data with the
MusicAPI's own rules. The result per file is a :class:`SpecFile` whose tracks
carry the canonical create request that ``planning`` fingerprints. Every
problem becomes a :class:`SpecProblem` naming file, line and field, collected
into one :class:`SpecError` per file; no other exception type escapes.

Validation is plain code rather than pydantic: the messages are the product
here (``unknown field 'promt' (did you mean 'prompt'?)``) and the hand-written
checks are both shorter than translating pydantic's error locations and
faster on the hot path (a cold plan parses thousands of files).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
import stat
import tomllib
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from reconciler.errors import SpecError, SpecProblem
from reconciler.limits import (
    DEFAULT_MODELS,
    FIELD_LIMITS,
    TEXT_FIELDS,
    FieldLimits,
    limits_for,
    loosest,
)

if TYPE_CHECKING:
    import yaml

__all__ = [
    "DEFAULT_MODELS",
    "MAX_SPEC_BYTES",
    "SPEC_SUFFIXES",
    "Look",
    "Observation",
    "Settling",
    "SpecFile",
    "SpecScan",
    "TrackSpec",
    "is_spec_candidate",
    "load_spec_file",
    "observe",
    "parse_spec",
    "scan_specs",
]

SPEC_SUFFIXES = (".yaml", ".yml", ".toml", ".json")
MAX_SPEC_BYTES = 4 * 1024 * 1024

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

_Loc = tuple[str | int, ...]


# ---------------------------------------------------------------------------
# Public data


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class SpecFile:
    """One valid spec file: a soundtrack and its tracks in file order."""

    path: str
    soundtrack: str
    tracks: tuple[TrackSpec, ...]
    digest: str


@dataclass(frozen=True)
class SpecScan:
    """The whole specs folder as one pass sees it.

    ``root_state`` tells the planner whether pruning is safe: only ``"ok"``
    means the folder was read completely. A folder with a subfolder that
    cannot be listed is ``"unreadable"``, because the tracks in it are unknown,
    not gone, and a bad spec must remove nothing.
    """

    root_state: Literal["ok", "missing", "unreadable", "empty"]
    files: Mapping[str, SpecFile]
    errors: Mapping[str, SpecError]
    #: Files still changing (see :class:`Settling`), with the note to show for each.
    settling: Mapping[str, str] = field(default_factory=dict)
    #: When the first of them may be read: the end of its window, on the scan's clock.
    settled_by: float | None = None
    #: How every file read looked, to pass as ``Settling.previous`` next time.
    observed: Mapping[str, Observation] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Waiting for a file to stop changing


@dataclass(frozen=True)
class Look:
    """What one read of a spec file shows: enough to tell that it changed."""

    size: int
    mtime_ns: int
    digest: str


@dataclass(frozen=True)
class Observation:
    """A spec file's look, since when it has looked so, and when it was last read.

    Times are on the clock of the scans; the file is stable once
    ``since + window <= now``.
    """

    look: Look
    since: float
    seen: float


def observe(previous: Observation | None, look: Look, now: float, window: float) -> Observation:
    """The file's observation after reading ``look`` at ``now``.

    A file that looks as it did keeps its ``since``. Otherwise its mtime is
    believed when it is already ``window`` old and later than the last read
    (or there was none): the file has not changed since, so a folder nobody
    is writing to is read at once, and so is a file saved once, found by the
    pass its save scheduled. The tools that set an old mtime on purpose
    (``cp -p``, ``tar``, ``rsync -t``) set it after the last byte, so at
    worst they make a changed file look older than our last read: then, as
    for a young or future mtime, the window starts now.
    """
    if previous is not None and previous.look == look:
        return replace(previous, seen=now)
    modified = look.mtime_ns / 1e9
    after_last_read = previous is None or modified > previous.seen
    if after_last_read and now - modified >= window:
        return Observation(look, modified, now)
    return Observation(look, now, now)


@dataclass(frozen=True)
class Settling:
    """Read a file only once it has stopped changing (paying for a half-written
    prompt is paying twice): ``scan_specs`` holds back a file until it has
    looked the same (size, mtime, content digest) for ``window`` seconds.

    ``previous`` is the last scan's ``observed``; ``now`` the scan's time.
    With ``hold`` False the settling files are read all the same and only
    reported (``plan`` shows what the folder says now).
    """

    previous: Mapping[str, Observation]
    now: float
    window: float
    hold: bool = True


# ---------------------------------------------------------------------------
# Finding and reading files

# Editors and sync tools write these next to the real file; the suffix test
# already excludes "x.yaml~", "#x.yaml#", "x.yaml.swp" and vim's "4913" probe.
_TEMP_SUFFIXES = frozenset({".swp", ".swx", ".tmp", ".bak", ".orig", ".part"})


def is_spec_candidate(path: Path) -> bool:
    """Whether ``path`` (relative to the specs root) should be read as a spec.

    Hidden files and folders, editor swap/backup files and partial downloads
    are not candidates, so saving a file in an editor never shows a
    half-written neighbour to the reconciler.
    """
    name = path.name
    if path.suffix.lower() not in SPEC_SUFFIXES:
        return False
    if any(part.startswith(".") for part in path.parts):
        return False
    if name.startswith("#"):  # emacs auto-save "#x.yaml" variants
        return False
    return not any(s.lower() in _TEMP_SUFFIXES for s in path.suffixes[:-1])


def load_spec_file(
    root: Path,
    path: Path,
    *,
    models: Sequence[str] = DEFAULT_MODELS,
    limits: FieldLimits = FIELD_LIMITS,
    label_root: str | None = None,
) -> SpecFile:
    """Read and validate one spec file under ``root``.

    ``path`` is either inside ``root`` (``root / "a.yaml"``) or relative to it
    (``"a.yaml"``). Errors are labelled ``f"{label_root or root.name}/{rel}"``.
    Raises :class:`SpecError` for anything wrong, reading included.
    """
    rel = _relative(root, path)
    label = _label(root.name if label_root is None else label_root, rel)
    data, _ = _read_spec_bytes(root, rel, label)
    return _parse(label, data, rel, models, limits)[0]


def scan_specs(
    root: Path,
    *,
    models: Sequence[str] = DEFAULT_MODELS,
    limits: FieldLimits = FIELD_LIMITS,
    reuse: Mapping[str, SpecFile] | None = None,
    settle: Settling | None = None,
) -> SpecScan:
    """Read every candidate file under ``root``, sorted by relative path.

    With ``settle``, a file that has not yet looked the same for the settle
    window is held back (neither in ``files`` nor in ``errors``, but in
    ``settling``): the caller keeps its last good version in force.

    A file whose bytes hash to ``reuse[rel].digest`` is not parsed again: the
    earlier object is returned, which keeps a pass over an unchanged folder
    cheap. Pass ``reuse`` only from scans made with the same ``models`` and ``limits``.
    ``reuse`` also settles two files naming one soundtrack: the file whose
    earlier version named it keeps it; otherwise the first by path does.
    Symlinked folders are not followed (they could leave the root or loop);
    symlinked files are read when they resolve inside the root.
    """
    try:
        root_stat = root.stat()
    except FileNotFoundError:
        return SpecScan("missing", {}, {})
    except OSError:
        return SpecScan("unreadable", {}, {})
    if not stat.S_ISDIR(root_stat.st_mode):
        return SpecScan("unreadable", {}, {})
    rels, complete = _walk(root)
    if not rels:
        return SpecScan("empty" if complete else "unreadable", {}, {})

    prefix = root.name
    parsed: list[tuple[str, bytes, SpecFile]] = []
    errors: dict[str, SpecError] = {}
    settling: dict[str, str] = {}
    settled_by: float | None = None
    observed: dict[str, Observation] = {}
    for rel in rels:
        label = _label(prefix, rel)
        try:
            data, mtime_ns = _read_spec_bytes(root, rel, label)
            digest = hashlib.sha256(data).hexdigest()
            if settle is not None:
                look = Look(len(data), mtime_ns, digest)
                seen = observe(settle.previous.get(rel), look, settle.now, settle.window)
                observed[rel] = seen
                ready_at = seen.since + settle.window
                if ready_at > settle.now:
                    settling[rel] = (
                        f"{label}: is still changing; it is read once it has been "
                        f"unchanged for {settle.window:g} s"
                    )
                    settled_by = ready_at if settled_by is None else min(settled_by, ready_at)
                    if settle.hold:
                        continue
            previous = reuse.get(rel) if reuse else None
            if previous is not None and previous.digest == digest:
                spec = previous
            else:
                spec = _parse(label, data, rel, models, limits)[0]
        except SpecError as exc:
            errors[rel] = exc
            continue
        parsed.append((rel, data, spec))

    def incumbent_first(entry: tuple[str, bytes, SpecFile]) -> tuple[bool, str]:
        # A soundtrack stays with the file whose last good version defined it:
        # a file dropped in later that names it (even one sorting first) is
        # the duplicate, so it can never take over another file's outputs.
        rel, _, spec = entry
        previous = reuse.get(rel) if reuse else None
        return (previous is None or previous.soundtrack != spec.soundtrack, rel)

    files: dict[str, SpecFile] = {}
    owners: dict[str, str] = {}  # soundtrack name -> label of the file that defines it
    # An invalid file keeps its last good version in force, and with it its
    # soundtrack: another file naming it is the duplicate (and is reported),
    # unless that file defined it itself last time.
    incumbents = {
        spec.soundtrack for rel, _, spec in parsed if not incumbent_first((rel, b"", spec))[0]
    }
    for rel in errors:
        previous = reuse.get(rel) if reuse else None
        if previous is not None and previous.soundtrack not in incumbents:
            owners.setdefault(previous.soundtrack, _label(prefix, rel))
    for rel, data, spec in sorted(parsed, key=incumbent_first):
        label = _label(prefix, rel)
        owner = owners.get(spec.soundtrack)
        if owner is not None:
            # Only now is the line needed; parsing again is cheaper than
            # carrying it on every SpecFile for this rare case.
            line = _parse(label, data, rel, models, limits)[1]
            message = (
                f"soundtrack '{spec.soundtrack}' is already defined by {owner}; "
                "give this file another `soundtrack:` name"
            )
            errors[rel] = SpecError([SpecProblem(label, line, "soundtrack", message)])
            continue
        owners[spec.soundtrack] = label
        files[rel] = spec
    files = {rel: files[rel] for rel in sorted(files)}
    errors = {rel: errors[rel] for rel in sorted(errors)}
    root_state: Literal["ok", "unreadable"] = "ok" if complete else "unreadable"
    return SpecScan(root_state, files, errors, settling, settled_by, observed)


def _walk(root: Path) -> tuple[list[str], bool]:
    """Candidate files under ``root`` as sorted POSIX relative paths.

    The flag is False when some folder could not be listed.
    """
    found: list[str] = []
    complete = True
    pending: list[tuple[str, str]] = [(os.fspath(root), "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    rel = prefix + entry.name
                    if entry.is_dir(follow_symlinks=False):
                        if not entry.name.startswith("."):
                            pending.append((entry.path, rel + "/"))
                    elif is_spec_candidate(Path(rel)) and not (
                        entry.is_symlink() and entry.is_dir()
                    ):
                        found.append(rel)
        except OSError:
            complete = False
    found.sort()
    return found, complete


def _relative(root: Path, path: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _label(prefix: str, rel: str) -> str:
    label = f"{prefix}/{rel}" if prefix else rel
    # A file name may hold a newline: escaped, the report stays one line per problem.
    return label if label.isprintable() else repr(label)


def _read_spec_bytes(root: Path, rel: str, label: str) -> tuple[bytes, int]:
    """The file's bytes and mtime_ns, read only if it is a regular file inside ``root``."""

    def refuse(message: str) -> SpecError:
        return SpecError([SpecProblem(label, None, None, message)])

    try:
        real_root = root.resolve(strict=True)
        real = (root / rel).resolve(strict=True)
        if not real.is_relative_to(real_root):
            raise refuse(f"points to {real}, outside the specs folder")
        before = real.stat()
        if not stat.S_ISREG(before.st_mode):
            raise refuse("is not a regular file")
        if before.st_size > MAX_SPEC_BYTES:
            raise refuse(_too_large(before.st_size))
        # O_NOFOLLOW: the path was resolved above, so a symlink here means it
        # was swapped in since; O_NONBLOCK: a FIFO swapped in cannot hang us.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(real, flags)
        try:
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (before.st_dev, before.st_ino):
                raise refuse(_CHANGING)
            chunks: list[bytes] = []
            size = 0
            while chunk := os.read(fd, 1 << 20):
                size += len(chunk)
                if size > MAX_SPEC_BYTES:
                    raise refuse(_too_large(size))
                chunks.append(chunk)
            after = os.fstat(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise refuse(f"cannot be read: {exc.strerror or exc}") from None
    if (opened.st_size, opened.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or (
        size != after.st_size
    ):
        raise refuse(_CHANGING)
    return b"".join(chunks), after.st_mtime_ns


_CHANGING = "is changing while being read; it will be read again on the next pass"


def _too_large(size: int) -> str:
    return f"is too large ({size} bytes; spec files may be at most {MAX_SPEC_BYTES} bytes)"


# ---------------------------------------------------------------------------
# Parsing: bytes → plain data + the line of every field


@dataclass
class _Doc:
    data: Any
    lines: dict[_Loc, int]
    #: Problems met while reading (a duplicate key, an alias) that leave the
    #: rest readable: validation goes on and reports them with the others.
    problems: list[SpecProblem] = field(default_factory=list)
    #: Where a value was refused while reading (read as unset): nothing more
    #: is said about those places, the reading problem says it all.
    refused: set[_Loc] = field(default_factory=set)

    def line(self, loc: _Loc) -> int:
        """The line of ``loc``, or of its closest located parent."""
        while loc:
            found = self.lines.get(loc)
            if found is not None:
                return found
            loc = loc[:-1]
        return self.lines.get((), 1)


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


def _decode(label: str, data: bytes) -> str:
    def located(offset: int, message: str) -> SpecError:
        line = data.count(b"\n", 0, offset) + 1
        return SpecError([SpecProblem(label, line, None, message)])

    if not data.strip():
        raise SpecError([SpecProblem(label, None, None, "file is empty")])
    nul = data.find(b"\0")
    if nul >= 0:
        raise located(nul, "holds NUL bytes: this is a binary file, not a UTF-8 text spec")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = data[exc.start]
        raise located(
            exc.start, f"is not UTF-8 text (byte 0x{byte:02x}); save it as UTF-8"
        ) from None
    return text.removeprefix("\ufeff")  # a BOM is harmless; json.loads would refuse it


def _syntax_error(label: str, fmt: str, line: int | None, message: str) -> SpecError:
    return SpecError([SpecProblem(label, line, None, f"invalid {fmt}: {message}")])


def _number_error(label: str, fmt: str, text: str) -> SpecError:
    """int() refuses numbers of thousands of digits; say so at their line."""
    match = re.search(r"\d{1000,}", text)
    line = text.count("\n", 0, match.start()) + 1 if match else None
    return _syntax_error(label, fmt, line, "a number has too many digits")


# --- YAML -------------------------------------------------------------------

_YAML_STR = "tag:yaml.org,2002:str"
_YAML_PLAIN = "!reconciler/plain"
# Explicit core tags are honoured by reading the text as a plain scalar; any
# other explicit tag (!!python/..., !!binary, !custom) is refused.
_YAML_PLAIN_TAGS = frozenset(
    [_YAML_PLAIN] + ["tag:yaml.org,2002:" + t for t in ("null", "bool", "int", "float")]
)
# A plain scalar is a number only where YAML 1.1 and 1.2 agree that it is one,
# so "08", "1e3", "1_000" or "0x1f" stay text: files written by YAML 1.1
# tools (PyYAML quotes only what 1.1 reads as non-text) read back unchanged.
_YAML_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]*)\Z")
_YAML_FLOAT = re.compile(r"[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+][0-9]+)?\Z")
_YAML_SPECIAL = {
    "": None,
    "~": None,
    "null": None,
    "Null": None,
    "NULL": None,
    "true": True,
    "True": True,
    "TRUE": True,
    "false": False,
    "False": False,
    "FALSE": False,
    ".inf": math.inf,
    "+.inf": math.inf,
    ".Inf": math.inf,
    "+.Inf": math.inf,
    ".INF": math.inf,
    "+.INF": math.inf,
    "-.inf": -math.inf,
    "-.Inf": -math.inf,
    "-.INF": -math.inf,
    ".nan": math.nan,
    ".NaN": math.nan,
    ".NAN": math.nan,
}
_MAX_DEPTH = 16  # a spec needs 4 levels; deeper input is refused, not recursed into


@cache
def _yaml_loader() -> type[yaml.CSafeLoader]:
    """The loader class, made with the first YAML file read: PyYAML is imported
    then rather than with this module, which ``status`` and ``--version`` load
    without reading a spec file (a sixth of their start-up)."""
    import yaml

    try:  # libyaml is an order of magnitude faster; the pure-Python loader keeps marks too
        from yaml import CSafeLoader as base
    except ImportError:  # pragma: no cover - only on a PyYAML built without libyaml
        from yaml import SafeLoader as base  # type: ignore[assignment]

    class _YamlLoader(base):
        """Composes without PyYAML's YAML 1.1 implicit typing.

        PyYAML would call its regex resolver for every scalar (the slowest part
        of a compose) and turn yes/no/on/off into booleans. Plain scalars are
        only marked here and typed by _YamlBuilder.scalar.
        """

        def resolve(self, kind: type[yaml.Node], value: Any, implicit: Any) -> str:
            if kind is yaml.ScalarNode:
                return _YAML_PLAIN if implicit[0] else _YAML_STR
            if kind is yaml.SequenceNode:
                return yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG
            return yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG

    return _YamlLoader


def _read_yaml(label: str, text: str) -> _Doc:
    import yaml  # loaded by _yaml_loader() just before

    # compose() rather than load(): nodes keep their line marks, and building
    # the values ourselves gives YAML 1.2 scalars and no alias expansion.
    loader = _yaml_loader()(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = exc.problem or "cannot be parsed"
        if "another document" in problem:
            problem = "the file holds more than one YAML document (---); use one file each"
        elif exc.context:
            problem = f"{problem} ({exc.context})"
        raise _syntax_error(label, "YAML", line, problem + _yaml_hint(text, line)) from None
    except yaml.YAMLError as exc:  # reader errors (control characters) carry an offset
        position = getattr(exc, "position", None)
        line = text.count("\n", 0, position) + 1 if isinstance(position, int) else None
        raise _syntax_error(label, "YAML", line, str(getattr(exc, "reason", exc))) from None
    finally:
        loader.dispose()
    if root is None:
        raise SpecError([SpecProblem(label, None, None, "file is empty (it holds only comments)")])
    builder = _YamlBuilder(label)
    data = builder.build(root, (), 0)
    return _Doc(data, builder.lines, builder.problems, builder.refused)


_YAML_FLOW_VALUE = re.compile(r"(?:^|:\s|-\s)\s*[\[{]")


def _yaml_hint(text: str, line: int | None) -> str:
    """A fix for the two syntax errors people make most in spec files."""
    lines = text.split("\n")
    if line is None or line > len(lines):
        return ""
    source = lines[line - 1]
    if "\t" in source[: len(source) - len(source.lstrip())]:
        return "; YAML indents with spaces, not tabs"
    if _YAML_FLOW_VALUE.search(source):
        return "; text starting with [ or { must be quoted or written as a | block"
    return ""


class _YamlBuilder:
    """Turns a composed YAML node tree into plain data, recording lines."""

    def __init__(self, label: str) -> None:
        import yaml  # already loaded: only YAML files are built

        self.scalar_node, self.sequence_node = yaml.ScalarNode, yaml.SequenceNode
        self.label = label
        self.lines: dict[_Loc, int] = {}
        self.problems: list[SpecProblem] = []
        self.refused: set[_Loc] = set()
        self.seen: set[int] = set()

    def problem(self, loc: _Loc, line: int, message: str, *, refused: bool = True) -> None:
        """Record a problem; ``refused``: the value at ``loc`` was read as unset."""
        self.problems.append(SpecProblem(self.label, line, _field(loc), message))
        if refused:
            self.refused.add(loc)

    def build(self, node: yaml.Node, loc: _Loc, depth: int) -> Any:
        line = node.start_mark.line + 1
        self.lines.setdefault(loc, line)
        # The composer hands out the anchored node again for each alias, so a
        # node seen twice is an alias: refusing it rules out "billion laughs".
        if id(node) in self.seen:
            # Reported where the alias is used, not where its anchor is.
            where = self.lines.get(loc, line)
            self.problem(loc, where, "YAML aliases (*name) are not supported; use `defaults`")
            return None
        self.seen.add(id(node))
        if depth > _MAX_DEPTH:
            self.problem(loc, line, "nested too deeply")
            return None
        if isinstance(node, self.scalar_node):
            return self.scalar(node, loc, line)
        if isinstance(node, self.sequence_node):
            return [self.build(item, (*loc, i), depth + 1) for i, item in enumerate(node.value)]
        return self.mapping(node, loc, depth)  # the only other kind of node

    def mapping(self, node: yaml.Node, loc: _Loc, depth: int) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, self.scalar_node):
                self.problem(loc, line, "field names must be plain text")
                continue
            key = str(key_node.value)
            if key in result:
                first = self.lines[(*loc, key)]
                # The first value stays and is checked like any other.
                message = f"duplicate field {key!r} (first at line {first})"
                self.problem((*loc, key), line, message, refused=False)
                continue
            self.lines[(*loc, key)] = line
            result[key] = self.build(value_node, (*loc, key), depth + 1)
        return result

    def scalar(self, node: yaml.ScalarNode, loc: _Loc, line: int) -> Any:
        value = str(node.value)
        if node.tag == _YAML_STR:
            return value
        if node.tag not in _YAML_PLAIN_TAGS:
            self.problem(loc, line, f"YAML tag '{node.tag}' is not supported")
            return None
        if value in _YAML_SPECIAL:
            return _YAML_SPECIAL[value]
        if _YAML_INT.match(value):
            try:
                return int(value)
            except ValueError:  # beyond int()'s digit limit
                self.problem(loc, line, "number has too many digits")
                return None
        if _YAML_FLOAT.match(value):
            return float(value)
        return value  # yes/no/on/off, dates, 1:30 and 08 stay text


# --- TOML -------------------------------------------------------------------

_TOML_AT = re.compile(r"\s*\(at (?:line (\d+), column \d+|end of document)\)\Z")


def _read_toml(label: str, text: str) -> _Doc:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        match = _TOML_AT.search(message)
        line: int | None = None
        if match:
            message = message[: match.start()]
            line = int(match[1]) if match[1] else text.count("\n") + 1
        raise _syntax_error(label, "TOML", line, message) from None
    except RecursionError:
        raise _syntax_error(label, "TOML", None, "nested too deeply") from None
    except ValueError:
        raise _number_error(label, "TOML", text) from None
    return _Doc(data, _toml_lines(text))


_TOML_TOKEN = re.compile(
    r"""
      (?P<nl>\n)
    | [\ \t\r]+
    | \#[^\n]*
    | (?P<str>"{3}(?:\\[\s\S]|[^\\])*?"{3,5}
        | '{3}[\s\S]*?'{3,5}
        | "(?:\\.|[^"\\\n])*"
        | '[^'\n]*')
    | (?P<punct>[\[\]{}=,.])
    | (?P<bare>[^\s\[\]{}=,.\#"']+)
    """,
    re.VERBOSE,
)


def _toml_key(lexeme: str) -> str:
    if lexeme[0] == "'":
        return lexeme[1:-1]
    if lexeme[0] == '"':
        try:
            return str(json.loads(lexeme))  # TOML's basic escapes are JSON's, bar \U
        except ValueError:
            return lexeme[1:-1]
    return lexeme


def _toml_lines(text: str) -> dict[_Loc, int]:
    """Map each key path of a *valid* TOML text to its line: a light scan.

    It knows tables, arrays of tables (``[[tracks]]`` headers number the
    tracks), dotted keys and inline arrays/tables, which covers how specs
    are written; it never raises on input tomllib accepted.
    """
    lines: dict[_Loc, int] = {}
    counters: dict[_Loc, int] = {}  # array-of-tables path -> index of its last element
    table: _Loc = ()
    # The statement being read at top level, then one frame per open inline
    # array or table: [path, is_array, next index, state, keys read].
    # States: start, header, keys, value, after (skip to "," / "]" / "}" / newline).
    top_level: list[Any] = [(), False, 0, "start", []]
    stack = [top_level]
    header_array = False
    line = 1
    position = 0
    tokens = [m for m in _TOML_TOKEN.finditer(text) if m.lastgroup]
    for i, match in enumerate(tokens):
        start = match.start()
        line += text.count("\n", position, start)
        position = start
        kind, lexeme = match.lastgroup, match[0]
        frame = stack[-1]
        path, is_array, index, state, keys = frame
        if kind == "nl":
            if frame is top_level:
                frame[3] = "start"
            continue
        if frame is top_level and state == "start":
            if lexeme == "[":
                following = tokens[i + 1] if i + 1 < len(tokens) else None
                header_array = following is not None and following.start() == start + 1
                header_array = header_array and following is not None and following[0] == "["
                frame[3], frame[4] = "header", []
                continue
            state = frame[3] = "keys"
            keys = frame[4] = []
        if state == "header":
            if lexeme == "]":
                table = _toml_table(keys, header_array, counters)
                lines.setdefault(table, line)
                if header_array:
                    lines.setdefault(table[:-1], line)
                frame[3] = "after"
            elif kind != "punct":
                keys.append(_toml_key(lexeme))
        elif is_array:
            if lexeme == "]":
                stack.pop()
            elif lexeme == ",":
                frame[3] = "value"
            elif state == "value":
                element = (*path, index)
                lines.setdefault(element, line)
                frame[2], frame[3] = index + 1, "after"
                _toml_open(stack, element, lexeme)
        elif lexeme == "}" and frame is not top_level:
            stack.pop()
        elif lexeme == "," and frame is not top_level:
            frame[3], frame[4] = "keys", []
        elif state == "keys":
            if lexeme == "=":
                base = table if frame is top_level else path
                for n in range(1, len(keys) + 1):
                    lines.setdefault((*base, *keys[:n]), line)
                frame[3] = "value"
            elif kind != "punct":
                keys.append(_toml_key(lexeme))
        elif state == "value":
            frame[3] = "after"
            _toml_open(stack, (*(table if frame is top_level else path), *keys), lexeme)
    return lines


def _toml_table(header: list[str], is_array: bool, counters: dict[_Loc, int]) -> _Loc:
    """The key path a table header opens, through the arrays of tables above it."""
    path: _Loc = ()
    for n, key in enumerate(header):
        path = (*path, key)
        if n == len(header) - 1 and is_array:
            counters[path] = counters.get(path, -1) + 1
        if path in counters:
            path = (*path, counters[path])
    return path


def _toml_open(stack: list[list[Any]], path: _Loc, lexeme: str) -> None:
    if lexeme == "[":
        stack.append([path, True, 0, "value", []])
    elif lexeme == "{":
        stack.append([path, False, 0, "keys", []])


# --- JSON -------------------------------------------------------------------

_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"]+')


def _read_json(label: str, text: str) -> _Doc:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _syntax_error(label, "JSON", exc.lineno, exc.msg) from None
    except RecursionError:
        raise _syntax_error(label, "JSON", None, "nested too deeply") from None
    except ValueError:
        raise _number_error(label, "JSON", text) from None
    lines, duplicates = _json_lines(text)
    problems = [
        SpecProblem(
            label, line, _field(loc), f"duplicate field {loc[-1]!r} (first at line {lines[loc]})"
        )
        for loc, line in duplicates
    ]
    return _Doc(data, lines, problems)


def _json_lines(text: str) -> tuple[dict[_Loc, int], list[tuple[_Loc, int]]]:
    """Map each key path and array element of a *valid* JSON text to its line.

    json.loads keeps the last of duplicate keys silently, so the duplicates
    found on the way are returned too, with their lines.
    """
    lines: dict[_Loc, int] = {}
    duplicates: list[tuple[_Loc, int]] = []
    # Open containers: [path, is_object, array index, object key, expecting key]
    stack: list[list[Any]] = []
    line = 1
    position = 0
    for match in _JSON_TOKEN.finditer(text):
        start = match.start()
        line += text.count("\n", position, start)
        position = start
        lexeme = match[0]
        if lexeme in ":,":
            if lexeme == "," and stack and stack[-1][1]:
                stack[-1][4] = True
            continue
        if lexeme in "]}":
            stack.pop()
            continue
        if not stack:
            loc: _Loc = ()
            lines[loc] = line
        else:
            top = stack[-1]
            if top[1]:
                if top[4]:  # an object key
                    key = lexeme[1:-1] if "\\" not in lexeme else str(json.loads(lexeme))
                    loc = (*top[0], key)
                    if loc in lines:
                        duplicates.append((loc, line))
                    else:
                        lines[loc] = line
                    top[3], top[4] = key, False
                    continue
                loc = (*top[0], top[3])
            else:
                loc = (*top[0], top[2])
                lines[loc] = line
                top[2] += 1
        if lexeme == "{":
            stack.append([loc, True, 0, "", True])
        elif lexeme == "[":
            stack.append([loc, False, 0, "", False])
    return lines, duplicates


_READERS: dict[str, Callable[[str, str], _Doc]] = {
    ".yaml": _read_yaml,
    ".yml": _read_yaml,
    ".toml": _read_toml,
    ".json": _read_json,
}


# ---------------------------------------------------------------------------
# Validation: plain data → SpecFile


def _field(loc: _Loc) -> str | None:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        # A key is the file's text: escaped (repr) when it holds a newline or
        # other control character, so that a report stays one line per problem.
        name = part if part.isprintable() else repr(part)
        text += f".{name}" if text else name
    return text or None


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
