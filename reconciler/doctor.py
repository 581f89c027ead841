"""``reconciler doctor``: a preflight that spends nothing, and ``--live``, one paid generation.

Where it sits: beside the flow, before anyone trusts it with a budget. The
preflight asks what the pass would meet: the specs (``specs.scan_specs``),
the folder layout (``layout.check_layout``), the key and balance
(``GET /get-credits``), the plan's cost (``running.make_plan``, the same dry
run as ``reconciler plan``) against the balance and the ceilings, whether the
batch endpoint exists (an empty batch, which the protocol refuses with 400,
so nothing can be created), the webhook receiver behind ``public_url``, and
the clock against the service's ``Date`` header. ``--live`` then submits one
item, follows it to the end, downloads and decodes its audio, and keeps every
raw answer (secrets removed) under ``<state>/doctor/<UTC time>/`` with how the
client read each one: the real service's shapes are only partly public.

Each check is a small function returning a :class:`Check`; :func:`run_doctor`
runs them in order and hands each result to ``emit`` as it is known (a live
check takes minutes). Rendering (:func:`render_line`, :func:`report_json`)
is separate; ``cli.py`` prints.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reconciler.app import api_client
from reconciler.audio import probe_audio
from reconciler.config import KEY_HELP, Secret, Settings, WebhookSettings
from reconciler.errors import (
    AmbiguousSubmitError,
    APIError,
    AuthError,
    BatchUnsupportedError,
    ConfigError,
    NotFoundError,
    OutputError,
    RateLimitedError,
    ReconcilerError,
    TemporaryAPIError,
)
from reconciler.layout import check_layout
from reconciler.ledger import Ledger
from reconciler.musicapi import (
    Accepted,
    BatchProbe,
    Credits,
    MusicAPI,
    Reading,
    Rejected,
    TaskStatus,
)
from reconciler.planning import CREDITS_PER_TASK, utc_day_start
from reconciler.running import make_plan
from reconciler.specs import scan_specs
from reconciler.webhooks import WebhookReceiver, WebhookServer
from reconciler.words import plural

Outcome = Literal["ok", "warn", "FAIL"]

#: Webhook signatures carry timestamps; a clock further off than this is trouble.
CLOCK_TOLERANCE = 60.0
#: The live check's one generation.
LIVE_COST = CREDITS_PER_TASK
LIVE_PROMPT = "calm solo piano, slow and simple, instrumental"
#: How long ``--live`` follows its generation unless ``--timeout`` says otherwise.
LIVE_TIMEOUT = 600.0
#: After the generation ends, how long to wait for a first callback that has not come.
WEBHOOK_GRACE = 30.0
#: The unsigned POST that shows whether ``public_url`` reaches our receiver.
PROBE_TIMEOUT = 10.0
SCHEMA = 1


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, what was found, what to do."""

    name: str
    outcome: Outcome
    found: str
    todo: str = ""

    @property
    def failed(self) -> bool:
        return self.outcome == "FAIL"


# ---------------------------------------------------------------------------
# The preflight: each check alone


def check_specs(settings: Settings) -> Check:
    """The specs folder exists and every file in it parses."""
    where = settings.specs_dir
    scan = scan_specs(where, models=settings.models, limits=settings.field_limits)
    if scan.root_state == "missing":
        return Check(
            "specs",
            "FAIL",
            f"the specs folder {where} does not exist",
            "create it, or point --specs (or `specs` in the config) at your spec files",
        )
    if scan.root_state == "unreadable":
        return Check(
            "specs",
            "FAIL",
            f"the specs folder {where} cannot be read completely",
            "give this user read access to it and its subfolders",
        )
    tracks = sum(len(spec.tracks) for spec in scan.files.values())
    files = f"{plural(tracks, 'track')} in {plural(len(scan.files), 'file')}"
    if scan.errors:
        first = next(iter(scan.errors.values()))
        return Check(
            "specs",
            "FAIL",
            f"{plural(len(scan.errors), 'invalid file')} ({files} valid); first: "
            f"{str(first).splitlines()[0]}",
            "`reconciler validate` lists every problem",
        )
    if not tracks:
        return Check(
            "specs",
            "warn",
            f"the specs folder {where} holds no track",
            "add spec files (README: Spec files); until then nothing is generated",
        )
    return Check("specs", "ok", f"{files} in {where}, all valid")


