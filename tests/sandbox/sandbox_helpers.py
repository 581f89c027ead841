"""Helpers shared by the sandbox tests (imported as ``sandbox_helpers``; not fixtures)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

import httpx

from reconciler.sandbox import ManualClock, SandboxControl, SandboxServer


def description(
    prompt: str = "lofi study beats, warm vinyl crackle", **extra: Any
) -> dict[str, Any]:
    """A valid description-mode create body; keyword arguments add or override fields."""
    return {"custom_mode": False, "mv": "sonic-v5", "gpt_description_prompt": prompt, **extra}


@dataclass
class Stepped:
    """A sandbox whose clock moves only when the test says so."""

    server: SandboxServer
    clock: ManualClock
    control: SandboxControl
    api: httpx.Client


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class WebhookReceiver:
    """A plain HTTP server that records webhook POSTs.

    ``fail_next`` answers that many deliveries with 500; while ``gate`` is
    cleared, handlers block (to show the sandbox does not wait for them).
    """

    url: str = ""
    received: list[Received] = field(default_factory=list)
    fail_next: int = 0
    gate: threading.Event = field(default_factory=threading.Event)
    waiting: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
