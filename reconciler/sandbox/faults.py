"""Fault injection for the sandbox: the profile format and the seeded injector.

A *fault profile* (TOML file, ``--fault`` flags, or JSON to ``POST
/_sandbox/config``) is a list of rules. Each rule names a fault ``kind``, one
schedule (``rate``, ``at``, ``every`` or ``after``), an optional ``endpoints``
filter and the kind's own parameters::

    batch_disabled = 405        # optional: the batch endpoint answers 404 or 405
    audio_url_ttl = 30          # optional: audio URLs expire (403) after 30 s

    [[faults]]
    kind = "rate_limited"
    rate = 0.1                  # probability per matching event
    retry_after = 2

    [[faults]]
    kind = "drop_response"      # submit processed, then the connection closes
    at = [2]                    # 1-based ordinals of matching events

The :class:`FaultInjector` answers, per event, which rules fire. Each rule
counts its own matching events and draws from its own RNG seeded from the
sandbox seed and the rule's position, so a run is reproducible under a seed.
``app.py`` asks at each HTTP request, ``state.py`` at each submitted item and
each created task, ``webhooks.py`` at each delivery.
"""

from __future__ import annotations

import random
import tomllib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any


class FaultProfileError(ValueError):
    """A fault profile is malformed; the message names the rule and the field."""


class Category(Enum):
    """When a fault kind is decided: per HTTP request, submitted item, task or webhook delivery."""

    REQUEST = "request"
    ITEM = "item"
    TASK = "task"
    WEBHOOK = "webhook"


API_ENDPOINTS = frozenset({"create", "batch_submit", "task_poll", "batch_poll", "credits"})
SUBMIT_ENDPOINTS = frozenset({"create", "batch_submit"})
AUDIO_ENDPOINTS = frozenset({"audio"})
ALL_ENDPOINTS = API_ENDPOINTS | AUDIO_ENDPOINTS
WEBHOOK_ENDPOINTS = frozenset({"webhook"})


@dataclass(frozen=True)
class _KindSpec:
    category: Category
    default_endpoints: frozenset[str]
    allowed_endpoints: frozenset[str]
    params: frozenset[str] = frozenset()


KINDS: dict[str, _KindSpec] = {
    # Answered by the HTTP layer before (or, for drop_response, after) the handler runs.
    "rate_limited": _KindSpec(
        Category.REQUEST, API_ENDPOINTS, ALL_ENDPOINTS, frozenset({"retry_after"})
    ),
    "server_error": _KindSpec(
        Category.REQUEST, API_ENDPOINTS, ALL_ENDPOINTS, frozenset({"status", "body"})
    ),
    "connection_reset": _KindSpec(Category.REQUEST, API_ENDPOINTS, ALL_ENDPOINTS),
    "slow": _KindSpec(Category.REQUEST, API_ENDPOINTS, ALL_ENDPOINTS, frozenset({"delay"})),
    "drop_response": _KindSpec(Category.REQUEST, SUBMIT_ENDPOINTS, ALL_ENDPOINTS),
    "unauthorized": _KindSpec(Category.REQUEST, API_ENDPOINTS, API_ENDPOINTS),
    "audio_expired": _KindSpec(
        Category.REQUEST, AUDIO_ENDPOINTS, AUDIO_ENDPOINTS, frozenset({"status"})
    ),
    "audio_truncated": _KindSpec(
        Category.REQUEST, AUDIO_ENDPOINTS, AUDIO_ENDPOINTS, frozenset({"fraction", "mode"})
    ),
    # Decided per submitted item: the item is rejected by index (or the create answers 4xx).
    "reject": _KindSpec(
        Category.ITEM, SUBMIT_ENDPOINTS, SUBMIT_ENDPOINTS, frozenset({"type", "error"})
    ),
    "insufficient_credits": _KindSpec(Category.ITEM, SUBMIT_ENDPOINTS, SUBMIT_ENDPOINTS),
    # Decided per created task: how its life goes. Several may fire for one task.
    "task_failed": _KindSpec(
        Category.TASK, SUBMIT_ENDPOINTS, SUBMIT_ENDPOINTS, frozenset({"type", "error"})
    ),
    "clip_failed": _KindSpec(Category.TASK, SUBMIT_ENDPOINTS, SUBMIT_ENDPOINTS),
    "stuck": _KindSpec(Category.TASK, SUBMIT_ENDPOINTS, SUBMIT_ENDPOINTS),
    "unfinished_clips": _KindSpec(Category.TASK, SUBMIT_ENDPOINTS, SUBMIT_ENDPOINTS),
    "duration_string": _KindSpec(Category.TASK, SUBMIT_ENDPOINTS, SUBMIT_ENDPOINTS),
    # Decided per webhook delivery.
    "webhook_duplicate": _KindSpec(Category.WEBHOOK, WEBHOOK_ENDPOINTS, WEBHOOK_ENDPOINTS),
    "webhook_out_of_order": _KindSpec(Category.WEBHOOK, WEBHOOK_ENDPOINTS, WEBHOOK_ENDPOINTS),
    "webhook_bad_signature": _KindSpec(Category.WEBHOOK, WEBHOOK_ENDPOINTS, WEBHOOK_ENDPOINTS),
}

