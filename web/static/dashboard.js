// The dashboard: vibed's own first app. It uses the public API through the browser SDK
// (firstParty: the server's own login, tokens in memory), like any client; nothing here has a
// private shortcut. Data is always put on the page as text (textContent, text nodes), never as
// markup. docs/dashboard.md describes what each view does.

import { createVibe, VibeError } from "/sdk/vibe.js";

const vibe = createVibe({ server: location.origin, scopes: [], firstParty: true });
const $ = (id) => document.getElementById(id);
const VIEWS = ["identity", "data", "files", "apps", "sessions", "security", "export", "delete"];
const COLLECTION = /^[a-z][a-z0-9_-]{0,63}$/;
const PAGE_SIZE = 20;

// -- small helpers ------------------------------------------------------------------------------

/** An element with attributes, listeners ("on..." functions) and children (strings = text). */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("on") && typeof value === "function") node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function show(node, visible = true) {
  node.hidden = !visible;
}

function say(node, text, visible = true) {
  node.textContent = text || "";
  node.hidden = !visible || !text;
}

const UNITS = ["bytes", "KB", "MB", "GB", "TB"];
function bytes(n) {
  if (typeof n !== "number" || !Number.isFinite(n)) return "?";
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${n} ${n === 1 ? "byte" : "bytes"}` : `${value.toFixed(value < 10 ? 1 : 0)} ${UNITS[unit]}`;
}

function when(iso) {
  if (!iso) return "never";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
}

const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
function ago(iso) {
  if (!iso) return "never";
  const seconds = (new Date(iso).getTime() - Date.now()) / 1000;
  if (!Number.isFinite(seconds)) return String(iso);
  for (const [unit, size] of [["year", 31536000], ["month", 2592000], ["day", 86400], ["hour", 3600], ["minute", 60]]) {
    if (Math.abs(seconds) >= size) return relative.format(Math.round(seconds / size), unit);
  }
  return "just now";
}

/** What to tell a person about an error, in words they can act on. */
function explain(error) {
  if (!(error instanceof VibeError)) return `Something went wrong: ${error && error.message ? error.message : error}. Reload the page and try again.`;
  if (error.status === 0) return "The server cannot be reached. Check your connection, then try again.";
  if (error.status === 429) {
    const wait = Number(error.body && error.body.retryAfter) || 60;
    const minutes = Math.ceil(wait / 60);
    return `Too many attempts. Try again in ${minutes === 1 ? "a minute" : `${minutes} minutes`}.`;
  }
  if (error.status === 503) return "The server cannot reach its storage right now. Wait a moment, then try again.";
  if (error.status === 401) return "Your session has ended. Reload the page to log in again.";
  return error.message || `The server answered ${error.status}.`;
}

function banner(text, bad = false) {
  const node = $("banner");
  node.className = bad ? "notice bad" : "notice";
  say(node, text);
}

function busy(button, text) {
  const label = button.textContent;
  button.disabled = true;
  if (text) button.textContent = text;
  return () => {
    button.disabled = false;
    button.textContent = label;
  };
}

// -- start and routing --------------------------------------------------------------------------

const enter = {};
let currentView = null;
let leaveCurrent = null;

function route(focus) {
  const [head, ...rest] = location.hash.replace(/^#/, "").split("/");
  const view = VIEWS.includes(head) ? head : "identity";
  if (currentView !== view) {
    if (leaveCurrent) leaveCurrent();
    leaveCurrent = null;
    say($("banner"), ""); // a message belongs to the view it was said in
  }
  currentView = view;
  for (const name of ["loading", ...VIEWS]) show($(`view-${name}`), name === view);
  for (const link of document.querySelectorAll("nav.sections a")) {
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${$(`h-${view}`).textContent} · Vibe Cloud`;
  if (focus) $(`h-${view}`).focus();
  const args = rest.map((part) => {
    try {
      return decodeURIComponent(part);
    } catch {
      return "";
    }
  });
  Promise.resolve(enter[view](...args)).catch((error) => banner(explain(error), true));
}

