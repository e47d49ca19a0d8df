// kiln's dashboard: snapshots from /dashboard/events (server-sent events)
// drawn with uPlot. Everything comes from the kiln process serving this page.
"use strict";

// What went wrong on the page, for a person in the console and for tests.
window.__kilnErrors = [];
window.addEventListener("error", (e) => window.__kilnErrors.push(String(e.message || e)));
document.addEventListener("securitypolicyviolation", (e) =>
  window.__kilnErrors.push(`blocked ${e.blockedURI} (${e.violatedDirective})`));

const state = {
  snapshots: [],
  points: 0,
  model: null,
  events: [],
  charts: {},
  connected: false,
  // The last explanation shown, and the layer and head chosen (-1: mean).
  explanation: null,
  attention: { layer: -1, head: -1 },
};
window.kilnDashboard = state;

const css = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();
const $ = (id) => document.getElementById(id);
const fmt = (v, digits = 1) => (v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(digits));
const bytes = (b) => {
  if (b === null || b === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
  return `${b.toFixed(i ? 1 : 0)} ${units[i]}`;
};
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));

function axes(yLabel) {
  const stroke = css("--muted"), grid = { stroke: css("--grid"), width: 1 };
  return [
    { stroke, grid, ticks: grid },
    { stroke, grid, ticks: grid, label: yLabel, size: 60 },
  ];
}

function chart(id, yLabel, series, opts = {}) {
  const el = $(id);
  const colors = ["--s1", "--s2", "--s3", "--s4", "--s5", "--s6"].map(css);
  const u = new uPlot({
    width: el.clientWidth || 400,
    height: 220,
    scales: opts.scales || { x: { time: true } },
    axes: opts.axes || axes(yLabel),
    legend: { live: true },
    series: [{}].concat(series.map((s, i) => Object.assign({
      stroke: colors[i % colors.length], width: 2, spanGaps: false,
      value: (u, v) => fmt(v, s.digits === undefined ? 1 : s.digits),
    }, s))),
  }, [[], ...series.map(() => [])], el);
  state.charts[id] = u;
  return u;
}

function setup() {
  chart("latency", "ms", [
    { label: "first token p50" }, { label: "first token p95" }, { label: "first token p99" },
    { label: "end to end p50" }, { label: "end to end p99" }, { label: "between tokens p50" },
  ]);
  chart("throughput", "tok/s", [{ label: "prompt" }, { label: "generated" }]);
  chart("cache", "%", [{ label: "KV prefix reuse" }, { label: "completion cache" }, { label: "draft accepted" }]);
  chart("requests", "", [{ label: "requests/s", digits: 2 }, { label: "running", digits: 0 }, { label: "waiting", digits: 0 }]);
  const colors = ["--s1", "--s4"].map(css);
  const bars = uPlot.paths.bars({ size: [0.8, 40] });
  const el = $("histogram");
  state.histBounds = [];
  state.charts.histogram = new uPlot({
    width: el.clientWidth || 400,
    height: 220,
    scales: { x: { time: false } },
    axes: [
      { stroke: css("--muted"), grid: { show: false },
        values: (u, ticks) => ticks.map((t) => {
          const b = state.histBounds[Math.round(t)];
          return b === undefined ? "" : b < 0 ? "∞" : b >= 1000 ? `${fmt(b / 1000, 1)}s` : `${fmt(b, 0)}`;
        }), label: "≤ ms" },
      { stroke: css("--muted"), grid: { stroke: css("--grid") }, label: "requests", size: 60 },
    ],
    series: [
      { value: (u, v) => { const b = state.histBounds[v]; return b === undefined ? "–" : b < 0 ? "> last" : `≤ ${fmt(b, 1)} ms`; } },
      { label: "first token", stroke: colors[0], fill: colors[0] + "88", paths: bars, points: { show: false } },
      { label: "end to end", stroke: colors[1], fill: colors[1] + "88", paths: bars, points: { show: false } },
    ],
  }, [[], [], []], el);
  window.addEventListener("resize", () => {
    for (const [id, u] of Object.entries(state.charts)) u.setSize({ width: $(id).clientWidth, height: 220 });
  });
}

