// hermux's dashboard: reads /hermux/{me,health,keys,usage} with the access
// token the user signs in with, and shows them.  Every value from hermux
// goes into the page as text (textContent, attributes), never as HTML: model
// ids and client names come from clients.  The token lives in this tab's
// sessionStorage and leaves it only as the Authorization header of fetch().

const REFRESH_MS = 10000;
const TOKEN = "hermux.token";
const SVG = "http://www.w3.org/2000/svg";
const DAY_MS = 86400000;
const HISTORY_DAYS = 30;
const STATES = new Set(["ready", "cooling", "exhausted", "disabled"]);
const PALETTE = 8;
const USAGE_COLUMNS = [
  ["requests", "Requests"],
  ["free_requests", "Free-model"],
  ["rate_limited", "Rate limited"],
  ["errors", "Errors"],
  ["prompt_tokens", "Prompt tokens"],
  ["completion_tokens", "Completion tokens"],
  ["reasoning_tokens", "Reasoning tokens"],
  ["cached_tokens", "Cached tokens"],
  ["cost", "Credits"],
];
const METRICS = {
  requests: { label: "requests", of: (row) => row.requests },
  tokens: { label: "tokens", of: (row) => row.prompt_tokens + row.completion_tokens },
  cost: { label: "credits", of: (row) => row.cost },
};

const $ = (id) => document.getElementById(id);
const counts = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const creditsFormat = new Intl.NumberFormat(undefined, { maximumSignificantDigits: 4 });
const axisFormat = new Intl.NumberFormat(undefined, { maximumSignificantDigits: 3 });
const credits = (value) => (value === 0 ? "0" : creditsFormat.format(value));
const count = (value) => counts.format(value);

const state = {
  session: 0, // changes on every sign-in and sign-out: late answers are dropped
  timer: null,
  lastTry: 0,
  updatedAt: null,
  running: null,
  again: false,
  history: null,
  drawn: null,
  usage: {},
  sort: {
    "clients-table": { column: "requests", descending: true },
    "models-table": { column: "requests", descending: true },
  },
};

class Unauthorized extends Error {}
class Unreachable extends Error {}

// The one way the page asks hermux for data.
async function getJSON(path) {
  const token = sessionStorage.getItem(TOKEN);
  let response;
  try {
    response = await fetch(path, {
      headers: { Authorization: `Bearer ${token}` },
      cache: "no-store",
      credentials: "omit",
      redirect: "error",
    });
  } catch {
    throw new Unreachable("hermux is unreachable");
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: the status says enough
  }
  if (response.ok && body !== null) {
    return body;
  }
  const message = body?.error?.message ?? `hermux answered ${response.status}`;
  if (response.status === 401) {
    throw new Unauthorized(message);
  }
  throw new Error(`${response.status}: ${message}`);
}

// --- small DOM helpers -----------------------------------------------------

function text(element, value) {
  const shown = value === null || value === undefined ? "" : String(value);
  if (element.textContent !== shown) {
    element.textContent = shown;
  }
}

function make(tag, className, content) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (content !== undefined) element.textContent = content;
  return element;
}

function cell(tr, index, tag = "td") {
  while (tr.cells.length <= index) {
    const created = document.createElement(tr.cells.length === 0 ? "th" : tag);
    if (created.tagName === "TH") created.scope = "row";
    tr.append(created);
  }
  return tr.cells[index];
}

// Make tbody's rows those of items, in order, reusing the row of each key
// so that an unchanged row is not touched (no flicker, no lost selection).
function syncRows(tbody, items, keyOf, fill) {
  const existing = new Map();
  for (const tr of tbody.rows) existing.set(tr.dataset.key, tr);
  items.forEach((item, index) => {
    const key = keyOf(item);
    let tr = existing.get(key);
    if (tr === undefined) {
      tr = document.createElement("tr");
      tr.dataset.key = key;
    } else {
      existing.delete(key);
    }
    fill(tr, item);
    if (tbody.rows[index] !== tr) {
      tbody.insertBefore(tr, tbody.rows[index] ?? null);
    }
  });
  for (const tr of existing.values()) tr.remove();
}

