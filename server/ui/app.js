// sitefit's web page: plain JavaScript, no framework, nothing loaded from outside this server.
//
// The API key is entered once and kept in sessionStorage (this tab only); every API call
// sends it as "Authorization: Bearer KEY". Results (preview, masks, report, SEG) are fetched
// with the key too and handed to the browser as blob: URLs, since <img> and <a> cannot send
// headers. Every string from the server reaches the page as text (textContent, text nodes,
// attribute values), never as HTML.
"use strict";

const KEY_STORAGE = "sitefit.api-key";
const PAGE_SIZE = 20;
const ACTIVE = new Set(["queued", "running"]);
const JOB_ID = /^[0-9a-f]{32}$/;
const SITE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
const POLL_JOB_MS = 1000; // the open job, while it is queued or running
const POLL_LIST_ACTIVE_MS = 2000; // the job list, while any job on it is active
const POLL_LIST_IDLE_MS = 15000; // the job list otherwise (PACS jobs arrive unattended)
// the API's root: the page is served at <root>/ui/, so this works behind a path prefix too
const API_ROOT = new URL("../", document.baseURI);

const state = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  offset: 0,
  listTimer: 0,
  listAsked: 0, // bumped on every job list request: only the latest answer is shown
  sitesAsked: 0, // the same for the site list
  jobTimer: 0,
  selected: null, // id of the job shown
  lastStatus: null, // its status at the last poll
  shown: 0, // bumped on every job switch: late answers for the previous job are dropped
  resultsFor: null, // the job whose preview and downloads are on the page
  blobUrls: [], // blob: URLs of the job shown, revoked when another job is shown
};

const MODES = {
  auto: "the site's weights when they are self-consistent on this scan, else adapt",
  adapt: "refine on this scan, from the site's weights; may save the site's next version",
  cached: "the site's latest weights as they are (the base model if it has none)",
  none: "the base model, no adaptation",
};

const $ = (id) => document.getElementById(id);

// ---- DOM helpers: text only ---------------------------------------------------------------

// el("td", {className: "x"}, "text", childNode, ...): strings become text nodes
function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "className") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

function fill(node, ...children) {
  node.replaceChildren();
  append(node, children);
}

// a live region is re-announced when its text is set again: set it only when it changes
function say(node, text) {
  if (node.textContent !== text) node.textContent = text;
}

function show(node, visible) {
  node.hidden = !visible;
}

function number(value, digits = 3) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "–";
}

function when(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  const shown = Number.isNaN(date.valueOf()) ? iso
    : date.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
  return el("time", { datetime: iso }, shown);
}

function badge(text, kind) {
  return el("span", { className: `badge badge-${kind || text}` }, text);
}

function facts(pairs) {
  const list = [];
  for (const [term, value] of pairs) {
    if (value === null || value === undefined || value === "") continue;
    list.push(el("dt", {}, term), el("dd", {}, value));
  }
  return list;
}

// ---- the API --------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

function apiUrl(path) {
  return new URL(path.replace(/^\/+/, ""), API_ROOT);
}

// fetch with the key; a non-2xx answer throws ApiError carrying the server's one-line detail
async function call(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (state.key) headers.set("Authorization", `Bearer ${state.key}`);
  let response;
  try {
    response = await fetch(apiUrl(path), { ...options, headers, cache: "no-store" });
  } catch {
    throw new ApiError(0, "the server cannot be reached");
  }
  if (!response.ok) throw new ApiError(response.status, await detailOf(response));
  return response;
}

async function callJson(path, options) {
  return (await call(path, options)).json();
}

async function detailOf(response) {
  try {
    const body = await response.json();
    if (body && typeof body.detail === "string") return body.detail;
  } catch {
    // not JSON: fall back to the status line
  }
  return `HTTP ${response.status} ${response.statusText}`.trim();
}

// an error of a background refresh: a missing or wrong key is said once, at the top
function complain(error) {
  if (error instanceof ApiError && error.status === 401) {
    notice(state.key ? `The API key was refused: ${error.message}` :
      "This server needs an API key: enter it above.");
  } else {
    notice(error.message || String(error));
  }
}

function notice(text) {
  fill($("notice"), text || "");
  show($("notice"), Boolean(text));
}

