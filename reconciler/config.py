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
    """The optional receiver (``[webhook]``): where it listens, the URL it is called at."""

    #: Address the receiver binds (``listen``'s host part).
    host: str
    #: Port the receiver binds (``listen``'s port part).
    port: int
    #: The URL the service reaches the receiver at; items carry ``<public_url>/hook/<fingerprint>``.
    public_url: str
    #: Shared secret that signs each delivery (``secret`` or ``secret_file``).
    secret: Secret = field(repr=False)
    #: Largest accepted request body, in bytes (413 above it).
    max_body: int = 1_000_000
    #: Seconds a delivery's timestamp may differ from now (401 outside it).
    tolerance: float = 300.0


@dataclass(frozen=True)
class Settings:
    """Everything a command needs, resolved once. Never holds the key in ``repr``.

    Each field's default here is the only one: the config file states only
    what it sets (config_file.py), and the README's and the example config's
    defaults are checked against these (tests/test_config.py). The fields are
    flat rather than grouped by config-file section because the pass reads
    them by these names; the comments above each run follow the sections.
    """

    # Where things are (top level of the config file).
    #: Folder of spec files (``specs``).
    specs_dir: Path = Path("specs")
    #: Folder the generated audio, playlists and tracks.json are written to (``out``).
    out_dir: Path = Path("tracks")
    #: Folder of the ledger, the audio cache and the trash (``state``).
    state_dir: Path = Path(".reconciler")
    #: MusicAPI base URL, without a trailing slash (``api_url``).
    api_url: str = DEFAULT_API_URL
    #: The API key; None when none is configured (``require_key`` says how to set one).
    api_key: Secret | None = field(default=None, repr=False)
    #: True with ``--sandbox``: the bundled emulator stands in for the API.
    sandbox: bool = False
    #: Models a spec may name (``models``).
    models: tuple[str, ...] = DEFAULT_MODELS
    #: model → text field → most characters allowed (limits.py, with ``[limits.<model>]``).
    field_limits: FieldLimits = field(default_factory=lambda: FIELD_LIMITS)
    #: Least important log level shown: debug, info, warning or error (``log_level``).
    log_level: str = "info"
    #: Where the ledger is (``ledger``): a ``postgresql://`` URL (replicas share
    #: it), or a SQLite file; None: ``ledger.sqlite3`` in the state folder.
    ledger: str | None = None

    # [submit]
    #: Seconds a burst of saves may share batches, and how long a spec file must
    #: stay unchanged (size, mtime, content) before a pass reads it.
    batch_window: float = 2.0
    #: Tasks submitted and not finished, at most.
    max_in_flight: int = 200
    #: Credits to spend per UTC day at most; None: no budget beyond the balance.
    daily_budget: int | None = None
    #: Seconds to wait for a webhook to claim items whose submit answer was lost
    #: before submitting them again.
    ambiguous_grace: float = 900.0
    #: Resubmits allowed per fingerprint after ambiguous submits (0: park for a person)
    #: (``max_resubmits_per_fingerprint``).
    max_resubmits: int = 1
    #: This run's spending ceiling in credits (``--max-credits``); None: no ceiling.
    max_credits: int | None = None

    # [api]
    #: Token bucket rate for every request to the API, in requests per second.
    max_requests_per_second: float = 4.0

    # [poll]
    #: Seconds between polls of one batch in flight (``interval``); the service
    #: recommends 15-25. ``--sandbox`` without it polls every SANDBOX_POLL_INTERVAL.
    poll_interval: float = 15.0
    #: Seconds between full rescans of the specs folder by the daemon, besides file events.
    rescan_interval: float = 300.0
    #: Seconds a task may run before it is given up on (retried, flagged).
    task_timeout: float = 1800.0

    # [retry]
    #: Seconds before the first retry of a 429, 5xx or network fault; doubles up to the cap.
    backoff_initial: float = 5.0
    #: Seconds between retries at most, and how long submitting pauses after a 401
    #: or an empty account.
    backoff_cap: float = 600.0
    #: Seconds one HTTP request to the API may take. The official SDK waits 60 s;
    #: a shorter timeout only manufactures ambiguous submits, which may cost a
    #: second generation.
    request_timeout: float = 60.0

    # [prune]
    #: True: outputs no spec asks for any more move to the trash (``enabled``, ``--prune``).
    prune: bool = False
    #: Seconds a pruned file stays in the trash before it is deleted (``grace``; 7 days).
    prune_grace: float = 7 * 86400.0

    # [ha]
    #: Seconds the leader's lease lasts: replicas sharing a ledger take over
    #: from a leader that stopped renewing it (every ``lease / 3``) this long ago.
    lease: float = 15.0

    # [webhook], [ops] and where the settings came from.
    #: The webhook receiver; None when the config file has no ``[webhook]``.
    webhook: WebhookSettings | None = None
    #: The ops listener (metrics, health, dashboard): (host, port), None when off.
    ops_listen: tuple[str, int] | None = None
    #: The config file these settings were read from; None when there was none.
    config_file: Path | None = None

    def with_api(self, url: str, key: str) -> Settings:
        """The same settings pointed at another API (the embedded sandbox)."""
        return replace(self, api_url=url, api_key=Secret(key))

    def require_key(self) -> Secret:
        if self.api_key is None or not self.api_key.get_secret_value():
            raise ConfigError(KEY_HELP)
        return self.api_key

    @property
    def ledger_target(self) -> Path | str:
        """The ledger to open: a PostgreSQL URL as given, or the SQLite file's path."""
        if self.ledger is None:
            return self.state_dir / "ledger.sqlite3"
        if self.ledger.startswith(("postgresql://", "postgres://")):
            return self.ledger
        return Path(self.ledger.removeprefix("sqlite:///").removeprefix("sqlite://"))


