"""The TOML config file: its schema, validated with pydantic, and its errors in a person's words.

Where it sits: read by ``config.load_settings`` only when a config file is
given, so a command run without one never imports pydantic (a tenth of a
second of start-up). It answers what the file says, as ``Settings`` fields by
name; the flags and the environment are laid over that in config.py.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_core import ErrorDetails

from reconciler.config import Secret, WebhookSettings, read_secret_file
from reconciler.errors import ConfigError
from reconciler.limits import DEFAULT_MODELS, with_overrides
from reconciler.words import did_you_mean

LogLevel = Literal["debug", "info", "warning", "error"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Submit(_Section):
    batch_window: float = Field(2.0, ge=0, le=600)
    max_in_flight: int = Field(200, ge=1, le=100_000)
    daily_budget: int | None = Field(None, ge=0)
    ambiguous_grace: float = Field(900.0, ge=0)
    max_resubmits_per_fingerprint: int = Field(1, ge=0, le=100)


class _Api(_Section):
    max_requests_per_second: float = Field(4.0, gt=0, le=1000)


class _Poll(_Section):
    interval: float | None = Field(None, gt=0, le=3600)
    rescan_interval: float = Field(300.0, gt=0)
    task_timeout: float = Field(1800.0, gt=0)


class _Retry(_Section):
    backoff_initial: float = Field(5.0, gt=0)
    backoff_cap: float = Field(600.0, gt=0)
    # The official SDK waits 60 s; a shorter timeout only manufactures
    # ambiguous submits, which may cost a second generation.
    request_timeout: float = Field(60.0, gt=0)


class _Prune(_Section):
    enabled: bool = False
    grace: float = Field(7 * 86400.0, ge=0)


class _Webhook(_Section):
    listen: str | None = None
    public_url: str | None = None
    secret: SecretStr | None = None
    secret_file: Path | None = None
    max_body: int = Field(1_000_000, gt=0)
    tolerance: float = Field(300.0, gt=0)


class _Ops(_Section):
    listen: str | None = None


class _Limits(_Section):
    """One model's overrides of the text-length table (limits.py)."""

    prompt: int | None = Field(None, gt=0)
    gpt_description_prompt: int | None = Field(None, gt=0)
    title: int | None = Field(None, gt=0)
    tags: int | None = Field(None, gt=0)
    negative_tags: int | None = Field(None, gt=0)


class _File(_Section):
    specs: Path | None = None
    out: Path | None = None
    state: Path | None = None
    api_url: str | None = None
    api_key_file: Path | None = None
    models: tuple[str, ...] | None = None
    log_level: LogLevel = "info"
    submit: _Submit = _Submit()
    api: _Api = _Api()
    poll: _Poll = _Poll()
    retry: _Retry = _Retry()
    prune: _Prune = _Prune()
    webhook: _Webhook = _Webhook()
    ops: _Ops = _Ops()
    limits: dict[str, _Limits] = Field(default_factory=dict)