// ---- key --------------------------------------------------------------------------------------

function showKeyState() {
  say($("key-state"), state.key ? "key in use (this tab only)" : "no key");
}

function useKey(key) {
  state.key = key;
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  $("key").value = "";
  showKeyState();
  notice("");
  closeJob();
  fill($("site-detail"));
  state.offset = 0;
  loadAll();
}

// ---- models and sites -----------------------------------------------------------------------

async function loadModels() {
  const select = $("upload-model");
  const chosen = select.value;
  const body = await callJson("v1/models");
  const options = [];
  for (const model of body.models) {
    const classes = Object.entries(model.latest.classes)
      .filter(([label]) => label !== "0")
      .map(([, name]) => name)
      .join(", ");
    options.push(el("option", { value: model.name },
      `${model.name} (v${model.latest.version}${classes ? `: ${classes}` : ""})`));
    for (const version of [...model.versions].reverse()) {
      if (version === model.latest.version) continue;
      const value = `${model.name}@${version}`;
      options.push(el("option", { value }, value));
    }
  }
  fill(select, options);
  if (chosen && [...select.options].some((option) => option.value === chosen)) {
    select.value = chosen;
  }
}

async function loadSites() {
  const asked = ++state.sitesAsked;
  const body = await callJson("v1/sites");
  if (asked !== state.sitesAsked) return;
  fill($("site-options"), body.sites.map((entry) => el("option", { value: entry.site })));
  fill($("sites-body"), body.sites.map((entry) => el("tr", {
    onclick: (event) => { if (!event.target.closest("button")) showSite(entry.site); },
  },
    el("td", {}, el("button", {
      type: "button", className: "link", dataset: { site: entry.site },
      "aria-label": `Versions of site ${entry.site}`,
      onclick: () => showSite(entry.site),
    }, entry.site)),
    el("td", {}, entry.models.join(", ")))));
  show($("sites-empty"), body.sites.length === 0);
  show($("sites-table"), body.sites.length > 0);
}

async function showSite(site) {
  const box = $("site-detail");
  if (!SITE.test(site)) return;
  fill(box, el("p", { className: "muted" }, "Loading…"));
  let detail;
  try {
    detail = await callJson(`v1/sites/${encodeURIComponent(site)}`);
  } catch (error) {
    fill(box, el("p", { className: "error", role: "alert" }, error.message));
    return;
  }
  const parts = [el("h3", {}, `Site ${detail.site}`)];
  for (const [model, versions] of Object.entries(detail.models)) {
    parts.push(el("h4", {}, `Model ${model}`));
    parts.push(el("table", { className: "listing" },
      el("caption", { className: "visually-hidden" }, `Versions of ${model} at ${detail.site}`),
      el("thead", {}, el("tr", {},
        ["Version", "Saved", "Scans", "Self-consistency", "Epochs", "Saved by"]
          .map((name) => el("th", { scope: "col" }, name)))),
      el("tbody", {}, [...versions].reverse().map((version) => el("tr", {},
        el("td", { title: `base model sha256 ${version.base_sha256}` }, `v${version.version}`,
          version.base_version ? ` (base v${version.base_version})` : "",
          version.rolled_back_from ? `, rollback of v${version.rolled_back_from}` : ""),
        el("td", {}, when(version.created)),
        el("td", { className: "num" }, String(version.scans_refined)),
        el("td", { className: "num" },
          `${number(version.self_consistency_before)} → ${number(version.self_consistency_after)}`),
        el("td", { className: "num" }, String(version.refinement_epochs)),
        el("td", {}, jobButton(version.job_id)))))));
    for (const bad of detail.unreadable[model] || []) {
      parts.push(el("p", { className: "error" }, `v${bad.version} unreadable: ${bad.reason}`));
    }
  }
  fill(box, parts);
}

function jobButton(jobId) {
  if (!jobId || !JOB_ID.test(jobId)) return jobId ? el("code", {}, jobId) : "CLI";
  return el("button", {
    type: "button", className: "link", "aria-label": `Open job ${jobId}`,
    onclick: () => openJob(jobId),
  }, el("code", {}, jobId.slice(0, 8)));
}

