"""Settings: the one frozen object every other module receives.

Flag > environment > config file > default is resolved here and nowhere else;
the CLI hands in the flags it parsed, this module reads the environment and the
TOML config file, validates everything with pydantic, and returns ``Settings``.
Errors name the source (flag, variable or ``file: section.key``) so a person
can fix them.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_core import ErrorDetails

from reconciler.errors import ConfigError
from reconciler.limits import FIELD_LIMITS, FieldLimits, with_overrides
from reconciler.specs import DEFAULT_MODELS
from reconciler.words import did_you_mean

DEFAULT_API_URL = "https://api.musicapi.ai/api/v1"
CREDENTIAL_NAME = "musicapi-key"
#: What a person must do when no key is configured (printed as one line).
KEY_HELP = (
    "no MusicAPI key: set MUSICAPI_KEY, or api_key_file in the config file, "
    "or pass --sandbox to use the bundled emulator"
)


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


@dataclass(frozen=True)
class WebhookSettings:
    """The optional receiver: where it listens, the URL the service calls, the secret."""

    host: str
    port: int
    public_url: str
    secret: SecretStr = field(repr=False)
    max_body: int = 1_000_000
    tolerance: float = 300.0


@dataclass(frozen=True)
class Settings:
    """Everything a command needs, resolved once. Never holds the key in ``repr``."""

    specs_dir: Path
    out_dir: Path
    state_dir: Path
    api_url: str
    api_key: SecretStr | None = field(repr=False)
    sandbox: bool = False
    models: tuple[str, ...] = DEFAULT_MODELS
    #: model → text field → most characters allowed (limits.py, with the config's overrides).
    field_limits: FieldLimits = field(default_factory=lambda: FIELD_LIMITS)
    #: Seconds a burst of saves may share batches, and how long a spec file must
    #: stay unchanged (size, mtime, content) before a pass reads it.
    batch_window: float = 2.0
    max_in_flight: int = 200
    daily_budget: int | None = None
    ambiguous_grace: float = 900.0
    #: Resubmits allowed per fingerprint after ambiguous submits (0: park for a person).
    max_resubmits: int = 1
    #: This run's spending ceiling in credits (``--max-credits``); None: no ceiling.
    max_credits: int | None = None
    #: Token bucket rate for every request to the API.
    max_requests_per_second: float = 4.0
    poll_interval: float = 15.0
    rescan_interval: float = 300.0
    task_timeout: float = 1800.0
    backoff_initial: float = 5.0
    backoff_cap: float = 600.0
    request_timeout: float = 60.0
    prune: bool = False
    prune_grace: float = 7 * 86400.0
    webhook: WebhookSettings | None = None
    #: The ops listener (metrics, health, dashboard): (host, port), None when off.
    ops_listen: tuple[str, int] | None = None
    log_level: str = "info"
    config_file: Path | None = None

    def with_api(self, url: str, key: str) -> Settings:
        """The same settings pointed at another API (the embedded sandbox)."""
        return replace(self, api_url=url, api_key=SecretStr(key))

    def require_key(self) -> SecretStr:
        if self.api_key is None or not self.api_key.get_secret_value():
            raise ConfigError(KEY_HELP)
        return self.api_key

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "ledger.sqlite3"


@dataclass(frozen=True)
class Flags:
    """What the command line said; None means "not given"."""

    specs: Path | None = None
    out: Path | None = None
    state: Path | None = None
    config: Path | None = None
    api_url: str | None = None
    sandbox: bool = False
    prune: bool | None = None
    max_credits: int | None = None
    ops_listen: str | None = None


def _read_file(path: Path) -> _File:
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


def _relative_to(base: Path | None, value: Path | None) -> Path | None:
    """Paths in a config file are relative to the file's folder, not the cwd."""
    if value is None or base is None or value.is_absolute():
        return value
    return base / value


def _read_secret_file(path: Path, what: str) -> SecretStr:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from exc
    if not text:
        raise ConfigError(f"{path}: {what} file is empty")
    return SecretStr(text)


def _api_key(env: Mapping[str, str], conf: _File, base: Path | None) -> SecretStr | None:
    if env.get("MUSICAPI_KEY"):
        return SecretStr(env["MUSICAPI_KEY"])
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL_NAME).is_file():
        return _read_secret_file(Path(creds) / CREDENTIAL_NAME, "API key")
    key_file = _relative_to(base, conf.api_key_file)
    return _read_secret_file(key_file, "API key") if key_file else None