function show(id, visible) {
  $(id).hidden = !visible;
}

function utcDay(offsetDays = 0) {
  return new Date(Date.now() + offsetDays * DAY_MS).toISOString().slice(0, 10);
}

function duration(seconds) {
  if (seconds < 120) return `${seconds} s`;
  if (seconds < 7200) return `${Math.floor(seconds / 60)} min`;
  if (seconds < 172800) return `${Math.floor(seconds / 3600)} h`;
  return `${Math.floor(seconds / 86400)} days`;
}

function localTime(element, iso) {
  // iso: an ISO UTC time from hermux, or null.
  if (iso === null || iso === undefined) {
    text(element, "");
    element.removeAttribute("title");
    return;
  }
  let time = element.querySelector("time");
  if (time === null) {
    time = document.createElement("time");
    element.replaceChildren(time);
  }
  time.setAttribute("datetime", iso);
  time.setAttribute("title", `${iso.replace("T", " ").replace(/Z$|\+00:00$/, "")} UTC`);
  text(time, new Date(iso).toLocaleString());
}

// A number against its limit: a <meter> and "value / limit".
function bar(td, value, limit, format) {
  let meter = td.querySelector("meter");
  let label = td.querySelector("span");
  if (meter === null) {
    meter = document.createElement("meter");
    label = document.createElement("span");
    td.replaceChildren(meter, label);
  }
  if (limit === null || limit === undefined) {
    meter.hidden = true;
    text(label, format(value));
    return;
  }
  meter.hidden = false;
  meter.min = 0;
  meter.max = limit;
  meter.high = limit * 0.8;
  meter.optimum = 0;
  meter.value = value;
  meter.setAttribute("aria-label", `${format(value)} of ${format(limit)}`);
  text(label, `${format(value)} / ${format(limit)}`);
}

// --- what hermux says ------------------------------------------------------

function renderHealth(health) {
  const line = $("health");
  const parts = [health.status === "ok" ? "ok" : `degraded: ${health.problem ?? "a problem"}`];
  parts.push(`version ${health.version}`, `up ${duration(health.uptime)}`);
  parts.push(`${health.keys_ready} of ${health.keys} keys ready`);
  text(line, parts.join(" · "));
  line.classList.toggle("degraded", health.status !== "ok");
}

function renderWho(me) {
  text($("who"), `${me.name} (${me.role})`);
}

function renderKeys(keys) {
  syncRows(
    $("keys-table").tBodies[0],
    keys,
    (key) => key.name,
    (tr, key) => {
      text(cell(tr, 0), key.name);
      const stateCell = cell(tr, 1);
      let badge = stateCell.querySelector("span");
      if (badge === null) {
        badge = document.createElement("span");
        stateCell.replaceChildren(badge);
      }
      badge.className = `badge state-${STATES.has(key.state) ? key.state : "other"}`;
      text(badge, key.state);
      bar(cell(tr, 2), key.free_requests_today, key.daily_limit, count);
      bar(cell(tr, 3), key.cost_today, key.daily_cost, credits);
      text(cell(tr, 4), count(key.rate_limited_today));
      text(cell(tr, 5), count(key.errors_today));
      localTime(cell(tr, 6), key.usable_again_at);
      // A ready key may still serve only free-model or only paid requests.
      const reasons = [
        key.free_requests_reason && `free-model requests: ${key.free_requests_reason}`,
        key.paid_requests_reason && `paid requests: ${key.paid_requests_reason}`,
      ];
      text(cell(tr, 7), key.reason ?? reasons.filter(Boolean).join("; "));
    },
  );
}

