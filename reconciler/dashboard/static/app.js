// The dashboard: fetches /api/status every two seconds and redraws.
// Read-only; everything comes from this listener (no external assets).
"use strict";

const REFRESH_MS = 2000;
const players = new Map(); // audio URL -> <audio>, kept across redraws so playback goes on

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function player(url, label) {
  let audio = players.get(url);
  if (!audio) {
    audio = el("audio", { controls: "", preload: "metadata", src: url, "aria-label": label });
    players.set(url, audio);
  }
  return audio;
}

function row(t) {
  const play = el("td", { class: "play" });
  t.audio.forEach((url, i) => play.append(player(url, `${t.soundtrack}/${t.track} clip ${i + 1}`)));
  const tr = el(
    "tr",
    { "data-track": `${t.soundtrack}/${t.track}`, "data-state": t.state },
    el("td", { class: "name", text: t.track }),
    el("td", { class: `state state-${t.state}`, text: t.state }),
    el("td", { class: "reason", text: t.reason || "" }),
    play,
  );
  return tr;
}

function render(report) {
  const s = report.summary;
  document.getElementById("ready").textContent = `${s.ready} / ${s.tracks}`;
  document.getElementById("inflight").textContent =
    `${s.generating} generating, ${report.batches_in_flight} batch(es)`;
  const c = report.credits;
  const budget = c.daily_budget;
  document.getElementById("credits").textContent =
    budget === null ? `${c.spent_today}` : `${c.spent_today} / ${budget}`;
  const meter = document.getElementById("budget");
  meter.hidden = budget === null;
  if (budget !== null) { meter.max = budget || 1; meter.value = c.spent_today; }
  document.getElementById("doubles").textContent = report.possible_double_spend;
  const paused = document.getElementById("paused");
  paused.hidden = !report.submit_block;
  paused.textContent = report.submit_block ? `Submissions paused: ${report.submit_block}` : "";

  const groups = new Map();
  for (const t of report.tracks) {
    if (!groups.has(t.soundtrack)) groups.set(t.soundtrack, []);
    groups.get(t.soundtrack).push(t);
  }
  const sections = [];
  for (const [name, tracks] of groups) {
    const ready = tracks.filter((t) => t.state === "ready").length;
    const head = el("tr", {}, ...["track", "state", "reason", "listen"].map((h) => el("th", { text: h })));
    sections.push(el(
      "section",
      { class: "soundtrack", "data-soundtrack": name },
      el("h2", { text: `${name} — ${ready}/${tracks.length} ready` }),
      el("table", {}, el("thead", {}, head), el("tbody", {}, ...tracks.map(row))),
    ));
  }
  document.getElementById("soundtracks").replaceChildren(...sections);
  const when = new Date().toLocaleTimeString();
  document.getElementById("updated").textContent = `updated ${when}`;
  document.body.dataset.loaded = "true";
}

async function refresh() {
  try {
    const answer = await fetch("/api/status", { cache: "no-store" });
    if (!answer.ok) throw new Error(`HTTP ${answer.status}`);
    render(await answer.json());
  } catch (err) {
    document.getElementById("updated").textContent = `cannot reach the daemon (${err.message})`;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
