// The render farm's web console: one script, no build step, nothing fetched but this service's own /v1 API.
// Views are hash routes (#/, #/jobs/{id}, #/batches/{name}, #/fleet). Live progress comes from each job's SSE
// stream; lists are polled. Every text from the API goes into the page through textContent, never as HTML.
"use strict";

const TERMINAL = new Set(["succeeded", "interrupted", "revoked", "failed", "expired"]);
const KEY_STORE = "render.apiKey";
// A browser opens at most six HTTP/1.1 connections to one host and every EventSource holds one open: the job
// list follows this many running jobs live and polls the rest, so fetches always have a connection left.
const MAX_STREAMS = 3;
const LIST_POLL_MS = 3000;
const FLEET_POLL_MS = 5000;

const view = document.getElementById("view");
const notice = document.getElementById("notice");
const keyDialog = document.getElementById("key-dialog");
const keyForm = document.getElementById("key-form");
const keyInput = document.getElementById("key-input");
const keyReason = document.getElementById("key-reason");
const forgetKey = document.getElementById("forget-key");

let cleanups = [];

class AuthNeeded extends Error {}

class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field;
  }
}

// --- small helpers -------------------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "text") el.textContent = value;
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function say(text, kind = "info") {
  notice.textContent = text || "";
  notice.dataset.kind = kind;
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

// EventSource and <img> cannot send an Authorization header: the service takes the key as ?access_token= on
// its own GET URLs (events, files). Absolute URLs (S3 presigned) are left alone: they carry their signature.
function withToken(url) {
  const key = apiKey();
  if (!url || !key || !url.startsWith("/")) return url;
  return url + (url.includes("?") ? "&" : "?") + "access_token=" + encodeURIComponent(key);
}

async function api(path, options = {}) {
  const headers = { Accept: "application/json" };
  const key = apiKey();
  if (key) headers.Authorization = "Bearer " + key;
  let response;
  try {
    response = await fetch(path, { method: options.method || "GET", headers });
  } catch (err) {
    throw new ApiError(0, "unreachable", "the service did not answer (" + err.message + "); retrying");
  }
  if (response.status === 401) {
    askForKey(key ? "The key was not accepted; enter another." : "This farm asks for an API key.");
    throw new AuthNeeded("an API key is needed");
  }
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null;
  }
  if (!response.ok) {
    const error = (body && body.error) || {};
    throw new ApiError(response.status, error.code || "http_" + response.status,
      error.message || response.status + " " + response.statusText, error.field);
  }
  return body;
}

function report(err) {
  if (err instanceof AuthNeeded) return;
  say(err.message, "error");
}