function column(f) { return state.snapshots.map(f); }

function draw() {
  const snaps = state.snapshots;
  if (!snaps.length) return;
  const x = column((s) => s.t / 1000);
  const pct = (v) => (v === null || v === undefined ? null : v * 100);
  state.charts.latency.setData([x,
    column((s) => s.ttft_ms.p50), column((s) => s.ttft_ms.p95), column((s) => s.ttft_ms.p99),
    column((s) => s.e2e_ms.p50), column((s) => s.e2e_ms.p99), column((s) => s.inter_token_ms.p50)]);
  state.charts.throughput.setData([x, column((s) => s.prompt_tokens_per_s), column((s) => s.generated_tokens_per_s)]);
  state.charts.cache.setData([x, column((s) => pct(s.prefix_cache_hit_rate)),
    column((s) => pct(s.completion_cache_hit_rate)), column((s) => pct(s.draft_acceptance))]);
  state.charts.requests.setData([x, column((s) => s.requests_per_s), column((s) => s.running), column((s) => s.waiting)]);
  const last = snaps[snaps.length - 1];
  drawHistogram(last);
  drawModel(last);
  drawContext(last.last_prompt);
  drawPolicies(last.policies);
  drawPool(last.pool);
  drawOffline(last.offline);
  drawExperiments(last.experiments);
  $("updated").textContent = `updated ${new Date(last.t).toLocaleTimeString()}, every ${fmt(last.interval_s, 0)} s`;
}

function drawHistogram(s) {
  const bounds = new Set();
  for (const [b] of s.ttft_histogram.concat(s.e2e_histogram)) bounds.add(b);
  const sorted = [...bounds].sort((a, b) => (a < 0) - (b < 0) || a - b);
  state.histBounds = sorted;
  const count = (h) => sorted.map((b) => { const e = h.find(([x]) => x === b); return e ? e[1] : 0; });
  state.charts.histogram.setData([sorted.map((_, i) => i), count(s.ttft_histogram), count(s.e2e_histogram)]);
}

function rows(table, pairs) {
  $(table).innerHTML = pairs.map(([k, v]) => `<tr><th>${esc(k)}</th><td>${v}</td></tr>`).join("");
}

function drawModel(s) {
  const m = s.model || {};
  const id = m.model || null;
  if (id !== state.model) {
    state.model = id;
    $("model").textContent = id ? `${id} on ${m.backend}` : "no model";
  }
  const t = s.totals;
  rows("modeltable", [
    ["model", esc(m.model || "–")],
    ["architecture", esc(m.architecture || "–")],
    ["backend", esc(m.backend || "–")],
    ["FIM template", esc(m.fim || "–")],
    ["context window", `${fmt(s.context_window_tokens, 0)} tokens`],
    ["model file", bytes(s.model_bytes)],
    ["memory", `${bytes(s.memory.resident_bytes)} resident, ${bytes(s.memory.available_bytes)} available`],
    ["served", `${fmt(t.requests, 0)} requests, ${fmt(t.prompt_tokens, 0)} prompt and ${fmt(t.generated_tokens, 0)} generated tokens`],
    ["fallbacks to CPU", fmt(t.fallbacks, 0)],
    ["completion cache evictions", fmt(t.completion_cache_evictions, 0)],
    ["device transfers", `${bytes(t.bytes_to_device)} up, ${bytes(t.bytes_from_device)} down`],
    ["plugins", pluginHealth(s.offline && s.offline.models && s.offline.models.plugins)],
  ]);
}

// Each backend plugin: its state, its conformance gate, its library there.
function pluginHealth(list) {
  if (!list) return "–";
  if (!list.length) return "none installed (the built-in CPU backend)";
  return list.map((p) => {
    const gate = p.failed ? `${p.failed} conformance case(s) failed` : `${fmt(p.passed, 0)} cases passed`;
    const lib = p.library_present ? "" : ", its library is missing";
    return `${esc(p.plugin)}: ${esc(p.state)}, ${gate}${lib}`;
  }).join("<br>");
}