@dataclass(frozen=True)
class Flags:
    """What the command line said; None means "not given"."""

    specs: Path | None = None
    out: Path | None = None
    state: Path | None = None
    ledger: str | None = None
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


def check_ledger(value: str, what: str) -> str:
    """A ledger URL or SQLite path as given; an empty one, or another database's
    URL, is refused, naming where it was given (``what``)."""
    scheme, sep, _ = value.partition("://")
    if not value.strip():
        raise ConfigError(f"{what}: empty; give a postgresql:// URL or a SQLite file path")
    if sep and scheme not in ("postgresql", "postgres", "sqlite"):
        raise ConfigError(
            f"{what}: expected a postgresql:// URL or a SQLite file path, got a {scheme}:// URL"
        )
    return value


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


#: Seconds between polls in a ``--sandbox`` run whose config file sets no
#: ``[poll] interval``: the emulator finishes in seconds, so the demo feels alive.
SANDBOX_POLL_INTERVAL = 1.0


def load_settings(flags: Flags, env: Mapping[str, str] | None = None) -> Settings:
    """Resolve flag > environment > config file > default into one ``Settings``.

    Only what a flag, a variable or the file gives is passed on; the rest
    takes the field's default.
    """
    env = os.environ if env is None else env
    config_path = flags.config or (
        Path(env["RECONCILER_CONFIG"]) if env.get("RECONCILER_CONFIG") else None
    )
    conf: dict[str, Any] = {}
    if config_path:
        from reconciler.config_file import read_config_file

        conf = read_config_file(config_path)
    source = str(config_path) if config_path else "config"
    for name, flag, var in (
        ("specs_dir", flags.specs, "RECONCILER_SPECS"),
        ("out_dir", flags.out, "RECONCILER_OUT"),
        ("state_dir", flags.state, "RECONCILER_STATE"),
    ):
        if flag is not None:
            conf[name] = flag
        elif env.get(var):
            conf[name] = Path(env[var])
    if flags.ledger is not None:
        conf["ledger"] = check_ledger(flags.ledger, "--ledger")
    elif env.get("RECONCILER_LEDGER"):
        conf["ledger"] = check_ledger(env["RECONCILER_LEDGER"], "RECONCILER_LEDGER")
    elif conf.get("ledger") is not None:
        conf["ledger"] = check_ledger(str(conf["ledger"]), f"{source}: ledger")
    api_url = flags.api_url or env.get("MUSICAPI_BASE_URL") or conf.get("api_url")
    if api_url is not None:
        if not api_url.startswith(("http://", "https://")):
            raise ConfigError(f"API URL must start with http:// or https://, got {api_url!r}")
        conf["api_url"] = api_url.rstrip("/")
    conf["api_key"] = _api_key(env, conf.pop("api_key_file", None))
    ops_file = conf.pop("ops_listen", None)
    if flags.ops_listen:
        conf["ops_listen"] = parse_listen(flags.ops_listen, "--ops-listen")
    elif ops_file:
        conf["ops_listen"] = parse_listen(ops_file, f"{source}: ops.listen")
    if flags.sandbox:
        conf.setdefault("poll_interval", SANDBOX_POLL_INTERVAL)
    if flags.prune is not None:
        conf["prune"] = flags.prune
    return Settings(
        sandbox=flags.sandbox, max_credits=flags.max_credits, config_file=config_path, **conf
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