def read_config_file(path: Path) -> dict[str, Any]:
    """What the file at ``path`` sets, as ``Settings`` fields by name.

    Paths in it are relative to its folder. Three entries are not resolved
    here because a flag or the environment may stand in for them:
    ``api_key_file`` (read only when no key comes from the environment),
    ``ops_listen`` (parsed only without ``--ops-listen``) and ``poll_interval``
    (absent when the file leaves it to the sandbox-dependent default).
    """
    conf = _parse(path)
    base = path.parent
    if conf.retry.backoff_cap < conf.retry.backoff_initial:
        raise ConfigError(f"{path}: retry.backoff_cap must be >= retry.backoff_initial")
    models = conf.models or DEFAULT_MODELS
    unknown = [m for m in conf.limits if m not in models]
    if unknown:
        raise ConfigError(
            "\n".join(
                f"{path}: limits.{m}: unknown model"
                + (did_you_mean(m, list(models)) or f" (known: {', '.join(models)})")
                for m in unknown
            )
        )
    found: dict[str, Any] = {
        "models": models,
        "field_limits": with_overrides(
            {m: row.model_dump(exclude_none=True) for m, row in conf.limits.items()}
        ),
        "batch_window": conf.submit.batch_window,
        "max_in_flight": conf.submit.max_in_flight,
        "daily_budget": conf.submit.daily_budget,
        "ambiguous_grace": conf.submit.ambiguous_grace,
        "max_resubmits": conf.submit.max_resubmits_per_fingerprint,
        "max_requests_per_second": conf.api.max_requests_per_second,
        "rescan_interval": conf.poll.rescan_interval,
        "task_timeout": conf.poll.task_timeout,
        "backoff_initial": conf.retry.backoff_initial,
        "backoff_cap": conf.retry.backoff_cap,
        "request_timeout": conf.retry.request_timeout,
        "prune": conf.prune.enabled,
        "prune_grace": conf.prune.grace,
        "webhook": _webhook(conf.webhook, base, str(path)),
        "log_level": conf.log_level,
    }
    optional = {
        "specs_dir": _relative_to(base, conf.specs),
        "out_dir": _relative_to(base, conf.out),
        "state_dir": _relative_to(base, conf.state),
        "api_url": conf.api_url,
        "api_key_file": _relative_to(base, conf.api_key_file),
        "ops_listen": conf.ops.listen,
        "poll_interval": conf.poll.interval,
    }
    return found | {k: v for k, v in optional.items() if v is not None}


def _parse(path: Path) -> _File:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: config file is not UTF-8 text") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    try:
        return _File.model_validate(raw)
    except ValidationError as exc:
        # Every problem in the file, one line each, so one edit fixes them all.
        lines = [f"{path}: {_describe(error)}" for error in exc.errors()]
        raise ConfigError("\n".join(lines)) from exc


def _section_of(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model that holds the last key of ``loc`` (for did-you-mean suggestions)."""
    model: type[BaseModel] = _File
    keys = list(loc[:-1])
    while keys:
        info = model.model_fields.get(str(keys.pop(0)))
        annotation = info.annotation if info else None
        if get_origin(annotation) is dict:
            # A table of tables keyed by name ([limits.<model>]): skip the name.
            annotation = get_args(annotation)[1]
            if not keys:
                return None
            keys.pop(0)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _describe(error: ErrorDetails) -> str:
    """One pydantic error in the words of a person editing the file."""
    loc = tuple(error["loc"])
    where = ".".join(str(p) for p in loc)
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        section = _section_of(loc)
        known = sorted(section.model_fields) if section else []
        return f"{where}: unknown key{did_you_mean(str(loc[-1]), known)}"
    if error["type"] == "literal_error" and loc == ("log_level",):
        levels = list(get_args(LogLevel))
        hint = did_you_mean(str(value), levels) or f" (one of {', '.join(levels)})"
        return f"{where}: {value!r} is not a log level{hint}"
    if error["type"] == "model_type":
        return f"{where}: expected a [{where}] table, got {value!r}"
    message = error["msg"].replace("Input should be", "must be", 1)
    return f"{where}: {message}, got {value!r}"


def _relative_to(base: Path, value: Path | None) -> Path | None:
    """Paths in a config file are relative to the file's folder, not the cwd."""
    if value is None or value.is_absolute():
        return value
    return base / value


def _webhook(hook: _Webhook, base: Path, source: str) -> WebhookSettings | None:
    if hook.listen is None and hook.public_url is None:
        return None
    if not (hook.listen and hook.public_url):
        raise ConfigError(f"{source}: webhook: set both listen and public_url")
    host, sep, port = hook.listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"{source}: webhook.listen: expected HOST:PORT, got {hook.listen!r}")
    secret_file = _relative_to(base, hook.secret_file)
    secret = (
        read_secret_file(secret_file, "webhook secret")
        if secret_file
        else Secret(hook.secret.get_secret_value())
        if hook.secret
        else None
    )
    if secret is None or not secret.get_secret_value():
        raise ConfigError(f"{source}: webhook: a secret (secret or secret_file) is required")
    return WebhookSettings(
        host=host.strip("[]"),
        port=int(port),
        public_url=hook.public_url.rstrip("/"),
        secret=secret,
        max_body=hook.max_body,
        tolerance=hook.tolerance,
    )
