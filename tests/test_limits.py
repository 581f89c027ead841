"""The one table of text limits: spec validation, the sandbox and the config all use it."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.config import Flags, load_settings
from reconciler.errors import ConfigError, SpecError
from reconciler.limits import FIELD_LIMITS, NEWER_MODELS, limits_for, loosest, with_overrides
from reconciler.sandbox.validation import validate_item
from reconciler.specs import parse_spec


def spec(model: str, **fields: str) -> bytes:
    body = "".join(f"    {k}: {v}\n" for k, v in fields.items())
    return f"tracks:\n  - name: a\n    mv: {model}\n{body}".encode()


def problems(data: bytes, limits: object = FIELD_LIMITS) -> list[str]:
    try:
        parse_spec("s.yaml", data, path="s.yaml", limits=limits)  # type: ignore[arg-type]
    except SpecError as exc:
        return [str(p) for p in exc.problems]
    return []


@pytest.mark.parametrize(
    ("model", "field", "limit"),
    [
        ("sonic-v3-5", "prompt", 3000),
        ("sonic-v4", "tags", 199),
        ("sonic-v5", "prompt", 5000),
        ("sonic-v5", "gpt_description_prompt", 400),
        ("sonic-v4-5", "title", 79),
        ("sonic-v9-future", "negative_tags", 1000),
    ],
)
def test_the_table_answers_per_model(model: str, field: str, limit: int) -> None:
    assert limits_for(model)[field] == limit


def test_loosest_is_the_largest_any_model_allows() -> None:
    assert loosest("prompt") == 5000
    assert loosest("tags", with_overrides({"sonic-v5": {"tags": 2000}})) == 2000


def test_overrides_change_one_entry_and_keep_the_rest() -> None:
    table = with_overrides({"sonic-v5": {"prompt": 3000}, "sonic-v6": {"title": 120}})
    assert table["sonic-v5"]["prompt"] == 3000
    assert table["sonic-v5"]["tags"] == 1000
    assert table["sonic-v6"] == {**NEWER_MODELS, "title": 120}
    assert FIELD_LIMITS["sonic-v5"]["prompt"] == 5000, "the default table is left alone"


@pytest.mark.parametrize(
    ("model", "length", "sandbox_ok"),
    [
        ("sonic-v4", 3000, True),
        ("sonic-v4", 3001, False),
        ("sonic-v5", 5000, True),
        ("sonic-v5", 5001, False),
    ],
)
def test_specs_and_the_sandbox_agree(model: str, length: int, sandbox_ok: bool) -> None:
    item = {"custom_mode": True, "mv": model, "prompt": "x" * length}
    assert (validate_item(item) is None) == sandbox_ok
    assert (problems(spec(model, prompt="x" * length)) == []) == sandbox_ok


def test_the_config_overrides_a_limit_and_spec_validation_uses_it(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text("[limits.sonic-v5]\nprompt = 3000\ntags = 150\n")
    settings = load_settings(Flags(config=config), env={})
    assert settings.field_limits["sonic-v5"]["prompt"] == 3000
    assert settings.field_limits["sonic-v4-5"]["prompt"] == 5000
    found = problems(spec("sonic-v5", prompt="x" * 3001), settings.field_limits)
    assert len(found) == 1
    assert "sonic-v5 allows at most 3000" in found[0]
    assert problems(spec("sonic-v5", prompt="x" * 3000), settings.field_limits) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[limits.sonic-v5]\npromt = 3000\n",
            "limits.sonic-v5.promt: unknown key (did you mean 'prompt'?)",
        ),
        (
            "[limits.sonic-v5]\nprompt = 0\n",
            "limits.sonic-v5.prompt: must be greater than 0, got 0",
        ),
        (
            "[limits.sonic-v55]\nprompt = 3000\n",
            "limits.sonic-v55: unknown model (did you mean 'sonic-v5'?)",
        ),
    ],
)
def test_limit_mistakes_in_the_config_are_named(tmp_path: Path, text: str, expected: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(Flags(config=config), env={})
    assert str(err.value) == f"{config}: {expected}"