def check_folders(settings: Settings) -> list[Check]:
    """Output and state folders writable and apart from the specs folder: the one layout rule."""
    problems = check_layout(settings.specs_dir, settings.out_dir, settings.state_dir)
    if not problems:
        return [
            Check(
                "folders",
                "ok",
                f"output {settings.out_dir} and state {settings.state_dir} are writable "
                f"and apart from the specs folder",
            )
        ]
    # Each sentence of the layout rule already says what to do.
    return [Check("folders", "FAIL", problem) for problem in problems]


async def check_key(api: MusicAPI | None, api_url: str) -> tuple[Check, Credits | None]:
    """The key is accepted (``GET /get-credits``); the balance comes with it."""
    if api is None:
        return Check("key", "FAIL", KEY_HELP), None
    try:
        credits = await api.get_credits()
    except AuthError as exc:
        return Check(
            "key",
            "FAIL",
            f"{api_url} refused the key (HTTP {exc.status}: {exc.message})",
            "set MUSICAPI_KEY (or api_key_file) to the key from your MusicAPI account, "
            "exactly as shown there",
        ), None
    except APIError as exc:
        return Check(
            "key",
            "FAIL",
            f"cannot ask {api_url} for the balance: {exc.message}",
            "check api_url (--api-url, MUSICAPI_BASE_URL) and the network",
        ), None
    return Check("key", "ok", f"accepted by {api_url}"), credits


def check_balance(credits: Credits | None, cost: int | None) -> Check:
    """The balance against what ``reconciler plan`` would submit now."""
    if credits is None:
        return Check("balance", "warn", "not checked: it needs an accepted key")
    balance = f"{credits.total} credits"
    if cost is None:
        return Check("balance", "warn", f"{balance}; the plan's cost is unknown (see specs)")
    if cost == 0:
        return Check("balance", "ok", f"{balance}; the plan submits nothing now")
    if credits.total < LIVE_COST:
        return Check(
            "balance",
            "FAIL",
            f"{balance}, less than one generation ({LIVE_COST}); the plan costs {cost}",
            "top up the account",
        )
    if credits.total < cost:
        return Check(
            "balance",
            "warn",
            f"{balance}, the plan costs {cost}: submissions pause when the balance runs out",
            "top up the account to converge in one go",
        )
    return Check("balance", "ok", f"{balance} cover the plan's {cost}")


def check_budget(
    cost: int | None, daily_budget: int | None, max_credits: int | None, spent_today: int = 0
) -> Check:
    """The plan's cost against ``daily_budget`` (what is left of it today) and
    ``--max-credits``: a warning when it is above either."""
    if daily_budget is None and max_credits is None:
        return Check(
            "budget",
            "ok",
            "no daily_budget or --max-credits: submissions stop only at the balance",
        )
    ceilings = []
    if daily_budget is not None:
        ceilings.append(f"daily_budget {daily_budget} ({spent_today} spent today)")
    if max_credits is not None:
        ceilings.append(f"--max-credits {max_credits}")
    if cost is None:
        return Check("budget", "warn", f"{' and '.join(ceilings)}; the plan's cost is unknown")
    over = []
    if daily_budget is not None:
        left = max(0, daily_budget - spent_today)
        if cost > daily_budget:
            days = math.ceil(cost / daily_budget) if daily_budget else None
            spread = f"spread over {days} UTC days" if days else "never submitted"
            over.append(f"more than daily_budget {daily_budget} ({spread})")
        elif cost > left:
            over.append(
                f"more than the {left} left of daily_budget {daily_budget} today "
                "(the rest goes out after 00:00 UTC)"
            )
    if max_credits is not None and cost > max_credits:
        over.append(f"more than --max-credits {max_credits} (this run stops there)")
    if over:
        return Check(
            "budget",
            "warn",
            f"the plan costs {cost} credits, {'; '.join(over)}",
            "raise the ceiling if you mean to spend it now",
        )
    return Check("budget", "ok", f"the plan's {cost} credits fit {' and '.join(ceilings)}")


def _spent_today(settings: Settings, now: float) -> int:
    """Credits the ledger counts against today's budget (as ``status`` does)."""
    ledger = Ledger.open_existing(settings.ledger_target)
    if ledger is None:
        return 0
    try:
        return CREDITS_PER_TASK * ledger.spent_since(utc_day_start(now))
    finally:
        ledger.close()