// ---- upload ------------------------------------------------------------------------------------

async function upload(event) {
  event.preventDefault();
  const error = $("upload-error");
  show(error, false);
  const file = $("upload-file").files[0];
  if (!file) {
    fill(error, "Choose a scan file first.");
    show(error, true);
    return;
  }
  const form = new FormData();
  form.append("file", file, file.name); // the server reads the kind from the name's suffix
  form.append("model", $("upload-model").value);
  const site = $("upload-site").value.trim();
  if (site) form.append("site", site);
  form.append("mode", $("upload-mode").value);
  const button = $("upload-submit");
  button.disabled = true;
  fill($("upload-status"), "Uploading…");
  try {
    const created = await callJson("v1/jobs", { method: "POST", body: form });
    fill($("upload-status"), `Job ${created.id.slice(0, 8)} queued.`);
    $("upload-file").value = "";
    state.offset = 0;
    openJob(created.id);
    refreshJobs();
  } catch (failure) {
    fill($("upload-status"));
    const status = failure instanceof ApiError && failure.status ? ` (HTTP ${failure.status})` : "";
    fill(error, el("strong", {}, `Upload refused${status}: `), failure.message);
    show(error, true);
  } finally {
    button.disabled = false;
  }
}

// ---- the job list ------------------------------------------------------------------------------

async function refreshJobs() {
  clearTimeout(state.listTimer);
  const params = new URLSearchParams({ limit: PAGE_SIZE, offset: state.offset });
  const status = $("filter-status").value;
  const site = $("filter-site").value.trim();
  if (status) params.set("status", status);
  if (site) params.set("site", site);
  const asked = ++state.listAsked;
  let active = false;
  try {
    const body = await callJson(`v1/jobs?${params}`);
    if (asked !== state.listAsked) return; // a newer request (another key, page or filter)
    renderJobs(body);
    active = body.jobs.some((job) => ACTIVE.has(job.status));
    notice("");
  } catch (error) {
    if (asked !== state.listAsked) return;
    complain(error);
  }
  const delay = active ? POLL_LIST_ACTIVE_MS : POLL_LIST_IDLE_MS;
  state.listTimer = setTimeout(() => {
    if (document.visibilityState === "visible") refreshJobs();
    else state.listTimer = setTimeout(refreshJobs, delay);
  }, delay);
}

function renderJobs(body) {
  fill($("jobs-body"), body.jobs.map((job) => el("tr", {
    dataset: { jobId: job.id },
    className: job.id === state.selected ? "selected" : null,
    onclick: (event) => { if (!event.target.closest("button")) openJob(job.id); },
  },
  el("td", {}, el("button", {
    type: "button", className: "link", "aria-label": `Open job ${job.id}`,
    onclick: () => openJob(job.id),
  }, el("code", {}, job.id.slice(0, 8)))),
  el("td", {}, badge(job.status)),
  el("td", {}, job.model),
  el("td", {}, job.site || "–"),
  el("td", {}, job.mode),
  el("td", {}, when(job.created_at)))));
  show($("jobs-empty"), body.total === 0);
  show($("jobs-table"), body.total > 0);
  const first = body.total ? body.offset + 1 : 0;
  const last = body.offset + body.jobs.length;
  fill($("jobs-range"), body.total ? `${first}–${last} of ${body.total}` : "");
  $("jobs-newer").disabled = body.offset === 0;
  $("jobs-older").disabled = last >= body.total;
}

function page(step) {
  state.offset = Math.max(0, state.offset + step * PAGE_SIZE);
  refreshJobs();
}

// ---- one job -------------------------------------------------------------------------------

function releaseResults() {
  for (const url of state.blobUrls) URL.revokeObjectURL(url);
  state.blobUrls = [];
  state.resultsFor = null;
  const image = $("job-preview-image");
  image.removeAttribute("src");
  show($("job-preview"), false);
  fill($("job-preview-caption"));
  fill($("job-downloads"));
}

function closeJob() {
  clearTimeout(state.jobTimer);
  state.selected = null;
  state.lastStatus = null;
  state.shown += 1;
  releaseResults();
  show($("job"), false);
}

