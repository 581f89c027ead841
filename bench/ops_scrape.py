"""What the ops listener costs: one /metrics render and one /api/status at N tracks.

Both read the ledger through ``status.build_report`` (tracks by state need
the same rules ``status`` applies), on the daemon's event loop, at most once
a second (``ops.REPORT_TTL``). This measures that read and the rest of each
answer in-process, on a ledger filled with N tracks from N/10 spec files (the
tracks queued: the state query reads the same rows whatever the state).

    uv run python bench/ops_scrape.py --results bench/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, median, revision, today, write_section, write_specs
from prometheus_client import generate_latest

from reconciler.config import Settings
from reconciler.ledger import Ledger
from reconciler.ops import Metrics, OpsApp
from reconciler.planning import desired_state
from reconciler.specs import scan_specs
from reconciler.status import build_report


def timed(fn: object, repeat: int) -> float:
    """Median seconds of ``repeat`` calls."""
    assert callable(fn)
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return median(runs)


def measure(tracks: int, repeat: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_specs(root / "specs", tracks, max(1, tracks // 10))
        scan = scan_specs(root / "specs")
        ledger = Ledger.open(root / "ledger.sqlite3")
        ledger.record_specs(scan.files, {}, complete=True)
        ledger.apply_desired(desired_state(scan.files, (), "ok", {}))
        settings = Settings(root / "specs", root / "out", root, "http://127.0.0.1:1", None)
        metrics = Metrics()
        ops = OpsApp(metrics, ledger, lambda: settings)

        def scrape() -> None:
            ops._report = None  # every call a fresh ledger read, as after REPORT_TTL
            generate_latest(metrics.registry)

        def status() -> None:
            ops._report = None
            json.dumps(ops.report())

        figures = {
            "build_report": timed(lambda: build_report(settings, time.time()), repeat),
            "metrics": timed(scrape, repeat),
            "status": timed(status, repeat),
        }
        ledger.close()
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000", help="track counts, comma-separated")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--results", type=Path, help="write the section into this file")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {n: measure(n, args.repeat) for n in sizes}
    header = "| measure | " + " | ".join(f"{n:,} tracks" for n in sizes) + " |"
    rows = [header, "|---|" + "---:|" * len(sizes)]
    for key, label in (
        ("build_report", "`status.build_report` (the ledger read)"),
        ("metrics", "`/metrics` body (ledger read + render)"),
        ("status", "`/api/status` body (ledger read + JSON)"),
    ):
        rows.append(f"| {label} | " + " | ".join(f"{results[n][key]:.3f} s" for n in sizes) + " |")
    text = f"""## Ops listener: the cost of a scrape and of the dashboard's poll

- Command: `uv run python bench/ops_scrape.py --results bench/RESULTS.md` at commit {revision()}
- Machine: {machine()}
- Date: {today()}; medians of {args.repeat} calls, in one process, on a ledger of
  N queued tracks from N/10 spec files.

{chr(10).join(rows)}

Each answer reads the ledger at most once a second (`ops.REPORT_TTL`), so a
15 s scrape interval costs one such read per scrape, and an open dashboard
(one poll every 2 s) one per poll, on the daemon's event loop.
"""
    print(text)
    if args.results:
        write_section("ops_scrape", text, args.results)


if __name__ == "__main__":
    main()
