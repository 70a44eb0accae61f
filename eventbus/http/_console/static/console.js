// The eventbus console: one page per section of the admin API, no framework, no build step.
// Every call goes through api(), which adds the API key (kept in sessionStorage, sent as a
// header, never in a URL) and turns a problem+json answer into an Error with its detail.

const $ = (id) => document.getElementById(id);
const MAX_ROWS = 500; // live rows kept in the DOM

let apiKey = sessionStorage.getItem("eventbus-key") || "";

function headers(extra = {}) {
  return apiKey ? { ...extra, Authorization: `Bearer ${apiKey}` } : extra;
}

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

// The API's paths, relative to the page (/console): behind a proxy that serves eventbus under
// a path of its own (/eventbus/console), "/rules" went to the proxy's root, not to eventbus.
const relative = (path) => path.replace(/^\//, "");

async function api(method, path, body) {
  const init = { method, headers: headers() };
  if (body !== undefined) {
    init.body = typeof body === "string" ? body : JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const resp = await fetch(relative(path), init);
  const text = await resp.text();
  let parsed = null;
  try {
    parsed = text ? JSON.parse(text) : null;
  } catch {
    parsed = text;
  }
  if (!resp.ok) {
    const detail = (parsed && parsed.detail) || `HTTP ${resp.status}`;
    if (resp.status === 401) askForKey("");
    else if (keyRefused(resp.status, detail)) askForKey(detail);
    throw new ApiError(resp.status, detail);
  }
  return parsed;
}

// A key held and refused later for its scope (rotated to publish only, say): as a key
// refused outright, it is forgotten and another asked for (it was sent again every 5 s, and
// after a reload of the page no form was left to give another).
const keyRefused = (status, detail) => status === 403 && Boolean(apiKey) && / lacks scope /.test(detail);

// Characters that reorder or hide text (bidi embeddings, overrides, isolates and marks; zero
// widths, invisible operators, soft hyphens, tags): shown as the \u escapes they are (a tag,
// beyond U+FFFF, as its two UTF-16 halves, as JSON writes it), so that event content cannot
// make a row or a payload read otherwise than it is ("txt.exe" written backwards, say).
const HIDDEN = /[\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff\u{e0000}-\u{e007f}]/gu;
const escaped = (c) => Array.from({ length: c.length }, (_, i) => `\\u${c.charCodeAt(i).toString(16).padStart(4, "0")}`).join("");
const shown = (text) => String(text).replace(HIDDEN, escaped);

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = shown(text);
  if (cls) node.className = cls;
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.append(cell);
    else td.textContent = cell === null || cell === undefined ? "" : shown(cell);
    tr.append(td);
  }
  return tr;
}

// The query of a filter form: each field that is not empty, as [parameter, input id] says.
function formParams(fields) {
  const params = new URLSearchParams();
  for (const [name, id] of fields) {
    const value = $(id).value.trim();
    if (value) params.set(name, value);
  }
  return params;
}

const trailPath = (source, id) => `/events/trail?source=${encodeURIComponent(source)}&id=${encodeURIComponent(id)}`;
// JSON text in which HIDDEN characters are escapes: the same JSON, seen as it is
const pretty = (value) => shown(JSON.stringify(value, null, 2));
const clock = (iso) => (iso ? iso.replace(/^.*T/, "").replace(/(\.\d{3})\d*/, "$1") : "");

// -- the API key ----------------------------------------------------------------------------

function askForKey(error) {
  // The key held, if any, was refused (rotated, revoked): forget it, and stop the refreshing
  // that would send it, or no key, again every 5 s until one is given.
  apiKey = "";
  sessionStorage.removeItem("eventbus-key");
  $("key-forget").hidden = true;
  clearInterval(refresh);
  $("key-form").hidden = false;
  $("key-error").textContent = error;
  stopLive();
}

$("key-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  apiKey = $("key-input").value.trim();
  try {
    await api("GET", "/rules"); // admin scope, and answered without the database
  } catch (err) {
    if (err.status === 401 || err.status === 403) apiKey = ""; // refused: later calls must not send it
    $("key-error").textContent = err.message;
    return;
  }
  sessionStorage.setItem("eventbus-key", apiKey);
  $("key-form").hidden = true;
  $("key-forget").hidden = false;
  show();
});

$("key-forget").addEventListener("click", () => {
  sessionStorage.removeItem("eventbus-key");
  apiKey = "";
  location.reload();
});

// -- pages ----------------------------------------------------------------------------------