function openJob(id) {
  if (!JOB_ID.test(id)) return;
  closeJob();
  state.selected = id;
  fill($("job-id"), id);
  fill($("job-state"), "Loading…");
  for (const name of ["job-facts", "job-progress", "job-verdict", "job-outcome", "job-status"]) {
    fill($(name));
  }
  show($("job-error"), false);
  show($("job"), true);
  for (const row of $("jobs-body").rows) row.classList.toggle("selected", row.dataset.jobId === id);
  refreshJob(state.shown);
}

async function refreshJob(shown) {
  const id = state.selected;
  let job;
  try {
    job = await callJson(`v1/jobs/${id}`);
  } catch (error) {
    if (shown !== state.shown) return;
    fill($("job-state"), error instanceof ApiError && error.status === 404
      ? "This job no longer exists (deleted, or past its retention)." : error.message);
    if (!(error instanceof ApiError) || error.status === 0 || error.status >= 500) {
      state.jobTimer = setTimeout(() => refreshJob(shown), POLL_JOB_MS * 3);
    }
    return;
  }
  if (shown !== state.shown) return; // another job was opened meanwhile
  const ended = !ACTIVE.has(job.status) && state.lastStatus !== null
    && ACTIVE.has(state.lastStatus);
  state.lastStatus = job.status;
  renderJob(job);
  if (ended) refreshJobs(); // the list shows the new status at once
  if (ACTIVE.has(job.status)) {
    state.jobTimer = setTimeout(() => refreshJob(shown), POLL_JOB_MS);
  } else if (job.status === "finished" && state.resultsFor !== job.id) {
    state.resultsFor = job.id;
    loadPreview(job, shown);
    renderDownloads(job);
    if (job.report && job.report.site_weights && job.report.site_weights.saved_version) {
      loadSites().catch(complain); // the job saved a site version
    }
  }
}

function renderJob(job) {
  const status = $("job-status");
  status.className = `badge badge-${job.status}`;
  fill(status, job.status);
  const progress = job.progress || {};
  const running = `Running: ${progress.stage || "starting"}`
    + (progress.epoch ? `, epoch ${progress.epoch}` : "");
  const stage = ACTIVE.has(job.status)
    ? (job.status === "queued" ? "Waiting in the queue" : running)
    : `${job.status[0].toUpperCase()}${job.status.slice(1)}`
      + (job.ended_at ? ` ${new Date(job.ended_at).toLocaleString()}` : "");
  say($("job-state"), stage);
  const report = job.report;
  fill($("job-facts"), facts([
    ["Model", report ? `${report.model.name} v${report.model.version}` : job.model],
    ["Site", job.site ? `${job.site}${job.site_source && job.site_source !== "request"
      ? ` (from the ${job.site_source})` : ""}` : "none"],
    ["Mode", report && report.mode_used !== job.mode
      ? `${job.mode} → ${report.mode_used}` : job.mode],
    ["Input", `${job.source_format === "dicom" ? "DICOM series" : "NIfTI"}`
      + (job.origin === "pacs" ? ` from the PACS${job.route ? ` (route ${job.route})` : ""}` : "")],
    ["Created", when(job.created_at)],
    ["Ended", job.ended_at ? when(job.ended_at) : null],
    ["Attempt", progress.attempt > 1 ? `${progress.attempt}${progress.note
      ? `: ${progress.note}` : ""}` : null],
    ...(report ? reportFacts(report) : []),
  ]));
  const error = $("job-error");
  if (job.error && (job.status === "failed" || job.status === "canceled")) {
    fill(error, el("strong", {}, job.status === "failed" ? "Failed: " : "Canceled: "), job.error);
    show(error, true);
  } else {
    show(error, false);
  }
  renderProgress(job);
  fill($("job-verdict"), report ? verdicts(report) : []);
  fill($("job-outcome"), report ? figures(report) : []);
}

