// engine's pages: live updates from /v1/events, the controls (calls to /v1), the image viewer,
// the gallery's endless scroll and the submit form. No framework, no build step.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));
// The engine's vocabulary (statuses that have ended, ...), given by the page: never copied here.
const WORDS = JSON.parse(document.body.dataset.words || "{}");

function toast(text, bad = false) {
  const box = $("#toast");
  if (!box) return;
  box.textContent = text;
  box.dataset.bad = bad ? "1" : "";
  box.classList.add("shown");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => box.classList.remove("shown"), 4000);
}

// The API's errors are {code, message}: said as "CODE: message".
async function api(method, url, body) {
  const options = {method, credentials: "same-origin", headers: {}};
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(url, options);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = {code: String(response.status), message: text}; }
  if (!response.ok) {
    const error = new Error(data && data.message ? `${data.code}: ${data.message}` : `HTTP ${response.status}`);
    error.data = data;
    throw error;
  }
  return data;
}

// live updates --------------------------------------------------------------------------------

function setLive(state, text) {
  const badge = $("#live");
  if (!badge) return;
  badge.dataset.state = state;
  badge.textContent = text;
}

// One stream of events for the page. A dropped connection (the server stopped, say) is opened
// again after `after` the last event seen, so nothing is missed; what changed meanwhile is then
// fetched again whole.
class Live {
  constructor(query, onEvent, onProgress, onReconnect) {
    this.query = query;
    this.onEvent = onEvent;
    this.onProgress = onProgress;
    this.onReconnect = onReconnect;
    this.last = null;
    this.wait = 500;
    this.open();
  }

  open() {
    const params = new URLSearchParams(this.query);
    if (this.last !== null) params.set("after", this.last);
    const source = new EventSource("/v1/events" + (params.toString() ? "?" + params : ""));
    this.source = source;
    let first = true;
    source.onopen = () => {
      this.wait = 500;
      setLive("live", "live");
      if (!first || this.last !== null) this.onReconnect();
      first = false;
    };
    source.onmessage = () => {};
    source.addEventListener("progress", (message) => {
      try { this.onProgress(JSON.parse(message.data)); } catch (e) { /* a frame cut short */ }
    });
    const handle = (message) => {
      if (message.lastEventId) this.last = message.lastEventId;
      this.onEvent(message.type);
    };
    // EventSource dispatches by the frame's `event:` name: listen to every type the log holds
    // (the page lists them in <body data-events>).
    for (const name of (document.body.dataset.events || "").split(" ")) if (name) source.addEventListener(name, handle);
    source.onerror = () => {
      setLive("down", "reconnecting…");
      source.close();
      setTimeout(() => this.open(), this.wait);
      this.wait = Math.min(this.wait * 2, 5000);
    };
  }
}

function showProgress(frame) {
  const percent = Math.round(100 * Math.max(0, Math.min(1, frame.progress || 0)));
  for (const bar of $$(`[data-progress-of="${CSS.escape(frame.session_id)}"]`)) {
    bar.value = percent;
    bar.textContent = percent + "%";
  }
  for (const text of $$(`[data-message-of="${CSS.escape(frame.session_id)}"]`)) text.textContent = frame.message || "";
}

// A fragment (an element with data-fragment) is fetched again when its events say it changed:
// at most once every 250 ms, and once more if events came while it was being fetched.
function keepFresh(box) {
  let busy = false, again = false, timer = null;
  const refresh = async () => {
    timer = null;
    if (busy) { again = true; return; }
    busy = true;
    try {
      const response = await fetch(box.dataset.fragment, {credentials: "same-origin"});
      if (response.ok) {
        const open = $$("details[open]", box).map((d) => d.querySelector("summary")?.textContent);
        box.innerHTML = await response.text();
        for (const d of $$("details", box)) if (open.includes(d.querySelector("summary")?.textContent)) d.open = true;
        box.dispatchEvent(new CustomEvent("refreshed", {bubbles: true}));
      } else if (response.status === 401 || response.redirected) {
        location.reload();
      }
    } catch (e) {
      // the server is away: the event stream's reconnect fetches it again
    } finally {
      busy = false;
      if (again) { again = false; schedule(); }
    }
  };
  const schedule = () => { if (!timer) timer = setTimeout(refresh, 250); };
  return schedule;
}

function startLive() {
  for (const box of $$("[data-fragment]")) {
    const schedule = keepFresh(box);
    if (box.dataset.every) setInterval(schedule, Number(box.dataset.every));
    if (box.dataset.live !== undefined) {
      const query = box.dataset.live === "all" ? "" : box.dataset.live;
      new Live(query, schedule, showProgress, schedule);
    }
  }
}

// controls ------------------------------------------------------------------------------------