def _webhook(hook: _Webhook, base: Path | None, source: str) -> WebhookSettings | None:
    if hook.listen is None and hook.public_url is None:
        return None
    if not (hook.listen and hook.public_url):
        raise ConfigError(f"{source}: webhook: set both listen and public_url")
    host, sep, port = hook.listen.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"{source}: webhook.listen: expected HOST:PORT, got {hook.listen!r}")
    secret_file = _relative_to(base, hook.secret_file)
    secret = _read_secret_file(secret_file, "webhook secret") if secret_file else hook.secret
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


def parse_listen(value: str, what: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or a bare ``PORT`` (loopback: 127.0.0.1) as (host, port).

    Nothing is exposed by accident: only an explicit host listens elsewhere.
    """
    host, sep, port = value.strip().rpartition(":")
    if not sep:
        host = "127.0.0.1"
    if not port.isdigit() or not host or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{what}: expected HOST:PORT or PORT, got {value!r}")
    return host.strip("[]"), int(port)


def load_settings(flags: Flags, env: Mapping[str, str] | None = None) -> Settings:
    """Resolve flag > environment > config file > default into one ``Settings``."""
    env = os.environ if env is None else env
    config_path = flags.config or (
        Path(env["RECONCILER_CONFIG"]) if env.get("RECONCILER_CONFIG") else None
    )
    conf = _read_file(config_path) if config_path else _File()
    base = config_path.parent if config_path else None
    source = str(config_path) if config_path else "config"

    def path(flag: Path | None, var: str, from_file: Path | None, default: str) -> Path:
        if flag is not None:
            return flag
        if env.get(var):
            return Path(env[var])
        return _relative_to(base, from_file) or Path(default)

    api_url = flags.api_url or env.get("MUSICAPI_BASE_URL") or conf.api_url or DEFAULT_API_URL
    if not api_url.startswith(("http://", "https://")):
        raise ConfigError(f"API URL must start with http:// or https://, got {api_url!r}")
    if conf.retry.backoff_cap < conf.retry.backoff_initial:
        raise ConfigError(f"{source}: retry.backoff_cap must be >= retry.backoff_initial")
    # The docs recommend polling every 15-25 s; the sandbox finishes in seconds,
    # so an unconfigured sandbox run polls faster to feel alive.
    poll = conf.poll.interval or (1.0 if flags.sandbox else 15.0)
    models = conf.models or DEFAULT_MODELS
    unknown = [m for m in conf.limits if m not in models]
    if unknown:
        raise ConfigError(
            "\n".join(
                f"{source}: limits.{m}: unknown model"
                + (did_you_mean(m, list(models)) or f" (known: {', '.join(models)})")
                for m in unknown
            )
        )
    return Settings(
        specs_dir=path(flags.specs, "RECONCILER_SPECS", conf.specs, "specs"),
        out_dir=path(flags.out, "RECONCILER_OUT", conf.out, "tracks"),
        state_dir=path(flags.state, "RECONCILER_STATE", conf.state, ".reconciler"),
        api_url=api_url.rstrip("/"),
        api_key=_api_key(env, conf, base),
        sandbox=flags.sandbox,
        models=models,
        field_limits=with_overrides(
            {m: row.model_dump(exclude_none=True) for m, row in conf.limits.items()}
        ),
        batch_window=conf.submit.batch_window,
        max_in_flight=conf.submit.max_in_flight,
        daily_budget=conf.submit.daily_budget,
        ambiguous_grace=conf.submit.ambiguous_grace,
        max_resubmits=conf.submit.max_resubmits_per_fingerprint,
        max_credits=flags.max_credits,
        max_requests_per_second=conf.api.max_requests_per_second,
        poll_interval=poll,
        rescan_interval=conf.poll.rescan_interval,
        task_timeout=conf.poll.task_timeout,
        backoff_initial=conf.retry.backoff_initial,
        backoff_cap=conf.retry.backoff_cap,
        request_timeout=conf.retry.request_timeout,
        prune=conf.prune.enabled if flags.prune is None else flags.prune,
        prune_grace=conf.prune.grace,
        webhook=_webhook(conf.webhook, base, source),
        ops_listen=(
            parse_listen(flags.ops_listen, "--ops-listen")
            if flags.ops_listen
            else parse_listen(conf.ops.listen, f"{source}: ops.listen")
            if conf.ops.listen
            else None
        ),
        log_level=conf.log_level,
        config_file=config_path,
    )


def settings_summary(settings: Settings) -> dict[str, Any]:
    """Non-secret settings for logs and ``status``."""
    return {
        "specs": str(settings.specs_dir),
        "out": str(settings.out_dir),
        "state": str(settings.state_dir),
        "api_url": settings.api_url,
        "sandbox": settings.sandbox,
        "prune": settings.prune,
        "daily_budget": settings.daily_budget,
        "webhook": settings.webhook.public_url if settings.webhook else None,
    }