function every(ms, fn) {
  let stopped = false;
  let timer = null;
  const tick = async () => {
    try {
      await fn();
    } catch (err) {
      report(err);
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

// Follow one job's snapshots; `onJob` gets each. Ends on the final state (the server then closes the stream and
// an EventSource left open would reconnect). A stream that cannot open falls back to polling the job.
function follow(job, onJob) {
  let closed = false;
  let stopPoll = null;
  const source = new EventSource(withToken(job.links.events));
  source.addEventListener("snapshot", (event) => {
    const next = JSON.parse(event.data);
    if (TERMINAL.has(next.status)) source.close();
    onJob(next);
  });
  source.addEventListener("error", () => {
    if (closed || source.readyState !== EventSource.CLOSED || stopPoll) return;
    stopPoll = every(2000, async () => {
      const next = await api(job.links.self);
      onJob(next);
      if (TERMINAL.has(next.status)) stopPoll();
    });
  });
  return () => {
    closed = true;
    source.close();
    if (stopPoll) stopPoll();
  };
}

function stepText(job) {
  if (job.total) return (job.step || 0) + " / " + job.total;
  return TERMINAL.has(job.status) ? "" : "—";
}

function progressBar(job, label) {
  const bar = h("progress", { max: job.total || 1, "aria-label": label });
  fillProgress(bar, job);
  return bar;
}

function fillProgress(bar, job) {
  if (job.total) {
    bar.max = job.total;
    bar.value = job.step || 0;
  } else if (TERMINAL.has(job.status)) {
    bar.max = 1;
    bar.value = job.status === "succeeded" ? 1 : 0;
  } else {
    bar.removeAttribute("value"); // indeterminate while queued
  }
}

function statusBadge(status) {
  return h("span", { class: "status", "data-status": status, text: status });
}

function setImage(img, url) {
  const src = withToken(url);
  if (src && img.getAttribute("src") !== src) img.src = src;
  img.hidden = !src;
}

function jobLink(id) {
  return h("a", { href: "#/jobs/" + encodeURIComponent(id) }, h("code", { text: id }));
}

function batchLink(name) {
  return name ? h("a", { href: "#/batches/" + encodeURIComponent(name), text: name }) : "";
}

// --- the key prompt ------------------------------------------------------------------------------------------

function askForKey(reason) {
  keyReason.textContent = reason + " It is kept in this tab only (sessionStorage).";
  if (!keyDialog.open) {
    keyInput.value = "";
    keyDialog.showModal();
    keyInput.focus();
  }
}

keyForm.addEventListener("submit", () => {
  sessionStorage.setItem(KEY_STORE, keyInput.value.trim());
  forgetKey.hidden = false;
  route();
});

forgetKey.addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORE);
  forgetKey.hidden = true;
  route();
});

// --- views ---------------------------------------------------------------------------------------------------

