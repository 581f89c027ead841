"""The service's limits: the batch size, and the per-model length limits of the
create request's text fields (the one table).

Where it sits: beside the spec rules. ``specs.py`` checks every track against
it before anything is paid for, and the sandbox's request validation answers
400 by the same numbers. The service's documents disagree on some of these
(its error table says "less than 200" where the parameter pages give larger
per-model figures), so a deployment can override any entry in the config
(``[limits.<model>]``, read by config.py into ``Settings.field_limits``).
"""

from __future__ import annotations

from collections.abc import Mapping

#: The models a spec may name unless the config lists others (``models``).
DEFAULT_MODELS: tuple[str, ...] = (
    "sonic-v3-5",
    "sonic-v4",
    "sonic-v4-5",
    "sonic-v4-5-plus",
    "sonic-v5",
)

#: The most create requests one ``POST /sonic/batch`` carries: the service's
#: limit, and the batch size the reconciler submits, since a full batch is
#: the fewest calls (there is nothing to gain from smaller ones).
MAX_BATCH_ITEMS = 10

#: The text fields that have a length limit, in the order requests list them.
TEXT_FIELDS: tuple[str, ...] = (
    "prompt",
    "gpt_description_prompt",
    "title",
    "tags",
    "negative_tags",
)

#: A model's limits: field → most characters allowed.
Limits = Mapping[str, int]
#: model → its limits.
FieldLimits = Mapping[str, Limits]

# The models before v4-5 have the API's shorter limits.
_BEFORE_V4_5: Limits = {
    "prompt": 3000,
    "gpt_description_prompt": 400,
    "title": 79,  # the API says "< 80"
    "tags": 199,  # "< 200"
    "negative_tags": 199,
}
_V4_5_AND_LATER: Limits = {
    "prompt": 5000,
    "gpt_description_prompt": 400,
    "title": 79,
    "tags": 1000,
    "negative_tags": 1000,
}

#: Any model not named in a table (a newer one included) gets these, which is
#: what the service does for new models.
NEWER_MODELS: Limits = _V4_5_AND_LATER

FIELD_LIMITS: FieldLimits = {
    "sonic-v3-5": _BEFORE_V4_5,
    "sonic-v4": _BEFORE_V4_5,
    "sonic-v4-5": _V4_5_AND_LATER,
    "sonic-v4-5-plus": _V4_5_AND_LATER,
    "sonic-v5": _V4_5_AND_LATER,
}


def limits_for(model: str, table: FieldLimits = FIELD_LIMITS) -> Limits:
    """The limits of ``model``: its own row, or the newer models' one."""
    return table.get(model, NEWER_MODELS)


def loosest(field: str, table: FieldLimits = FIELD_LIMITS) -> int:
    """The highest limit any model has for ``field``: a longer value fits no model."""
    return max([NEWER_MODELS[field], *(row[field] for row in table.values())])


def with_overrides(overrides: Mapping[str, Mapping[str, int]]) -> FieldLimits:
    """The table with the config's ``[limits.<model>]`` entries laid over it."""
    table = {model: dict(row) for model, row in FIELD_LIMITS.items()}
    for model, row in overrides.items():
        table[model] = {**limits_for(model), **table.get(model, {}), **row}
    return table
