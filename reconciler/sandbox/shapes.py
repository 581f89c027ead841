"""Shape profiles: the other plausible answers of the real service, one switch each.

The live service publishes only the top-level keys of a batch submit answer
and the documented webhook example; the element shapes the sandbox serves by
default are this project's guess. Each profile named in :data:`SHAPES`
rewrites one part of that guess into another shape the service could use,
so the client can be proven against all of them. ``state.py`` and
``app.py`` build the default body first; the functions here rewrite it on
the way out. Nothing here touches credits, tasks or counters: a profile
changes what the client reads, never what is charged.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

from reconciler.sandbox.faults import FaultProfileError
from reconciler.sandbox.validation import validate_item

SHAPES: tuple[str, ...] = (
    # The batch poll.
    "batch-poll-202",  # 202 {"type":"not_ready"} while any task of the batch is unfinished
    "poll-no-index",  # entries carry no "index"
    "poll-no-task-id",  # entries carry no "task_id"
    "succeeded-no-data",  # finished entries say "succeeded" with "data": []
    "poll-single-shape",  # entries look like single-task poll bodies, plus "task_id"
    # The batch submit answer.
    "submit-id",  # accepted entries name the task under "id"
    "submit-taskId",  # ... under "taskId"
    "submit-bare",  # "tasks" is a list of bare task-id strings, accepted items only
    "numeric-batch-id",  # "batch_id" is a JSON number
    "one-based-index",  # submit and poll entries count "index" from 1
    "rejected-omitted",  # rejected items are left out of "tasks"
    "submit-no-index",  # submit entries carry no "index"
    "rejection-message-only",  # a rejected entry is {"index": i, "message": reason}
    "batch-400-one-bad",  # one invalid item makes the whole batch a 400; nothing is created
    # Webhooks.
    "webhook-documented",  # the documented body: {"code":200,"data":[...]}, no task_id
    "webhook-x-signature",  # X-Signature: hex HMAC-SHA256(secret, body), no timestamp
)

# Where a submit entry names its task: only one of these can be in force.
_TASK_KEY_SHAPES = ("submit-id", "submit-taskId", "submit-bare")
# The code a failure webhook carries under "webhook-documented": the docs show
# only a success example, so this is a guess; the client must not rely on it.
FAILED_WEBHOOK_CODE = 500


def parse_shapes(names: object, where: str = "shapes") -> tuple[str, ...]:
    """Check a list of profile names; each may itself be comma-separated.

    Returns them without repeats, in the order of :data:`SHAPES`. Raises
    :class:`FaultProfileError` naming ``where`` and listing the known names.
    """
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise FaultProfileError(f"{where}: expected a list of shape names, got {names!r}")
    chosen: set[str] = set()
    for entry in names:
        if not isinstance(entry, str):
            raise FaultProfileError(f"{where}: expected a shape name, got {entry!r}")
        for name in (part.strip() for part in entry.split(",")):
            if name not in SHAPES:
                raise FaultProfileError(
                    f"{where}: unknown shape {name!r} (known: {', '.join(SHAPES)})"
                )
            chosen.add(name)
    clashing = [name for name in _TASK_KEY_SHAPES if name in chosen]
    if len(clashing) > 1:
        raise FaultProfileError(
            f"{where}: {' and '.join(clashing)} both say where a submit entry names its task;"
            " choose one"
        )
    return tuple(name for name in SHAPES if name in chosen)


def batch_problem(items: list[Any]) -> str | None:
    """Under ``batch-400-one-bad``: the whole-batch 400 message for the first invalid item."""
    for index, item in enumerate(items):
        problem = validate_item(item, "item")
        if problem is not None:
            field, _, reason = problem.partition(": ")
            where = f"items[{index}]" if field == "item" else f"items[{index}].{field}"
            return f"{where}: {reason}"
    return None


def submit_body(body: dict[str, Any], shapes: Collection[str]) -> dict[str, Any]:
    """Rewrite a batch submit answer (default shape) into the shapes in force."""
    tasks: list[Any] = []
    for entry in body["tasks"]:
        accepted = "task_id" in entry
        if not accepted and ({"rejected-omitted", "submit-bare"} & set(shapes)):
            continue
        if "submit-bare" in shapes:
            tasks.append(entry["task_id"])
            continue
        if accepted:
            key = "id" if "submit-id" in shapes else "taskId" if "submit-taskId" in shapes else None
            shaped = {"index": entry["index"], key or "task_id": entry["task_id"]}
        elif "rejection-message-only" in shapes:
            shaped = {"index": entry["index"], "message": entry["error"]}
        else:
            shaped = dict(entry)
        if "one-based-index" in shapes:
            shaped["index"] += 1
        if "submit-no-index" in shapes:
            del shaped["index"]
        tasks.append(shaped)
    return {**body, "batch_id": _batch_id(body["batch_id"], shapes), "tasks": tasks}


def poll_answer(body: dict[str, Any], shapes: Collection[str]) -> tuple[int, dict[str, Any]]:
    """Status and body of a batch poll, from its default-shape body."""
    entries = body["tasks"]
    if "batch-poll-202" in shapes and any(
        entry["status"] not in ("succeeded", "failed") for entry in entries
    ):
        return 202, {"type": "not_ready"}
    return 200, {
        **body,
        "batch_id": _batch_id(body["batch_id"], shapes),
        "tasks": [_poll_entry(entry, shapes) for entry in entries],
    }


def _poll_entry(entry: dict[str, Any], shapes: Collection[str]) -> dict[str, Any]:
    if "poll-single-shape" in shapes:
        shaped = {**_single_poll_body(entry), "task_id": entry["task_id"]}
    else:
        shaped = dict(entry)
    if "succeeded-no-data" in shapes and entry["status"] == "succeeded":
        shaped["data"] = []
    if "index" in shaped:
        if "one-based-index" in shapes:
            shaped["index"] += 1
        if "poll-no-index" in shapes:
            del shaped["index"]
    if "poll-no-task-id" in shapes:
        del shaped["task_id"]
    return shaped


def _single_poll_body(entry: dict[str, Any]) -> dict[str, Any]:
    """What ``GET /sonic/task/{id}`` answers for the task of a default-shape batch entry."""
    if "type" in entry:
        return {"type": entry["type"], "error": entry["error"]}
    if not entry["data"]:
        return {"type": "not_ready"}
    return {"code": 200, "message": "success", "data": entry["data"]}


def webhook_payload(body: dict[str, Any], task_id: str, shapes: Collection[str]) -> dict[str, Any]:
    """The webhook body for a task whose single-task poll answered ``body``."""
    if "webhook-documented" not in shapes:
        return {**body, "task_id": task_id}
    if "error" in body:
        return {"code": FAILED_WEBHOOK_CODE, "type": body["type"], "error": body["error"]}
    return {"code": 200, "data": body["data"]}


def _batch_id(batch_id: str, shapes: Collection[str]) -> str | int:
    # state.py draws digit-only ids while numeric-batch-id is in force; an id
    # drawn before the profile was switched on stays a string.
    if "numeric-batch-id" in shapes and batch_id.isdigit():
        return int(batch_id)
    return batch_id