function renderProgress(job) {
  const box = $("job-progress");
  const report = job.report;
  const trace = report ? report.refinement.dice_trace : (job.progress || {}).dice_trace || [];
  if (!trace.length) {
    fill(box, ACTIVE.has(job.status)
      ? el("p", { className: "muted" }, "No refinement epoch yet.") : []);
    return;
  }
  const label = "Dice of the early head's mask vs the final mask, per refinement step"
    + (report && report.refinement.best_epoch ? " (bold: the step kept)" : "");
  fill(box, el("div", { className: "trace" },
    el("h3", {}, "Dice trace"),
    el("p", { className: "muted" }, label),
    trace.length > 1 ? sparkline(trace, report ? report.refinement.best_epoch : null) : null,
    el("ol", { className: "trace-values" }, trace.map((value, index) => el("li", {
      className: report && report.refinement.best_epoch === index + 1 ? "best" : null,
    }, number(value))))));
}

// a small line of the trace; the values are also listed as text next to it
function sparkline(values, best) {
  const svgNs = "http://www.w3.org/2000/svg";
  const width = 160;
  const height = 40;
  const pad = 4;
  const svg = document.createElementNS(svgNs, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("class", "sparkline");
  svg.setAttribute("aria-hidden", "true");
  const x = (index) => pad + (values.length === 1 ? (width - 2 * pad) / 2
    : index * (width - 2 * pad) / (values.length - 1));
  const y = (value) => height - pad - Math.max(0, Math.min(1, value)) * (height - 2 * pad);
  const line = document.createElementNS(svgNs, "polyline");
  line.setAttribute("points", values.map((value, index) => `${x(index)},${y(value)}`).join(" "));
  svg.append(line);
  values.forEach((value, index) => {
    const dot = document.createElementNS(svgNs, "circle");
    dot.setAttribute("cx", String(x(index)));
    dot.setAttribute("cy", String(y(value)));
    dot.setAttribute("r", best === index + 1 ? "3.5" : "2");
    if (best === index + 1) dot.setAttribute("class", "best");
    svg.append(dot);
  });
  return svg;
}

function verdictBox(title, verdict, reason, kind) {
  return el("div", { className: `verdict verdict-${kind}` },
    el("span", { className: "verdict-title" }, title),
    badge(verdict, verdict),
    reason ? el("span", { className: "verdict-reason" }, reason) : null);
}

function reportFacts(report) {
  const weights = report.site_weights || {};
  return [
    ["Site version used", weights.used_version ? `v${weights.used_version}` : null],
    ["Site version saved", weights.saved_version ? `v${weights.saved_version}` : null],
    ["Site weights", weights.save_reason],
    ["Time", `${number(report.timings_s.total, 1)} s on ${report.device}`],
  ];
}

// the verdict first: the quality check's when the report has one, and the guard's
function verdicts(report) {
  const parts = [];
  if (report.qc && report.qc.verdict) {
    parts.push(verdictBox("Quality check", report.qc.verdict, report.qc.reason, "qc"));
  }
  if (report.guard) {
    parts.push(verdictBox("Guard", report.guard.verdict, report.guard.reason, "guard"));
  }
  if (report.mode_reason) {
    parts.push(el("p", { className: "muted" }, `Mode ${report.mode_used}: ${report.mode_reason}`));
  }
  return parts;
}

function figures(report) {
  const parts = [el("h3", {}, "Key figures")];
  const rows = [
    ["Self-consistency before", report.self_consistency.before],
    ["Self-consistency after", report.self_consistency.after],
    ["Agreement base vs adapted", report.agreement_base_vs_adapted],
  ];
  if (report.reference) {
    rows.push(["Reference: base model", report.reference.before]);
    rows.push(["Reference: output", report.reference.after]);
  }
  parts.push(el("table", { className: "figures" },
    el("caption", {}, `Surface Dice at ${number(report.tolerance_mm, 1)} mm. Self-consistency: `
      + "the early head's mask vs the final mask; agreement: the base model's mask vs the output."),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Figure"),
      el("th", { scope: "col" }, "Surface Dice"), el("th", { scope: "col" }, "Dice"))),
    el("tbody", {}, rows.map(([name, overlap]) => el("tr", {},
      el("th", { scope: "row" }, name),
      el("td", { className: "num" }, number(overlap && overlap.surface_dice)),
      el("td", { className: "num" }, number(overlap && overlap.dice)))))));
  if (report.per_class) {
    parts.push(el("table", { className: "figures" },
      el("caption", {}, "Per class (Dice)"),
      el("thead", {}, el("tr", {}, ["Class", "Self-consistency before → after",
        "Base vs adapted"].map((name) => el("th", { scope: "col" }, name)))),
      el("tbody", {}, Object.entries(report.per_class).map(([name, figures]) => el("tr", {},
        el("th", { scope: "row" }, name),
        el("td", { className: "num" }, `${number(figures.self_consistency.before.dice)} → `
          + number(figures.self_consistency.after.dice)),
        el("td", { className: "num" }, number(figures.agreement_base_vs_adapted.dice)))))));
  }
  if (report.warnings && report.warnings.length) {
    parts.push(el("ul", { className: "warnings" },
      report.warnings.map((warning) => el("li", {}, warning))));
  }
  return parts;
}