// Widths are set through the DOM after the markup: the page's security
// policy refuses inline style attributes.
function bar(part, whole) {
  const p = whole > 0 ? Math.min(100, (100 * part) / whole) : 0;
  return `<div class="bar"><div data-width="${p.toFixed(1)}"></div></div>`;
}

function sizeBars(root) {
  for (const el of root.querySelectorAll("[data-width]")) el.style.width = `${el.dataset.width}%`;
}

function drawContext(p) {
  if (!p) return;
  const snippets = (p.snippets || []).map((c) =>
    `<tr><td>${esc(c.path)}:${c.start_line + 1}–${c.end_line}</td><td class="num">${c.tokens}</td><td class="num">${fmt(c.score, 2)}</td></tr>`).join("");
  $("context").innerHTML =
    `<div>${esc(p.file)}: ${p.prompt_tokens} prompt tokens of ${p.limit_tokens} ${bar(p.prompt_tokens, p.limit_tokens)}</div>` +
    `<div>other files: ${p.context_tokens} of ${p.context_budget_tokens} tokens, ranked by ${esc(p.ranked_by)} ${bar(p.context_tokens, p.context_budget_tokens)}</div>` +
    (snippets ? `<table><tr><th>snippet</th><th>tokens</th><th>score</th></tr>${snippets}</table>` : `<p class="muted">No snippet from other files.</p>`);
  sizeBars($("context"));
}

function drawPolicies(list) {
  if (!list || !list.length) return;
  const perCall = (p) => { const n = (p.ok || 0) + (p.error || 0); return n && p.fuel !== undefined ? p.fuel / n : null; };
  $("policies").innerHTML = `<table><tr><th>policy</th><th>ok</th><th>errors</th><th>fuel per call</th><th>breaker</th></tr>` +
    list.map((p) => `<tr><td>${esc(p.policy)}</td><td class="num">${fmt(p.ok || 0, 0)}</td><td class="num">${fmt(p.error || 0, 0)}</td><td class="num">${fmt(perCall(p), 0)}</td><td>${p.breaker_open ? "open: built-in ranker" : "closed"}</td></tr>`).join("") +
    `</table>`;
}

function drawPool(p) {
  if (!p || !p.models || !p.models.length) return;
  $("pool").innerHTML =
    `<div>${bytes(p.memory_bytes)} of a ${bytes(p.budget_bytes)} budget ${bar(p.memory_bytes, p.budget_bytes)}</div>` +
    `<table><tr><th>model</th><th>loaded</th><th>health</th><th>loads</th><th>unloads</th><th>failed over</th></tr>` +
    p.models.map((m) => `<tr><td>${esc(m.model)}</td><td>${m.loaded ? "yes" : "no"}</td><td class="${m.health === "healthy" ? "" : "bad"}">${esc(m.health)}</td>` +
      `<td class="num">${fmt(m.loads, 0)}</td><td class="num">${fmt(m.unloads, 0)}</td><td class="num">${fmt(m.fallbacks, 0)}</td></tr>`).join("") +
    `</table><div class="muted">${fmt(p.paused, 0)} request(s) paused for an inline completion, ${fmt(p.offline_answers, 0)} answered from the offline cache</div>`;
  sizeBars($("pool"));
}

function drawOffline(o) {
  const yes = (b, good, bad) => (b === null || b === undefined ? "–" : b ? good : bad);
  rows("offline", [
    ["listening on", esc((o.listening || []).join(", ") || "–")],
    ["loopback only", yes(o.loopback_only, "yes", "no: reachable from other machines")],
    ["connections to other machines", o.outbound_connections === null ? "–" : `${o.outbound_connections}`],
    ["models on this disk", o.models ? `${o.models.on_disk} of ${o.models.registered} registered` : "–"],
  ]);
}