def check_batch(probe: BatchProbe | APIError | None) -> Check:
    """The batch endpoint is there, as shown by an empty batch (which creates nothing)."""
    if probe is None:
        return Check("batch", "warn", "not checked: it needs an accepted key")
    if isinstance(probe, APIError):
        return Check(
            "batch",
            "FAIL",
            f"POST /sonic/batch got no answer: {probe.message}",
            "check api_url and the network",
        )
    if probe.status == 400:
        return Check(
            "batch",
            "ok",
            "POST /sonic/batch is there (an empty batch is refused with 400; nothing created)",
        )
    if probe.status in (404, 405):
        return Check(
            "batch",
            "warn",
            f"POST /sonic/batch is absent here (HTTP {probe.status}): the daemon sends one "
            "/sonic/create per generation and polls each task",
            "nothing to do; batches only save calls",
        )
    return Check(
        "batch",
        "warn",
        f"POST /sonic/batch answered an empty batch with HTTP {probe.status} "
        f"({probe.message}), not the 400 the protocol gives",
        "`reconciler doctor --live` shows how it answers a real batch",
    )


def check_clock(server_time: float | None, local_time: float) -> Check:
    """The local clock within :data:`CLOCK_TOLERANCE` of the API's ``Date`` header."""
    if server_time is None:
        return Check("clock", "warn", "not checked: the API's answer had no readable Date header")
    skew = local_time - server_time
    if abs(skew) > CLOCK_TOLERANCE:
        return Check(
            "clock",
            "FAIL",
            f"the local clock is {skew:+.0f} s off the API's (its Date header)",
            "turn on time sync (systemd-timesyncd, chrony): webhook signatures carry "
            "timestamps and stale ones are refused",
        )
    return Check("clock", "ok", f"within {abs(skew):.0f} s of the API's (its Date header)")


def _unsigned_post(url: str) -> tuple[int, bytes]:
    """POST ``{}`` with no signature; the status and body of whatever answered.

    The standard library, not httpx: this request goes to our own receiver,
    never to the API, and musicapi.py stays the one home of the API client.
    """
    request = urllib.request.Request(  # noqa: S310 (the scheme is checked by the caller)
        url,
        data=b"{}",
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "reconciler-doctor"},
    )
    try:
        with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT) as answer:  # noqa: S310
            return int(answer.status), bytes(answer.read(4096))
    except urllib.error.HTTPError as answer:
        with answer:
            return int(answer.code), bytes(answer.read(4096))


async def _listening(host: str, port: int) -> bool:
    """Something accepts connections on ``host:port`` (the daemon's receiver, usually)."""
    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(target, port), 2.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with suppress(OSError):
        await writer.wait_closed()
    return True


@asynccontextmanager
async def _receiver(
    hook: WebhookSettings,
    *,
    on_hint: Callable[[], None] = lambda: None,
    record: Callable[[dict[str, str], bytes, int], None] | None = None,
) -> AsyncIterator[bool]:
    """Serve a receiver on ``webhook.listen`` unless one already does; yields whether ours runs."""
    if await _listening(hook.host, hook.port):
        yield False
        return
    receiver = WebhookReceiver(hook, on_hint=on_hint)
    if record is not None:
        receiver.app.add_middleware(_Recorder, record=record, limit=hook.max_body)
    server = WebhookServer(receiver, hook.host, hook.port)
    await server.start()
    try:
        yield True
    finally:
        await server.stop()


async def check_webhook(hook: WebhookSettings | None) -> Check:
    """``public_url`` reaches a reconciler receiver: an unsigned POST gets its 401."""
    if hook is None:
        return Check(
            "webhook",
            "warn",
            "no [webhook] configured: a submit whose answer is lost is held for "
            "ambiguous_grace and may then be paid for twice (possible double spend)",
            "configure [webhook] (listen, public_url, secret_file) so callbacks claim such "
            "items and keep possible double spend at 0 (docs/systemd.md: Webhooks)",
        )
    url = f"{hook.public_url}/hook"
    where = f"webhook.listen {hook.host}:{hook.port}"
    if not url.startswith(("http://", "https://")):
        return Check("webhook", "FAIL", f"public_url {hook.public_url!r} is not an http(s) URL", "")
    try:
        async with _receiver(hook) as ours:
            status, body = await asyncio.to_thread(_unsigned_post, url)
    except ConfigError as exc:
        return Check("webhook", "FAIL", str(exc), f"choose a free address for {where}")
    except (OSError, urllib.error.URLError) as exc:
        reason = getattr(exc, "reason", exc)
        return Check(
            "webhook",
            "FAIL",
            f"{url} cannot be reached: {reason}",
            f"make public_url (through your proxy) reach {where}",
        )
    whose = "doctor's own receiver" if ours else "the receiver already running there"
    if status == 401 and _is_our_refusal(body):
        return Check(
            "webhook", "ok", f"{url} reaches {whose} (an unsigned POST was refused with 401)"
        )
    return Check(
        "webhook",
        "FAIL",
        f"{url} answered HTTP {status}, not a reconciler receiver's 401",
        f"make public_url (through your proxy) reach {where}, path /hook included",
    )


