"""Webhook hints applied to the ledger: "poll this now", or a claim on a lost answer.

Where it sits: between the webhook receiver (``webhooks``), which queues
verified callbacks as :class:`Hint` values, and the next pass. The daemon
applies them between passes, never during one; hints are never facts, they
only make the polls that find the facts come sooner.
"""

from __future__ import annotations

from reconciler.ledger.facts import Hint
from reconciler.ledger.work import Ledger


def apply_hints(ledger: Ledger, hints: list[Hint], now: float) -> int:
    """Turn hints into "poll now" in the ledger; returns how many changed something.

    A task the ledger knows (by id, or by a clip id an earlier poll recorded)
    has its batch (or itself) polled now. A task it does not know is claimed
    when its generation is waiting on a lost submit answer (``unknown``): the
    callback proves the task exists and is paid for. A callback for such a
    generation that names no task marks it paid, so it is never sent again on
    its own. A task naming another fingerprint than its URL is refused: the
    signature covers the body, not the URL. Whatever names nothing known polls
    the open batches now.
    """
    # Imported here: ``status`` imports this package, and structlog's import
    # costs a large part of that short command's start-up; the daemon has it.
    import structlog

    log = structlog.get_logger("reconciler")
    changed = 0
    for hint in hints:
        task_id = hint.task_id or next(
            (t for c in hint.clip_ids if (t := ledger.task_of_clip(c)) is not None), None
        )
        ref = ledger.task_ref(task_id) if task_id else None
        if ref is not None:
            if hint.fingerprint is not None and ref.fingerprint != hint.fingerprint:
                log.warning(
                    "webhook.mismatch",
                    fingerprint=hint.fingerprint,
                    task_id=task_id,
                    task_fingerprint=ref.fingerprint,
                )
                continue
            ledger.wake(ref.batch_id, ref.task_id)
            changed += 1
            continue
        if hint.fingerprint is not None and task_id is not None:
            if ledger.claim(hint.fingerprint, task_id, now):
                log.warning("webhook.claimed", fingerprint=hint.fingerprint, task_id=task_id)
                changed += 1
                continue
        elif hint.fingerprint is not None and ledger.paid_hint(hint.fingerprint):
            log.warning("webhook.paid_unnamed", fingerprint=hint.fingerprint)
            changed += 1
        # Nothing known: something finished somewhere, and the polls find it.
        woken = ledger.wake_open()
        log.info("webhook.unmatched", fingerprint=hint.fingerprint, task_id=task_id, woken=woken)
        changed += bool(woken)
    return changed