// A/B experiments: each arm's outcomes, the difference with its
// always-valid 95 % interval, and the decision.
function drawExperiments(list) {
  if (!list || !list.length) return;
  $("experiments").innerHTML = list.map((s) => {
    const e = s.experiment, a = s.analysis;
    const pct = (v) => (v === null || v === undefined ? "–" : `${(v * 100).toFixed(1)} %`);
    const arms = s.arms.map((r) => `<tr><td>${esc(r.arm)}</td><td>${esc(r.version)}</td><td class="num">${r.units}</td>` +
      `<td class="num">${r.served}</td><td class="num">${r.accepted}</td><td class="num">${r.superseded}</td>` +
      `<td class="num">${pct(r.acceptance)}</td><td class="num">${fmt(r.mean_latency_ms, 0)}</td></tr>`).join("");
    const scale = a.metric === "acceptance" ? 100 : 1, unit = a.metric === "acceptance" ? " points" : " ms";
    const diff = a.difference === null ? "no outcomes yet"
      : `b − a ${(a.difference * scale).toFixed(1)}${unit}, 95 % always-valid interval [${(a.interval[0] * scale).toFixed(1)}, ${(a.interval[1] * scale).toFixed(1)}]; likelihood ratio ${fmt(a.likelihood_ratio, 2)} (a winner at ${fmt(a.threshold, 0)})`;
    const verdict = e.state !== "running"
      ? `stopped: ${esc(e.reason || "")}`
      : a.guardrail ? `guardrail: ${esc(a.guardrail)}`
      : a.winner ? `decided: ${esc(a.winner === "a" ? e.a : e.b)} wins`
      : a.events_needed > 0 ? `undecided: ${a.events_needed} more outcomes per arm before a decision` : "undecided";
    return `<h3>${esc(e.name)} <span class="muted">${esc(e.model)}, by ${esc(e.metric)}, ${esc(e.state)}</span></h3>` +
      `<table><tr><th>arm</th><th>version</th><th>units</th><th>served</th><th>accepted</th><th>superseded</th><th>acceptance</th><th>ms</th></tr>${arms}</table>` +
      `<div class="muted">${diff}</div><div>${verdict}</div>`;
  }).join("");
}

function addEvents(s) {
  for (const e of s.events || []) state.events.unshift({ t: s.t, text: e });
  state.events = state.events.slice(0, 100);
  if (state.events.length) {
    $("events").innerHTML = state.events.map((e) => `<li><span class="muted">${new Date(e.t).toLocaleTimeString()}</span> ${esc(e.text)}</li>`).join("");
  }
}

// Parts by importance and the counterfactual of the last explanation.
function drawExplanation(d) {
  const e = d.explanation;
  const parts = (e.parts || []).concat(e.lines || []).slice(0, 8).map((a) =>
    `<tr><td class="num">${fmt(a.importance, 3)}</td><td>${esc(a.kind)}</td><td>${esc(a.label)}</td></tr>`).join("");
  const cf = e.counterfactual
    ? `<div>without <b>${esc(e.counterfactual.removed.label)}</b>: <code>${esc(e.counterfactual.completion)}</code></div>` : "";
  $("explanation").innerHTML =
    `<div>${esc(d.model)} completes with <code>${esc(e.completion)}</code> (${e.completion_tokens} tokens, log-probability ${fmt(e.logprob, 2)})</div>` +
    (parts ? `<table><tr><th>importance (nats)</th><th>part</th><th></th></tr>${parts}</table>` : "") + cf;
  const m = e.attention;
  $("attn").hidden = !m;
  if (!m) return;
  const options = (n, what) => [`<option value="-1">mean of ${what}s</option>`]
    .concat([...Array(n).keys()].map((i) => `<option value="${i}">${what} ${i}</option>`)).join("");
  $("attn-layer").innerHTML = options(m.layers, "layer");
  $("attn-head").innerHTML = options(m.heads, "head");
  state.attention = { layer: -1, head: -1 };
  drawAttention();
}

// Mean attention per prompt token over the chosen layers and heads.
function attentionRow(m, layer, head) {
  const out = new Float64Array(m.tokens.length);
  const ls = layer < 0 ? [...Array(m.layers).keys()] : [layer];
  const hs = head < 0 ? [...Array(m.heads).keys()] : [head];
  for (const l of ls) for (const h of hs) m.weights[l][h].forEach((w, i) => { out[i] += w; });
  return out.map((v) => v / (ls.length * hs.length));
}

