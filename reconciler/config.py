"""Settings: the one frozen object every other module receives.

Flag > environment > config file > default is resolved here and nowhere else;
the CLI hands in the flags it parsed, this module reads the environment and
lays both over what the TOML config file says (config_file.py, imported only
when there is a file), and returns ``Settings``. Errors name the source
(flag, variable or ``file: section.key``) so a person can fix them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from reconciler.errors import ConfigError
from reconciler.limits import DEFAULT_MODELS, FIELD_LIMITS, FieldLimits

DEFAULT_API_URL = "https://api.musicapi.ai/api/v1"
CREDENTIAL_NAME = "musicapi-key"
#: What a person must do when no key is configured (printed as one line).
KEY_HELP = (
    "no MusicAPI key: set MUSICAPI_KEY, or api_key_file in the config file, "
    "or pass --sandbox to use the bundled emulator"
)


class Secret:
    """A key or webhook secret: equal by value, never shown by ``repr`` or ``str``.

    Plain rather than pydantic's ``SecretStr`` (same interface): resolving
    settings imports no validation library, a tenth of a second of start-up.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{self}')"

    def __str__(self) -> str:
        return "**********" if self._value else ""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class WebhookSettings:
    """The optional receiver: where it listens, the URL the service calls, the secret."""

    host: str
    port: int
    public_url: str
    secret: Secret = field(repr=False)
    max_body: int = 1_000_000
    tolerance: float = 300.0


@dataclass(frozen=True)
class Settings:
    """Everything a command needs, resolved once. Never holds the key in ``repr``."""

    specs_dir: Path
    out_dir: Path
    state_dir: Path
    api_url: str
    api_key: Secret | None = field(repr=False)
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
        return replace(self, api_url=url, api_key=Secret(key))

    def require_key(self) -> Secret:
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


def read_secret_file(path: Path, what: str) -> Secret:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what}: {exc.strerror}") from exc
    if not text:
        raise ConfigError(f"{path}: {what} file is empty")
    return Secret(text)


def _api_key(env: Mapping[str, str], key_file: Path | None) -> Secret | None:
    if env.get("MUSICAPI_KEY"):
        return Secret(env["MUSICAPI_KEY"])
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL_NAME).is_file():
        return read_secret_file(Path(creds) / CREDENTIAL_NAME, "API key")
    return read_secret_file(key_file, "API key") if key_file else None


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
    conf: dict[str, Any] = {}
    if config_path:
        from reconciler.config_file import read_config_file

        conf = read_config_file(config_path)
    source = str(config_path) if config_path else "config"

    def path(flag: Path | None, var: str, from_file: Path | None, default: str) -> Path:
        if flag is not None:
            return flag
        if env.get(var):
            return Path(env[var])
        return from_file or Path(default)

    specs_dir = path(flags.specs, "RECONCILER_SPECS", conf.pop("specs_dir", None), "specs")
    out_dir = path(flags.out, "RECONCILER_OUT", conf.pop("out_dir", None), "tracks")
    state_dir = path(flags.state, "RECONCILER_STATE", conf.pop("state_dir", None), ".reconciler")
    file_url: str | None = conf.pop("api_url", None)
    api_url = flags.api_url or env.get("MUSICAPI_BASE_URL") or file_url or DEFAULT_API_URL
    if not api_url.startswith(("http://", "https://")):
        raise ConfigError(f"API URL must start with http:// or https://, got {api_url!r}")
    api_key = _api_key(env, conf.pop("api_key_file", None))
    ops_file = conf.pop("ops_listen", None)
    # The docs recommend polling every 15-25 s; the sandbox finishes in seconds,
    # so an unconfigured sandbox run polls faster to feel alive.
    conf.setdefault("poll_interval", 1.0 if flags.sandbox else 15.0)
    if flags.prune is not None:
        conf["prune"] = flags.prune
    return Settings(
        specs_dir=specs_dir,
        out_dir=out_dir,
        state_dir=state_dir,
        api_url=api_url.rstrip("/"),
        api_key=api_key,
        sandbox=flags.sandbox,
        max_credits=flags.max_credits,
        ops_listen=(
            parse_listen(flags.ops_listen, "--ops-listen")
            if flags.ops_listen
            else parse_listen(ops_file, f"{source}: ops.listen")
            if ops_file
            else None
        ),
        config_file=config_path,
        **conf,
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