function jobsView(params) {
  const statusFilter = params.get("status") || "";
  const limit = Math.min(Number(params.get("limit")) || 50, 1000);
  const rows = new Map();
  const streams = new Map();
  const batches = new Map();
  const tbody = h("tbody");
  const batchList = h("ul", { class: "batches" });
  const go = (changes) => {
    const next = new URLSearchParams(params);
    for (const [name, value] of Object.entries(changes)) {
      if (value) next.set(name, value);
      else next.delete(name);
    }
    location.hash = "#/" + (next.toString() ? "?" + next : "");
  };
  const more = h("button", { type: "button", id: "more-jobs", hidden: true, text: "Show older jobs",
    onclick: () => go({ limit: String(limit + 50) }) });
  const filter = h("select", { id: "status-filter", onchange: () => go({ status: filter.value, limit: "" }) },
    h("option", { value: "", text: "all" }),
    ["queued", "started", "progress", ...TERMINAL].map((s) => h("option", { value: s, text: s, selected: s === statusFilter })));
  view.replaceChildren(
    h("section", { "aria-labelledby": "jobs-title" },
      h("div", { class: "heading" }, h("h2", { id: "jobs-title", text: "Jobs" }),
        h("label", { for: "status-filter" }, "Status ", filter)),
      h("table", { class: "jobs" },
        h("caption", { class: "visually-hidden", text: "Jobs, newest first" }),
        h("thead", {}, h("tr", {}, ["Job", "Model", "Batch", "Status", "Progress", "Preview"].map((c) => h("th", { scope: "col", text: c })))),
        tbody),
      h("p", { id: "jobs-empty", class: "muted", hidden: true, text: "No jobs yet." }), more),
    h("section", { "aria-labelledby": "batches-title" },
      h("h2", { id: "batches-title", text: "Batches" }), batchList,
      h("p", { id: "batches-empty", class: "muted", text: "No batches among these jobs." })));

  function row(job) {
    let tr = rows.get(job.id);
    if (!tr) {
      const img = h("img", { class: "thumb", alt: "Newest preview of job " + job.id, hidden: true, width: 64, height: 64 });
      tr = h("tr", { "data-job-id": job.id },
        h("td", {}, jobLink(job.id)), h("td", { "data-col": "model" }), h("td", { "data-col": "batch" }),
        h("td", { "data-col": "status" }), h("td", { "data-col": "progress" },
          progressBar(job, "Progress of job " + job.id), h("span", { class: "steps" })),
        h("td", {}, img));
      rows.set(job.id, tr);
    }
    const cells = Object.fromEntries([...tr.querySelectorAll("[data-col]")].map((td) => [td.dataset.col, td]));
    cells.model.textContent = job.model || "";
    cells.batch.replaceChildren(batchLink(job.batch));
    cells.status.replaceChildren(statusBadge(job.status));
    fillProgress(tr.querySelector("progress"), job);
    tr.querySelector(".steps").textContent = stepText(job);
    setImage(tr.querySelector("img"), job.preview || (job.files || []).filter((f) => f.kind === "image").map((f) => f.url)[0]);
    tr.dataset.status = job.status;
    return tr;
  }

  function stream(job) {
    if (TERMINAL.has(job.status) || streams.has(job.id) || streams.size >= MAX_STREAMS) return;
    streams.set(job.id, follow(job, (next) => {
      row(next);
      if (TERMINAL.has(next.status)) {
        streams.get(job.id)();
        streams.delete(job.id);
      }
    }));
  }

  async function refreshBatches() {
    for (const [name, li] of batches) {
      const batch = await api("/v1/batches/" + encodeURIComponent(name));
      li.querySelector(".counts").textContent = countsText(batch);
    }
  }

  const stopPoll = every(LIST_POLL_MS, async () => {
    const query = new URLSearchParams({ limit: String(limit) });
    if (statusFilter) query.set("status", statusFilter);
    const page = await api("/v1/jobs?" + query);
    say("");
    // A job that a stream follows is newer in the stream than in this list: keep its row as the stream left it.
    tbody.replaceChildren(...page.jobs.map((job) => (streams.has(job.id) ? rows.get(job.id) : row(job))));
    document.getElementById("jobs-empty").hidden = page.jobs.length > 0;
    more.hidden = !page.next_cursor || limit >= 1000;
    // Running jobs first: they are the ones with a moving preview.
    page.jobs.filter((job) => job.status === "progress" || job.status === "started").forEach(stream);
    page.jobs.forEach(stream);
    for (const name of new Set(page.jobs.map((j) => j.batch).filter(Boolean))) {
      if (!batches.has(name)) {
        batches.set(name, h("li", {}, batchLink(name), " ", h("span", { class: "counts muted" })));
        batchList.append(batches.get(name));
      }
    }
    document.getElementById("batches-empty").hidden = batches.size > 0;
    await refreshBatches();
  });
  return () => {
    stopPoll();
    streams.forEach((stop) => stop());
  };
}

function countsText(batch) {
  const parts = Object.entries(batch.counts || {}).filter(([, n]) => n).map(([state, n]) => n + " " + state);
  let text = batch.total + " jobs: " + (parts.join(", ") || "none counted");
  if (batch.images_per_second) text += " · " + batch.images_per_second.toFixed(2) + " images/s";
  if (batch.eta_seconds) text += " · about " + Math.ceil(batch.eta_seconds) + " s left";
  return text;
}

function fileFigure(file, caption) {
  const src = withToken(file.url);
  return h("figure", {},
    h("a", { href: src }, h("img", { src, alt: caption, loading: "lazy" })),
    h("figcaption", { text: caption }));
}

