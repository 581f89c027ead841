"""Saved plans: ``reconciler plan --save FILE`` and ``reconciler apply FILE``.

Where it sits: on the command side, beside ``running``. A saved plan is the
dry run's report (``running.make_plan``) plus what it was computed from: the
folders, the prune flag, a digest of the desired specs and of the ledger facts
the plan reads, and the balance it assumed. ``apply`` takes the state lock,
computes the plan again, restricted to the saved fingerprints as its passes
will be, and refuses when what it would submit or prune now is not what was
saved; otherwise it runs passes that submit only those fingerprints and spend
at most the saved credits, and follows them to ready like ``sync``.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from reconciler.app import open_app
from reconciler.config import Settings
from reconciler.errors import APIError, PlanFileError
from reconciler.reconciling import Reconciler
from reconciler.running import converge_with_progress, make_plan, summary_line
from reconciler.words import plural

#: What the first keys of a saved plan say, so a foreign JSON file is refused.
FORMAT = "reconciler-plan"
#: Bumped when a saved plan changes meaning or how its digests are computed
#: (2: desired tracks are digested as lists); ``apply`` refuses other versions.
VERSION = 2


def _folders(settings: Settings) -> dict[str, str]:
    return {
        "specs": str(settings.specs_dir.absolute()),
        "out": str(settings.out_dir.absolute()),
        "state": str(settings.state_dir.absolute()),
    }


def save_plan(report: dict[str, Any], settings: Settings, path: Path) -> None:
    """Write the plan, whole or not at all (temp file, then rename)."""
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "folders": _folders(settings),
        "prune_enabled": settings.prune,
        **report,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise PlanFileError(f"{path}: cannot write the plan: {exc.strerror}") from exc


def load_plan(path: Path) -> dict[str, Any]:
    """Read a saved plan; anything that is not one of this version is refused by name."""
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise PlanFileError(f"{path}: cannot read the plan: {exc.strerror}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanFileError(f"{path}: not a saved plan (not JSON: {exc})") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise PlanFileError(
            f'{path}: not a saved plan (no "format": "{FORMAT}"; '
            "write one with `reconciler plan --save FILE`)"
        )
    if doc.get("version") != VERSION:
        raise PlanFileError(
            f"{path}: a saved plan of version {doc.get('version')!r}; this reconciler "
            f"applies version {VERSION} (make the plan again with `reconciler plan --save FILE`)"
        )
    try:
        _check_shape(doc)
    except ValueError as exc:
        raise PlanFileError(f"{path}: a damaged saved plan ({exc})") from exc
    return doc


#: The keys ``apply`` relies on, and their types.
_SHAPE: dict[str, type] = {
    "folders": dict,
    "prune_enabled": bool,
    "specs_digest": str,
    "ledger_digest": str,
    "submit": list,
    "held": list,
    "failed": list,
    "prune": list,
    "credits": int,
}


def _check_shape(doc: dict[str, Any]) -> None:
    """Raise ValueError naming the first key ``apply`` relies on that is missing or wrong."""
    for key, kind in _SHAPE.items():
        if not isinstance(doc.get(key), kind):
            raise ValueError(f"{key}: missing, or not a JSON {kind.__name__}")
    for item in doc["submit"]:
        if not (
            isinstance(item, dict)
            and isinstance(item.get("fingerprint"), str)
            and isinstance(item.get("tracks"), list)
        ):
            raise ValueError("submit: an item without a fingerprint and tracks")


def planned(doc: dict[str, Any]) -> frozenset[str]:
    return frozenset(str(item["fingerprint"]) for item in doc["submit"])


def what_changed(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Why the saved plan no longer holds, one line each; empty when it does.

    ``now`` is the plan computed now, restricted to the saved fingerprints as
    ``apply``'s passes are. What costs money or moves files must be the same:
    the specs, the generations it submits, the files it prunes. A balance or
    budget that changed but still pays for the plan is no reason to refuse.
    """
    found: list[str] = []
    if saved["specs_digest"] != now["specs_digest"]:
        found.append("the specs changed since the plan was made")
    submit_then = [item["fingerprint"] for item in saved["submit"]]
    submit_now = {item["fingerprint"] for item in now["submit"]}
    if submit_then != [item["fingerprint"] for item in now["submit"]]:
        why = {h["fingerprint"]: h["detail"] for h in now["held"]}
        state = {f["fingerprint"]: "failed (parked)" for f in now["failed"]}
        for item in saved["submit"]:
            fp = item["fingerprint"]
            if fp in submit_now:
                continue
            reason = why.get(fp) or state.get(fp) or "already submitted, or no spec asks for it"
            found.append(f"{', '.join(item['tracks'])} would not be submitted now: {reason}")
    if list(saved["prune"]) != list(now["prune"]):
        found.append(
            f"it would prune {plural(len(now['prune']), 'file')} now, "
            f"not the {len(saved['prune'])} planned"
        )
    if found and saved["ledger_digest"] != now["ledger_digest"]:
        found.append("the ledger changed since the plan was made (a sync, the daemon, retry)")
    if found and saved.get("balance") != now.get("balance"):
        found.append(
            f"the balance is {_credits(now.get('balance'))}; "
            f"the plan assumed {_credits(saved.get('balance'))}"
        )
    return found


def _credits(balance: Any) -> str:
    return "unknown" if balance is None else f"{balance} credits"


async def apply_plan(settings: Settings, path: Path, console: Console) -> bool:
    """Carry out a saved plan; True when every planned generation is ready.

    Refuses (``PlanFileError``) before any submit when the plan no longer holds.
    """
    saved = load_plan(path)
    if saved["folders"] != _folders(settings):
        raise PlanFileError(
            f"{path}: the plan was made for other folders "
            f"({', '.join(f'{k} {v}' for k, v in saved['folders'].items())})"
        )
    fingerprints = planned(saved)
    cost = int(saved["credits"])
    ceiling = cost if settings.max_credits is None else min(cost, settings.max_credits)
    # Only the saved fingerprints, for at most the saved credits: a failed
    # task's retry would cost more than planned, so it waits for a new plan.
    settings = replace(settings, prune=bool(saved["prune_enabled"]), max_credits=ceiling)
    async with open_app(settings) as app:
        try:
            balance: int | None = (await app.api.get_credits()).total
        except APIError:
            balance = None  # the service refuses per item what the account cannot pay
        # Under the lock: nothing else can change the ledger before the passes.
        now = make_plan(app.settings, balance, only=fingerprints)
        problems = what_changed(saved, now)
        if problems:
            raise PlanFileError(
                "\n".join(
                    [
                        f"{path}: the saved plan no longer holds; nothing was submitted:",
                        *(f"  {line}" for line in problems),
                        "make a new plan with `reconciler plan --save FILE`",
                    ]
                )
            )
        rec = Reconciler(app.settings, app.ledger, app.api, only=fingerprints)
        result = await converge_with_progress(rec, console)
        states = app.ledger.generations()
    ready = sum(1 for fp in fingerprints if fp in states and states[fp].state == "succeeded")
    done = ready == len(fingerprints) and not result.output_failures
    console.print(
        f"applied {path}: {ready}/{plural(len(fingerprints), 'planned generation')} ready; "
        + summary_line(result),
        soft_wrap=True,
        markup=False,
    )
    return done
