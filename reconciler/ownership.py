"""Which ledger keeps an output folder, and which process keeps a ledger.

Where it sits: checked by the composition root (``app.open_app``) before a
command that writes opens its API, so that nothing is spent when two
ledgers, or two kinds of writer, would work on the same things.

- An output folder is kept by one ledger. A second ledger (a replica started
  without ``--ledger`` beside the others, a second state folder pointed at
  the same ``--out``) would find none of the folder's tracks recorded,
  submit every one of them again, and then restore the files the other
  ledger writes, in turn, forever. The folder names its ledger in
  ``.reconciler-ledger`` (the ledger's id and where it is); a writer of
  another ledger is refused. A ledger recreated in the same place (the state
  folder was lost) takes the folder over: there is nobody else to fight.
- A ledger in a state folder, opened without ``--ledger``, belongs to the
  one process holding that folder's lock and takes no lease. A replica must
  not name it with ``--ledger`` while that process runs; and that process
  must not start while replicas lead the ledger through its lease.
"""

from __future__ import annotations

import json
from pathlib import Path

import structlog

from reconciler.durable import make_dirs
from reconciler.errors import LockedError, OutputError
from reconciler.ledger import Ledger
from reconciler.ledger.lease import read_leadership
from reconciler.ledger.store import describe, is_postgres
from reconciler.outputs import write_text_if_changed
from reconciler.statelock import lock_holder

#: The file at the top of an output folder naming the ledger that keeps it.
MARKER = ".reconciler-ledger"


def where(target: Path | str) -> str:
    """Where the ledger is, comparable between processes: an absolute path, or
    the URL without its password."""
    return describe(target) if is_postgres(target) else str(Path(target).resolve())


def claim_output_folder(out_dir: Path, ledger: Ledger, target: Path | str) -> None:
    """Refuse an output folder another ledger keeps; name this one in it otherwise."""
    mine = {"ledger_id": ledger.identity(), "ledger": where(target)}
    marker = out_dir / MARKER
    try:
        theirs = json.loads(marker.read_text(encoding="utf-8"))
    except FileNotFoundError:
        theirs = None
    except (OSError, ValueError):
        theirs = {}  # unreadable: named again below, as a folder nobody claimed
    if isinstance(theirs, dict) and theirs.get("ledger_id") not in (None, mine["ledger_id"]):
        if theirs.get("ledger") != mine["ledger"]:
            raise LockedError(
                f"{out_dir} is kept by another ledger ({theirs.get('ledger')}; see {marker}). "
                "A second ledger would submit every track again and fight over the files: "
                f"run with --ledger {theirs.get('ledger')} (or RECONCILER_LEDGER) to join it, "
                f"or use another --out. If that ledger is gone for good, delete {marker}: "
                "this ledger then pays for every track again (`plan` shows the cost first)."
            )
        structlog.get_logger("reconciler").warning(
            "outputs.adopted", out=str(out_dir), ledger=mine["ledger"], previous=theirs["ledger_id"]
        )
    try:
        make_dirs(out_dir)
        write_text_if_changed(marker, json.dumps(mine, indent=2) + "\n")
    except (OutputError, OSError) as exc:
        # A folder that cannot take files is the pass's to report (and it
        # submits nothing while it cannot): the claim is made once it can.
        structlog.get_logger("reconciler").warning("outputs.unclaimed", error=str(exc))


def check_ledger_owner(ledger: Ledger, target: Path | str, state_dir: Path, shared: bool) -> None:
    """Refuse to mix a state folder's own ledger with replicas of it.

    ``shared``: the ledger was named (``--ledger``); then it must not be the
    ledger of another state folder whose process is running. Otherwise no
    replica may be leading it.
    """
    if shared:
        if is_postgres(target):
            return
        folder = Path(target).resolve().parent
        if folder == state_dir.resolve():
            return
        holder = lock_holder(folder)
        if holder is not None:
            raise LockedError(
                f"{target} is the ledger of the state folder {folder}, in use by {holder}, "
                "which runs without --ledger and so takes no lease: two writers would spend "
                f"at once. Stop it, or start it with --ledger {target} too."
            )
        return
    leader, _ = read_leadership(ledger)
    if leader is not None and not leader.expired:
        raise LockedError(
            f"replicas share this ledger ({describe(target)}): {leader.host} pid {leader.pid} "
            f"leads it. Join them with --ledger {describe(target)}, or stop them first."
        )