def _is_our_refusal(body: bytes) -> bool:
    """The body our receiver gives an unsigned request (webhooks.py: ``missing_headers``)."""
    try:
        data = json.loads(body)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("error") == "missing_headers"


# ---------------------------------------------------------------------------
# The live check: its raw answers


class _Recorder:
    """ASGI middleware around the receiver: keeps each callback's raw body and the answer.

    The body is read here (at most ``limit`` + 1 bytes, so the receiver still
    sees an oversized one as such) and replayed to the receiver unchanged.
    """

    def __init__(
        self, app: ASGIApp, record: Callable[[dict[str, str], bytes, int], None], limit: int
    ) -> None:
        self.app = app
        self.record = record
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = bytearray()
        while len(body) <= self.limit:
            message = await receive()
            if message["type"] != "http.request":
                return  # the caller went away
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        replayed = False
        status = 0

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        await self.app(scope, replay, watch)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        self.record(headers, bytes(body), status)


@dataclass(frozen=True)
class Stored:
    """One raw answer or callback kept on disk, and how it was read."""

    file: str
    endpoint: str
    status: int
    shape: str


#: The shape a reader expects first: "documented" for the API's answers (as
#: :class:`Reading` says), "expected" for callbacks, whose documented body is
#: the one *without* a task id; the receiver reads both.
EXPECTED = ("documented", "expected")


def _webhook_shape(headers: dict[str, str], body: bytes) -> str:
    """How a callback differs from what the receiver reads first: a top-level
    ``task_id``, signed with a timestamp."""
    odd = []
    if "x-webhook-signature" not in headers:
        odd.append("older X-Signature scheme" if "x-signature" in headers else "unsigned")
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        odd.append("not a JSON object")
    elif "task_id" not in data:
        odd.append("no task_id (matched by clip id)")
    return ", ".join(odd) or "expected"


class RawStore:
    """``<state>/doctor/<UTC time>/``: every raw answer, numbered in arrival order.

    Files are ``NNN-<endpoint>-<status>.json`` (``.txt`` when not JSON), plus
    ``NNN-<endpoint>-request.json`` for what was sent and ``index.json`` at the
    end. ``secrets`` (the key, the webhook secret) are replaced by ``***``.
    """

    def __init__(self, folder: Path, secrets: Sequence[str]) -> None:
        self.folder = folder
        self.secrets = [s for s in secrets if s]
        self.stored: list[Stored] = []
        self.webhook_arrived = asyncio.Event()
        self._n = 0

    @classmethod
    def create(cls, state_dir: Path, secrets: Sequence[str], now: datetime) -> RawStore:
        """A new folder named for ``now`` (a suffix when two runs share a second)."""
        base = state_dir / "doctor" / now.strftime("%Y%m%dT%H%M%SZ")
        for n in range(100):
            folder = base if n == 0 else base.with_name(f"{base.name}-{n}")
            try:
                folder.mkdir(parents=True)
            except FileExistsError:
                continue
            except OSError as exc:
                raise OutputError(f"cannot create {folder}: {exc.strerror or exc}") from exc
            return cls(folder, secrets)
        raise OutputError(f"cannot create a new folder next to {base}")

    def _redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def _write(self, label: str, text: str) -> str:
        self._n += 1
        try:
            json.loads(text)
            suffix = "json"
        except ValueError:
            suffix = "txt"
        name = f"{self._n:03d}-{label}.{suffix}"
        (self.folder / name).write_text(self._redact(text), encoding="utf-8")
        return name

    def request(self, endpoint: str, payload: dict[str, Any]) -> None:
        self._write(f"{endpoint}-request", json.dumps(payload, indent=2))

    def reading(self, reading: Reading) -> None:
        """The client's observer: called for every answer it reads."""
        name = self._write(f"{reading.endpoint}-{reading.status}", reading.body)
        self.stored.append(Stored(name, reading.endpoint, reading.status, reading.shape))

    def webhook(self, headers: dict[str, str], body: bytes, status: int) -> None:
        """The receiver's recorder: called for every callback, with our answer's status."""
        text = body.decode("utf-8", errors="replace")
        name = self._write(f"webhook-{status}", text)
        self.stored.append(Stored(name, "webhook", status, _webhook_shape(headers, body)))
        self.webhook_arrived.set()

    def close(self, summary: dict[str, Any]) -> None:
        index = {
            **summary,
            "answers": [
                {"file": s.file, "endpoint": s.endpoint, "status": s.status, "shape": s.shape}
                for s in self.stored
            ],
        }
        (self.folder / "index.json").write_text(
            self._redact(json.dumps(index, indent=2)), encoding="utf-8"
        )


