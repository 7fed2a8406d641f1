// The job page of cpt-server: a list of jobs and sweeps, a job with its live curves, a sweep with
// its comparison. Everything comes from the API, with the same token curl uses (kept in this tab's
// sessionStorage, sent as a header); the charts are SVG drawn by the server.
"use strict";

const TOKEN = "cpt-api-token";
const AT_REST = ["succeeded", "failed", "cancelled", "paused"];
const CHARTS = ["loss", "perplexity", "lr", "throughput", "bits_per_byte"];

const $ = (selector) => document.querySelector(selector);

/** An element with attributes and children (strings become text, never HTML). */
function el(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") element.className = value;
    else if (name === "href" || name.startsWith("data-")) element.setAttribute(name, value);
    else element[name] = value;
  }
  for (const child of children) element.append(child instanceof Node ? child : String(child ?? ""));
  return element;
}

class Unauthorized extends Error {}

/** A fetch of the API with the token; errors carry the API's message. */
async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const token = sessionStorage.getItem(TOKEN);
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    $("#login").hidden = false;
    throw new Unauthorized("the API token is needed");
  }
  if (!response.ok) {
    let message = response.statusText;
    try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
    throw new Error(`${response.status}: ${message}`);
  }
  return response;
}
const getJson = async (path) => (await api(path)).json();
const postJson = async (path) =>
  (await api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" })).json();

function say(message) { $("#status").textContent = message; }

const number = (x, digits = 2) => (x == null || !Number.isFinite(x) ? "–" : Number(x).toFixed(digits));

function duration(seconds) {
  if (!Number.isFinite(seconds)) return "–";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
}

/** Time left at the latest step's pace. */
function eta(job) {
  const metrics = job.latest_metrics, total = job.progress.total_steps;
  if (job.state !== "running" || !metrics || !total) return "–";
  return duration((total - job.progress.step) * metrics.step_seconds);
}

function progress(job) {
  const p = job.progress;
  if (p.total_steps == null) return `${p.step}`;
  return `${p.step}/${p.total_steps} (${Math.round(100 * (p.fraction || 0))}%)`;
}

const state = (s) => el("span", { class: `state ${s}` }, s);

function evals(job) {
  const latest = job.latest_evals || {};
  return Object.keys(latest).sort()
    .map((set) => `${set} ${number(latest[set].perplexity)}${Number.isFinite(latest[set].perplexity_change)
      ? ` (${latest[set].perplexity_change >= 0 ? "+" : ""}${number(100 * latest[set].perplexity_change, 1)}%)` : ""}`)
    .join(", ");
}

function table(headings, rows) {
  return el("table", {}, el("tr", {}, ...headings.map((h) => el("th", {}, h))), ...rows);
}

/** Replaces the contents of `container` with the SVG document at `path`. */
async function svgInto(container, path) {
  const text = await (await api(path)).text();
  const svg = new DOMParser().parseFromString(text, "image/svg+xml").documentElement;
  if (svg.nodeName !== "svg") throw new Error(`${path} is not an SVG document`);
  container.replaceChildren(document.importNode(svg, true));
}

// ---- the list of jobs and sweeps ----

async function listView(main) {
  const [jobs, sweeps] = await Promise.all([getJson("/v1/jobs?limit=100"), getJson("/v1/sweeps?limit=20")]);
  const jobRows = jobs.jobs.map((job) => el("tr", { "data-job": job.id },
    el("td", {}, el("a", { href: `/jobs/${encodeURIComponent(job.id)}` }, job.name)), el("td", {}, job.kind), el("td", {}, state(job.state)),
    el("td", { class: "number" }, progress(job)), el("td", { class: "number" }, job.progress.tokens_total),
    el("td", { class: "number" }, eta(job)), el("td", {}, evals(job))));
  const sweepRows = sweeps.sweeps.map((sweep) => el("tr", {},
    el("td", {}, el("a", { href: `/sweeps/${encodeURIComponent(sweep.id)}` }, sweep.name)), el("td", {}, state(sweep.state)),
    el("td", {}, Object.entries(sweep.counts).filter(([, n]) => n > 0).map(([s, n]) => `${n} ${s}`).join(", "))));
  main.replaceChildren(
    el("h1", {}, "Jobs"),
    jobs.jobs.length ? table(["name", "kind", "state", "step", "tokens", "ETA", "latest perplexity (vs step 0)"], jobRows)
      : el("p", {}, "No jobs yet: POST /v1/jobs (see the README)."),
    ...(sweeps.sweeps.length ? [el("h2", {}, "Sweeps"), table(["name", "state", "jobs"], sweepRows)] : []));
  return 5000;
}

// ---- one job ----

/** Reads an SSE stream with fetch (EventSource cannot send the token); calls `onEvent(kind)` per event. */
async function follow(path, lastId, onEvent) {
  const response = await api(path, { headers: { "Last-Event-ID": String(lastId.value) } });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let kind = "message";
      for (const line of frame.split("\n")) {
        if (line.startsWith("id: ")) lastId.value = Number(line.slice(4));
        else if (line.startsWith("event: ")) kind = line.slice(7);
      }
      onEvent(kind);
    }
  }
}