async function start() {
  $("loading-text").textContent = "Loading your dashboard…";
  show($("loading-actions"), false);
  const state = await vibe.init();
  if (state !== "logged-in") {
    if (vibe.lastError) {
      $("loading-text").textContent = explain(vibe.lastError);
      show($("loading-actions"));
      return;
    }
    await vibe.login({ returnTo: location.pathname + location.hash });
    return;
  }
  fillIdentity(vibe.identity);
  show($("logout"));
  window.addEventListener("hashchange", () => route(true));
  route(false);
}

let deleting = false; // this tab's own deletion redirects by itself (it knows "pending")

vibe.on("state", (state, info) => {
  if (state !== "logged-out") return;
  if (info.reason === "deleted") {
    if (!deleting) location.replace("/?deleted=1");
  }
  else if (info.reason === "logout") location.replace("/?loggedout=1");
  else if (info.reason === "revoked") {
    banner("Your session has ended (it was logged out from elsewhere, or your password changed). Reload the page to log in again.", true);
  }
});

$("retry").addEventListener("click", () => start());
$("logout").addEventListener("click", async () => {
  busy($("logout"), "Logging out…");
  await vibe.logout();
});

// -- identity -------------------------------------------------------------------------------------

function fillIdentity(identity) {
  if (!identity) return;
  $("who").textContent = identity.email || identity.id;
  $("id-email").textContent = identity.email || "";
  $("id-did").textContent = identity.did || "";
  $("id-created").textContent = when(identity.createdAt);
  $("id-id").textContent = identity.id;
}

enter.identity = () => {};

$("copy-did").addEventListener("click", async () => {
  const text = $("id-did").textContent;
  try {
    await navigator.clipboard.writeText(text);
    $("copy-result").textContent = "Copied.";
  } catch {
    const range = document.createRange();
    range.selectNodeContents($("id-did"));
    const selection = getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    $("copy-result").textContent = "Selected: press Ctrl+C (or ⌘C) to copy.";
  }
  setTimeout(() => {
    $("copy-result").textContent = "";
  }, 4000);
});

// -- data ------------------------------------------------------------------------------------------

const data = {
  name: null,
  selector: null,
  bookmarks: [null],
  page: 0,
  next: null,
  stop: null,
  timer: null,
  doc: null, // the document open in the viewer
  editing: false,
  creating: false,
};

async function loadCollections() {
  const list = await vibe.account.collections();
  const items = list.map((c) =>
    el(
      "li",
      {},
      el(
        "button",
        {
          type: "button",
          "aria-current": c.name === data.name ? "true" : null,
          onclick: () => {
            location.hash = `#data/${encodeURIComponent(c.name)}`;
          },
        },
        el("span", {}, c.name),
        el("span", { class: "count", "aria-label": `${c.count} documents` }, String(c.count)),
      ),
    ),
  );
  $("collections").replaceChildren(...items);
  show($("collections-empty"), list.length === 0);
  return list;
}

function preview(doc) {
  const parts = [];
  for (const [key, value] of Object.entries(doc)) {
    if (key === "_id" || key === "_rev") continue;
    parts.push(`${key}: ${typeof value === "string" ? value : JSON.stringify(value)}`);
    if (parts.length === 3) break;
  }
  return parts.join(" · ") || "(empty)";
}