# ---------------------------------------------------------------------------
# The live check: following one generation


@dataclass
class Followed:
    """What following the one generation came to."""

    batch_id: str | None = None
    task_id: str | None = None
    status: TaskStatus | None = None
    submit: Check | None = None
    end: Check | None = None
    notes: list[str] = field(default_factory=list)


def live_item(settings: Settings) -> dict[str, Any]:
    """The one request: a short instrumental description on the newest configured model."""
    return {
        "custom_mode": False,
        "mv": settings.models[-1],
        "gpt_description_prompt": LIVE_PROMPT,
        "make_instrumental": True,
    }


async def _submit(
    api: MusicAPI, item: dict[str, Any], hooks: dict[str, str], store: RawStore, out: Followed
) -> None:
    """Send the one item; sets ``out.submit`` (a FAIL ends the check) and the ids."""
    store.request("batch_submit", {"items": [item], **hooks})
    not_in_ledger = f"its {LIVE_COST} credits are not in the ledger (status does not count them)"
    try:
        answer = await api.submit_batch([item], **hooks)
    except BatchUnsupportedError:
        out.notes.append("no batch endpoint: sent one /sonic/create")
        store.request("create", {**item, **hooks})
        try:
            out.task_id = await api.create({**item, **hooks})
        except APIError as exc:
            out.submit = _submit_failure(exc)
            return
    except APIError as exc:
        out.submit = _submit_failure(exc)
        return
    else:
        out.batch_id = answer.batch_id
        result = answer.results[0]
        if isinstance(result, Rejected):
            out.submit = Check(
                "live submit",
                "FAIL",
                f"the item was refused ({result.type}: {result.error}); nothing was charged",
                "check the model list (`models` in the config) against your account",
            )
            return
        if isinstance(result, Accepted):
            out.task_id = result.task_id
        elif len(answer.orphans) == 1:
            # One item, one task id the answer could not place: it can only be ours.
            out.task_id = answer.orphans[0]
    if out.task_id is None and out.batch_id is None:
        out.submit = Check(
            "live submit",
            "FAIL",
            f"the answer names neither a task nor a batch; a task ({LIVE_COST} credits) may exist",
            "send the stored answer to the maintainers; check your MusicAPI account's tasks",
        )
        return
    named = f"task {out.task_id}" if out.task_id else "a task the answer does not name"
    batch = f"batch {out.batch_id}: " if out.batch_id else ""
    out.submit = Check("live submit", "ok", f"{batch}{named}; {not_in_ledger}")


def _submit_failure(exc: APIError) -> Check:
    if isinstance(exc, AmbiguousSubmitError):
        return Check(
            "live submit",
            "FAIL",
            f"the answer was lost ({exc.message}); a task ({LIVE_COST} credits) may exist "
            "that nothing follows",
            "look at your MusicAPI account's tasks before running --live again",
        )
    # Anything but an ambiguous submit means the service created nothing.
    return Check(
        "live submit",
        "FAIL",
        f"not accepted ({exc.message}); nothing was charged",
        "fix what the message says, then run --live again",
    )