const pages = {
  overview: loadOverview,
  live: showLive,
  trail: async () => {},
  dead: loadDeadLetters,
  rules: loadRules,
  targets: loadTargets,
};
let refresh = 0; // the overview and targets pages refresh themselves while shown
let refreshing = false; // one refresh at a time: a slow one is not joined by the next

function shownPage() {
  const name = location.hash.slice(1).split("?")[0] || "live";
  return name in pages ? name : "live";
}

function show() {
  const page = shownPage();
  for (const section of document.querySelectorAll(".page")) section.hidden = section.id !== `page-${page}`;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.page === page);
  if (page !== "live") stopLive();
  clearInterval(refresh);
  $("page-error").textContent = "";
  if (page === "overview" || page === "targets") {
    refresh = setInterval(async () => {
      if (refreshing) return;
      refreshing = true;
      try {
        await load(page);
      } finally {
        refreshing = false;
      }
    }, 5000);
  }
  load(page);
}

// Load a page; when it cannot be, say why above it until it can (a 401 asks for a key).
async function load(page) {
  try {
    await pages[page]();
    if (page === shownPage()) $("page-error").textContent = "";
  } catch (err) {
    // (a slow page's failure was written above the page shown since)
    if (!$("key-form").hidden || page !== shownPage()) return; // a key is asked for instead
    const what = err.partial ? "Part of this page could not load" : "Could not load this page";
    $("page-error").textContent = `${what}: ${err.message}`;
  }
}

window.addEventListener("hashchange", show);

// -- live events ----------------------------------------------------------------------------

const live = { controller: null, paused: false, pending: [], rows: new Map(), pattern: "", frame: 0, dropped: 0, heldBack: 0, skipped: new Set(), problem: "" };

async function showLive() {
  if (!live.controller) startLive();
}

function stopLive() {
  if (live.controller) live.controller.abort();
  live.controller = null;
}

function startLive() {
  stopLive();
  delete $("live-status").dataset.pattern;
  const controller = new AbortController();
  live.controller = controller;
  readStream(controller).catch(() => {});
}