async function loadPage() {
  const collection = vibe.collection(data.name);
  const options = { limit: PAGE_SIZE, bookmark: data.bookmarks[data.page] };
  say($("query-error"), "");
  $("docs-status").textContent = "Loading…";
  let page;
  try {
    page = data.selector ? await collection.query(data.selector, options) : await collection.list(options);
  } catch (error) {
    $("docs-status").textContent = "";
    if (data.selector && error instanceof VibeError && error.status === 400) {
      say($("query-error"), `The server refused this query: ${error.message}`);
      return;
    }
    throw error;
  }
  data.next = page.bookmark;
  const items = page.docs.map((doc) =>
    el(
      "li",
      {},
      el(
        "button",
        { type: "button", onclick: () => openDoc(doc._id) },
        el("span", { class: "doc-id" }, doc._id),
        el("span", { class: "doc-preview" }, preview(doc)),
      ),
    ),
  );
  $("docs").replaceChildren(...items);
  const shown = page.docs.length;
  $("docs-status").textContent = shown
    ? `${data.selector ? "Matching documents" : "Documents"}, page ${data.page + 1}.`
    : data.selector
      ? "No document matches."
      : "This collection has no documents yet.";
  $("page-prev").disabled = data.page === 0;
  $("page-next").disabled = !page.bookmark || shown < PAGE_SIZE;
  $("page-info").textContent = "";
}

function showList() {
  data.doc = null;
  data.editing = false;
  data.creating = false;
  show($("doc-view"), false);
  show($("collection-view"), true);
}

function subscribe(name) {
  if (data.stop) data.stop();
  data.stop = vibe.collection(name).subscribe(
    (change) => {
      clearTimeout(data.timer);
      data.timer = setTimeout(() => {
        if (currentView !== "data" || data.name !== name) return;
        loadCollections().catch(() => {});
        if (!data.doc && !data.creating) loadPage().catch((error) => banner(explain(error), true));
      }, 150);
      if (data.doc && change.id === data.doc._id && change.rev !== data.doc._rev) {
        if (data.editing) {
          say($("doc-changed"), change.deleted
            ? "This document was deleted somewhere else while you were editing it."
            : "This document was changed somewhere else while you were editing it; saving will ask what to keep.");
        } else if (change.deleted) {
          say($("doc-changed"), "This document was deleted somewhere else.");
          show($("doc-actions"), true);
        } else {
          showDoc(change.doc);
          say($("doc-changed"), "This document was just changed somewhere else; you see the new version.");
        }
      }
    },
    { onError: (message) => banner(`Live updates stopped: ${message.message || message.reason}. Reload to restart them.`, true) },
  );
}

async function openCollection(name) {
  if (!COLLECTION.test(name)) {
    banner("That is not a collection name: use lower-case letters, digits, - and _, starting with a letter.", true);
    return;
  }
  if (data.name !== name) {
    data.name = name;
    data.selector = null;
    data.bookmarks = [null];
    data.page = 0;
    $("query").value = "";
    subscribe(name);
  }
  $("collection-title").textContent = `Collection “${name}”`;
  show($("collection-none"), false);
  showList();
  await Promise.all([loadCollections(), loadPage()]);
}

enter.data = async (name) => {
  leaveCurrent = () => {
    if (data.stop) data.stop();
    data.stop = null;
    data.name = null;
  };
  if (name) await openCollection(name);
  else {
    show($("collection-view"), false);
    show($("doc-view"), false);
    show($("collection-none"), true);
    await loadCollections();
  }
};

$("open-collection").addEventListener("submit", (event) => {
  event.preventDefault();
  const name = $("collection-name").value.trim();
  location.hash = `#data/${encodeURIComponent(name)}`;
  if (data.name === name) openCollection(name).catch((error) => banner(explain(error), true));
});

$("query-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("query").value.trim();
  if (!text) {
    data.selector = null;
  } else {
    try {
      const selector = JSON.parse(text);
      if (selector === null || typeof selector !== "object" || Array.isArray(selector)) throw new Error("a selector is a JSON object, like {\"done\": false}");
      data.selector = selector;
    } catch (error) {
      say($("query-error"), `This is not a valid selector: ${error.message}.`);
      return;
    }
  }
  data.bookmarks = [null];
  data.page = 0;
  loadPage().catch((error) => banner(explain(error), true));
});