function jobView(id) {
  let stopFollow = null;
  const seenFrames = []; // while the job runs the API names only its newest frame: the strip keeps those seen
  const status = h("span", { id: "job-status" });
  const steps = h("span", { id: "job-step" });
  const bar = h("progress", { id: "job-progress", "aria-label": "Progress" });
  const preview = h("img", { id: "job-preview", alt: "Newest preview frame", hidden: true });
  const cancel = h("button", { type: "button", id: "cancel-job", class: "danger", text: "Cancel job" });
  const fields = h("dl", { class: "facts" });
  const images = h("div", { class: "gallery", id: "job-images" });
  const frames = h("div", { class: "frames", id: "job-frames" });
  const manifest = h("pre", { id: "job-manifest", tabindex: 0 });
  const errorBox = h("p", { id: "job-error", class: "error", hidden: true });
  view.replaceChildren(
    h("p", {}, h("a", { href: "#/", text: "← All jobs" })),
    h("h2", {}, "Job ", h("code", { text: id })),
    h("div", { class: "job-head" },
      h("div", {}, fields, h("p", { class: "progress-line" }, bar, " ", steps), errorBox, cancel),
      h("figure", { class: "preview" }, preview, h("figcaption", { id: "preview-caption", text: "No preview yet" }))),
    h("section", { "aria-labelledby": "images-title" }, h("h3", { id: "images-title", text: "Images" }), images),
    h("section", { "aria-labelledby": "frames-title" }, h("h3", { id: "frames-title", text: "Frames" }), frames),
    h("section", { "aria-labelledby": "manifest-title" }, h("h3", { id: "manifest-title", text: "Manifest" }), manifest));

  function show(job) {
    status.replaceChildren(statusBadge(job.status));
    fields.replaceChildren(...[
      ["Status", status], ["Model", job.model || "—"], ["Batch", batchLink(job.batch) || "—"],
      ["Tenant", job.tenant || "default"],
    ].flatMap(([k, v]) => [h("dt", { text: k }), h("dd", {}, v)]));
    fillProgress(bar, job);
    steps.textContent = stepText(job);
    errorBox.textContent = job.error || "";
    errorBox.hidden = !job.error;
    cancel.hidden = TERMINAL.has(job.status);
    if (job.preview) {
      setImage(preview, job.preview);
      document.getElementById("preview-caption").textContent = "Newest preview: " + frameName(job.preview, 0).toLowerCase();
    }
    const files = job.files || [];
    const imageFiles = files.filter((f) => f.kind === "image");
    let frameFiles = files.filter((f) => f.kind === "frame");
    if (!job.manifest) {
      for (const f of frameFiles) if (!seenFrames.some((seen) => seen.url === f.url)) seenFrames.push(f);
      frameFiles = seenFrames;
    }
    fillGallery(images, imageFiles, (f, i) => "Image " + (i + 1),
      TERMINAL.has(job.status) ? "No images." : "Not rendered yet.");
    fillGallery(frames, frameFiles, (f, i) => frameName(f.url, i), "No frames stored.");
    manifest.textContent = job.manifest ? JSON.stringify(job.manifest, null, 2) : "Written when the job ends.";
  }

  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      show(await api("/v1/jobs/" + encodeURIComponent(id) + "/cancel", { method: "POST" }));
      say("Cancel sent for " + id + ".");
    } catch (err) {
      report(err);
    } finally {
      cancel.disabled = false;
    }
  });

  function missing(message) {
    view.replaceChildren(h("h2", { text: "No such job" }), h("p", { text: message }),
      h("p", {}, h("a", { href: "#/", text: "All jobs" })));
  }

  api("/v1/jobs/" + encodeURIComponent(id)).then((job) => {
    if (job.status === "unknown") {
      missing("Redis knows no job " + id + ": it was never submitted, or its record expired.");
      return;
    }
    show(job);
    if (!TERMINAL.has(job.status)) {
      stopFollow = follow(job, async (next) => {
        show(next);
        // The final snapshot may come before the manifest's files are listed: read the job once more.
        if (TERMINAL.has(next.status)) show(await api(next.links.self));
      });
    }
  }).catch((err) => {
    if (err instanceof ApiError && err.status === 404) {
      missing(err.message);
    } else {
      report(err);
    }
  });
  return () => stopFollow && stopFollow();
}

