"""The TOML config file: its schema, its checks and its errors in a person's words.

Where it sits: read by ``config.load_settings`` when a config file is given.
It answers what the file says, as ``Settings`` fields by name; the flags and
the environment are laid over that in config.py, and what nobody says takes
the field's default there. No default is stated here: a key the file leaves
out is left out of the answer.

The checks are a table of small functions rather than a validation library:
they run at the start of every command given ``--config`` (``status`` among
them), where importing pydantic and building its models took longer than
the command itself. They accept what pydantic's lax mode accepted, so no
file that was valid becomes invalid: a number as text (``"2.5"``), a whole
number where an integer is asked (``2.0``), ``true``/``false`` as 1/0, and
for a switch 0/1 or the words yes/no, on/off, true/false, t/f, y/n.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from reconciler.config import Secret, Settings, WebhookSettings, read_secret_file
from reconciler.errors import ConfigError
from reconciler.limits import TEXT_FIELDS, with_overrides
from reconciler.words import did_you_mean

LOG_LEVELS = ("debug", "info", "warning", "error")
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


class _Invalid(Exception):
    """One value's problem: what it must be (the value is added where it is reported)."""


#: A check: the value as TOML typed it → the value to use; raises _Invalid.
Check = Callable[[Any], Any]
#: A table's keys: key → (check, the name its value is answered under). The
#: names are ``Settings`` fields, ``WebhookSettings`` fields in ``[webhook]``,
#: or what config.py and ``_webhook`` resolve further (``api_key_file``,
#: ``ops_listen``, ``listen``, ``secret``, ``secret_file``).
Table = Mapping[str, tuple[Check, str]]


def _bounded(value: float, ge: float | None, gt: float | None, le: float | None) -> None:
    if ge is not None and not value >= ge:
        raise _Invalid(f"must be greater than or equal to {ge}")
    if gt is not None and not value > gt:
        raise _Invalid(f"must be greater than {gt}")
    if le is not None and not value <= le:
        raise _Invalid(f"must be less than or equal to {le}")


def _number(ge: float | None = None, gt: float | None = None, le: float | None = None) -> Check:
    def check(value: Any) -> float:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise _Invalid(
                    "must be a valid number, unable to parse string as a number"
                ) from None
        elif not isinstance(value, int | float):  # bool is an int
            raise _Invalid("must be a valid number")
        number = float(value)
        _bounded(number, ge, gt, le)
        return number

    return check


def _integer(ge: int | None = None, gt: int | None = None, le: int | None = None) -> Check:
    def check(value: Any) -> int:
        if isinstance(value, str):
            try:
                value = float(value.strip()) if "." in value else int(value.strip())
            except ValueError:
                raise _Invalid(
                    "must be a valid integer, unable to parse string as an integer"
                ) from None
        if isinstance(value, float):
            if not math.isfinite(value):
                raise _Invalid("must be a finite number")
            if not value.is_integer():
                raise _Invalid("must be a valid integer, got a number with a fractional part")
            value = int(value)
        if not isinstance(value, int):  # bool is an int
            raise _Invalid("must be a valid integer")
        _bounded(value, ge, gt, le)
        return int(value)

    return check