$("query-clear").addEventListener("click", () => {
  $("query").value = "";
  data.selector = null;
  data.bookmarks = [null];
  data.page = 0;
  loadPage().catch((error) => banner(explain(error), true));
});

$("page-next").addEventListener("click", () => {
  if (!data.next) return;
  data.bookmarks[data.page + 1] = data.next;
  data.page += 1;
  loadPage().catch((error) => banner(explain(error), true));
});

$("page-prev").addEventListener("click", () => {
  if (data.page === 0) return;
  data.page -= 1;
  loadPage().catch((error) => banner(explain(error), true));
});

function showDoc(doc) {
  data.doc = doc;
  data.editing = false;
  data.creating = false;
  show($("collection-view"), false);
  show($("doc-view"), true);
  show($("doc-form"), false);
  show($("doc-actions"), true);
  show($("doc-delete-confirm"), false);
  say($("doc-changed"), "");
  $("doc-title").textContent = `Document ${doc._id}`;
  $("doc-json").textContent = JSON.stringify(doc, null, 2);
  show($("doc-json"), true);
}

async function openDoc(id) {
  try {
    showDoc(await vibe.collection(data.name).get(id));
    $("doc-title").focus?.();
  } catch (error) {
    banner(explain(error), true);
  }
}

function edit(text, creating) {
  data.editing = true;
  data.creating = creating;
  show($("collection-view"), false);
  show($("doc-view"), true);
  show($("doc-json"), !creating);
  show($("doc-actions"), false);
  show($("doc-delete-confirm"), false);
  show($("doc-conflict"), false);
  say($("doc-error"), "");
  show($("doc-form"), true);
  $("doc-editor").value = text;
  $("doc-editor").focus();
}

$("new-doc").addEventListener("click", () => {
  data.doc = null;
  $("doc-title").textContent = `New document in “${data.name}”`;
  say($("doc-changed"), "");
  edit('{\n  "title": ""\n}', true);
});

$("doc-edit").addEventListener("click", () => edit(JSON.stringify(data.doc, null, 2), false));
$("doc-back").addEventListener("click", () => {
  showList();
  loadPage().catch((error) => banner(explain(error), true));
});
$("doc-cancel").addEventListener("click", () => {
  if (data.creating || !data.doc) {
    showList();
    return;
  }
  showDoc(data.doc);
});

function parseEditor() {
  try {
    const value = JSON.parse($("doc-editor").value);
    if (value === null || typeof value !== "object" || Array.isArray(value)) throw new Error("a document is a JSON object, in { }");
    return value;
  } catch (error) {
    say($("doc-error"), `This is not valid JSON: ${error.message}. Fix it, then save.`);
    return null;
  }
}

async function save(body) {
  const collection = vibe.collection(data.name);
  if (data.creating) {
    const id = typeof body._id === "string" && body._id ? body._id : null;
    delete body._rev;
    const written = id ? await collection.put(id, body) : await collection.create(body);
    return collection.get(written.id);
  }
  const id = data.doc._id;
  body._id = id;
  // The version the editor was opened on, unless the person typed another: a save over a
  // newer version is then a conflict, not a silent overwrite.
  if (typeof body._rev !== "string") body._rev = data.doc._rev;
  await collection.put(id, body);
  return collection.get(id);
}

$("doc-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  say($("doc-error"), "");
  const body = parseEditor();
  if (!body) return;
  const done = busy($("doc-save"), "Saving…");
  try {
    const saved = await save(body);
    done();
    showDoc(saved);
    banner(data.creating ? "Document created." : "Saved.");
  } catch (error) {
    done();
    if (error instanceof VibeError && error.code === "conflict" && !data.creating) {
      show($("doc-conflict"), true);
    } else {
      say($("doc-error"), explain(error));
    }
  }
});