function renderMe(me) {
  const limits = me.limits;
  const rows = [
    ["daily requests", limits.daily_requests, count(me.today.requests), me.remaining.requests, count],
    ["daily credits", limits.daily_cost, credits(me.today.cost), me.remaining.cost, credits],
    ["requests per minute", limits.per_minute, "", null, count],
    ["requests at once", limits.max_parallel, "", null, count],
    ["models", limits.models && limits.models.join(", "), "", null, String],
    ["keys", limits.keys && limits.keys.join(", "), "", null, String],
    ["expires", limits.expires, "", null, (iso) => new Date(iso).toLocaleString()],
  ];
  syncRows(
    $("me-table").tBodies[0],
    rows,
    (row) => row[0],
    (tr, [name, allowed, used, remaining, format]) => {
      text(cell(tr, 0), name);
      text(cell(tr, 1), allowed === null ? "no limit" : format(allowed));
      text(cell(tr, 2), used);
      text(cell(tr, 3), remaining === null ? "" : format(remaining));
    },
  );
}

// --- the chart: stacked bars per UTC day, one series per key ----------------

function svg(tag, attributes, content) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, value);
  if (content !== undefined) element.textContent = content;
  return element;
}

function niceMax(value) {
  if (value <= 0) return 1;
  const step = 10 ** Math.floor(Math.log10(value));
  for (const factor of [1, 2, 2.5, 5, 10]) {
    if (factor * step >= value) return factor * step;
  }
  return 10 * step;
}