def _switch(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _Invalid("must be a valid boolean (true or false)")


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid("must be a valid string")
    return value


def _path(value: Any) -> Path:
    if not isinstance(value, str):
        raise _Invalid("must be a path, as a string")
    return Path(value)


def _ledger(value: Any) -> str | Path:
    """A database URL as it is; a SQLite file as a path (relative to the file)."""
    text = _text(value)
    return text if "://" in text else Path(text)


def _secret(value: Any) -> Secret:
    return Secret(_text(value))


def _texts(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _Invalid("must be a list of strings")
    return tuple(value)


def _log_level(value: Any) -> str:
    if value not in LOG_LEVELS:
        hint = did_you_mean(str(value), LOG_LEVELS) or f" (one of {', '.join(LOG_LEVELS)})"
        raise _Invalid(f"is not a log level{hint}")
    return str(value)


#: The top level's keys; each of SECTIONS is a table of its own.
TOP: Table = {
    "specs": (_path, "specs_dir"),
    "out": (_path, "out_dir"),
    "state": (_path, "state_dir"),
    "ledger": (_ledger, "ledger"),
    "api_url": (_text, "api_url"),
    "api_key_file": (_path, "api_key_file"),
    "models": (_texts, "models"),
    "log_level": (_log_level, "log_level"),
}
SECTIONS: Mapping[str, Table] = {
    "submit": {
        "batch_window": (_number(ge=0, le=600), "batch_window"),
        "max_in_flight": (_integer(ge=1, le=100_000), "max_in_flight"),
        "daily_budget": (_integer(ge=0), "daily_budget"),
        "ambiguous_grace": (_number(ge=0), "ambiguous_grace"),
        "max_resubmits_per_fingerprint": (_integer(ge=0, le=100), "max_resubmits"),
    },
    "api": {"max_requests_per_second": (_number(gt=0, le=1000), "max_requests_per_second")},
    "poll": {
        "interval": (_number(gt=0, le=3600), "poll_interval"),
        "rescan_interval": (_number(gt=0), "rescan_interval"),
        "task_timeout": (_number(gt=0), "task_timeout"),
    },
    "retry": {
        "backoff_initial": (_number(gt=0), "backoff_initial"),
        "backoff_cap": (_number(gt=0), "backoff_cap"),
        "request_timeout": (_number(gt=0), "request_timeout"),
    },
    "prune": {"enabled": (_switch, "prune"), "grace": (_number(ge=0), "prune_grace")},
    "webhook": {
        "listen": (_text, "listen"),
        "public_url": (_text, "public_url"),
        "secret": (_secret, "secret"),
        "secret_file": (_path, "secret_file"),
        "max_body": (_integer(gt=0), "max_body"),
        "tolerance": (_number(gt=0), "tolerance"),
    },
    "ops": {"listen": (_text, "ops_listen")},
}
#: ``[limits.<model>]``: one model's overrides of the text-length table (limits.py).
LIMITS: Table = {name: (_integer(gt=0), name) for name in TEXT_FIELDS}


def default(section: str, key: str) -> Any:
    """What ``section.key`` (``section`` "" for the top level) is when nobody sets it.

    Read from the field it sets, the one place a default is stated; None for
    a key without one (``api_key_file``, ``[webhook] listen``, ...).
    """
    name = (SECTIONS[section] if section else TOP)[key][1]
    owner = WebhookSettings if section == "webhook" else Settings
    for found in fields(owner):
        if found.name == name and found.default is not MISSING:
            return found.default
    return None


def read_config_file(path: Path) -> dict[str, Any]:
    """What the file at ``path`` sets, as ``Settings`` fields by name.

    Only the keys the file gives are in the answer. Paths in it are relative
    to its folder. Two entries are not ``Settings`` fields because a flag or
    the environment may stand in for them: ``api_key_file`` (read only when
    no key comes from the environment) and ``ops_listen`` (parsed only
    without ``--ops-listen``).
    """
    top, sections, limits = _parse(path)
    base = path.parent
    retry = sections["retry"]
    initial = retry.get("backoff_initial", default("retry", "backoff_initial"))
    if retry.get("backoff_cap", default("retry", "backoff_cap")) < initial:
        raise ConfigError(f"{path}: retry.backoff_cap must be >= retry.backoff_initial")
    if top.get("models") == ():  # an empty list: the default models
        del top["models"]
    models = top.get("models", default("", "models"))
    unknown = [m for m in limits if m not in models]
    if unknown:
        raise ConfigError(
            "\n".join(
                f"{path}: limits.{m}: unknown model"
                + (did_you_mean(m, list(models)) or f" (known: {', '.join(models)})")
                for m in unknown
            )
        )
    found: dict[str, Any] = dict(top)
    for name, values in sections.items():
        if name != "webhook":
            found |= values
    found = {k: _relative_to(base, v) if isinstance(v, Path) else v for k, v in found.items()}
    if limits:
        found["field_limits"] = with_overrides(limits)
    webhook = _webhook(sections["webhook"], base, str(path))
    return found | ({"webhook": webhook} if webhook else {})


Values = dict[str, Any]


def _parse(path: Path) -> tuple[Values, dict[str, Values], dict[str, Values]]:
    """The file's top-level values, its sections' and its ``[limits.<model>]`` tables.

    Every problem in the file is reported, one line each, so one edit fixes them all.
    """
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: config file is not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    problems: list[str] = []
    known = [*TOP, *SECTIONS, "limits"]
    top = _table(raw, TOP, "", problems, extra=known)
    sections = {
        name: _table(_section(raw.get(name, {}), name, problems), keys, f"{name}.", problems)
        for name, keys in SECTIONS.items()
    }
    limits: dict[str, Values] = {}
    given = raw.get("limits", {})
    if not isinstance(given, dict):
        problems.append(f"limits: must be a valid dictionary, got {given!r}")
        given = {}
    for model, row in given.items():
        where = f"limits.{model}"
        limits[model] = _table(_section(row, where, problems), LIMITS, f"{where}.", problems)
    if problems:
        raise ConfigError("\n".join(f"{path}: {p}" for p in problems))
    return top, sections, limits


def _section(value: Any, where: str, problems: list[str]) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    problems.append(f"{where}: expected a [{where}] table, got {value!r}")
    return {}


def _table(
    given: Mapping[str, Any],
    keys: Table,
    prefix: str,
    problems: list[str],
    *,
    extra: list[str] | None = None,
) -> Values:
    """``given`` checked against ``keys``, by the names ``keys`` answers under.

    ``extra``: the names allowed at this level besides ``keys`` (the top
    level's sections), offered as suggestions too.
    """
    values: Values = {}
    for key, (check, name) in keys.items():
        if key not in given:
            continue
        try:
            values[name] = check(given[key])
        except _Invalid as exc:
            problems.append(f"{prefix}{key}: {_phrase(str(exc), given[key])}")
    allowed = extra if extra is not None else list(keys)
    for key in given:
        if key not in allowed:
            problems.append(f"{prefix}{key}: unknown key{did_you_mean(key, sorted(allowed))}")
    return values


def _phrase(problem: str, value: Any) -> str:
    """The problem with the value shown: where it reads best for the problem."""
    if problem.startswith("is not"):
        return f"{value!r} {problem}"
    return f"{problem}, got {value!r}"


def _relative_to(base: Path, value: Path) -> Path:
    """Paths in a config file are relative to the file's folder, not the cwd."""
    return value if value.is_absolute() else base / value


def _webhook(hook: Values, base: Path, source: str) -> WebhookSettings | None:
    listen, public_url = hook.get("listen"), hook.get("public_url")
    if listen is None and public_url is None:
        return None
    if not (listen and public_url):
        raise ConfigError(f"{source}: webhook: set both listen and public_url")
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"{source}: webhook.listen: expected HOST:PORT, got {listen!r}")
    secret_file = hook.get("secret_file")
    secret = (
        read_secret_file(_relative_to(base, secret_file), "webhook secret")
        if secret_file
        else hook.get("secret")
    )
    if secret is None or not secret.get_secret_value():
        raise ConfigError(f"{source}: webhook: a secret (secret or secret_file) is required")
    return WebhookSettings(
        host=host.strip("[]"),
        port=int(port),
        public_url=public_url.rstrip("/"),
        secret=secret,
        **{k: v for k, v in hook.items() if k in ("max_body", "tolerance")},
    )
