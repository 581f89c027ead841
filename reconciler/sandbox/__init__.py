"""The MusicAPI emulator: the live service's protocol, served on loopback.

Stands in for the live service in tests, benchmarks, demos and ``--sandbox``:
real tasks with a configurable generation time, real MP3 files, credits,
signed webhooks, counters for tests and fault injection. Modules, in the
order a request meets them:

    cli.py         ``reconciler sandbox``: flags -> SandboxConfig -> SandboxServer
    server.py      SandboxServer: uvicorn on a socket of its own, sync or async
    app.py         Starlette routes behind a fault/auth layer
    state.py       tasks (lazy, computed from the clock), batches, credits, counters
    shapes.py      shape profiles: the other plausible answer shapes of the real service
    validation.py  the create-field rules
    faults.py      fault profile format and the seeded injector
    audio.py       deterministic MP3 synthesis and its cache
    webhooks.py    signed deliveries with retries, in the background
    control.py     SandboxControl: a small client for /_sandbox/* (the test fixture's handle)
"""

from reconciler.sandbox.config import SandboxConfig
from reconciler.sandbox.control import SandboxControl
from reconciler.sandbox.faults import FaultProfile, FaultProfileError, FaultRule
from reconciler.sandbox.server import SandboxServer
from reconciler.sandbox.shapes import SHAPES
from reconciler.sandbox.state import ManualClock, fingerprint

__all__ = [
    "SHAPES",
    "FaultProfile",
    "FaultProfileError",
    "FaultRule",
    "ManualClock",
    "SandboxConfig",
    "SandboxControl",
    "SandboxServer",
    "fingerprint",
]