async def _status_once(api: MusicAPI, out: Followed) -> TaskStatus:
    """Where the task stands: the batch poll, and the task poll for what it cannot tell."""
    if out.batch_id is not None:
        known = {0: out.task_id} if out.task_id else {}
        try:
            poll = await api.poll_batch(out.batch_id, known)
        except NotFoundError:
            out.notes.append("the batch poll did not know the batch: followed by task polls")
            out.batch_id = None
        except RateLimitedError:
            raise  # the task endpoint is under the same limit
        except TemporaryAPIError:
            # An answer the client could not read (the observer kept it) or a
            # fault: the task endpoint may still tell.
            if out.task_id is None:
                raise
        else:
            if out.task_id is None:
                named = {s.task_id for s in poll.statuses}
                if len(named) == 1:
                    out.task_id = named.pop()
            found = next((s for s in poll.statuses if s.task_id == out.task_id), None)
            settled = found is not None and (
                found.status != "succeeded" or any(c.done for c in found.clips)
            )
            if found is not None and settled and out.task_id not in poll.unread:
                return found
    if out.task_id is None:
        raise TemporaryAPIError("the batch poll names no task yet")
    return await api.poll_task(out.task_id)


async def _follow(
    api: MusicAPI,
    out: Followed,
    *,
    interval: float,
    follow_for: float,
    wake: asyncio.Event,
    clock: Callable[[], float],
) -> None:
    """Poll until the task ends or ``follow_for`` seconds pass; sets ``out.status``, ``.end``."""
    start = clock()
    deadline = start + follow_for
    last_error: str | None = None
    while True:
        wait = interval
        try:
            status = await _status_once(api, out)
        except TemporaryAPIError as exc:
            last_error = exc.message
            if exc.retry_after is not None:
                wait = max(wait, exc.retry_after)
        except APIError as exc:
            out.end = Check(
                "live generation",
                "FAIL",
                f"cannot follow task {out.task_id}: {exc.message}",
                "fix what the message says; the task is paid and runs on regardless",
            )
            return
        else:
            out.status = status
            if status.status == "failed":
                out.end = Check(
                    "live generation",
                    "FAIL",
                    f"task {out.task_id} failed upstream ({status.failure_type}: {status.error}); "
                    "the service refunds failed tasks",
                    "run --live again later",
                )
                return
            if status.status == "succeeded" and any(c.done for c in status.clips):
                done = sum(c.done for c in status.clips)
                out.end = Check(
                    "live generation",
                    "ok",
                    f"task {out.task_id} succeeded after {clock() - start:.0f} s with "
                    f"{plural(done, 'clip')}",
                )
                return
        remaining = deadline - clock()
        if remaining <= 0:
            still = f"; last error: {last_error}" if last_error else ""
            out.end = Check(
                "live generation",
                "FAIL",
                f"task {out.task_id} not finished after {follow_for:.0f} s{still}",
                "raise --timeout, or look at the task in your MusicAPI account",
            )
            return
        wake.clear()
        with suppress(TimeoutError):
            # A verified callback says something happened: poll now.
            await asyncio.wait_for(wake.wait(), min(wait, remaining))


async def _check_audio(api: MusicAPI, status: TaskStatus, folder: Path) -> Check:
    """Download the first finished clip once and check it decodes."""
    clip = next(c for c in status.clips if c.done)
    assert clip.audio_url is not None  # done means it has one
    dest = folder / "audio.mp3"
    try:
        size = await api.download(clip.audio_url, dest)
        seconds = await asyncio.to_thread(probe_audio, dest)
    except (APIError, OutputError) as exc:
        return Check(
            "live audio",
            "FAIL",
            f"clip {clip.clip_id}: {exc}",
            "send the stored answers to the maintainers",
        )
    return Check(
        "live audio",
        "ok",
        f"clip {clip.clip_id}: {size:,} bytes, decodes as {seconds:.1f} s of MPEG audio ({dest})",
    )


def _shapes(stored: Sequence[Stored], unit: str) -> tuple[str, bool]:
    """``shape (n answers); ...`` and whether any differs from the expected one."""
    shapes = Counter(s.shape for s in stored)
    parts = [f"{shape} ({plural(n, unit)})" for shape, n in shapes.items()]
    return "; ".join(parts), any(shape not in EXPECTED for shape in shapes)