$("conflict-theirs").addEventListener("click", async () => {
  try {
    const latest = await vibe.collection(data.name).get(data.doc._id);
    data.doc = latest;
    $("doc-editor").value = JSON.stringify(latest, null, 2);
    $("doc-json").textContent = JSON.stringify(latest, null, 2);
    show($("doc-conflict"), false);
    say($("doc-changed"), "");
  } catch (error) {
    say($("doc-error"), explain(error));
  }
});

$("conflict-mine").addEventListener("click", async () => {
  const body = parseEditor();
  if (!body) return;
  try {
    const latest = await vibe.collection(data.name).get(data.doc._id);
    body._rev = latest._rev;
    const saved = await save(body);
    show($("doc-conflict"), false);
    showDoc(saved);
    banner("Saved: your version replaced the other one.");
  } catch (error) {
    say($("doc-error"), explain(error));
  }
});

$("doc-delete").addEventListener("click", () => {
  show($("doc-delete-confirm"), true);
  $("doc-delete-no").focus();
});
$("doc-delete-no").addEventListener("click", () => show($("doc-delete-confirm"), false));
$("doc-delete-yes").addEventListener("click", async () => {
  try {
    await vibe.collection(data.name).delete(data.doc._id, data.doc._rev);
    banner(`Document ${data.doc._id} deleted.`);
    showList();
    await Promise.all([loadPage(), loadCollections()]);
  } catch (error) {
    show($("doc-delete-confirm"), false);
    if (error instanceof VibeError && error.code === "conflict") {
      say($("doc-changed"), "This document was changed somewhere else: look at the new version before deleting it.");
      openDoc(data.doc._id);
    } else {
      banner(explain(error), true);
    }
  }
});

// -- files -------------------------------------------------------------------------------------------

const files = { after: null };

async function loadUsage() {
  const usage = await vibe.files.usage();
  const used = usage.used + usage.pending;
  const bar = $("quota-bar");
  if (usage.quota) {
    bar.max = usage.quota;
    bar.value = Math.min(used, usage.quota);
    const percent = ((100 * used) / usage.quota).toFixed(used && used < usage.quota / 1000 ? 2 : 0);
    $("quota-text").textContent = `${bytes(used)} of ${bytes(usage.quota)} used (${percent}%).`;
  } else {
    bar.max = Math.max(used, 1);
    bar.value = used;
    $("quota-text").textContent = `${bytes(used)} used; this server sets no limit.`;
  }
  bar.setAttribute("aria-valuetext", $("quota-text").textContent);
  $("file-rules").textContent = `Up to ${bytes(usage.maxSize)} per file.`;
}

function fileRow(blob) {
  const name = (blob.meta && typeof blob.meta.name === "string" && blob.meta.name) || blob.id;
  const confirm = el(
    "div",
    { class: "confirm", hidden: true },
    el("span", {}, "Delete for good?"),
    el("button", { type: "button", class: "danger small", onclick: () => removeFile(blob, row) }, "Delete"),
    el("button", { type: "button", class: "small", onclick: () => show(confirm, false) }, "Keep"),
  );
  const row = el(
    "tr",
    {},
    el("td", {}, el("span", { class: "file-name" }, name)),
    el("td", {}, blob.mime),
    el("td", { class: "num" }, bytes(blob.size)),
    el("td", { class: "num" }, when(blob.createdAt)),
    el(
      "td",
      {},
      el(
        "div",
        { class: "row-actions" },
        el("button", { type: "button", class: "small", "aria-label": `Download ${name}`, onclick: (e) => download(blob, name, e.currentTarget) }, "Download"),
        el("button", { type: "button", class: "small", "aria-label": `Delete ${name}`, onclick: () => show(confirm, true) }, "Delete"),
      ),
      confirm,
    ),
  );
  return row;
}

async function loadFiles(reset = true) {
  if (reset) files.after = null;
  const page = await vibe.files.list({ limit: 50, after: files.after || undefined });
  const rows = page.blobs.map(fileRow);
  if (reset) $("files").replaceChildren(...rows);
  else $("files").append(...rows);
  files.after = page.next;
  show($("files-more"), Boolean(page.next));
  const none = $("files").children.length === 0;
  show($("files-empty"), none);
  show($("files-table"), !none);
}