async function jobView(main, id) {
  const title = el("h1", {}), summary = el("p", {}), error = el("p", { class: "error" });
  const cancel = el("button", { id: "cancel" }, "Cancel"), resume = el("button", { id: "resume" }, "Resume");
  const charts = CHARTS.map((name) => el("div", { class: "chart", "data-chart": name }));
  const checkpoints = el("div"), samples = el("div", { class: "samples" });
  main.replaceChildren(title, summary, el("p", {}, cancel, resume), error, el("div", { class: "charts" }, ...charts),
    el("h2", {}, "Checkpoints"), checkpoints, el("h2", {}, "Samples"), samples);

  let job;
  async function refresh() {
    job = await getJson(`/v1/jobs/${id}`);
    document.title = `${job.name} — cpt`;
    title.replaceChildren(job.name, " ", state(job.state));
    const lineage = job.lineage && job.lineage.parent_id ? `, continues job ${job.lineage.parent_id}` : "";
    summary.textContent = `${job.kind} job ${job.id}: step ${progress(job)}, ${job.progress.tokens_total} tokens, ` +
      `ETA ${eta(job)}; ${evals(job) || "no eval yet"}${lineage}${job.error ? ` — ${job.error}` : ""}`;
    cancel.disabled = !["queued", "running", "paused"].includes(job.state);
    resume.disabled = !["failed", "cancelled", "paused"].includes(job.state) || job.kind !== "train";
    const [saved, sampled] = await Promise.all([
      getJson(`/v1/jobs/${id}/checkpoints`), getJson(`/v1/jobs/${id}/events?kind=sample&limit=1000`)]);
    checkpoints.replaceChildren(saved.checkpoints.length
      ? table(["step", "tokens", "path"], saved.checkpoints.map((c) =>
        el("tr", {}, el("td", { class: "number" }, c.step), el("td", { class: "number" }, c.tokens_total), el("td", {}, c.path))))
      : el("p", {}, "none yet"));
    samples.replaceChildren(...sampled.events.slice(-6).reverse().map((e) =>
      el("pre", {}, `step ${e.data.step} · ${e.data.prompt}`, el("b", {}, e.data.continuation))));
    if (!sampled.events.length) samples.append(el("p", {}, "none yet"));
    await Promise.all(charts.map((chart) => svgInto(chart, `/v1/jobs/${id}/plot.svg?chart=${chart.dataset.chart}`)));
  }

  async function act(button, verb) {
    button.disabled = true;
    try { await postJson(`/v1/jobs/${id}/${verb}`); error.textContent = ""; } catch (e) { error.textContent = e.message; }
    await refresh();
    if (!AT_REST.includes(job.state)) live();
  }
  cancel.onclick = () => act(cancel, "cancel");
  resume.onclick = () => act(resume, "resume");

  // Redraws at most every 1.5 s while events arrive; follows until the job is at rest.
  let pending = null, following = false;
  const lastId = { value: 0 };
  const later = () => { pending = pending || setTimeout(() => { pending = null; refresh().catch(show); }, 1500); };
  async function live() {
    if (following) return;
    following = true;
    try {
      while (!AT_REST.includes(job.state)) {
        try { await follow(`/v1/jobs/${id}/events/stream`, lastId, later); } catch (e) {
          if (e instanceof Unauthorized) return;
          say(`reconnecting: ${e.message}`);
          await new Promise((r) => setTimeout(r, 2000));
        }
        await refresh();
        say("");
      }
    } finally { following = false; }
  }
  await refresh();
  // Follow from now: the charts already hold everything stored so far.
  lastId.value = job.last_event_id || 0;
  live();
  return null;
}

