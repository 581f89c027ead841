"""Spec file formats: bytes → plain data and the line of every field.

Where it sits: the middle of the ``specs`` package. ``files`` reads a file's
bytes safely; this module decodes them and reads YAML, TOML or JSON into plain
data with the line each field came from, so that ``rules`` can name file, line
and field in every problem. Any syntax problem becomes a :class:`SpecError`.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

from reconciler.errors import SpecError, SpecProblem

if TYPE_CHECKING:
    import yaml

SPEC_SUFFIXES = (".yaml", ".yml", ".toml", ".json")

_Loc = tuple[str | int, ...]


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
    (through the ledger) without reading a spec file: a sixth of their start-up."""
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
    import yaml  # loaded by _yaml_loader() just below

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
