"""Request validation for the sandbox: the create-field rules of the protocol doc.

Sits at the sandbox's front door: ``state.py`` runs every submitted item
(single create or batch element) through :func:`validate_item` before it
charges credits or creates a task. A failure is one line that starts with the
field name, e.g. ``mv: unknown model 'sonic-v9'``, exactly what the service's
400 bodies say, so the client's error mapping is exercised with realistic text.
Unknown fields are ignored, as the live service does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from reconciler.limits import FIELD_LIMITS, limits_for

# The service's own model list: the models the length table names.
MODELS: tuple[str, ...] = tuple(FIELD_LIMITS)
# Models before v4-5 have no vocal_gender (their tighter limits are in the table).
_OLD_MODELS = frozenset({"sonic-v3-5", "sonic-v4"})
TASK_TYPES = ("create_music",)
WEBHOOK_FIELDS = ("webhook_url", "webhook_secret")


def _is_number(value: object) -> bool:
    # bool is an int subclass; JSON true is not a weight.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_text(item: Mapping[str, Any], field: str, limit: int) -> str | None:
    value = item.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        return f"{field}: expected a string, got {type(value).__name__}"
    if len(value) > limit:
        return f"{field}: {len(value)} characters, the limit is {limit}"
    return None


def validate_webhook(fields: Mapping[str, Any]) -> str | None:
    """Check ``webhook_url``/``webhook_secret`` (per item or batch-wide)."""
    url = fields.get("webhook_url")
    if url is not None and (
        not isinstance(url, str) or not url.startswith(("http://", "https://"))
    ):
        return "webhook_url: expected an http:// or https:// URL"
    secret = fields.get("webhook_secret")
    if secret is not None and not isinstance(secret, str):
        return "webhook_secret: expected a string"
    return None


def validate_item(item: object, name: str = "body") -> str | None:
    """Return the first problem with one generation request, or None if it is valid.

    ``name`` is what a request that is not a JSON object is called in the message.
    """
    if not isinstance(item, Mapping):
        return f"{name}: expected a JSON object"
    custom = item.get("custom_mode")
    if custom is None:
        return "custom_mode: required"
    if not isinstance(custom, bool):
        return "custom_mode: expected true or false"
    mv = item.get("mv")
    if mv is None:
        return "mv: required"
    if mv not in MODELS:
        return f"mv: unknown model {mv!r}"
    old = mv in _OLD_MODELS
    limits = limits_for(mv)
    task_type = item.get("task_type")
    if task_type is not None and task_type not in TASK_TYPES:
        return f"task_type: unsupported task type {task_type!r}"

    if custom:
        if not item.get("prompt"):
            return "prompt: required when custom_mode is true"
        problem = _check_text(item, "prompt", limits["prompt"])
    else:
        if not item.get("gpt_description_prompt"):
            return "gpt_description_prompt: required when custom_mode is false"
        problem = _check_text(item, "gpt_description_prompt", limits["gpt_description_prompt"])
    if problem:
        return problem
    for field in ("title", "tags", "negative_tags"):
        problem = _check_text(item, field, limits[field])
        if problem:
            return problem

    instrumental = item.get("make_instrumental")
    if instrumental is not None and not isinstance(instrumental, bool):
        return "make_instrumental: expected true or false"
    gender = item.get("vocal_gender")
    if gender is not None:
        if gender not in ("f", "m"):
            return "vocal_gender: expected 'f' or 'm'"
        if old:
            return f"vocal_gender: not supported by model {mv!r}"
    for field in ("style_weight", "weirdness_constraint"):
        weight = item.get(field)
        if weight is None:
            continue
        if not _is_number(weight):
            return f"{field}: expected a number from 0 to 1"
        if not 0 <= weight <= 1:
            return f"{field}: {weight} is outside 0 to 1"
    return validate_webhook(item)
