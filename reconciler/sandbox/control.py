"""A small client for the sandbox's own endpoints (``/_sandbox/*``).

Used by the shared ``sandbox`` pytest fixture and by anything that drives a
sandbox it did not start in-process (e.g. one started with ``reconciler
sandbox`` in another process). It speaks plain HTTP, so it works the same
against an embedded :class:`~reconciler.sandbox.server.SandboxServer` and a
separate process.
"""

from __future__ import annotations

from typing import Any

import httpx

from reconciler.sandbox.faults import FaultProfileError

TIMEOUT_SECONDS = 10.0


class SandboxControl:
    """Counters, reset and runtime configuration of one running sandbox.

    ``base_url`` is the API base (``.../api/v1``) to give a MusicAPI client;
    ``url`` is the server root; ``key`` is the bearer key.
    """

    def __init__(self, base_url: str, key: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.url = self.base_url.removesuffix("/api/v1")
        self.key = key

    def __repr__(self) -> str:
        return f"SandboxControl(base_url={self.base_url!r})"

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        response = httpx.request(
            method,
            f"{self.url}{path}",
            json=body,
            headers={"Authorization": f"Bearer {self.key}"},
            timeout=TIMEOUT_SECONDS,
        )
        if response.status_code == 400:
            raise FaultProfileError(response.json()["error"])
        response.raise_for_status()
        return response.json()

    def stats(self) -> dict[str, Any]:
        """``GET /_sandbox/stats``: every counter, ``credits`` and ``faults_fired``."""
        result: dict[str, Any] = self._request("GET", "/_sandbox/stats")
        return result

    def reset(self) -> None:
        """``POST /_sandbox/reset``: no tasks, zero counters, starting balance and configuration."""
        self._request("POST", "/_sandbox/reset")

    def config(self) -> dict[str, Any]:
        """``GET /_sandbox/config``: the configuration in force."""
        result: dict[str, Any] = self._request("GET", "/_sandbox/config")
        return result

    def configure(self, **changes: Any) -> dict[str, Any]:
        """``POST /_sandbox/config``: change settings while running; returns the result.

        Keys: ``latency``, ``clip_stagger``, ``webhook_retries``, ``credits``
        (sets the current balance), ``shapes`` (a list of shape profile
        names, replacing the list), and the fault profile's ``faults`` (a
        list of rule dicts, replacing the rules), ``batch_disabled`` and
        ``audio_url_ttl``. Example::

            sandbox.configure(latency=0.5, faults=[{"kind": "rate_limited", "every": 2}])
            sandbox.configure(shapes=["batch-poll-202", "submit-bare"])
        """
        result: dict[str, Any] = self._request("POST", "/_sandbox/config", changes)
        return result
