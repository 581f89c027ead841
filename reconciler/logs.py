"""structlog setup: a readable console on a terminal, JSON lines otherwise (journald).

Where it sits: configured once by the CLI before anything else runs. Event
names are stable and dotted (``batch.submitted``, ``track.ready``) with data in
keys; every pass ends with one ``pass.completed`` line. Logs go to stderr so
stdout stays for command output (``status --json``, the sandbox URL).
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from reconciler.hiding import without

# structlog imports rich only for its console renderer's pretty tracebacks,
# which ours never shows: ``format_exc_info`` renders each exception first.
with without("rich"):
    import structlog
from structlog.typing import EventDict, WrappedLogger

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _own_retry_event(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    """stamina's retry line in our words: its ``callable`` is ``<context block>``
    for the retry loops musicapi.py uses, which tells a reader nothing."""
    if event.get("event") != "stamina.retry_scheduled":
        return event
    return {
        "event": "api.retry_scheduled",
        "attempt": event.get("retry_num"),
        "wait": event.get("wait_for"),
        "error": event.get("caused_by"),
    }


def configure(
    level: str = "info", *, stream: TextIO | None = None, json: bool | None = None
) -> None:
    stream = stream or sys.stderr
    as_json = (not stream.isatty()) if json is None else json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            _own_retry_event,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # uvicorn and httpx log through the standard library; keep them quiet
    # unless debugging, they would drown the reconciler's own events.
    logging.basicConfig(level=logging.WARNING, stream=stream)