// The heat map (a row per layer) and the prompt shaded by the chosen
// row. The first token, where heads park attention they do not need,
// is drawn but left out of the scale.
function drawAttention() {
  const m = state.explanation && state.explanation.explanation.attention;
  if (!m) return;
  const { layer, head } = state.attention;
  const canvas = $("attn-map");
  const width = Math.max(1, canvas.clientWidth);
  const rowH = Math.max(4, Math.min(12, Math.floor(240 / m.layers)));
  canvas.width = width;
  canvas.height = rowH * m.layers;
  const ctx = canvas.getContext("2d");
  const rows = [...Array(m.layers).keys()].map((l) => attentionRow(m, l, head));
  const max = Math.max(1e-9, ...rows.map((r) => Math.max(0, ...r.slice(1))));
  const cell = width / m.tokens.length;
  ctx.fillStyle = css("--card");
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  rows.forEach((r, l) => {
    r.forEach((v, i) => {
      ctx.fillStyle = `rgba(194, 65, 12, ${Math.min(1, Math.sqrt(v / max)).toFixed(3)})`;
      ctx.fillRect(Math.floor(i * cell), l * rowH, Math.max(1, Math.ceil(cell)), rowH);
    });
    if (l === layer) {
      ctx.strokeStyle = css("--fg");
      ctx.strokeRect(0.5, l * rowH + 0.5, width - 1, rowH - 1);
    }
  });
  const row = attentionRow(m, layer, head);
  const rowMax = Math.max(1e-9, ...row.slice(1));
  $("attn-text").innerHTML = m.tokens.map((t, i) =>
    `<span data-a="${Math.min(1, row[i] / rowMax).toFixed(3)}" title="token ${i}: ${row[i].toFixed(4)}">${esc(t)}</span>`).join("");
  for (const el of $("attn-text").querySelectorAll("[data-a]")) {
    el.style.backgroundColor = `rgba(194, 65, 12, ${(0.85 * Math.sqrt(Number(el.dataset.a))).toFixed(3)})`;
  }
}

async function loadExplanation(seq) {
  if (!seq || state.loadingSeq === seq || (state.explanation && state.explanation.seq === seq)) return;
  state.loadingSeq = seq;
  const r = await fetch("/dashboard/explanation");
  if (!r.ok) return;
  const d = await r.json();
  if (!d || !d.explanation) return;
  state.explanation = d;
  drawExplanation(d);
}

function take(s) {
  state.snapshots.push(s);
  state.points++;
  loadExplanation(s.explanations).catch((e) => window.__kilnErrors.push(String(e)));
  const keep = 1000;
  if (state.snapshots.length > keep) state.snapshots.splice(0, state.snapshots.length - keep);
  addEvents(s);
}

function connect() {
  const es = new EventSource("/dashboard/events");
  es.addEventListener("open", () => {
    state.connected = true;
    $("conn").textContent = "live";
    $("conn").className = "pill ok";
  });
  es.addEventListener("error", () => {
    state.connected = false;
    $("conn").textContent = "disconnected: retrying";
    $("conn").className = "pill bad";
  });
  es.addEventListener("history", (e) => {
    state.snapshots = [];
    state.events = [];
    for (const s of JSON.parse(e.data)) take(s);
    draw();
  });
  es.addEventListener("snapshot", (e) => {
    take(JSON.parse(e.data));
    draw();
  });
}

setup();
connect();
$("attn-layer").addEventListener("change", (e) => { state.attention.layer = Number(e.target.value); drawAttention(); });
$("attn-head").addEventListener("change", (e) => { state.attention.head = Number(e.target.value); drawAttention(); });
$("attn-map").addEventListener("click", (e) => {
  const m = state.explanation && state.explanation.explanation.attention;
  if (!m) return;
  const l = Math.floor((e.offsetY / e.target.clientHeight) * m.layers);
  state.attention.layer = state.attention.layer === l ? -1 : l;
  $("attn-layer").value = String(state.attention.layer);
  drawAttention();
});
window.addEventListener("resize", drawAttention);
