"""The one composition root: state lock → ledger → settings in force → API → reconciler.

Where it sits: under the commands that write, ``sync`` (``running.run_sync``)
and ``run`` (``daemon.Daemon.run``); both get their reconciler from
:func:`open_app`, so the two agree on what a pass is wired to. The API is the
MusicAPI service, or with ``--sandbox`` the emulator served in this process on
loopback (then the settings in force carry its URL and key). One clock stamps
the ledger and drives the reconciler, so a test can inject it in one place.

A ledger given with ``--ledger`` may be shared by replicas (``ledger.lease``):
``sync`` and ``apply`` then hold its lease for as long as they run, or refuse
to start while a replica leads, so two processes never spend at once. The
daemon takes the lease itself, as one of the replicas (``daemon``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog

from reconciler.config import Settings
from reconciler.errors import LedgerError, LockedError
from reconciler.layout import require_layout
from reconciler.ledger import Ledger
from reconciler.ledger.lease import Identity, Lease, read_leadership
from reconciler.musicapi import MusicAPI
from reconciler.ownership import check_ledger_owner, claim_output_folder
from reconciler.reconciling import Reconciler
from reconciler.statelock import StateLock


@asynccontextmanager
async def api_settings(settings: Settings) -> AsyncIterator[Settings]:
    """With ``--sandbox``, serve the emulator in this process and point at it."""
    if not settings.sandbox:
        settings.require_key()
        yield settings
        return
    from reconciler.sandbox.server import SandboxConfig, SandboxServer

    async with SandboxServer(SandboxConfig(port=0)) as server:
        structlog.get_logger("reconciler").info("sandbox.started", url=server.base_url)
        yield settings.with_api(server.base_url, server.key)


@asynccontextmanager
async def api_client(
    settings: Settings,
    *,
    max_attempts: int = 3,
    on_request: Callable[[str, str, float], None] | None = None,
) -> AsyncIterator[tuple[Settings, MusicAPI]]:
    """The settings in force and the API client they point at (the in-process
    sandbox with ``--sandbox``): the one place a command's client is built.
    ``on_request`` is the daemon's metrics hook (``MusicAPI``)."""
    async with (
        api_settings(settings) as s,
        MusicAPI(
            s.api_url,
            s.require_key(),
            timeout=s.request_timeout,
            max_requests_per_second=s.max_requests_per_second,
            max_attempts=max_attempts,
            on_request=on_request,
        ) as api,
    ):
        yield s, api


@dataclass(frozen=True)
class App:
    """What a writing command works with, open for as long as it runs."""

    #: The settings in force: with ``--sandbox``, pointing at the emulator.
    settings: Settings
    ledger: Ledger
    api: MusicAPI
    reconciler: Reconciler


@asynccontextmanager
async def open_app(
    settings: Settings,
    *,
    clock: Callable[[], float] = time.time,
    on_request: Callable[[str, str, float], None] | None = None,
    lead: bool = True,
) -> AsyncIterator[App]:
    """Check the folders, take the state lock, open the ledger (and, when it may
    be shared and ``lead``, its lease) and the API, build the reconciler; close
    them in reverse order however the caller ends."""
    require_layout(settings.specs_dir, settings.out_dir, settings.state_dir)
    lock = StateLock(settings.state_dir)
    lock.acquire()
    try:
        ledger = Ledger.open(settings.ledger_target, clock=clock)
        try:
            # Before anything may be spent: one ledger per output folder, and a
            # state folder's own ledger never shared with replicas.
            check_ledger_owner(
                ledger, settings.ledger_target, settings.state_dir, settings.ledger is not None
            )
            claim_output_folder(settings.out_dir, ledger, settings.ledger_target)
            async with (
                held_lease(settings, ledger, lead),
                api_client(settings, on_request=on_request) as (s, api),
            ):
                yield App(s, ledger, api, Reconciler(s, ledger, api, clock=clock))
        finally:
            ledger.close()
    finally:
        lock.release()


@asynccontextmanager
async def held_lease(settings: Settings, ledger: Ledger, lead: bool) -> AsyncIterator[None]:
    """Hold the shared ledger's lease while a command runs: fence its writes,
    renew it every ``lease / 3``, hand it back at the end. Raises
    ``LockedError`` while another process leads."""
    if settings.ledger is None or not lead:
        yield
        return
    lease = Lease(ledger, Identity.of_this_process(), settings.lease)
    if not lease.acquire():
        leader, _ = read_leadership(ledger)
        who = "another process" if leader is None else f"{leader.host} pid {leader.pid}"
        raise LockedError(
            f"{who} leads the replicas sharing this ledger (its lease is held); "
            "it converges the specs: stop it first to run this command"
        )

    async def renew() -> None:
        while True:
            await asyncio.sleep(settings.lease / 3)
            # A renewal refused leaves the fence to refuse the next write.
            with contextlib.suppress(LedgerError):
                lease.acquire()

    ledger.fence = lease.fence
    renewing = asyncio.create_task(renew())
    try:
        yield
    finally:
        renewing.cancel()
        ledger.fence = None
        with contextlib.suppress(LedgerError):
            lease.release()