def shape_checks(stored: Sequence[Stored]) -> list[Check]:
    """Per endpoint, which shapes were met and whether the client read them."""
    by_endpoint: dict[str, list[Stored]] = {}
    for s in stored:
        by_endpoint.setdefault(s.endpoint, []).append(s)
    checks = []
    for endpoint, answers in by_endpoint.items():
        found, odd = _shapes(answers, "answer")
        if any(s.shape.startswith("unreadable") for s in answers):
            outcome: Outcome = "FAIL"
            todo = "send the stored bodies to the maintainers: the daemon holds such items unknown"
        elif odd:
            outcome = "warn"
            todo = "read anyway; the stored bodies show the service's own shape"
        else:
            outcome, todo = "ok", ""
        checks.append(Check(f"live {endpoint}", outcome, found, todo))
    return checks


def _webhook_check(stored: Sequence[Stored], ours: bool) -> Check:
    if not ours:
        return Check(
            "live webhook",
            "warn",
            "a receiver already listens on webhook.listen (the daemon?): callbacks went "
            "to it and are not stored here",
            "stop the daemon during `doctor --live` to see the callbacks",
        )
    hooks = [s for s in stored if s.endpoint == "webhook"]
    if not hooks:
        return Check(
            "live webhook",
            "warn",
            f"no callback arrived within {WEBHOOK_GRACE:.0f} s of the end",
            "check that public_url reaches webhook.listen from the internet",
        )
    refused = [s for s in hooks if s.status != 200]
    if refused:
        return Check(
            "live webhook",
            "FAIL",
            f"{plural(len(refused), 'callback')} of {len(hooks)} refused by the receiver "
            f"(HTTP {refused[0].status})",
            "check the webhook secret; the stored bodies and the log's webhook.rejected say why",
        )
    found, odd = _shapes(hooks, "callback")
    if odd:
        return Check(
            "live webhook",
            "warn",
            f"all verified: {found}",
            "read anyway; the stored bodies show the service's own shape",
        )
    return Check("live webhook", "ok", f"all verified: {found}")


async def live_check(
    settings: Settings,
    key: Secret,
    *,
    follow_for: float,
    emit: Callable[[Check], None],
    clock: Callable[[], float] = time.monotonic,
) -> tuple[list[Check], Path | None]:
    """Spend one generation: submit, follow, download, and keep every raw answer."""
    checks: list[Check] = []

    def add(check: Check) -> None:
        checks.append(check)
        emit(check)

    hook = settings.webhook
    secrets = [key.get_secret_value(), hook.secret.get_secret_value() if hook else ""]
    try:
        store = RawStore.create(settings.state_dir, secrets, datetime.now(UTC))
    except OutputError as exc:
        add(Check("live", "FAIL", f"{exc}; nothing was spent", "make the state folder writable"))
        return checks, None
    wake = asyncio.Event()
    hooks = (
        {"webhook_url": f"{hook.public_url}/hook", "webhook_secret": hook.secret.get_secret_value()}
        if hook
        else {}
    )
    out = Followed()
    ours = False
    try:
        async with (
            _maybe_receiver(hook, wake.set, store.webhook) as ours,
            MusicAPI(
                settings.api_url,
                key,
                timeout=settings.request_timeout,
                max_requests_per_second=settings.max_requests_per_second,
                observer=store.reading,
            ) as api,
        ):
            await _submit(api, live_item(settings), hooks, store, out)
            assert out.submit is not None
            add(out.submit)
            if not out.submit.failed:
                await _follow(
                    api,
                    out,
                    interval=settings.poll_interval,
                    follow_for=follow_for,
                    wake=wake,
                    clock=clock,
                )
                assert out.end is not None
                add(out.end)
                if out.status is not None and not out.end.failed:
                    add(await _check_audio(api, out.status, store.folder))
                if hook is not None and ours and not store.webhook_arrived.is_set():
                    with suppress(TimeoutError):
                        await asyncio.wait_for(store.webhook_arrived.wait(), WEBHOOK_GRACE)
    except ConfigError as exc:
        add(Check("live", "FAIL", f"{exc}; nothing was spent", "free webhook.listen first"))
    finally:
        for note in out.notes:
            add(Check("live note", "warn", note))
        for check in shape_checks([s for s in store.stored if s.endpoint != "webhook"]):
            add(check)
        if hook is not None and out.submit is not None and not out.submit.failed:
            add(_webhook_check(store.stored, ours))
        store.close(
            {
                "batch_id": out.batch_id,
                "task_id": out.task_id,
                "checks": [_check_json(c) for c in checks],
            }
        )
        add(Check("live stored", "ok", f"every raw answer, secrets removed, in {store.folder}"))
    return checks, store.folder