document.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  const {action, kind, target} = button.dataset;
  if (button.dataset.confirm && !confirm(button.dataset.confirm)) return;
  button.disabled = true;
  try {
    if (action === "delete") {
      await api("DELETE", `/v1/${kind}/${encodeURIComponent(target)}`);
      toast(`${target} deleted`);
      location.assign("/");
      return;
    }
    const done = await api("POST", `/v1/${kind}/${encodeURIComponent(target)}/${action}`);
    toast(`${action}: ${(done.events || []).join(", ") || "done"}`);
  } catch (error) {
    toast(error.message, true);
  } finally {
    button.disabled = false;
  }
});

// a new priority
document.addEventListener("submit", async (event) => {
  const form = event.target.closest("form[data-priority-of]");
  if (!form) return;
  event.preventDefault();
  const value = Number.parseInt(form.elements.priority.value, 10);
  try {
    const done = await api("POST", `/v1/${form.dataset.priorityOf}/priority`, {priority: value});
    toast(`priority ${value}: ${(done.events || []).join(", ")}`);
  } catch (error) {
    toast(error.message, true);
  }
});

// the image viewer ----------------------------------------------------------------------------

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-view]");
  const viewer = $("#viewer");
  if (!button || !viewer) return;
  $("#viewer-image").src = button.dataset.view;
  $("#viewer-image").alt = button.querySelector("img")?.alt || "";
  $("#viewer-parameters").textContent = button.dataset.parameters || "(no parameters in this PNG)";
  $("#viewer-link").href = button.dataset.view;
  viewer.showModal();
});

// the gallery ---------------------------------------------------------------------------------

function startGallery() {
  const grid = $("#gallery");
  if (!grid) return;
  let loading = false;
  const observer = new IntersectionObserver(async (entries) => {
    const sentinel = entries.find((e) => e.isIntersecting)?.target;
    if (!sentinel || loading) return;
    loading = true;
    observer.unobserve(sentinel);
    try {
      const response = await fetch(sentinel.dataset.next, {credentials: "same-origin"});
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const more = await response.text();
      sentinel.remove();  // in the same turn as the page after it arrives: never a moment without either
      grid.insertAdjacentHTML("beforeend", more);
      watch();
    } catch (error) {
      toast("could not load more: " + error.message, true);
      observer.observe(sentinel);  // tried again when it comes into view again
    } finally {
      loading = false;
    }
  }, {rootMargin: "800px"});
  const watch = () => { const more = $(".more", grid); if (more) observer.observe(more); };
  watch();

  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-job-of]");
    if (!button) return;
    try {
      const job = await api("GET", `/ui/sessions/${encodeURIComponent(button.dataset.jobOf)}/job?image=${button.dataset.image}`);
      $("#job-text").value = JSON.stringify(job, null, 2);
      $("#job-dialog").showModal();
      $("#job-text").select();
    } catch (error) {
      toast(error.message, true);
    }
  });
  $("#job-copy")?.addEventListener("click", async () => {
    const text = $("#job-text");
    try {
      await navigator.clipboard.writeText(text.value);
      toast("copied");
    } catch (e) {
      text.select();
      toast("selected: press Ctrl+C to copy");
    }
  });
}

// submitting ----------------------------------------------------------------------------------

function readField(input, uploads) {
  const kind = input.dataset.kind;
  if (kind === "boolean") return input.checked;
  if (kind === "image") return uploads[input.name];
  const value = input.value.trim();
  if (value === "") return undefined;
  if (kind === "integer") return Number.parseInt(value, 10);
  if (kind === "number") return Number(value);
  if (kind === "json") {
    try { return JSON.parse(value); } catch (e) { throw new Error(`${input.name}: not JSON (${e.message})`); }
  }
  return value;
}

function startSubmit() {
  const form = $("#submit-form");
  if (!form) return;
  const uploads = {};
  const preview = $("#job-preview");
  const error = $("#submit-error");

  const build = () => {
    const job = {workflow: $("#workflow").value, params: {}};
    for (const input of $$("fieldset:not([data-job]) [data-kind]", form)) {
      if (input.disabled) continue;  // a field the chosen model's family does not use
      const value = readField(input, uploads);
      if (value !== undefined && !(input.dataset.kind === "boolean" && value === false)) job.params[input.name] = value;
    }
    for (const input of $$("fieldset[data-job] [data-kind]", form)) {
      const value = readField(input, uploads);
      if (value !== undefined && value !== false) job[input.name] = value;
    }
    return job;
  };
  const show = () => {
    try {
      preview.textContent = JSON.stringify(build(), null, 2);
      error.textContent = "";
    } catch (e) {
      error.textContent = e.message;
    }
  };
  const fitFamily = familyFitter(form);
  form.addEventListener("input", show);
  form.addEventListener("change", (event) => {
    if (event.target.name === "model") fitFamily();
    show();
  });
  fitFamily();

  for (const input of $$("input[data-kind=image]", form)) {
    input.addEventListener("change", async () => {
      const note = $(`[data-upload-of="${input.name}"]`);
      delete uploads[input.name];
      const file = input.files[0];
      if (!file) { show(); return; }
      note.textContent = "uploading…";
      const body = new FormData();
      body.append("file", file);
      try {
        const response = await fetch("/v1/uploads", {method: "POST", body, credentials: "same-origin"});
        const data = await response.json();
        if (!response.ok) throw new Error(`${data.code}: ${data.message}`);
        uploads[input.name] = data.path;
        note.textContent = "uploaded as " + data.path;
      } catch (e) {
        note.textContent = "";
        error.textContent = e.message;
      }
      show();
    });
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    let job;
    try { job = build(); } catch (e) { error.textContent = e.message; return; }
    const button = $("#submit-button");
    button.disabled = true;
    error.textContent = "";
    try {
      const made = await api("POST", "/v1/jobs", job);
      following(made);
    } catch (e) {
      error.textContent = e.message;
    } finally {
      button.disabled = false;
    }
  });
  show();
}

