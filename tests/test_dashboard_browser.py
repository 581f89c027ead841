"""The dashboard in a real browser: headless Chromium against a daemon on the sandbox.

The page must show every soundtrack and track of the example specs, turn them
ready as the daemon converges (it polls /api/status), and play their audio
from the ops listener; it must load nothing from anywhere else. The test
saves a screenshot; ``RECONCILER_SCREENSHOT=docs/dashboard.png`` also copies
it there (that is how the README's picture is made).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from reconciler.sandbox import SandboxControl
from tests.daemonproc import DaemonProc, daemon_project, expected_tracks, free_port
from tests.devtools import Browser, ensure_chromium
from tests.project import wait_until

EXAMPLES = Path(__file__).parent.parent / "specs"

#: Load the first ready row's first clip and report its duration (NaN until known).
PLAY_FIRST = """
(async () => {
  const audio = document.querySelector("tr[data-state=ready] audio");
  if (audio.readyState < 1) {
    await new Promise((resolve, reject) => {
      audio.addEventListener("loadedmetadata", resolve, { once: true });
      audio.addEventListener("error", () => reject(new Error(`audio error ${audio.error.code}`)),
                             { once: true });
      audio.load();
    });
  }
  return { src: audio.currentSrc, duration: audio.duration };
})()
"""
ROWS = """
[...document.querySelectorAll("tr[data-track]")].map(row => ({
  track: row.dataset.track,
  state: row.dataset.state,
  players: [...row.querySelectorAll("audio")].map(a => new URL(a.src).pathname),
}))
"""


@pytest.fixture(scope="module")
def chromium() -> None:
    reason = ensure_chromium()
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.usefixtures("chromium")
def test_dashboard_shows_tracks_turning_ready_and_plays_them(
    tmp_path: Path, sandbox: SandboxControl
) -> None:
    project = daemon_project(tmp_path, sandbox)
    shutil.copytree(EXAMPLES, project.specs, dirs_exist_ok=True)
    expected = expected_tracks(project.specs)
    count = sum(len(tracks) for tracks in expected.values())
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with DaemonProc(project, "--ops-listen", str(port)) as daemon, Browser() as browser:
        daemon.wait_event("ops.listening")
        browser.navigate(f"{base}/")
        wait_until(
            lambda: browser.evaluate("document.body?.dataset.loaded === 'true'"), 20, "first draw"
        )
        wait_until(
            lambda: (
                browser.evaluate("document.querySelectorAll('tr[data-state=ready]').length")
                == count
            ),
            60,
            f"{count} ready rows",
        )

        rows = browser.evaluate(ROWS)
        want = {f"{st}/{name}" for st, tracks in expected.items() for name in tracks}
        assert {r["track"] for r in rows} == want
        for r in rows:
            soundtrack, name = r["track"].split("/")
            first = f"/audio/{soundtrack}/{name}.mp3"
            assert r["players"][:1] == [first], r
            assert all(p.startswith(f"/audio/{soundtrack}/{name}") for p in r["players"])
        sections = browser.evaluate(
            "[...document.querySelectorAll('section[data-soundtrack]')]"
            ".map(s => s.dataset.soundtrack)"
        )
        assert sorted(sections) == sorted(expected)
        assert browser.evaluate("document.getElementById('ready').textContent") == (
            f"{count} / {count}"
        )

        played = browser.evaluate(PLAY_FIRST)
        assert played["src"].startswith(f"{base}/audio/")
        assert played["duration"] > 0

        resources = browser.evaluate("performance.getEntriesByType('resource').map(e => e.name)")
        assert resources, "the page fetched its script, style and status"
        assert all(url.startswith(base) for url in resources), resources

        shot = tmp_path / "dashboard.png"
        browser.screenshot(shot)
        assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
        assert shot.stat().st_size > 10_000
        if os.environ.get("RECONCILER_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["RECONCILER_SCREENSHOT"])