async function readStream(controller) {
  const query = live.pattern ? `?pattern=${encodeURIComponent(live.pattern)}` : "";
  while (!controller.signal.aborted) {
    try {
      const resp = await fetch(`events/live${query}`, { headers: headers(), signal: controller.signal });
      if (resp.status === 401) return askForKey("");
      if ([400, 403, 404, 413, 414, 431].includes(resp.status)) {
        // Refused (the filter, most likely): asking again every 2 s would change nothing.
        let detail = `HTTP ${resp.status}`;
        try {
          detail = (await resp.json()).detail || detail;
        } catch {}
        if (keyRefused(resp.status, detail)) return askForKey(detail);
        return setStatus(`stopped: ${detail}`);
      }
      if (!resp.ok) {
        let detail = `HTTP ${resp.status}`;
        try {
          detail = (await resp.json()).detail || detail;
        } catch {}
        throw new Error(detail);
      }
      live.problem = "";
      $("live-status").dataset.pattern = live.pattern; // which filter the stream applies
      setStatus("live");
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          onMessage(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (err) {
      if (controller.signal.aborted) return;
      live.problem = err.message;
    }
    // why, when the service said (too many watchers, say): "reconnecting…" alone hid it
    setStatus(live.problem ? `${live.problem}; reconnecting…` : "reconnecting…");
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

function onMessage(block) {
  let kind = "message";
  let data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event: ")) kind = line.slice(7);
    else if (line.startsWith("data: ")) data += line.slice(6);
  }
  if (kind === "rows") {
    live.pending.push(...JSON.parse(data));
    if (live.paused && live.pending.length > MAX_ROWS) trimWhilePaused();
    scheduleFlush();
  } else if (kind === "dropped") {
    live.dropped = JSON.parse(data).dropped;
    setStatus("live");
  } else if (kind === "problem") {
    live.problem = JSON.parse(data).detail;
    setStatus(live.problem);
  }
}

// Paused, the rows waiting are bounded in events, not rows (each event sends two, or more
// with retries: bounded in rows, 500 kept some 250 events, and the rest of the page's room went
// unused): the rows of one event are folded into one, with every delivery's latest state (a row
// whose delivery ended while paused stayed "routing" for good: its update was among the oldest,
// dropped); those of the rows shown are all kept, and of the others the newest events. An
// event skipped stays skipped: its later updates are dropped too (they were drawn as a row of
// their own, and the event counted as skipped and shown).
const SKIPPED_REMEMBERED = 10 * MAX_ROWS;

function trimWhilePaused() {
  const folded = new Map(); // in the order each event first came
  for (const r of live.pending) {
    const key = `${r.source}\n${r.id}`;
    if (live.skipped.has(key)) continue;
    const into = folded.get(key);
    folded.set(key, into ? foldRow(into, r) : r);
  }
  const shown = [];
  const others = [];
  for (const [key, r] of folded) (live.rows.has(key) ? shown : others).push([key, r]);
  const gone = others.splice(0, Math.max(0, others.length - Math.max(0, MAX_ROWS - shown.length)));
  live.heldBack += gone.length;
  for (const [key] of gone) live.skipped.add(key);
  for (const key of live.skipped) {
    if (live.skipped.size <= SKIPPED_REMEMBERED) break;
    live.skipped.delete(key); // the oldest first
  }
  live.pending = [...shown, ...others].map(([, r]) => r);
}

// One row of an event from two: the latest whole row (time set) with every delivery's latest
// state, one per delivery (bounded however many updates come).
function foldRow(into, r) {
  const latest = new Map(into.deliveries.map((d) => [`${d.rule}\n${d.target}`, d]));
  for (const d of r.deliveries) latest.set(`${d.rule}\n${d.target}`, d);
  const base = r.time !== null ? r : into;
  return { ...base, state: r.state, deliveries: [...latest.values()] };
}

function setStatus(text) {
  const extra = [];
  if (live.paused) extra.push(`paused, ${new Set(live.pending.map((r) => `${r.source}\n${r.id}`)).size} waiting`);
  if (live.heldBack) extra.push(`${live.heldBack} older events skipped while paused`);
  if (live.dropped) extra.push(`${live.dropped} dropped (too slow)`);
  $("live-status").textContent = extra.length ? `${text} (${extra.join("; ")})` : text;
}

function scheduleFlush() {
  if (live.paused) return setStatus("live");
  if (!live.frame) live.frame = requestAnimationFrame(flush);
}

function flush() {
  live.frame = 0;
  const rows = live.pending;
  live.pending = [];
  const fresh = document.createDocumentFragment();
  const added = [];
  for (const r of rows) {
    const key = `${r.source}\n${r.id}`;
    const known = live.rows.get(key);
    if (known) {
      fillRow(known, r);
      continue;
    }
    const tr = document.createElement("tr");
    for (let i = 0; i < 7; i++) tr.append(document.createElement("td"));
    tr.dataset.key = key;
    fillRow(tr, r);
    live.rows.set(key, tr);
    added.push(tr);
  }
  for (let i = added.length - 1; i >= 0; i--) fresh.append(added[i]); // newest on top
  const body = $("live-rows");
  body.prepend(fresh);
  while (body.rows.length > MAX_ROWS) {
    live.rows.delete(body.lastElementChild.dataset.key);
    body.lastElementChild.remove();
  }
}

const WORST_FIRST = ["dead-lettered", "retrying", "routing", "delivered"];

// A row from the router fills every cell; an update from the retry schedule (time null, one
// delivery) changes only that delivery's state. The row shows the worst of its deliveries.
function fillRow(tr, r) {
  const cells = tr.cells;
  if (r.time !== null || !tr.dataset.id) {
    cells[0].textContent = clock(r.time);
    cells[1].textContent = shown(r.source);
    cells[2].textContent = shown(r.type);
    cells[3].textContent = shown(r.subject ?? "");
    cells[4].textContent = shown(r.id);
    cells[5].textContent = r.rules.length ? `${r.rules.length}: ${r.rules.join(", ")}` : "0";
    tr.dataset.source = r.source;
    tr.dataset.id = r.id;
  }
  tr.deliveries ??= new Map();
  for (const d of r.deliveries) tr.deliveries.set(`${d.rule}\n${d.target}`, d.state);
  const states = [...tr.deliveries.values()];
  const state = WORST_FIRST.find((s) => states.includes(s)) ?? r.state;
  cells[6].textContent = state;
  cells[6].className = `state-${state}`;
}

$("live-rows").addEventListener("click", (e) => {
  const tr = e.target.closest("tr");
  if (tr) openTrail(tr.dataset.source, tr.dataset.id);
});

$("live-pause").addEventListener("click", () => {
  live.paused = !live.paused;
  $("live-pause").textContent = live.paused ? "Resume" : "Pause";
  if (!live.paused) {
    live.heldBack = 0;
    live.skipped.clear();
    scheduleFlush();
  }
  setStatus("live");
});

$("live-clear").addEventListener("click", () => {
  $("live-rows").replaceChildren();
  live.rows.clear();
  forgetWaiting();
  setStatus("live");
});

// Nothing waits any more: what was skipped while paused is no news of what will be shown.
function forgetWaiting() {
  live.pending = [];
  live.heldBack = 0;
  live.skipped.clear();
}

let filterTimer = 0;
const LIVE_FILTER_BYTES = 4096; // the server's bound: the filter travels in the stream's URL
$("live-filter").addEventListener("input", () => {
  clearTimeout(filterTimer);
  filterTimer = setTimeout(checkFilter, 250);
});

// Answers may arrive out of order: only the one for the text in the box now is applied.
async function checkFilter() {
  const text = $("live-filter").value.trim();
  const box = $("live-filter-error");
  const stale = () => $("live-filter").value.trim() !== text;
  if (text) {
    try {
      if (new TextEncoder().encode(text).length > LIVE_FILTER_BYTES) {
        throw new Error(`a live filter is at most ${LIVE_FILTER_BYTES} bytes long`);
      }
      await api("POST", "/patterns/validate", text);
    } catch (err) {
      if (stale()) return;
      box.textContent = err.message;
      $("live-filter").classList.add("invalid");
      return;
    }
    if (stale()) return;
  }
  box.textContent = "";
  $("live-filter").classList.remove("invalid");
  if (text !== live.pattern) {
    live.pattern = text;
    $("live-rows").replaceChildren();
    live.rows.clear();
    forgetWaiting();
    startLive();
  }
}

// -- event trail: find accepted events, then one event's trail --------------------------------

const found = { after: null, shown: null }; // shown: the filter of the list shown

async function searchEvents(more = false) {
  // The next page is of the list shown, whatever the fields say since (the list mixed two
  // searches, the second from the first one's cursor)
  const params =
    more && found.shown !== null
      ? new URLSearchParams(found.shown)
      : formParams([
          ["source", "search-source"],
          ["type", "search-type"],
          ["since", "search-since"],
          ["until", "search-until"],
        ]);
  params.set("limit", "50");
  params.delete("after");
  const filter = params.toString();
  if (more && found.after !== null) params.set("after", found.after);
  $("search-error").textContent = "";
  let page;
  try {
    page = await api("GET", `/events?${params}`);
  } catch (err) {
    $("search-error").textContent = err.message;
    return;
  }
  if (!more) $("search-rows").replaceChildren();
  for (const e of page.items) {
    const tr = row([e.received_at, e.source, e.type, e.subject, e.id, e.via]);
    tr.dataset.source = e.source;
    tr.dataset.id = e.id;
    $("search-rows").append(tr);
  }
  found.after = page.next_after;
  found.shown = filter;
  $("search-next").hidden = page.next_after === null;
  $("search-message").textContent = !more && !page.items.length ? "no accepted event matches" : "";
  $("search-result").hidden = false;
}

$("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  searchEvents();
});
$("search-next").addEventListener("click", () => searchEvents(true));
$("search-rows").addEventListener("click", (e) => {
  const tr = e.target.closest("tr");
  if (tr) openTrail(tr.dataset.source, tr.dataset.id);
});

// A link to another event's trail (a reply, or the event a reply answers).
function trailLink(source, id) {
  const a = el("a", `${source} ${id}`, "trail-link");
  a.href = "#trail";
  a.addEventListener("click", (e) => {
    e.preventDefault();
    openTrail(source, id);
  });
  return a;
}

function openTrail(source, id) {
  $("trail-source").value = source;
  $("trail-id").value = id;
  location.hash = "trail";
  loadTrail();
}

$("trail-form").addEventListener("submit", (e) => {
  e.preventDefault();
  loadTrail();
});

async function loadTrail() {
  const source = $("trail-source").value;
  const id = $("trail-id").value;
  $("trail-error").textContent = "";
  let trail;
  try {
    trail = await api("GET", trailPath(source, id));
  } catch (err) {
    $("trail-result").hidden = true;
    $("trail-error").textContent = err.message;
    return;
  }
  $("trail-result").hidden = false;
  // a long trail comes as its latest 1,000 matches and attempts: said, not left to be taken
  // for the whole of it
  const cut = trail.truncated ? " · only the latest 1,000 matches and attempts are shown" : "";
  $("trail-received").textContent = `received ${trail.received_at} via ${trail.via}${cut}`;
  $("trail-event").textContent = pretty(trail.event);
  const cause = $("trail-cause");
  cause.hidden = trail.cause === null;
  cause.replaceChildren();
  if (trail.cause) cause.append("a function's reply to ", trailLink(trail.cause.source, trail.cause.id));
  $("trail-replies").hidden = !trail.caused.length;
  $("trail-caused").replaceChildren(
    ...trail.caused.map((c) => {
      const li = el("li", null);
      li.append(trailLink(c.source, c.id), ` ${c.type} (${c.received_at})`);
      return li;
    }),
  );
  $("trail-matches").replaceChildren(
    ...(trail.matches.length ? trail.matches.map((m) => el("li", `${m.rule} → ${m.target} (${m.at})`)) : [el("li", "no rule matched")]),
  );
  $("trail-attempts").replaceChildren(
    ...trail.attempts.map((a) => {
      const li = el("li", null, `attempt outcome-${a.outcome}`);
      li.append(el("span", a.at, "muted"), " ", el("strong", a.outcome), ` ${a.rule} → ${a.target} #${a.attempt}`);
      if (a.status !== null) li.append(` · HTTP ${a.status}`);
      if (a.duration_ms) li.append(` · ${a.duration_ms.toFixed(1)} ms`);
      if (a.error) li.append(el("div", a.error, "error"));
      return li;
    }),
  );
  if (!trail.attempts.length) $("trail-attempts").append(el("li", "no attempt yet"));
  const retries = $("trail-retries");
  retries.replaceChildren();
  try {
    const pending = await api("GET", `/retries?source=${encodeURIComponent(source)}&id=${encodeURIComponent(id)}`);
    for (const r of pending.items) {
      retries.append(el("p", `next retry of ${r.rule} → ${r.target}: ${r.due_at} (${r.waiting_for}, ${r.attempts} attempts so far)`, "next-retry"));
    }
  } catch {
    // the trail stands without its retries
  }
}

$("trail-sandbox").addEventListener("click", () => {
  $("sandbox-event").value = $("trail-event").textContent;
  location.hash = "rules";
});

$("trail-copy").addEventListener("click", async () => {
  const text = $("trail-event").textContent;
  try {
    await navigator.clipboard.writeText(text);
    $("trail-copy").textContent = "Copied";
  } catch {
    const range = document.createRange(); // no clipboard (plain HTTP): select it instead
    range.selectNodeContents($("trail-event"));
    getSelection().removeAllRanges();
    getSelection().addRange(range);
    $("trail-copy").textContent = "Selected: press Ctrl+C";
  }
  setTimeout(() => ($("trail-copy").textContent = "Copy JSON"), 2000);
});

// -- dead letters ---------------------------------------------------------------------------

const dead = { after: null, current: null, shown: null }; // shown: the filter of the list shown

function deadFilter() {
  return formParams([
    ["rule", "dl-rule"],
    ["target", "dl-target"],
    ["source", "dl-source"],
    ["reason", "dl-reason"],
    ["status", "dl-status"],
    ["since", "dl-since"],
    ["until", "dl-until"],
  ]);
}

async function loadDeadLetters(more = false) {
  // the next page of the list shown, not of the fields as typed since (its rows went under
  // the first page's)
  const filter = more && dead.shown !== null ? dead.shown : deadFilter().toString();
  const params = new URLSearchParams(filter);
  params.set("limit", "50");
  if (more && dead.after !== null) params.set("after", dead.after);
  let page;
  try {
    page = await api("GET", `/dead-letters?${params}`);
  } catch (err) {
    if (!more) {
      // not the rows of another filter, or of before, under this one's error
      $("dl-rows").replaceChildren();
      $("dl-next").hidden = true;
      dead.shown = null;
    }
    $("dl-message").textContent = err.message;
    return;
  }
  if (!more) {
    $("dl-rows").replaceChildren();
    dead.shown = filter;
  }
  $("dl-message").textContent = ""; // an earlier load's error is over
  for (const d of page.items) {
    const tr = row([d.id, d.created_at, d.event_source, d.event_id, d.rule, d.target, d.attempts, d.last_status, d.reason, d.final_error]);
    tr.dataset.id = d.id;
    $("dl-rows").append(tr);
  }
  dead.after = page.next_after;
  $("dl-next").hidden = page.next_after === null;
  if (!more && !page.items.length) $("dl-message").textContent = "no dead letters match";
}

$("dl-form").addEventListener("submit", (e) => {
  e.preventDefault();
  $("dl-detail").hidden = true;
  $("dl-message").textContent = "";
  loadDeadLetters();
});
$("dl-next").addEventListener("click", () => loadDeadLetters(true));

$("dl-rows").addEventListener("click", async (e) => {
  const tr = e.target.closest("tr");
  if (!tr) return;
  let item;
  try {
    item = await api("GET", `/dead-letters/${tr.dataset.id}`);
  } catch (err) {
    $("dl-message").textContent = err.message;
    return;
  }
  dead.current = item;
  $("dl-detail-id").textContent = `#${item.id}`;
  $("dl-detail-body").textContent = pretty(item);
  $("dl-detail").hidden = false;
});

// How many dead letters match, the highest id among them, and the "since" the server took.
async function countDeadLetters(params) {
  // counted by the database (walking every page took 507 requests and 12 s at 507,000)
  const answer = await api("GET", `/dead-letters/count?${new URLSearchParams(params)}`);
  return { count: answer.count, lastId: answer.last_id, since: answer.since };
}

function confirmAction(text) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  dialog.showModal();
  return new Promise((resolve) => {
    const done = (answer) => () => {
      dialog.close();
      $("confirm-text").textContent = "";
      $("confirm-ok").onclick = $("confirm-cancel").onclick = null;
      resolve(answer);
    };
    $("confirm-ok").onclick = done(true);
    $("confirm-cancel").onclick = done(false);
  });
}

async function onFiltered(verb, method, path) {
  const params = deadFilter();
  if (params.toString() !== dead.shown) {
    // It acted on the fields as typed, which need not be the list shown above them.
    $("dl-message").textContent = `the filter is not the one of the list shown: press Filter, check the list, then ${verb.toLowerCase()}`;
    return;
  }
  const filtered = params.toString() !== "";
  if (!filtered) params.set("all", "true");
  let count, lastId, since;
  try {
    ({ count, lastId, since } = await countDeadLetters(deadFilter()));
  } catch (err) {
    $("dl-message").textContent = err.message;
    return;
  }
  if (!count) {
    $("dl-message").textContent = "no dead letters match";
    return;
  }
  // Act on those counted and no other: not those dead-lettered while the dialog waits (ids
  // up to the highest counted), nor those whose write was under way when they were counted
  // (the server does nothing, answering 409, unless exactly the confirmed number match; a
  // bound on the time let them in, and the purge deleted more than the dialog said).
  params.set("through", String(lastId));
  params.set("expect", String(count));
  // and after the "since" they were counted from: "1h" taken again at the confirmation would
  // leave out those that turned older than an hour while the dialog waited
  if (since) params.set("since", since);
  params.delete("all");
  const scope = filtered ? "matching the filter" : "(every dead letter: no filter given)";
  if (!(await confirmAction(`${verb} ${count} dead letter${count === 1 ? "" : "s"} ${scope}?`))) return;
  await act(async () => {
    const answer = await api(method, `${path}?${params}`);
    const n = answer.replayed ? answer.count : answer.purged;
    return [`${verb === "Replay" ? "replayed" : "purged"} ${n}`, ...(answer.notes || [])].join("; ");
  });
}

// Run an action, reload the list, then say how it went (the reload would hide the message).
async function act(action) {
  let message;
  try {
    message = await action();
  } catch (err) {
    message = err.message;
  }
  $("dl-detail").hidden = true;
  await loadDeadLetters();
  $("dl-message").textContent = message;
}

$("dl-replay-all").addEventListener("click", () => onFiltered("Replay", "POST", "/dead-letters/replay"));
$("dl-purge-all").addEventListener("click", () => onFiltered("Purge", "DELETE", "/dead-letters"));

$("dl-replay-one").addEventListener("click", async () => {
  const item = dead.current;
  if (!(await confirmAction(`Replay dead letter #${item.id} (${item.rule} → ${item.target})?`))) return;
  await act(async () => {
    const answer = await api("POST", `/dead-letters/${item.id}/replay`);
    return [`replayed #${item.id}`, ...(answer.notes || [])].join("; ");
  });
});

$("dl-delete-one").addEventListener("click", async () => {
  const item = dead.current;
  if (!(await confirmAction(`Delete dead letter #${item.id} for good?`))) return;
  await act(async () => {
    await api("DELETE", `/dead-letters/${item.id}`);
    return `deleted #${item.id}`;
  });
});

$("dl-trail-one").addEventListener("click", () => openTrail(dead.current.event_source, dead.current.event_id));

// -- rules ----------------------------------------------------------------------------------

async function loadRules() {
  loadRecent().catch((err) => ($("sandbox-error").textContent = err.message));
  const { rules } = await api("GET", "/rules");
  $("rules-rows").replaceChildren(
    ...rules.map((r) => {
      const def = {};
      for (const key of ["match", "when", "transform"]) if (key in r.definition) def[key] = r.definition[key];
      return row([r.name, r.enabled ? "yes" : "no", el("pre", pretty(def)), r.targets.join(", "), `${r.file}:${r.line ?? ""}`]);
    }),
  );
}

$("rules-reload").addEventListener("click", async () => {
  const box = $("rules-message");
  try {
    const answer = await api("POST", "/rules/reload");
    box.className = "";
    box.textContent = [`reloaded: ${answer.rules} rules`, ...(answer.notes || [])].join("; ");
    await loadRules();
  } catch (err) {
    box.className = "error";
    box.textContent = err.message;
  }
});

// The sandbox's picker: the newest accepted events; picking one puts the whole event (from
// its trail) in the sandbox.
async function loadRecent() {
  const { items } = await api("GET", "/events?limit=25");
  const pick = $("sandbox-pick");
  pick.replaceChildren(el("option", items.length ? "recent accepted events…" : "no accepted event yet"));
  pick.options[0].value = "";
  for (const e of items) {
    const option = el("option", `${clock(e.received_at)} ${e.source} · ${e.type} · ${e.id}`);
    option.value = pick.options.length;
    option.dataset.source = e.source;
    option.dataset.id = e.id;
    pick.append(option);
  }
}

$("sandbox-pick-refresh").addEventListener("click", () => loadRecent().catch((err) => ($("sandbox-error").textContent = err.message)));

$("sandbox-pick").addEventListener("change", async () => {
  const option = $("sandbox-pick").selectedOptions[0];
  if (!option || !option.value) return;
  $("sandbox-pick").value = ""; // the event is in the sandbox now, to edit or pick again
  $("sandbox-error").textContent = "";
  try {
    const trail = await api("GET", trailPath(option.dataset.source, option.dataset.id));
    $("sandbox-event").value = pretty(trail.event);
  } catch (err) {
    $("sandbox-error").textContent = err.message;
  }
});

$("sandbox-run").addEventListener("click", async () => {
  $("sandbox-error").textContent = "";
  const out = $("sandbox-result");
  out.replaceChildren();
  let result;
  try {
    result = await api("POST", "/rules/sandbox", $("sandbox-event").value);
  } catch (err) {
    $("sandbox-error").textContent = err.message;
    return;
  }
  out.append(el("p", `${result.routes.length} route(s) from ${result.rules} rules`, "muted"));
  for (const r of result.routes) {
    const div = el("div", null, "route");
    div.append(el("strong", `${r.rule} → ${r.target}`), el("pre", pretty(r.payload)));
    out.append(div);
  }
  for (const [rule, reason] of Object.entries(result.unmatched)) {
    out.append(el("p", `${rule} did not match: ${reason}`, "unmatched"));
  }
});

// -- targets, sources, readiness ------------------------------------------------------------

// Each part of the targets page on its own: one that fails (the source dead letters while the
// database is down) left the whole page empty, the circuits' states too, when most needed.
const UNKNOWN = Symbol("unknown");

async function loadTargets() {
  const parts = await Promise.allSettled([
    api("GET", "/targets"),
    api("GET", "/sources"),
    api("GET", "/stats/rates"),
    api("GET", "/stats/targets"),
    // the start of each payload only: a set-aside message may be megabytes
    api("GET", "/sources/dead-letters?limit=50&payload_bytes=200"),
  ]);
  const failures = parts.filter((p) => p.status === "rejected").map((p) => p.reason);
  const refused = failures.find((err) => err.status === 401);
  if (refused) throw refused;
  const [targetsPart, sourcesPart, statsPart, activityPart, setAsidePart] = parts.map((p) =>
    p.status === "fulfilled" ? p.value : UNKNOWN,
  );
  const targets = targetsPart === UNKNOWN ? [] : targetsPart.targets;
  const span = activityPart === UNKNOWN ? null : activityPart.window; // 5 minutes, less while the process is younger
  $("targets-window").textContent =
    span === null ? "" : `last ${span < 60 ? `${Math.ceil(span)} s` : `${Math.round(span / 60)} min`}`;
  const ms = (value) => (value === null ? "" : value.toFixed(1));
  const idle = { in_flight: 0, delivered: 0, failed: 0, latency_ms: null, p95_ms: null };
  const unknown = { in_flight: "?", delivered: "?", failed: "?", latency_ms: null, p95_ms: null };
  $("targets-rows").replaceChildren(
    ...targets.map((t) => {
      const disabled = el("span");
      if (t.disabled) {
        const button = el("button", "Enable");
        button.type = "button";
        button.addEventListener("click", async () => {
          try {
            await api("POST", `/targets/${encodeURIComponent(t.name)}/enable`);
            $("targets-message").textContent = `${t.name} enabled`;
            await loadTargets();
          } catch (err) {
            $("targets-message").textContent = err.message;
          }
        });
        disabled.append(el("span", `disabled ${t.disabled.at ?? ""} (${t.disabled.reason}) `, "error"), button);
      }
      const counts = statsPart === UNKNOWN ? null : statsPart.targets[t.name] || {};
      const n = (outcome) => (counts === null ? "?" : counts[outcome] ?? 0);
      const now = activityPart === UNKNOWN ? unknown : activityPart.targets[t.name] || idle;
      return row([
        t.name,
        t.type,
        t.circuit ?? "",
        now.in_flight,
        now.delivered,
        now.failed,
        ms(now.latency_ms),
        ms(now.p95_ms),
        n("delivered"),
        n("retry-scheduled"),
        n("dead-lettered"),
        t.retries ?? "?", // null: the database cannot be asked now
        disabled,
      ]);
    }),
  );
  const sources = sourcesPart === UNKNOWN ? [] : sourcesPart.sources;
  $("sources-rows").replaceChildren(
    ...sources.map((s) => row([s.name, s.type, s.state, s.events, s.errors, s.last_event_at, s.last_error, s.lag])),
  );
  const setAside = setAsidePart === UNKNOWN ? [] : setAsidePart.items;
  $("source-dl-rows").replaceChildren(
    ...setAside.map((d) => {
      const payload = d.payload ?? (d.payload_base64 ? `base64: ${d.payload_base64}` : "");
      const shown = payload.length > 200 ? `${payload.slice(0, 200)}…` : payload;
      const cut = d.payload_size > 200 ? ` (${d.payload_size} bytes)` : "";
      return row([d.id, d.source, d.received_at, d.error, shown + cut]);
    }),
  );
  if (failures.length) {
    const err = new Error([...new Set(failures.map((f) => f.message))].join("; "));
    err.partial = targetsPart !== UNKNOWN; // the rest is shown ("?" where unknown)
    throw err;
  }
}

// -- overview: rates over the last hour as small hand-drawn SVG charts ---------------------

const SERIES = [
  ["received", "events received /s"],
  ["routed", "events routed /s"],
  ["matched", "events matched /s"],
  ["delivered", "delivered /s"],
  ["retried", "retried /s"],
  ["dead_lettered", "dead-lettered /s"],
  ["latency_ms", "delivery latency, mean ms"],
];
const SVG = "http://www.w3.org/2000/svg";

function chart(title, points, key) {
  const width = 360;
  const height = 90;
  const values = points.map((p) => p[key] ?? 0);
  if (values.length === 1) values.push(values[0]); // one point: a flat line, not nothing
  const top = Math.max(1, ...values);
  const figure = el("figure", null, "chart");
  figure.dataset.series = key;
  const last = values.length ? values[values.length - 1] : 0;
  figure.append(el("figcaption", `${title}: ${last} now, peak ${Math.max(0, ...values)}`));
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  const line = document.createElementNS(SVG, "polyline");
  const step = values.length > 1 ? width / (values.length - 1) : width;
  line.setAttribute("points", values.map((v, i) => `${(i * step).toFixed(1)},${(height - 2 - (v / top) * (height - 4)).toFixed(1)}`).join(" "));
  svg.append(line);
  figure.append(svg);
  return figure;
}

async function loadOverview() {
  const stats = await api("GET", "/stats/rates");
  const minutes = Math.round((stats.points.length * stats.every) / 60);
  $("overview-note").textContent = `one point every ${stats.every} s, the last ${minutes} min (up to an hour)`;
  $("charts").replaceChildren(...SERIES.map(([key, title]) => chart(title, stats.points, key)));
  const ready = await fetch("readyz");
  $("overview-ready").textContent = pretty(await ready.json());
}

// -- start ----------------------------------------------------------------------------------

(async () => {
  try {
    await api("GET", "/rules"); // answered without the database: the console opens while it is down
  } catch (err) {
    if (!$("key-form").hidden) return; // api() asked for a key (a 401, or a key's scope)
    $("page-error").textContent = `Could not reach the service: ${err.message}`;
    $("key-forget").hidden = !apiKey; // whatever went wrong, a key held can be let go
    return;
  }
  $("key-forget").hidden = !apiKey;
  show();
})();