// ---- results: fetched with the key, shown and saved through blob: URLs --------------------------

function keep(blob) {
  const url = URL.createObjectURL(blob);
  state.blobUrls.push(url);
  return url;
}

async function loadPreview(job, shown) {
  const figure = $("job-preview");
  const caption = $("job-preview-caption");
  try {
    const blob = await (await call(`v1/jobs/${job.id}/preview.png`)).blob();
    if (shown !== state.shown) return;
    $("job-preview-image").src = keep(blob);
    fill(caption, "Slices along the model's slice axis: the mask's outline per class; the base "
      + "model's outline dashed in magenta where it differs.");
  } catch (error) {
    if (shown !== state.shown) return;
    fill(caption, `No preview: ${error.message}`);
  }
  show(figure, true);
}

function renderDownloads(job) {
  const id = job.id;
  const links = [
    ["Mask (.nii.gz)", `v1/jobs/${id}/mask`, `${id}_mask.nii.gz`],
    ["Base model mask (.nii.gz)", `v1/jobs/${id}/mask?variant=base`, `${id}_mask_base.nii.gz`],
    ["Report (.json)", `v1/jobs/${id}/report`, `${id}_report.json`],
  ];
  if (job.links && job.links.seg) {
    links.push(["DICOM SEG (.dcm)", `v1/jobs/${id}/seg`, `${id}_seg.dcm`]);
  }
  fill($("job-downloads"), el("h3", {}, "Downloads"), el("ul", { className: "downloads" },
    links.map(([label, path, name]) => el("li", {}, el("a", {
      href: apiUrl(path).href, className: "download", download: name, dataset: { path },
      onclick: download,
    }, label)))));
}

// first click: fetch with the key, point the link at the blob, and click it again, which
// saves it; later clicks save the same blob without another request
async function download(event) {
  const link = event.currentTarget;
  if (link.dataset.ready === "true") return;
  event.preventDefault();
  if (link.getAttribute("aria-busy") === "true") return;
  link.setAttribute("aria-busy", "true");
  const shown = state.shown;
  try {
    const blob = await (await call(link.dataset.path)).blob();
    if (shown !== state.shown) return;
    link.href = keep(blob);
    link.dataset.ready = "true";
    link.click();
  } catch (error) {
    if (shown !== state.shown) return;
    link.after(el("span", { className: "error", role: "alert" }, ` ${error.message}`));
  } finally {
    link.removeAttribute("aria-busy");
  }
}

// ---- start -------------------------------------------------------------------------------------

function loadAll() {
  loadModels().catch(complain);
  loadSites().catch(complain);
  refreshJobs();
}

function start() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    useKey($("key").value.trim());
  });
  $("key-forget").addEventListener("click", () => useKey(""));
  $("upload-form").addEventListener("submit", upload);
  const mode = $("upload-mode");
  const explainMode = () => {
    fill($("upload-mode-help"), `Mode ${mode.value}: ${MODES[mode.value]}`);
  };
  mode.addEventListener("change", explainMode);
  explainMode();
  $("jobs-filter").addEventListener("submit", (event) => {
    event.preventDefault();
    state.offset = 0;
    refreshJobs();
  });
  $("filter-status").addEventListener("change", () => {
    state.offset = 0;
    refreshJobs();
  });
  $("jobs-newer").addEventListener("click", () => page(-1));
  $("jobs-older").addEventListener("click", () => page(1));
  $("sites-refresh").addEventListener("click", () => loadSites().catch(complain));
  showKeyState();
  loadAll();
}

start();