enter.files = () => Promise.all([loadUsage(), loadFiles()]);

$("files-more").addEventListener("click", () => loadFiles(false).catch((error) => banner(explain(error), true)));

async function download(blob, name, button) {
  const done = busy(button, "Downloading…");
  const status = $("files-status");
  try {
    const url = await vibe.files.url(blob.id);
    const response = await fetch(url, { credentials: "omit" });
    if (!response.ok) throw new VibeError(`The file could not be downloaded (HTTP ${response.status}); try again.`, { status: response.status });
    const total = Number(response.headers.get("content-length")) || blob.size;
    const reader = response.body.getReader();
    const parts = [];
    let received = 0;
    for (;;) {
      const { done: finished, value } = await reader.read();
      if (finished) break;
      parts.push(value);
      received += value.length;
      status.textContent = `Downloading ${name}: ${total ? Math.round((100 * received) / total) : 0}%`;
    }
    const href = URL.createObjectURL(new Blob(parts, { type: blob.mime }));
    const link = el("a", { href, download: name, hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(href), 60_000);
    status.textContent = `Downloaded ${name}.`;
  } catch (error) {
    status.textContent = "";
    banner(explain(error), true);
  } finally {
    done();
  }
}

async function removeFile(blob, row) {
  try {
    await vibe.files.delete(blob.id);
    row.remove();
    $("files-status").textContent = "File deleted.";
    await Promise.all([loadUsage(), $("files").children.length ? null : loadFiles()]);
  } catch (error) {
    banner(explain(error), true);
  }
}

function uploadOne(file) {
  const bar = el("progress", { max: file.size || 1, value: 0, "aria-label": `Uploading ${file.name}` });
  const state = el("span", { class: "note" }, "Waiting…");
  const item = el("li", {}, el("span", {}, file.name || "file"), state, bar);
  $("uploads").append(item);
  return async () => {
    state.textContent = "Uploading… 0%";
    try {
      await vibe.files.upload(file, {
        meta: { name: file.name },
        onProgress: ({ loaded, total }) => {
          bar.max = total || 1;
          bar.value = loaded;
          state.textContent = `Uploading… ${total ? Math.round((100 * loaded) / total) : 100}%`;
        },
      });
      bar.value = bar.max;
      state.textContent = "Uploaded";
      state.className = "ok";
    } catch (error) {
      state.textContent = explain(error);
      state.className = "error";
    }
  };
}

async function uploadAll(list) {
  const jobs = [...list].map(uploadOne);
  if (!jobs.length) return;
  $("files-status").textContent = `Uploading ${jobs.length} file${jobs.length === 1 ? "" : "s"}…`;
  const queue = [...jobs];
  const workers = Array.from({ length: Math.min(3, queue.length) }, async () => {
    while (queue.length) await queue.shift()();
  });
  await Promise.all(workers);
  $("files-status").textContent = "Uploads finished.";
  await Promise.all([loadUsage(), loadFiles()]).catch((error) => banner(explain(error), true));
}

$("file-input").addEventListener("change", (event) => {
  const chosen = event.target.files;
  uploadAll(chosen).finally(() => {
    event.target.value = "";
  });
});

const zone = $("dropzone");
zone.addEventListener("dragover", (event) => {
  event.preventDefault();
  zone.classList.add("over");
});
zone.addEventListener("dragleave", () => zone.classList.remove("over"));
zone.addEventListener("drop", (event) => {
  event.preventDefault();
  zone.classList.remove("over");
  uploadAll(event.dataTransfer.files);
});

// -- apps --------------------------------------------------------------------------------------------

function describeScopes(scopes) {
  const written = new Set(scopes.filter((s) => s.startsWith("data:write:")).map((s) => s.slice(11)));
  return scopes
    .filter((s) => !(s.startsWith("data:read:") && written.has(s.slice(10))))
    .map((s) => {
      if (s === "data:*") return ["Read, change and delete everything in all your collections", null];
      if (s === "blob:*") return ["Upload, download and delete your files", null];
      if (s.startsWith("data:write:")) return ["Read and change your", s.slice(11)];
      if (s.startsWith("data:read:")) return ["Read your", s.slice(10)];
      return [s, null];
    });
}

function grantCard(grant) {
  const status = el("p", { class: "note", role: "status" });
  const confirm = el(
    "div",
    { class: "confirm", hidden: true },
    el("span", {}, "The app loses access at once."),
    el("button", { type: "button", class: "danger", onclick: () => revoke() }, "Revoke access"),
    el("button", { type: "button", onclick: () => show(confirm, false) }, "Keep"),
  );
  const card = el(
    "li",
    {},
    el("h2", { class: "origin" }, grant.origin),
    grant.name ? el("p", { class: "untrusted" }, `It calls itself “${grant.name}” (the app chose that name).`) : null,
    el("p", {}, "It may:"),
    el("ul", { class: "scopes" }, describeScopes(grant.scopes).map(([sentence, collection]) =>
      el("li", {}, sentence, collection ? " " : null, collection ? el("strong", {}, collection) : null))),
    el("p", { class: "meta" }, `Allowed ${when(grant.createdAt)} · last used ${ago(grant.lastUsedAt)}`),
    el("div", { class: "actions" }, el("button", { type: "button", onclick: () => show(confirm, true), "aria-label": `Revoke ${grant.origin}` }, "Revoke")),
    confirm,
    status,
  );
  async function revoke() {
    try {
      await vibe.account.revokeGrant(grant.id);
      card.remove();
      banner(`${grant.origin} can no longer use your data.`);
      show($("grants-empty"), $("grants").children.length === 0);
    } catch (error) {
      status.textContent = explain(error);
    }
  }
  return card;
}

enter.apps = async () => {
  const grants = await vibe.account.grants();
  $("grants").replaceChildren(...grants.map(grantCard));
  show($("grants-empty"), grants.length === 0);
};

// -- sessions ----------------------------------------------------------------------------------------

function describeAgent(ua) {
  if (!ua) return "An unknown browser or device";
  const browser = /Edg\//.test(ua)
    ? "Edge"
    : /OPR\//.test(ua)
      ? "Opera"
      : /Firefox\//.test(ua)
        ? "Firefox"
        : /(Chrome|Chromium|CriOS)\//.test(ua)
          ? "Chrome"
          : /Safari\//.test(ua)
            ? "Safari"
            : null;
  const system = /iPhone|iPad|iPod/.test(ua)
    ? "iOS"
    : /Android/.test(ua)
      ? "Android"
      : /Windows/.test(ua)
        ? "Windows"
        : /Mac OS X|Macintosh/.test(ua)
          ? "macOS"
          : /CrOS/.test(ua)
            ? "ChromeOS"
            : /Linux/.test(ua)
              ? "Linux"
              : null;
  if (browser && system) return `${browser} on ${system}`;
  return browser || system || ua.slice(0, 60);
}

function sessionCard(session) {
  const status = el("p", { class: "note", role: "status" });
  const card = el(
    "li",
    {},
    el("h2", {}, describeAgent(session.userAgent), session.current ? el("span", { class: "badge" }, "This browser") : null),
    el("p", { class: "meta" }, `Signed in ${when(session.createdAt)} · last active ${ago(session.lastUsedAt)}`),
    session.userAgent ? el("p", { class: "meta mono" }, session.userAgent) : null,
    el(
      "div",
      { class: "actions" },
      session.current
        ? el("button", { type: "button", onclick: () => vibe.logout() }, "Log out here")
        : el("button", { type: "button", onclick: () => end(), "aria-label": `Log out ${describeAgent(session.userAgent)}, signed in ${when(session.createdAt)}` }, "Log out"),
    ),
    status,
  );
  async function end() {
    try {
      await vibe.account.revokeSession(session.id);
      card.remove();
      $("sessions-status").textContent = "That session was logged out.";
    } catch (error) {
      status.textContent = explain(error);
    }
  }
  return card;
}

enter.sessions = async () => {
  const sessions = await vibe.account.sessions();
  sessions.sort((a, b) => Number(b.current) - Number(a.current)); // this browser first
  $("sessions").replaceChildren(...sessions.map(sessionCard));
  $("logout-others").disabled = sessions.every((s) => s.current);
};

$("logout-others").addEventListener("click", async () => {
  const done = busy($("logout-others"), "Logging out…");
  try {
    const { revoked } = await vibe.account.logoutEverywhereElse();
    $("sessions-status").textContent = revoked === 1 ? "1 other session was logged out." : `${revoked} other sessions were logged out.`;
    await enter.sessions();
  } catch (error) {
    $("sessions-status").textContent = explain(error);
  } finally {
    done();
    $("logout-others").disabled = !$("sessions").querySelector("li:nth-child(2)");
  }
});

// -- password ----------------------------------------------------------------------------------------

enter.security = () => {};

$("password-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const current = $("pw-current").value;
  const next = $("pw-new").value;
  say($("pw-error"), "");
  say($("pw-ok"), "");
  let problem = null;
  if (!current) problem = "Enter your current password.";
  else if (next.length < 8) problem = "The new password needs at least 8 characters.";
  else if (next !== $("pw-again").value) problem = "The two new passwords are not the same.";
  else if (next === current) problem = "The new password must differ from the current one.";
  if (problem) {
    say($("pw-error"), problem);
    return;
  }
  const done = busy($("pw-submit"), "Changing…");
  try {
    const { revokedSessions } = await vibe.account.changePassword(current, next);
    $("password-form").reset();
    say(
      $("pw-ok"),
      `Your password was changed${revokedSessions ? `, and ${revokedSessions} other session${revokedSessions === 1 ? " was" : "s were"} logged out` : ""}.`,
    );
  } catch (error) {
    say($("pw-error"), explain(error));
  } finally {
    done();
  }
});

