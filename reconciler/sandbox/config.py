"""The sandbox's settings: one frozen object, built by ``cli.py`` or by an embedding program.

``server.py`` binds with ``host``/``port``; ``state.py`` keeps the rest as its
starting point and returns to it on ``POST /_sandbox/reset``. ``latency``,
``clip_stagger``, ``webhook_retries``, ``faults`` and ``shapes`` can be
changed while running through ``POST /_sandbox/config`` (see
:func:`apply_changes`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from reconciler.sandbox.faults import FaultProfile, FaultProfileError
from reconciler.sandbox.shapes import parse_shapes

RUNTIME_KEYS = frozenset({"latency", "clip_stagger", "webhook_retries", "credits", "shapes"})
PROFILE_KEYS = frozenset({"faults", "batch_disabled", "audio_url_ttl"})


@dataclass(frozen=True)
class SandboxConfig:
    """How the sandbox serves: address, key, balance, timing, faults, shapes and seed.

    ``latency`` is the generation time in seconds from submit to the first
    clip; ``clip_stagger`` is how much later the second clip finishes.
    ``webhook_retries`` is how many times a failed webhook delivery is retried.
    ``shapes`` names the shape profiles in force (see
    :data:`~reconciler.sandbox.shapes.SHAPES`); an unknown name raises
    :class:`FaultProfileError`. ``seed`` None draws fresh ids on every start;
    a number makes ids repeat from one start to the next.
    """

    host: str = "127.0.0.1"
    port: int = 0
    latency: float = 3.0
    clip_stagger: float = 0.0
    key: str = "sandbox-key"
    credits: int = 100_000
    faults: FaultProfile = field(default_factory=FaultProfile)
    seed: int | None = None
    webhook_retries: int = 3
    shapes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Checked here so that a typo fails where the config is built, not at the first request.
        object.__setattr__(self, "shapes", parse_shapes(self.shapes))

    def __repr__(self) -> str:
        # The key is a stand-in for a real secret: keep it out of logs by habit.
        return (
            f"SandboxConfig(host={self.host!r}, port={self.port}, latency={self.latency}, "
            f"clip_stagger={self.clip_stagger}, credits={self.credits}, seed={self.seed}, "
            f"faults={len(self.faults.faults)} rule(s), shapes={list(self.shapes)})"
        )


def apply_changes(
    config: SandboxConfig, changes: Mapping[str, Any]
) -> tuple[SandboxConfig, int | None]:
    """Apply a ``POST /_sandbox/config`` body; returns the new config and a new balance, if given.

    Raises :class:`FaultProfileError` naming the offending key.
    """
    unknown = set(changes) - RUNTIME_KEYS - PROFILE_KEYS
    if unknown:
        raise FaultProfileError(f"{sorted(unknown)[0]}: unknown setting")
    updates: dict[str, Any] = {}
    for key in ("latency", "clip_stagger"):
        if key in changes:
            value = changes[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise FaultProfileError(f"{key}: expected a number of seconds >= 0")
            updates[key] = float(value)
    credits: int | None = None
    for key in ("webhook_retries", "credits"):
        if key in changes:
            value = changes[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise FaultProfileError(f"{key}: expected an integer >= 0")
            if key == "credits":
                credits = value
            else:
                updates[key] = value
    if "shapes" in changes:
        updates["shapes"] = parse_shapes(changes["shapes"])
    profile_changes = {key: changes[key] for key in PROFILE_KEYS if key in changes}
    if profile_changes:
        updates["faults"] = config.faults.with_changes(profile_changes, "config")
    return replace(config, **updates), credits