function drawChart() {
  const metricName = document.querySelector('input[name="metric"]:checked').value;
  const history = state.history;
  if (history === null) return;
  const signature = JSON.stringify([metricName, history.from, history.rows]);
  if (state.drawn === signature) return;
  state.drawn = signature;
  const metric = METRICS[metricName];
  const format = metricName === "cost" ? credits : count;
  const first = Date.parse(`${history.from}T00:00:00Z`);
  const days = Array.from({ length: HISTORY_DAYS }, (_, i) =>
    new Date(first + i * DAY_MS).toISOString().slice(0, 10),
  );
  const dayIndex = new Map(days.map((day, i) => [day, i]));
  const keys = [...new Set(history.rows.map((row) => row.key))].sort();
  const values = keys.map(() => new Array(HISTORY_DAYS).fill(0));
  for (const row of history.rows) {
    const i = dayIndex.get(row.day);
    if (i !== undefined) values[keys.indexOf(row.key)][i] += metric.of(row);
  }
  const totals = days.map((_, i) => values.reduce((sum, series) => sum + series[i], 0));
  const top = niceMax(Math.max(0, ...totals));
  const [width, height, left, right, upper, lower] = [640, 240, 56, 8, 10, 24];
  const plotHeight = height - upper - lower;
  const step = (width - left - right) / HISTORY_DAYS;
  const y = (value) => upper + plotHeight - (value / top) * plotHeight;

  const chart = $("chart");
  const title = $("chart-title");
  text(title, `${metric.label} per day over the last ${HISTORY_DAYS} days, by key`);
  const axis = svg("g", { class: "axis" });
  for (const value of [0, top / 2, top]) {
    axis.append(
      svg("line", { x1: left, x2: width - right, y1: y(value), y2: y(value) }),
      svg("text", { x: left - 6, y: y(value) + 4, "text-anchor": "end" }, axisFormat.format(value)),
    );
  }
  for (const i of [0, 14, HISTORY_DAYS - 1]) {
    axis.append(
      svg("text", { x: left + (i + 0.5) * step, y: height - 6, "text-anchor": "middle" }, days[i].slice(5)),
    );
  }
  const drawn = [title, axis];
  const base = new Array(HISTORY_DAYS).fill(0);
  keys.forEach((key, k) => {
    const group = svg("g", { class: `series s${k % PALETTE}`, "data-key": key });
    values[k].forEach((value, i) => {
      if (value <= 0) return;
      const rect = svg("rect", {
        x: left + i * step + 1,
        y: y(base[i] + value),
        width: Math.max(1, step - 2),
        height: Math.max(0.5, y(base[i]) - y(base[i] + value)),
      });
      rect.append(svg("title", {}, `${days[i]} ${key}: ${format(value)} ${metric.label}`));
      group.append(rect);
      base[i] += value;
    });
    drawn.push(group);
  });
  if (keys.length === 0) {
    drawn.push(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty" }, "no usage yet"));
  }
  chart.replaceChildren(...drawn);

  $("legend").replaceChildren(
    ...keys.map((key, k) => {
      const item = make("li");
      item.append(make("span", `swatch s${k % PALETTE}`), document.createTextNode(key));
      return item;
    }),
  );
}

// --- the tables per client and per model ----------------------------------

function buildUsageHeads() {
  for (const table of document.querySelectorAll("table.usage")) {
    const first = table.dataset.column;
    const tr = document.createElement("tr");
    for (const [column, label] of [[first, first === "client" ? "Client" : "Model"], ...USAGE_COLUMNS]) {
      const th = make("th");
      th.scope = "col";
      th.dataset.column = column;
      const button = make("button", "sort", label);
      button.type = "button";
      button.addEventListener("click", () => sortBy(table, column));
      th.append(button);
      tr.append(th);
    }
    table.tHead.replaceChildren(tr);
    table.append(document.createElement("tfoot"));
    markSorted(table);
  }
}

function sortBy(table, column) {
  const sort = state.sort[table.id];
  if (sort.column === column) {
    sort.descending = !sort.descending;
  } else {
    sort.column = column;
    sort.descending = column !== table.dataset.column;
  }
  markSorted(table);
  renderUsageTable(table);
}

function markSorted(table) {
  const sort = state.sort[table.id];
  for (const th of table.tHead.rows[0].cells) {
    if (th.dataset.column === sort.column) {
      th.setAttribute("aria-sort", sort.descending ? "descending" : "ascending");
    } else {
      th.removeAttribute("aria-sort");
    }
  }
}

function sortedRows(table) {
  const report = state.usage[table.id];
  if (report === undefined) return [];
  const { column, descending } = state.sort[table.id];
  const name = table.dataset.column;
  const rows = [...report.rows];
  rows.sort((a, b) => {
    const order = typeof a[column] === "string" ? a[column].localeCompare(b[column]) : a[column] - b[column];
    return (descending ? -order : order) || String(a[name]).localeCompare(String(b[name]));
  });
  return rows;
}

function fillUsageRow(name, tr, row) {
  text(cell(tr, 0), row[name]);
  USAGE_COLUMNS.forEach(([column], i) => {
    text(cell(tr, i + 1), column === "cost" ? credits(row[column]) : count(row[column]));
  });
}

function renderUsageTable(table) {
  const name = table.dataset.column;
  const report = state.usage[table.id];
  syncRows(table.tBodies[0], sortedRows(table), (row) => row[name], (tr, row) => fillUsageRow(name, tr, row));
  const totals = report && report.rows.length > 0 ? [{ ...report.totals, [name]: "total" }] : [];
  syncRows(table.tFoot, totals, () => "total", (tr, row) => fillUsageRow(name, tr, row));
}

function csvField(value) {
  let field = String(value);
  if (typeof value === "string" && /^[=+\-@\t\r]/.test(field)) {
    field = `'${field}`; // a spreadsheet would run it as a formula
  }
  return /[",\r\n]/.test(field) ? `"${field.replaceAll('"', '""')}"` : field;
}

function downloadCSV(table) {
  const name = table.dataset.column;
  const report = state.usage[table.id];
  if (report === undefined) return;
  const columns = [name, ...USAGE_COLUMNS.map(([column]) => column)];
  const lines = [columns.join(",")];
  for (const row of sortedRows(table)) lines.push(columns.map((column) => csvField(row[column])).join(","));
  const blob = new Blob([lines.join("\r\n") + "\r\n"], { type: "text/csv;charset=utf-8" });
  const link = make("a");
  link.href = URL.createObjectURL(blob);
  link.download = `hermux-${name}s-${report.from}-${report.to}.csv`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

// --- refreshing -----------------------------------------------------------

function showAge() {
  if (state.updatedAt === null) {
    text($("updated"), "");
    return;
  }
  const seconds = Math.max(0, Math.round((Date.now() - state.updatedAt) / 1000));
  text($("updated"), `updated ${seconds} s ago`);
}

async function load(session) {
  const me = await getJSON("me");
  const admin = me.role === "admin";
  const rangeDays = Number($("range").value);
  const today = utcDay();
  const asked = [
    getJSON("health"),
    getJSON(`usage?from=${utcDay(1 - HISTORY_DAYS)}&to=${today}&group_by=day,key`),
  ];
  if (admin) {
    const range = `from=${utcDay(1 - rangeDays)}&to=${today}`;
    asked.push(getJSON("keys"), getJSON(`usage?${range}&group_by=client`), getJSON(`usage?${range}&group_by=model`));
  }
  const [health, history, keys, byClient, byModel] = await Promise.all(asked);
  if (session !== state.session) return;
  renderWho(me);
  renderHealth(health);
  show("me", !admin);
  show("keys", admin);
  show("breakdown", admin);
  show("history", true);
  if (admin) {
    renderKeys(keys.keys);
    state.usage["clients-table"] = byClient;
    state.usage["models-table"] = byModel;
    renderUsageTable($("clients-table"));
    renderUsageTable($("models-table"));
  } else {
    renderMe(me);
  }
  state.history = history;
  drawChart();
}

async function refresh() {
  if (state.running !== null) {
    state.again = true;
    return state.running;
  }
  const session = state.session;
  state.running = (async () => {
    try {
      await load(session);
      if (session !== state.session) return;
      state.updatedAt = Date.now();
      show("unreachable", false);
      show("failure", false);
    } catch (error) {
      if (session !== state.session) return;
      if (error instanceof Unauthorized) {
        signOut(error.message);
      } else if (error instanceof Unreachable) {
        show("unreachable", true);
      } else {
        text($("failure"), `hermux could not answer: ${error.message}`);
        show("failure", true);
      }
    } finally {
      showAge();
    }
  })();
  try {
    await state.running;
  } finally {
    state.running = null;
  }
  if (state.again) {
    state.again = false;
    await refresh();
  }
}

function start() {
  state.session += 1;
  show("sign-in", false);
  show("session", true);
  clearInterval(state.timer);
  state.timer = setInterval(() => {
    showAge();
    if (Date.now() - state.lastTry >= REFRESH_MS) {
      state.lastTry = Date.now();
      refresh();
    }
  }, 1000);
  state.lastTry = Date.now();
  return refresh();
}

// Forget the token and everything shown with it.
function signOut(message = "") {
  state.session += 1;
  clearInterval(state.timer);
  state.timer = null;
  sessionStorage.removeItem(TOKEN);
  Object.assign(state, { updatedAt: null, history: null, drawn: null, usage: {} });
  for (const id of ["me", "keys", "history", "breakdown", "session", "unreachable", "failure"]) show(id, false);
  for (const tbody of document.querySelectorAll("tbody, tfoot")) tbody.replaceChildren();
  $("chart").replaceChildren($("chart-title"));
  $("legend").replaceChildren();
  text($("who"), "");
  text($("sign-in-error"), message);
  show("sign-in", true);
  $("token").focus();
}

async function signIn(event) {
  event.preventDefault();
  const input = $("token");
  const token = input.value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN, token);
  try {
    await getJSON("me");
  } catch (error) {
    sessionStorage.removeItem(TOKEN);
    text($("sign-in-error"), error.message);
    return;
  }
  input.value = "";
  text($("sign-in-error"), "");
  await start();
}

function main() {
  buildUsageHeads();
  $("sign-in-form").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut());
  $("refresh").addEventListener("click", () => refresh());
  $("range").addEventListener("change", () => refresh());
  for (const radio of document.querySelectorAll('input[name="metric"]')) {
    radio.addEventListener("change", drawChart);
  }
  for (const button of document.querySelectorAll("button.csv")) {
    button.addEventListener("click", () => downloadCSV($(button.dataset.table)));
  }
  if (sessionStorage.getItem(TOKEN)) {
    start();
  } else {
    signOut();
  }
}

main();