// -- export ------------------------------------------------------------------------------------------

enter.export = () => {};

$("export-start").addEventListener("click", async () => {
  const done = busy($("export-start"), "Preparing…");
  say($("export-error"), "");
  $("export-status").textContent = "Preparing your archive…";
  try {
    const { url } = await vibe.account.exportLink();
    const link = el("a", { href: url, download: "", hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
    $("export-status").textContent =
      "Your download has started: your browser shows its progress. The archive is made as it downloads, so a large one takes a while.";
  } catch (error) {
    $("export-status").textContent = "";
    say($("export-error"), explain(error));
  } finally {
    done();
  }
});

// -- delete ------------------------------------------------------------------------------------------

enter.delete = () => {};

$("delete-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  say($("delete-error"), "");
  const password = $("delete-password").value;
  if (!password) {
    say($("delete-error"), "Enter your password to confirm.");
    return;
  }
  if (!$("delete-sure").checked) {
    say($("delete-error"), "Tick the box to confirm that you understand this cannot be undone.");
    return;
  }
  const done = busy($("delete-submit"), "Deleting…");
  deleting = true;
  $("delete-status").textContent = "Deleting your identity and everything it owns… this can take a moment.";
  try {
    const answer = await vibe.account.deleteIdentity(password);
    location.replace(answer.state === "pending" ? "/?deleted=pending" : "/?deleted=1");
  } catch (error) {
    deleting = false;
    done();
    $("delete-status").textContent = "";
    say($("delete-error"), explain(error));
  }
});

start().catch((error) => {
  $("loading-text").textContent = explain(error);
  show($("loading-actions"));
});