// Redraw a gallery only when its list of files changed, so images already shown are not fetched again.
function fillGallery(box, files, caption, empty) {
  const key = files.map((f) => f.url).join("\n");
  if (box.dataset.key === key && box.childElementCount) return;
  box.dataset.key = key;
  if (files.length) box.replaceChildren(...files.map((f, i) => fileFigure(f, caption(f, i))));
  else box.replaceChildren(h("p", { class: "muted", text: empty }));
}

function frameName(url, index) {
  // frames/step-NNN.png, or a later stage's frames/hires-step-NNN.png / frames/refiner-step-NNN.png
  const match = /(?:\/([a-z]+)-)?step-(\d+)/.exec(url || "");
  if (!match) return "Frame " + (index + 1);
  const stage = match[1] ? match[1].charAt(0).toUpperCase() + match[1].slice(1) + " step " : "Step ";
  return stage + Number(match[2]);
}

function batchView(name) {
  const summary = h("p", { id: "batch-counts", text: "Loading…" });
  const gallery = h("div", { class: "gallery", id: "batch-gallery" });
  const cancel = h("button", { type: "button", id: "cancel-batch", class: "danger", text: "Cancel batch" });
  const bar = h("progress", { id: "batch-progress", class: "wide", "aria-label": "Jobs finished" });
  view.replaceChildren(
    h("p", {}, h("a", { href: "#/", text: "← All jobs" })),
    h("h2", {}, "Batch ", h("code", { text: name })),
    h("p", {}, bar), summary, cancel,
    h("section", { "aria-labelledby": "gallery-title" }, h("h3", { id: "gallery-title", text: "Gallery" }), gallery));
  const path = "/v1/batches/" + encodeURIComponent(name);
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      await api(path + "/cancel", { method: "POST" });
      say("Cancel sent for batch " + name + ".");
    } catch (err) {
      report(err);
    } finally {
      cancel.disabled = false;
    }
  });
  const cards = new Map();
  const stop = every(LIST_POLL_MS, async () => {
    const batch = await api(path);
    const done = Object.entries(batch.counts || {}).filter(([s]) => TERMINAL.has(s)).reduce((n, [, c]) => n + c, 0);
    bar.max = batch.total || 1;
    bar.value = done;
    summary.textContent = countsText(batch);
    cancel.hidden = done >= batch.total;
    const page = await api("/v1/jobs?" + new URLSearchParams({ batch: name, limit: "200" }));
    for (const job of page.jobs) {
      const url = (job.files || []).filter((f) => f.kind === "image").map((f) => f.url)[0] || job.preview;
      let card = cards.get(job.id);
      if (!card) {
        card = h("figure", { "data-job-id": job.id },
          h("a", { href: "#/jobs/" + encodeURIComponent(job.id) }, h("img", { alt: "Job " + job.id, hidden: true })),
          h("figcaption", {}, h("code", { text: lineName(name, job.id) }), " ", h("span", { class: "state" })));
        cards.set(job.id, card);
      }
      setImage(card.querySelector("img"), url);
      card.querySelector(".state").replaceChildren(statusBadge(job.status), " ", stepText(job));
      card.dataset.status = job.status;
    }
    gallery.replaceChildren(...page.jobs.map((job) => cards.get(job.id)));
    if (!page.jobs.length) gallery.replaceChildren(h("p", { class: "muted", text: "No jobs in this batch." }));
  });
  return stop;
}

// A batch job's id is `<batch>.<line, five digits>`: the gallery names it by its line.
function lineName(batch, id) {
  const line = id.startsWith(batch + ".") ? id.slice(batch.length + 1, batch.length + 6) : "";
  return /^\d{5}$/.test(line) ? "line " + Number(line) : id.slice(0, 12);
}