_SCHEDULE_KEYS = ("rate", "at", "every", "after")
_REJECT_TYPES = ("forbidden", "bad_request")
_FAILURE_TYPES = ("failed", "timeout", "forbidden", "api_error")
_TRUNCATIONS = ("hang_up", "short")


def _number(where: str, value: object, low: float, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FaultProfileError(f"{where}: expected a number, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise FaultProfileError(f"{where}: {value} is not {bounds}")
    return float(value)


def _integer(where: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FaultProfileError(f"{where}: expected an integer, got {value!r}")
    if value < low:
        raise FaultProfileError(f"{where}: {value} is less than {low}")
    return value


def _choice(where: str, value: object, choices: Iterable[object]) -> Any:
    options = tuple(choices)
    if value not in options:
        raise FaultProfileError(f"{where}: {value!r} is not one of {', '.join(map(repr, options))}")
    return value


@dataclass(frozen=True)
class FaultRule:
    """One fault: what happens, on which schedule, on which endpoints.

    Exactly one of ``rate`` (probability per matching event), ``at``
    (1-based ordinals of matching events), ``every`` (each n-th matching
    event) or ``after`` (every matching event after the first n) is set.
    The remaining fields are parameters of particular kinds.
    """

    kind: str
    rate: float | None = None
    at: frozenset[int] = frozenset()
    every: int | None = None
    after: int | None = None
    endpoints: frozenset[str] = frozenset()
    retry_after: float | None = None  # rate_limited: Retry-After seconds; None sends no header
    status: int | None = None  # server_error: 5xx; audio_expired: 403 or 404
    body: str = "html"  # server_error: "html" or "empty"
    delay: float = 30.0  # slow: seconds before the response
    type: str | None = None  # reject: forbidden|bad_request; task_failed: the failure type
    error: str | None = None  # reject, task_failed: the message
    fraction: float = 0.5  # audio_truncated: share of the file that is sent
    mode: str | None = (
        None  # audio_truncated: "hang_up" (full Content-Length, then close) or "short"
    )

    @property
    def category(self) -> Category:
        return KINDS[self.kind].category

    def fires(self, ordinal: int, draw: Callable[[], float]) -> bool:
        """Whether the ``ordinal``-th matching event triggers this rule."""
        if self.rate is not None:
            return draw() < self.rate
        if self.every is not None:
            return ordinal % self.every == 0
        if self.after is not None:
            return ordinal > self.after
        return ordinal in self.at

    @classmethod
    def from_mapping(cls, data: object, where: str) -> FaultRule:
        """Parse one rule (a TOML table or JSON object); errors name ``where`` and the field."""
        if not isinstance(data, Mapping):
            raise FaultProfileError(f"{where}: expected a table, got {data!r}")
        kind = data.get("kind")
        if kind not in KINDS:
            raise FaultProfileError(
                f"{where}.kind: unknown fault {kind!r} (one of {', '.join(sorted(KINDS))})"
            )
        spec = KINDS[kind]
        allowed = {"kind", "endpoints", *_SCHEDULE_KEYS, *spec.params}
        for key in data:
            if key not in allowed:
                raise FaultProfileError(f"{where}.{key}: not a field of fault {kind!r}")
        schedules = [key for key in _SCHEDULE_KEYS if key in data]
        if len(schedules) != 1:
            raise FaultProfileError(f"{where}: give exactly one of rate, at, every, after")

        values: dict[str, Any] = {"kind": kind, "endpoints": spec.default_endpoints}
        schedule = schedules[0]
        raw = data[schedule]
        if schedule == "rate":
            values["rate"] = _number(f"{where}.rate", raw, 0.0, 1.0)
        elif schedule == "at":
            if not isinstance(raw, list):
                raise FaultProfileError(f"{where}.at: expected a list of ordinals, got {raw!r}")
            values["at"] = frozenset(_integer(f"{where}.at", n, 1) for n in raw)
        elif schedule == "every":
            values["every"] = _integer(f"{where}.every", raw, 1)
        else:
            values["after"] = _integer(f"{where}.after", raw, 0)

        if "endpoints" in data:
            raw = data["endpoints"]
            if not isinstance(raw, list) or not raw:
                raise FaultProfileError(f"{where}.endpoints: expected a non-empty list")
            for name in raw:
                _choice(f"{where}.endpoints", name, sorted(spec.allowed_endpoints))
            values["endpoints"] = frozenset(raw)

        if "retry_after" in data:
            values["retry_after"] = _number(f"{where}.retry_after", data["retry_after"], 0.0)
        if kind == "server_error":
            values["status"] = _choice(f"{where}.status", data.get("status", 503), range(500, 600))
            values["body"] = _choice(f"{where}.body", data.get("body", "html"), ("html", "empty"))
        if kind == "audio_expired":
            values["status"] = _choice(f"{where}.status", data.get("status", 403), (403, 404))
        if "delay" in data:
            values["delay"] = _number(f"{where}.delay", data["delay"], 0.0)
        if "fraction" in data:
            values["fraction"] = _number(f"{where}.fraction", data["fraction"], 0.0, 1.0)
        if kind == "audio_truncated":
            values["mode"] = _choice(f"{where}.mode", data.get("mode", "hang_up"), _TRUNCATIONS)
        if kind == "reject":
            values["type"] = _choice(f"{where}.type", data.get("type", "forbidden"), _REJECT_TYPES)
        if kind == "task_failed":
            values["type"] = _choice(f"{where}.type", data.get("type", "failed"), _FAILURE_TYPES)
        if "error" in data:
            if not isinstance(data["error"], str):
                raise FaultProfileError(f"{where}.error: expected a string")
            values["error"] = data["error"]
        return cls(**values)

    def to_mapping(self) -> dict[str, Any]:
        """The rule as JSON-able data, in the profile format (for ``GET /_sandbox/config``)."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.rate is not None:
            out["rate"] = self.rate
        elif self.every is not None:
            out["every"] = self.every
        elif self.after is not None:
            out["after"] = self.after
        else:
            out["at"] = sorted(self.at)
        out["endpoints"] = sorted(self.endpoints)
        params = KINDS[self.kind].params
        for name in sorted(params):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


@dataclass(frozen=True)
class FaultProfile:
    """Every fault the sandbox injects, plus two deployment switches.

    ``batch_disabled`` (404 or 405) makes ``/sonic/batch`` answer like a
    deployment without it; ``audio_url_ttl`` (seconds) makes audio URLs
    expire, answering 403 once the sandbox clock passes their ``expires``.
    """

    faults: tuple[FaultRule, ...] = ()
    batch_disabled: int | None = None
    audio_url_ttl: float | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "profile") -> FaultProfile:
        """Parse the profile format from already-decoded TOML or JSON."""
        return cls().with_changes(data, source)

    @classmethod
    def from_toml(cls, path: Path) -> FaultProfile:
        """Read a profile file; errors name the file and the field."""
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise FaultProfileError(f"{path}: {exc}") from exc
        return cls.from_mapping(data, str(path))

    def with_changes(self, data: Mapping[str, Any], source: str = "profile") -> FaultProfile:
        """A copy with the keys present in ``data`` replaced (absent keys are kept)."""
        for key in data:
            if key not in ("faults", "batch_disabled", "audio_url_ttl"):
                raise FaultProfileError(f"{source}: {key}: unknown setting")
        changes: dict[str, Any] = {}
        if "faults" in data:
            rules = data["faults"]
            if not isinstance(rules, list):
                raise FaultProfileError(f"{source}: faults: expected a list of tables")
            changes["faults"] = tuple(
                FaultRule.from_mapping(rule, f"{source}: faults[{i}]")
                for i, rule in enumerate(rules)
            )
        if "batch_disabled" in data:
            value = data["batch_disabled"]
            if value is True:
                value = 404
            elif value is False:
                value = None
            changes["batch_disabled"] = _choice(
                f"{source}: batch_disabled", value, (None, 404, 405)
            )
        if "audio_url_ttl" in data:
            ttl = data["audio_url_ttl"]
            changes["audio_url_ttl"] = (
                None if ttl is None else _number(f"{source}: audio_url_ttl", ttl, 0.0)
            )
        return replace(self, **changes)

    def to_mapping(self) -> dict[str, Any]:
        """The profile as JSON-able data, in the format :meth:`from_mapping` reads."""
        return {
            "faults": [rule.to_mapping() for rule in self.faults],
            "batch_disabled": self.batch_disabled,
            "audio_url_ttl": self.audio_url_ttl,
        }


@dataclass
class FaultInjector:
    """Decides, event by event, which rules of a profile fire; counts what fired.

    Every rule that matches an event advances its ordinal (and draws from its
    RNG) whether or not another rule wins, so one rule's schedule does not
    depend on the others.
    """

    profile: FaultProfile
    seed: int
    fired: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        rules = self.profile.faults
        # String seeds are hashed with SHA-512 by random.seed: stable across runs and processes.
        self._rngs = [random.Random(f"{self.seed}:{i}:{rule.kind}") for i, rule in enumerate(rules)]
        self._ordinals = [0] * len(rules)

    def _firing(self, category: Category, endpoint: str) -> list[FaultRule]:
        firing = []
        for i, rule in enumerate(self.profile.faults):
            if rule.category is not category or endpoint not in rule.endpoints:
                continue
            self._ordinals[i] += 1
            if rule.fires(self._ordinals[i], self._rngs[i].random):
                firing.append(rule)
        return firing

    def _first(self, category: Category, endpoint: str) -> FaultRule | None:
        firing = self._firing(category, endpoint)
        if not firing:
            return None
        self.fired[firing[0].kind] += 1
        return firing[0]

    def _all(self, category: Category, endpoint: str) -> dict[str, FaultRule]:
        firing: dict[str, FaultRule] = {}
        for rule in self._firing(category, endpoint):
            if rule.kind not in firing:
                firing[rule.kind] = rule
                self.fired[rule.kind] += 1
        return firing

    def on_request(self, endpoint: str) -> FaultRule | None:
        """The request-level fault for one HTTP request (the first rule that fires)."""
        return self._first(Category.REQUEST, endpoint)

    def on_item(self, endpoint: str) -> FaultRule | None:
        """The rejection, if any, for one submitted item."""
        return self._first(Category.ITEM, endpoint)

    def on_task(self, endpoint: str) -> dict[str, FaultRule]:
        """Every task-level fault for one new task, by kind."""
        return self._all(Category.TASK, endpoint)

    def on_webhook(self) -> frozenset[str]:
        """The kinds of webhook fault for one delivery."""
        return frozenset(self._all(Category.WEBHOOK, "webhook"))
