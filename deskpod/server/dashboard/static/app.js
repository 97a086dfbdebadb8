// deskpod's dashboard: plain modules, no build step. Everything a model writes is put on the page as text
// (textContent), never as HTML. With an API key set on the server, every call sends it.

const $ = (selector) => document.querySelector(selector);
const COLORS = ["#2f6fdf", "#e08a1e", "#1c8a4a", "#9b4dca", "#c43b3b", "#5b6475"];

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "className") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children.flat()) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

function table(node, header, rows) {
  node.replaceChildren(el("tr", {}, header.map((h) => el("th", {}, h))),
    ...rows.map((cells) => el("tr", {}, cells.map((c) => c instanceof Node && c.tagName === "TD" ? c : el("td", {}, c)))));
}

const num = (value) => el("td", { className: "num" }, value);
const gb = (bytes) => `${(bytes / 1e9).toFixed(2)} GB`;
const mb = (bytes) => `${(bytes / 1e6).toFixed(1)} MB`;

// -- the API key and errors ------------------------------------------------------------------------

let apiKey = sessionStorage.getItem("deskpod-key") || "";
let askingKey = null;

function askKey() {
  if (!askingKey) {
    askingKey = new Promise((resolve) => {
      const dialog = $("#key-dialog");
      $("#key-form").onsubmit = () => {
        apiKey = $("#key-input").value.trim();
        sessionStorage.setItem("deskpod-key", apiKey);
        askingKey = null;
        resolve();
        refresh();
      };
      dialog.showModal();
    });
  }
  return askingKey;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, { json, method, headers = {}, signal } = {}) {
  const init = { method: method || (json === undefined ? "GET" : "POST"), headers: { ...headers }, signal };
  if (apiKey) init.headers.Authorization = `Bearer ${apiKey}`;
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    askKey();
    throw new Error("this server needs its API key");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error.message; } catch { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

const getJSON = async (path, options) => (await api(path, options)).json();

async function* serverEvents(response) {
  // the data of each server-sent event, parsed (the OpenAI stream's and the pull's)
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// -- views ------------------------------------------------------------------------------------------

let current = "box";
const views = { box: refreshBox, models: refreshModels, live: refreshLive, playground: refreshPlayground, planner: refreshPlanner };

function show(view) {
  current = view;
  history.replaceState(null, "", `#${view}`);
  for (const button of document.querySelectorAll("nav button")) button.classList.toggle("active", button.dataset.view === view);
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
  refresh();
}

async function refresh() {
  try {
    await views[current]();
    showError("");
  } catch (error) {
    showError(error.message);
  }
}

// -- the box ----------------------------------------------------------------------------------------

async function refreshBox() {
  const box = await getJSON("/api/dashboard/box");
  const m = box.memory;
  const parts = [];
  m.models.forEach((model, i) => {
    parts.push([`${model.name} weights`, model.weights_bytes, COLORS[i % COLORS.length]]);
    if (model.kv_cache_bytes) parts.push([`${model.name} KV pool`, model.kv_cache_bytes, COLORS[(i + 1) % COLORS.length] + "99"]);
  });
  const counted = parts.reduce((sum, p) => sum + p[1], 0);
  parts.push(["the rest of this process", Math.max(0, m.process_rss_bytes - counted), "#9aa3b2"]);
  parts.push(["used by others", Math.max(0, m.total_bytes - m.available_bytes - m.process_rss_bytes), "#c9ced8"]);
  $("#memory-bar").replaceChildren(...parts.map(([label, bytes, color]) => {
    const span = el("span", { title: `${label}: ${gb(bytes)}` });
    span.style.width = `${(100 * bytes) / m.total_bytes}%`;
    span.style.background = color;
    return span;
  }));
  table($("#memory-table"), ["", "planned by the engine", ""], [
    ...m.models.map((model) => [model.name, num(gb(model.weights_bytes + model.kv_cache_bytes)),
      `${gb(model.weights_bytes)} weights${model.kv_cache_bytes ? `, ${gb(model.kv_cache_bytes)} KV pool` : ""}`]),
    ["this process holds", num(gb(m.process_rss_bytes)), `peak ${gb(m.process_peak_bytes)}`],
    ["memory available", num(gb(m.available_bytes)), `of ${gb(m.total_bytes)}`],
  ]);
  const rows = [
    ["CPU", num(`${box.cpu.machine_percent.toFixed(0)} %`), `${box.cpu.cores} cores; deskpod ${box.cpu.process_percent.toFixed(0)} %`],
    ...box.gpu.map((g) => [g.name, num(gb(g.total_bytes - g.free_bytes)), `in use of ${gb(g.total_bytes)}`]),
    ["store", num(gb(box.disk.store_bytes)), `${box.disk.path}; ${gb(box.disk.free_bytes)} free of ${gb(box.disk.total_bytes)}`],
  ];
  table($("#machine-table"), ["", "", ""], rows);
}

// -- models -----------------------------------------------------------------------------------------

let known = null; // the last /api/dashboard/models answer

async function refreshModels() {
  known = await getJSON("/api/dashboard/models");
  $("#catalog").replaceChildren(...known.catalog.map((name) => el("option", { value: name })));
  const ref = (m) => (m.tag && m.tag !== "latest" ? `${m.name}:${m.tag}` : m.name);
  table($("#store-table"), ["name", "format", "architecture", "parameters", "quantization", "size", ""],
    known.store.map((m) => [ref(m), m.format, m.architecture,
      num(m.parameters ? `${(m.parameters / 1e6).toFixed(0)} M` : ""), m.quantization || "", num(mb(m.size)),
      el("td", {}, el("button", { onclick: () => verify(ref(m)) }, "Verify"), " ",
        el("button", { onclick: () => remove(ref(m)) }, "Remove"))]));
  table($("#loaded-table"), ["name", "kind", "context"], known.loaded.map((m) => [m.name, m.kind, num(m.max_context)]));
  $("#repository").hidden = !known.repository.length;
  table($("#repository-table"), ["model", "version", "state", "inferences", ""],
    known.repository.map((m) => [m.name, m.version || "", m.reason ? `${m.state}: ${m.reason}` : m.state,
      num(m.stats ? m.stats.inference_count : ""),
      el("td", {}, el("button", { onclick: () => repositoryAction(m.name, "load") }, "Load"), " ",
        el("button", { onclick: () => repositoryAction(m.name, "unload") }, "Unload"))]));
}

async function pull(event) {
  event.preventDefault();
  const name = $("#pull-name").value.trim();
  const bar = $("#pull-bar"), text = $("#pull-text");
  $("#pull-progress").hidden = false;
  bar.removeAttribute("value");
  text.textContent = `pulling ${name}...`;
  try {
    const response = await api("/api/dashboard/store/pull", { json: { name } });
    for await (const step of serverEvents(response)) {
      if (step.error) throw new Error(step.error);
      if (step.pulled) {
        bar.max = 1; bar.value = 1;
        text.textContent = `pulled ${step.pulled.name} (${mb(step.pulled.size)})`;
      } else if (step.total) {
        bar.max = step.total; bar.value = step.done;
        text.textContent = `${step.what}: ${mb(step.done)} of ${mb(step.total)}`;
      } else {
        bar.removeAttribute("value"); // a phase without a known size: the bar runs without a value
        text.textContent = `${step.what}...`;
      }
    }
    await refreshModels();
  } catch (error) {
    text.textContent = "";
    showError(error.message);
  }
}

async function verify(name) {
  try {
    const { problems } = await getJSON(`/api/dashboard/store/${encodeURIComponent(name)}/verify`, { method: "POST" });
    showError(problems.length ? problems.join("; ") : "");
    if (!problems.length) alert(`${name}: every file matches its sha256`);
  } catch (error) { showError(error.message); }
}

async function remove(name) {
  if (!confirm(`Remove ${name} from the store?`)) return;
  try {
    await api(`/api/dashboard/store/${encodeURIComponent(name)}`, { method: "DELETE" });
    await refreshModels();
  } catch (error) { showError(error.message); }
}

async function repositoryAction(name, action) {
  try {
    await api(`/v2/repository/models/${encodeURIComponent(name)}/${action}`, { json: {} });
    await refreshModels();
  } catch (error) { showError(error.message); }
}

// -- live serving: the numbers /metrics exports -----------------------------------------------------

const HISTORY = 60; // samples, one every 2 s
const samples = [];

function parseMetrics(text) {
  // Prometheus text format -> [{name, labels, value}]
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    for (const pair of (match[3] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
    out.push({ name: match[1], labels, value: Number(match[4]) });
  }
  return out;
}

const total = (metrics, name) => metrics.filter((m) => m.name === name).reduce((sum, m) => sum + m.value, 0);

function buckets(metrics, name) {
  // cumulative counts by upper bound, summed over models
  const byBound = new Map();
  for (const m of metrics) {
    if (m.name !== `${name}_bucket`) continue;
    const bound = m.labels.le === "+Inf" ? Infinity : Number(m.labels.le);
    byBound.set(bound, (byBound.get(bound) || 0) + m.value);
  }
  return [...byBound.entries()].sort((a, b) => a[0] - b[0]);
}

function quantile(now, before, q) {
  // from the histogram's growth since the earlier sample: the bucket bound where the q-th observation lies
  const growth = now.map(([bound, count], i) => [bound, count - (before ? before[i]?.[1] || 0 : 0)]);
  const count = growth.length ? growth[growth.length - 1][1] : 0;
  if (count <= 0) return null;
  const target = q * count;
  for (const [bound, cumulative] of growth) if (cumulative >= target) return bound;
  return null;
}

async function sampleMetrics() {
  const metrics = parseMetrics(await (await api("/metrics")).text());
  const sample = {
    at: performance.now() / 1000,
    tokens: total(metrics, "deskpod_generation_tokens_total"),
    running: total(metrics, "deskpod_num_requests_running"),
    waiting: total(metrics, "deskpod_num_requests_waiting"),
    kv: Math.max(0, ...metrics.filter((m) => m.name === "deskpod_kv_cache_usage_ratio").map((m) => m.value)),
    ttft: buckets(metrics, "deskpod_time_to_first_token_seconds"),
    itl: buckets(metrics, "deskpod_inter_token_latency_seconds"),
  };
  const previous = samples[samples.length - 1];
  const window = samples[Math.max(0, samples.length - 15)]; // latencies over the last ~30 s
  sample.tps = previous ? Math.max(0, (sample.tokens - previous.tokens) / (sample.at - previous.at)) : 0;
  for (const [key, q] of [["ttft50", 0.5], ["ttft95", 0.95]]) sample[key] = quantile(sample.ttft, window?.ttft, q);
  for (const [key, q] of [["itl50", 0.5], ["itl95", 0.95]]) sample[key] = quantile(sample.itl, window?.itl, q);
  samples.push(sample);
  if (samples.length > HISTORY) samples.shift();
}

function drawChart(canvas, series, format) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  canvas.width = width * ratio; canvas.height = height * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, width, height);
  const values = series.flatMap((s) => s.values).filter((v) => v !== null && Number.isFinite(v));
  const top = Math.max(1e-9, ...values) * 1.15;
  g.strokeStyle = "#d9dde5"; g.fillStyle = "#5b6475"; g.font = "11px system-ui";
  g.beginPath(); g.moveTo(0, height - 0.5); g.lineTo(width, height - 0.5); g.stroke();
  g.fillText(format(top), 4, 12);
  series.forEach((s, i) => {
    g.strokeStyle = COLORS[i]; g.lineWidth = 2; g.beginPath();
    let started = false;
    s.values.forEach((v, x) => {
      if (v === null || !Number.isFinite(v)) { started = false; return; }
      const px = (x / (HISTORY - 1)) * width, py = height - (v / top) * (height - 14);
      if (started) g.lineTo(px, py); else g.moveTo(px, py);
      started = true;
    });
    g.stroke();
  });
}

const seconds = (v) => (v === null || v === undefined ? "–" : v === Infinity ? "> max" : v < 1 ? `${(v * 1000).toFixed(0)} ms` : `${v.toFixed(1)} s`);

async function refreshLive() {
  await sampleMetrics();
  const last = samples[samples.length - 1];
  const column = (key) => samples.map((s) => (s[key] === Infinity ? null : s[key]));
  $("#live-tps").textContent = last.tps.toFixed(1);
  $("#live-running").textContent = last.running;
  $("#live-waiting").textContent = last.waiting;
  $("#live-kv").textContent = `${(100 * last.kv).toFixed(1)} %`;
  $("#live-ttft50").textContent = seconds(last.ttft50);
  $("#live-ttft95").textContent = seconds(last.ttft95);
  $("#live-itl50").textContent = seconds(last.itl50);
  $("#live-itl95").textContent = seconds(last.itl95);
  drawChart($("#chart-tps"), [{ values: column("tps") }], (v) => v.toFixed(0));
  drawChart($("#chart-requests"), [{ values: column("running") }, { values: column("waiting") }], (v) => v.toFixed(0));
  drawChart($("#chart-ttft"), [{ values: column("ttft50") }, { values: column("ttft95") }], seconds);
  drawChart($("#chart-itl"), [{ values: column("itl50") }, { values: column("itl95") }], seconds);
  drawChart($("#chart-kv"), [{ values: column("kv").map((v) => 100 * v) }], (v) => `${v.toFixed(0)} %`);
}

// -- the playground ---------------------------------------------------------------------------------

let conversation = [];

async function refreshPlayground() {
  const models = (await getJSON("/v1/models")).data;
  if (!known) known = await getJSON("/api/dashboard/models");
  const llms = known.loaded.filter((m) => m.kind === "llm").map((m) => m.name);
  const select = $("#chat-model"), chosen = select.value;
  select.replaceChildren(...models.filter((m) => llms.includes(m.id)).map((m) => el("option", { value: m.id }, m.id)));
  if (chosen) select.value = chosen;
}

function chatRequest() {
  const body = {
    model: $("#chat-model").value,
    messages: [...($("#chat-system").value.trim() ? [{ role: "system", content: $("#chat-system").value }] : []), ...conversation],
    temperature: Number($("#chat-temperature").value),
    top_p: Number($("#chat-top-p").value),
    max_tokens: Number($("#chat-max-tokens").value),
    stream: true,
  };
  if ($("#chat-seed").value !== "") body.seed = Number($("#chat-seed").value);
  const stop = $("#chat-stop").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (stop.length) body.stop = stop;
  if ($("#chat-logprobs").checked) Object.assign(body, { logprobs: true, top_logprobs: 3 });
  return body;
}

function python(value) {
  // a Python literal of a JSON value (strings as JSON writes them, which Python reads alike)
  if (value === true || value === false) return value ? "True" : "False";
  if (value === null) return "None";
  if (Array.isArray(value)) return `[${value.map(python).join(", ")}]`;
  if (typeof value === "object") return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${python(v)}`).join(", ")}}`;
  return JSON.stringify(value);
}

function showRequest(body) {
  const url = `${location.origin}/v1/chat/completions`;
  const auth = apiKey ? " -H 'Authorization: Bearer $DESKPOD_API_KEY'" : "";
  const quoted = JSON.stringify(body).replaceAll("'", "'\\''");
  $("#chat-curl").textContent = `curl -N ${url}${auth} -H 'Content-Type: application/json' -d '${quoted}'`;
  const { model, messages, stream, ...options } = body;
  const args = Object.entries(options).map(([k, v]) => `    ${k}=${python(v)},`);
  $("#chat-python").textContent = [
    ...(apiKey ? ["import os", ""] : []),
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url="${location.origin}/v1", api_key=${apiKey ? 'os.environ["DESKPOD_API_KEY"]' : '"none"'})`,
    "stream = client.chat.completions.create(",
    `    model=${JSON.stringify(model)},`,
    `    messages=${python(messages)},`,
    ...args,
    "    stream=True,",
    ")",
    "for chunk in stream:",
    '    print(chunk.choices[0].delta.content or "", end="", flush=True)',
  ].join("\n");
}

function tokenSpan(entry) {
  const p = Math.exp(entry.logprob);
  const span = el("span", { className: "tok", title: [`${entry.token}: ${(100 * p).toFixed(1)} %`,
    ...(entry.top_logprobs || []).map((t) => `${JSON.stringify(t.token)} ${(100 * Math.exp(t.logprob)).toFixed(1)} %`)].join("\n") }, entry.token);
  span.style.borderBottomColor = `hsl(${Math.round(120 * p)}, 70%, 45%)`;
  return span;
}

async function sendChat(event) {
  event.preventDefault();
  const text = $("#chat-input").value;
  if (!text.trim()) return;
  conversation.push({ role: "user", content: text });
  $("#chat-input").value = "";
  const log = $("#chat-log");
  log.append(el("div", { className: "msg user" }, text));
  const reply = el("div", { className: "msg assistant", "data-testid": "reply" });
  const body = el("span", { className: "body" });
  const meta = el("span", { className: "meta" });
  reply.append(body, meta);
  log.append(reply);
  const request = chatRequest();
  showRequest(request);
  $("#chat-send").disabled = true;
  let content = "", finish = "", tokens = 0;
  const started = performance.now();
  try {
    const response = await api("/v1/chat/completions", { json: request });
    for await (const chunk of serverEvents(response)) {
      const choice = chunk.choices[0];
      if (!choice) continue;
      const delta = choice.delta.content || "";
      content += delta;
      if (choice.logprobs && choice.logprobs.content) {
        for (const entry of choice.logprobs.content) { body.append(tokenSpan(entry)); tokens += 1; }
      } else if (delta) {
        body.append(delta); // text, never HTML
        tokens += 1;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    conversation.push({ role: "assistant", content });
    const elapsed = (performance.now() - started) / 1000;
    meta.textContent = `${tokens} tokens in ${elapsed.toFixed(1)} s · ${finish}`;
    reply.dataset.done = "true";
  } catch (error) {
    meta.textContent = error.message;
    reply.dataset.done = "error";
    conversation.pop();
  } finally {
    $("#chat-send").disabled = false;
  }
}

// -- the planner ------------------------------------------------------------------------------------

async function refreshPlanner() {
  if (!known) known = await getJSON("/api/dashboard/models");
  $("#plan-models").replaceChildren(...[...known.store.map((m) => m.name), ...known.builtins].map((n) => el("option", { value: n })));
  const hardware = $("#plan-hardware");
  if (!hardware.options.length) {
    hardware.replaceChildren(...known.hardware.map((h) => el("option", { value: h }, h)));
    hardware.options[0].selected = true;
    $("#plan-precision").append(...known.precisions.map((p) => el("option", { value: p }, p)));
  }
}

async function plan(event) {
  event.preventDefault();
  const hardware = [...$("#plan-hardware").selectedOptions].map((o) => o.value);
  const request = { model: $("#plan-model").value.trim(), hardware: hardware.length ? hardware : ["digits"] };
  if ($("#plan-precision").value) request.precision = $("#plan-precision").value;
  if ($("#plan-context").value) request.context = Number($("#plan-context").value);
  try {
    const plans = await getJSON("/api/dashboard/plan", { json: request });
    table($("#plan-table"), ["", ...plans.map((p) => `${p.hardware} (${p.boxes} box${p.boxes > 1 ? "es" : ""})`)], [
      ["fits", ...plans.map((p) => el("td", { className: p.fits ? "fits" : "nofit" }, p.fits ? "yes" : `no: needs ${p.nodes_needed || "more than 8"} boxes`))],
      ["precision", ...plans.map((p) => p.precision)],
      ["weights", ...plans.map((p) => num(gb(p.memory.weights)))],
      ["KV cache", ...plans.map((p) => num(`${gb(p.memory.kv_cache)} (${p.context.toLocaleString()} tokens)`))],
      ["activations + runtime", ...plans.map((p) => num(gb(p.memory.activations + p.memory.runtime_overhead)))],
      ["total / available", ...plans.map((p) => num(`${gb(p.memory.total_bytes)} / ${gb(p.memory.available_bytes)}`))],
      ["decode", ...plans.map((p) => num(`${p.decode_tokens_per_s.toFixed(1)} tok/s`))],
      ["time to first token", ...plans.map((p) => num(`${p.time_to_first_token_s.toFixed(2)} s`))],
      ["max context", ...plans.map((p) => num(p.max_context.toLocaleString()))],
    ]);
    showError("");
  } catch (error) { showError(error.message); }
}

// -- wiring -----------------------------------------------------------------------------------------

for (const button of document.querySelectorAll("nav button")) button.addEventListener("click", () => show(button.dataset.view));
$("#pull-form").addEventListener("submit", pull);
$("#chat-form").addEventListener("submit", sendChat);
$("#chat-clear").addEventListener("click", () => { conversation = []; $("#chat-log").replaceChildren(); });
$("#plan-form").addEventListener("submit", plan);
$("#chat-input").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("#chat-form").requestSubmit(); } });
const start = location.hash.slice(1);
show(views[start] ? start : "box");
window.addEventListener("hashchange", () => {
  const view = location.hash.slice(1);
  if (views[view] && view !== current) show(view);
});
setInterval(() => { if (current === "box" || current === "live") refresh(); }, 2000);