function fleetView() {
  const models = h("tbody");
  const workers = h("div", { id: "workers" });
  view.replaceChildren(
    h("section", { "aria-labelledby": "models-title" },
      h("h2", { id: "models-title", text: "Models" }),
      h("table", { class: "models" },
        h("thead", {}, h("tr", {}, ["Model", "Family", "Workers"].map((c) => h("th", { scope: "col", text: c })),
          ["High", "Normal", "Low"].map((c) => h("th", { scope: "col", class: "num", text: c + " queued" })))),
        models)),
    h("section", { "aria-labelledby": "workers-title" }, h("h2", { id: "workers-title", text: "Workers" }), workers));
  return every(FLEET_POLL_MS, async () => {
    const [modelPage, workerPage] = await Promise.all([api("/v1/models"), api("/v1/workers")]);
    say("");
    models.replaceChildren(...modelPage.models.map((m) => h("tr", { "data-model": m.name },
      h("th", { scope: "row" }, h("code", { text: m.name })), h("td", { text: m.family || "" }),
      h("td", { text: (m.workers || []).join(", ") || "none" }),
      ["high", "normal", "low"].map((p) => h("td", { class: "num", text: (m.queued || {})[p] ?? 0 })))));
    const adverts = Array.isArray(workerPage) ? workerPage : workerPage.workers || [];
    workers.replaceChildren(...(adverts.length ? adverts.map(workerCard) : [h("p", { class: "muted", text: "No live workers." })]));
  });
}

const SHOWN_ELSEWHERE = new Set(["hostname", "name", "models", "loaded", "job", "step", "total", "last_seen",
  "started_at", "families", "queues", "ttl"]);

function ago(seconds) {
  if (!seconds) return "—";
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 90) return Math.round(s) + " s ago";
  if (s < 5400) return Math.round(s / 60) + " min ago";
  return (s / 3600).toFixed(1) + " h ago";
}

function workerCard(advert) {
  const name = advert.hostname || advert.name || "worker";
  const job = advert.job ? [jobLink(advert.job), advert.total ? " step " + (advert.step || 0) + " / " + advert.total : ""] : "idle";
  const rows = [
    ["Job", job],
    ["Loaded", (advert.loaded || []).join(", ") || "none"],
    ["Serves", (advert.models || []).join(", ")],
    ["Last seen", ago(advert.last_seen)],
    ["Started", ago(advert.started_at)],
  ];
  for (const [k, v] of Object.entries(advert)) {
    if (SHOWN_ELSEWHERE.has(k) || v === null || (typeof v === "object" && !Object.keys(v).length)) continue;
    rows.push([k.replaceAll("_", " "), typeof v === "object" ? (Array.isArray(v) ? v.join(", ") : JSON.stringify(v)) : String(v)]);
  }
  return h("article", { class: "worker", "data-worker": name },
    h("h3", {}, h("code", { text: name })),
    h("dl", { class: "facts" }, rows.flatMap(([k, v]) => [h("dt", { text: k }), h("dd", {}, v)])));
}

// --- routing -------------------------------------------------------------------------------------------------

function route() {
  cleanups.forEach((stop) => stop());
  cleanups = [];
  say("");
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  let section = "jobs";
  if (parts[0] === "jobs" && parts[1]) {
    cleanups.push(jobView(parts[1]));
    document.title = "Job " + parts[1] + " · Render farm";
  } else if (parts[0] === "batches" && parts[1]) {
    cleanups.push(batchView(parts[1]));
    document.title = "Batch " + parts[1] + " · Render farm";
  } else if (parts[0] === "fleet") {
    section = "fleet";
    cleanups.push(fleetView());
    document.title = "Fleet · Render farm";
  } else {
    cleanups.push(jobsView(new URLSearchParams(query || "")));
    document.title = "Jobs · Render farm";
  }
  document.querySelectorAll("[data-nav]").forEach((a) => {
    if (a.dataset.nav === section) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  });
}

// The skip link must not change the hash: the hash is the route.
document.querySelector(".skip").addEventListener("click", (event) => {
  event.preventDefault();
  view.focus();
});
forgetKey.hidden = !apiKey();
window.addEventListener("hashchange", () => {
  route();
  view.focus({ preventScroll: true });
});
route();