// The form fitted to the chosen model's family: the fields it does not use hidden (and not sent),
// its defaults as placeholders, its schedulers alone, its size grid as the size fields' step.
function familyFitter(form) {
  const data = JSON.parse($("#model-forms").textContent);
  const note = $("#model-family");
  return () => {
    const chosen = form.elements.model ? form.elements.model.value : "";
    const fit = data.models[chosen || data.default];
    if (!fit) { note.textContent = ""; return; }
    note.textContent = `${chosen || data.default}: ${fit.family}`;
    for (const box of $$("[data-field]", form)) {
      const unused = fit.unused.includes(box.dataset.field);
      box.hidden = unused;
      for (const input of $$("[data-kind]", box)) input.disabled = unused;
    }
    for (const [name, value] of Object.entries(fit.defaults)) {
      const input = form.elements[name];
      if (input && input.form === form) input.placeholder = value;
    }
    for (const name of ["width", "height"]) {
      if (form.elements[name]) form.elements[name].step = fit.size_multiple;
    }
    const scheduler = form.elements.scheduler;
    if (scheduler) {
      for (const option of scheduler.options) {
        const allowed = option.value === "" || fit.schedulers.includes(option.value);
        option.hidden = !allowed;
        option.disabled = !allowed;
      }
      if (scheduler.selectedOptions[0] && scheduler.selectedOptions[0].disabled) scheduler.value = "";
    }
  };
}

// The submitted job's progress and, once it ends, its images, in place.
function following(made) {
  const box = $("#submit-result");
  const id = made.session_id || made.batch_id;
  const kind = made.session_id ? "sessions" : "batches";
  const page = made.session_id ? `/sessions/${id}` : `/batches/${id}`;
  box.innerHTML = "";
  const title = document.createElement("h2");
  const link = document.createElement("a");
  link.href = page;
  link.textContent = made.job_id || id;
  title.append("Submitted: ", link);
  const status = document.createElement("p");
  status.className = "status-line";
  status.textContent = made.status;
  const bar = document.createElement("progress");
  bar.max = 100;
  bar.value = 0;
  bar.dataset.progressOf = id;
  bar.setAttribute("aria-label", "progress");
  const message = document.createElement("span");
  message.className = "msg";
  message.dataset.messageOf = id;
  const images = document.createElement("div");
  images.className = "grid";
  box.append(title, status, bar, message, images);

  let ended = false;
  const look = async () => {
    if (ended) return;
    try {
      const report = await api("GET", `/v1/${kind}/${encodeURIComponent(id)}`);
      status.textContent = report.status + (report.error ? ` (${report.error.code}: ${report.error.message})` : "");
      status.dataset.status = report.status;
      bar.value = Math.round(100 * (report.progress || 0));
      if (WORDS.ended.includes(report.status) && (kind === "batches" || report.images.length || report.status !== "completed")) {
        ended = true;
        bar.value = 100;
        message.textContent = "";  // the last progress words are the step's, not the session's end
        (report.images || []).forEach((path, number) => {
          const a = document.createElement("a");
          a.href = `/v1/sessions/${id}/images/${number}`;
          const img = document.createElement("img");
          img.src = `/v1/sessions/${id}/images/${number}/thumbnail`;
          img.alt = `image ${number} of ${made.job_id || id}`;
          img.className = "result";
          a.append(img);
          images.append(a);
        });
      }
    } catch (e) {
      status.textContent = e.message;
    }
  };
  const schedule = keepFreshFn(look);
  new Live(`${kind === "sessions" ? "session" : "batch"}=${encodeURIComponent(id)}`, schedule, showProgress, schedule);
  look();
}

function keepFreshFn(fn) {
  let timer = null;
  return () => { if (!timer) timer = setTimeout(() => { timer = null; fn(); }, 150); };
}

document.addEventListener("DOMContentLoaded", () => {
  startLive();
  startGallery();
  startSubmit();
});
