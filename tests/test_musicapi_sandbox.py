"""The MusicAPI client against the real sandbox server over loopback HTTP.

The unit tests force each answer with a MockTransport; these check that the
client and the sandbox agree on the wire (paths, shapes, faults) end to end.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import stamina

from reconciler.errors import (
    AmbiguousSubmitError,
    AudioExpiredError,
    AuthError,
    BatchUnsupportedError,
    NotFoundError,
    TemporaryAPIError,
)
from reconciler.musicapi import (
    Accepted,
    BatchSubmission,
    Clip,
    MusicAPI,
    Rejected,
    TaskStatus,
)
from reconciler.sandbox import SandboxControl

T = TypeVar("T")
COST = 15  # credits per task


@pytest.fixture(autouse=True)
def _no_backoff_waits() -> Iterator[None]:
    with stamina.set_testing(True, attempts=1000, cap=True):
        yield


def item(prompt: str) -> dict[str, Any]:
    return {"custom_mode": False, "mv": "sonic-v5", "gpt_description_prompt": prompt}


def run(sandbox: SandboxControl, op: Callable[[MusicAPI], Awaitable[T]], **options: Any) -> T:
    async def main() -> T:
        async with MusicAPI(sandbox.base_url, sandbox.key, timeout=5.0, **options) as api:
            return await op(api)

    return asyncio.run(main())


async def until_settled(
    poll: Callable[[], Awaitable[tuple[TaskStatus, ...]]], deadline: float = 10.0
) -> tuple[TaskStatus, ...]:
    give_up = time.monotonic() + deadline
    while True:
        statuses = await poll()
        if statuses and all(s.status in ("succeeded", "failed") for s in statuses):
            return statuses
        assert time.monotonic() < give_up, f"not settled in {deadline} s: {statuses}"
        await asyncio.sleep(0.05)


async def polled(api: MusicAPI, submission: BatchSubmission) -> tuple[TaskStatus, ...]:
    """The batch's statuses, its accepted items told to the poll by index."""
    assert submission.batch_id is not None
    known = {r.index: r.task_id for r in submission.results if isinstance(r, Accepted)}
    answer = await api.poll_batch(submission.batch_id, known)
    assert answer.unread == ()
    return answer.statuses


def is_mp3(data: bytes) -> bool:
    return data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0)


def test_batch_submit_poll_download_and_credits(sandbox: SandboxControl, tmp_path: Path) -> None:
    async def scenario(api: MusicAPI) -> tuple[int, int, tuple[TaskStatus, ...], list[int]]:
        before = (await api.get_credits()).total
        submission = await api.submit_batch([item(f"lofi {i}") for i in range(3)])
        assert [type(r) for r in submission.results] == [Accepted] * 3
        assert [r.index for r in submission.results] == [0, 1, 2]
        statuses = await until_settled(lambda: polled(api, submission))
        sizes = []
        for status in statuses:
            for clip in status.clips:
                assert clip.audio_url
                dest = tmp_path / f"{clip.clip_id}.mp3"
                sizes.append(await api.download(clip.audio_url, dest))
                assert is_mp3(dest.read_bytes())
        after = (await api.get_credits()).total
        return before, after, statuses, sizes

    before, after, statuses, sizes = run(sandbox, scenario)
    assert [(s.index, s.status) for s in statuses] == [
        (0, "succeeded"),
        (1, "succeeded"),
        (2, "succeeded"),
    ]
    assert all(len(s.clips) == 2 and all(c.done for c in s.clips) for s in statuses)
    assert all(isinstance(c.duration, float) and c.duration > 0 for s in statuses for c in s.clips)
    assert len(sizes) == 6
    assert all(size > 0 for size in sizes)
    assert before - after == 3 * COST
    stats = sandbox.stats()
    assert (stats["batch_submit_calls"], stats["tasks_created"]) == (1, 3)