// ---- one sweep ----

async function sweepView(main, id) {
  const sweep = await getJson(`/v1/sweeps/${id}`);
  document.title = `${sweep.name} — cpt`;
  const sets = [...new Set(sweep.jobs.flatMap((j) => Object.keys(j.eval)))].sort();
  const rows = sweep.jobs.map((job) => el("tr", {},
    el("td", {}, el("a", { href: `/jobs/${encodeURIComponent(job.job_id)}` }, Object.entries(job.point).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(" "))),
    el("td", {}, state(job.state)), el("td", { class: "number" }, job.total_steps ? `${job.step}/${job.total_steps}` : job.step),
    el("td", { class: "number" }, job.tokens_total), el("td", { class: "number" }, duration(job.wall_seconds)),
    ...sets.map((set) => {
      const e = job.eval[set];
      return el("td", { class: "number" }, e ? `${number(e.final)} (${e.change >= 0 ? "+" : ""}${number(100 * e.change, 1)}%), best ${number(e.best)} @ ${e.best_step}` : "–");
    })));
  const plot = el("div", { class: "chart wide" });
  const cancel = el("button", {}, "Cancel all"), resume = el("button", {}, "Resume all");
  cancel.onclick = async () => { await postJson(`/v1/sweeps/${id}/cancel`); route(); };
  resume.onclick = async () => { await postJson(`/v1/sweeps/${id}/resume`); route(); };
  main.replaceChildren(el("h1", {}, sweep.name, " ", state(sweep.state)), el("p", {}, cancel, resume),
    table(["point", "state", "step", "tokens", "wall", ...sets.map((s) => `${s} perplexity: final (vs step 0), best`)], rows),
    el("h2", {}, "Learning against forgetting"), plot);
  try { await svgInto(plot, `/v1/sweeps/${id}/plot.svg`); } catch (e) { plot.replaceChildren(el("p", {}, e.message)); }
  return AT_REST.includes(sweep.state) ? null : 10000;
}

// ---- routing ----

/** `text` when it is a UUID (8-4-4-4-12 hex digits); anything else throws. */
function UUID(text) {
  if (!/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(text)) throw new Error(`${text} is not an id`);
  return encodeURIComponent(text);
}

let timer = null;
function show(e) { if (!(e instanceof Unauthorized)) say(e.message); }

async function route() {
  clearTimeout(timer);
  const main = $("#main"), path = location.pathname;
  // Ids are UUIDs, matched on the raw path: a decoded `..%2Fsweeps%2F<id>` must never become part
  // of an API path (a crafted link would make this tab's token act on another route).
  const job = path.match(/^\/jobs\/([0-9a-f-]{36})$/i), sweep = path.match(/^\/sweeps\/([0-9a-f-]{36})$/i);
  const other = path !== "/" && !job && !sweep;
  try {
    if (other) { main.replaceChildren(el("p", { class: "error" }, "No such page: job and sweep ids are UUIDs.")); return; }
    const again = job ? await jobView(main, UUID(job[1]))
      : sweep ? await sweepView(main, UUID(sweep[1])) : await listView(main);
    if (again) timer = setTimeout(route, again);
  } catch (e) { show(e); }
}

$("#login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN, $("#token").value.trim());
  $("#token").value = "";
  $("#login").hidden = true;
  route();
});
route();