@asynccontextmanager
async def _maybe_receiver(
    hook: WebhookSettings | None,
    on_hint: Callable[[], None],
    record: Callable[[dict[str, str], bytes, int], None],
) -> AsyncIterator[bool]:
    if hook is None:
        yield False
        return
    async with _receiver(hook, on_hint=on_hint, record=record) as ours:
        yield ours


# ---------------------------------------------------------------------------
# The whole run


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    live_folder: Path | None = None

    @property
    def passed(self) -> bool:
        return not any(c.failed for c in self.checks)


async def run_doctor(
    settings: Settings,
    *,
    live: bool = False,
    follow_for: float = LIVE_TIMEOUT,
    confirm: Callable[[str], bool] = lambda _: False,
    emit: Callable[[Check], None] = lambda _: None,
    clock: Callable[[], float] = time.time,
) -> Report:
    """The preflight, then (with ``live`` and ``confirm``'s yes) the live check.

    With ``--sandbox`` the emulator is served in this process meanwhile
    (``app.api_settings``).
    """
    report = Report()

    def add(check: Check) -> None:
        report.checks.append(check)
        emit(check)

    add(check_specs(settings))
    for check in check_folders(settings):
        add(check)
    cost: int | None
    spent = 0
    try:
        cost = int(make_plan(settings)["credits_queued"])
        spent = _spent_today(settings, clock())
    except ReconcilerError:
        cost = None  # the specs or folders line says why

    if not settings.sandbox and settings.api_key is None:
        add((await check_key(None, settings.api_url))[0])
        for check in (
            check_balance(None, cost),
            check_budget(cost, settings.daily_budget, settings.max_credits, spent),
            check_batch(None),
            await check_webhook(settings.webhook),
            check_clock(None, clock()),
        ):
            add(check)
        if live:
            add(Check("live", "FAIL", "not run: no key; nothing was spent"))
        return report

    async with api_client(settings) as (s, api):
        key_check, credits = await check_key(api, s.api_url)
        add(key_check)
        add(check_balance(credits, cost))
        add(check_budget(cost, s.daily_budget, s.max_credits, spent))
        probe: BatchProbe | APIError | None = None
        if credits is not None:
            try:
                probe = await api.probe_batch_endpoint()
            except APIError as exc:
                probe = exc
        add(check_batch(probe))
        add(await check_webhook(s.webhook))
        add(check_clock(probe.server_time if isinstance(probe, BatchProbe) else None, clock()))
        if not live:
            return report
        if credits is None:
            add(Check("live", "FAIL", "not run: the key was not accepted; nothing was spent"))
            return report
        if credits.total < LIVE_COST:
            add(
                Check(
                    "live",
                    "FAIL",
                    f"not run: the balance ({credits.total}) is below {LIVE_COST} credits",
                    "top up the account",
                )
            )
            return report
        statement = (
            f"doctor --live submits one generation: {LIVE_COST} credits of your "
            f"{credits.total}, not recorded in the ledger."
        )
        if not confirm(statement):
            add(Check("live", "FAIL", "not confirmed; nothing was spent"))
            return report
        checks, folder = await live_check(s, s.require_key(), follow_for=follow_for, emit=emit)
        report.checks += checks
        report.live_folder = folder
    return report


# ---------------------------------------------------------------------------
# Rendering


def render_line(check: Check) -> str:
    """``ok    key       accepted by ...``; a failure or warning adds what to do."""
    text = f"{check.outcome:<4}  {check.name:<17} {check.found}"
    return f"{text}; {check.todo}" if check.todo else text


def summary_line(report: Report) -> str:
    counts = Counter(c.outcome for c in report.checks)
    verdict = "all checks pass" if report.passed else "some checks FAIL"
    return (
        f"{verdict}: {counts['ok']} ok, {plural(counts['warn'], 'warning')}, "
        f"{plural(counts['FAIL'], 'failure')}"
    )


def _check_json(check: Check) -> dict[str, str]:
    return {
        "name": check.name,
        "outcome": check.outcome,
        "found": check.found,
        "todo": check.todo,
    }


def report_json(report: Report) -> dict[str, Any]:
    """The ``--json`` form: a stable schema (fields are only ever added)."""
    return {
        "schema": SCHEMA,
        "passed": report.passed,
        "checks": [_check_json(c) for c in report.checks],
        "live_folder": str(report.live_folder) if report.live_folder else None,
    }