def test_per_item_rejection_and_duration_as_string(sandbox: SandboxControl) -> None:
    sandbox.configure(
        faults=[
            {"kind": "reject", "at": [2], "type": "forbidden", "error": "copyrighted lyrics"},
            {"kind": "duration_string", "rate": 1.0},
        ]
    )

    async def scenario(api: MusicAPI) -> tuple[Any, tuple[TaskStatus, ...]]:
        submission = await api.submit_batch([item("a"), item("b")])
        return submission, await until_settled(lambda: polled(api, submission))

    submission, statuses = run(sandbox, scenario)
    assert isinstance(submission.results[0], Accepted)
    assert submission.results[1] == Rejected(1, "forbidden", "copyrighted lyrics")
    assert [s.index for s in statuses] == [0]
    clips: tuple[Clip, ...] = statuses[0].clips
    assert all(isinstance(c.duration, float) for c in clips)


def test_dropped_submit_response_is_ambiguous_and_the_task_exists(sandbox: SandboxControl) -> None:
    sandbox.configure(faults=[{"kind": "drop_response", "at": [1]}])
    with pytest.raises(AmbiguousSubmitError):
        run(sandbox, lambda api: api.submit_batch([item("dropped")]))
    stats = sandbox.stats()
    # Sent once, processed once: the client did not retry it.
    assert (stats["batch_submit_calls"], stats["tasks_created"]) == (1, 1)


def test_batch_disabled_falls_back_to_create_and_task_poll(sandbox: SandboxControl) -> None:
    sandbox.configure(batch_disabled=405)

    async def scenario(api: MusicAPI) -> TaskStatus:
        with pytest.raises(BatchUnsupportedError):
            await api.submit_batch([item("single")])
        task_id = await api.create(item("single"))

        async def one() -> tuple[TaskStatus, ...]:
            return (await api.poll_task(task_id),)

        (status,) = await until_settled(one)
        return status

    status = run(sandbox, scenario)
    assert status.status == "succeeded"
    assert status.index is None


def test_get_faults_are_retried_inside_the_client(sandbox: SandboxControl) -> None:
    sandbox.configure(
        faults=[
            {"kind": "rate_limited", "at": [1], "retry_after": 1, "endpoints": ["credits"]},
            {"kind": "server_error", "at": [2], "endpoints": ["credits"]},
            {"kind": "connection_reset", "at": [3], "endpoints": ["credits"]},
        ]
    )
    credits = run(sandbox, lambda api: api.get_credits(), max_attempts=4)
    assert credits.total > 0
    assert sandbox.stats()["credit_calls"] == 4


def finished_clip(sandbox: SandboxControl) -> Clip:
    async def scenario(api: MusicAPI) -> Clip:
        accepted = (await api.submit_batch([item("audio")])).results[0]
        assert isinstance(accepted, Accepted)

        async def one() -> tuple[TaskStatus, ...]:
            return (await api.poll_task(accepted.task_id),)

        (status,) = await until_settled(one)
        return status.clips[0]

    return run(sandbox, scenario)


def test_expired_audio_url(sandbox: SandboxControl, tmp_path: Path) -> None:
    url = finished_clip(sandbox).audio_url or ""
    sandbox.configure(faults=[{"kind": "audio_expired", "at": [1]}])
    with pytest.raises(AudioExpiredError):
        run(sandbox, lambda api: api.download(url, tmp_path / "a"))
    assert sandbox.stats()["downloads"] == 1


def test_truncated_audio_body(sandbox: SandboxControl, tmp_path: Path) -> None:
    url = finished_clip(sandbox).audio_url or ""
    sandbox.configure(faults=[{"kind": "audio_truncated", "rate": 1.0}])
    with pytest.raises(TemporaryAPIError):
        run(sandbox, lambda api: api.download(url, tmp_path / "b"), max_attempts=2)


def test_unknown_ids_and_bad_key(sandbox: SandboxControl) -> None:
    with pytest.raises(NotFoundError):
        run(sandbox, lambda api: api.poll_task("no-such-task"))
    with pytest.raises(NotFoundError):
        run(sandbox, lambda api: api.poll_batch("no-such-batch", {}))

    async def wrong_key() -> None:
        async with MusicAPI(sandbox.base_url, "sk-SECRET-123") as api:
            await api.get_credits()

    with pytest.raises(AuthError) as caught:
        asyncio.run(wrong_key())
    assert "sk-SECRET-123" not in repr(caught.value)
