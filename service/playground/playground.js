// The playground: one page over the server's own API (relative URLs, so it works behind a
// path prefix). No framework, no CDN: this file and playground.css are all it loads.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: [], samples: {}, image: null, imageName: "", objectUrls: [] };

function headers() {
  const token = $("token").value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function setStatus(text, kind = "") {
  const el = $("status");
  el.textContent = text;
  el.className = `status ${kind}`;
}

function forget() {
  state.objectUrls.forEach((u) => URL.revokeObjectURL(u));
  state.objectUrls = [];
}

function urlOf(blob) {
  const u = URL.createObjectURL(blob);
  state.objectUrls.push(u);
  return u;
}

async function loadModels() {
  const r = await fetch("v1/models", { headers: headers() });
  if (r.status === 401) {
    setStatus("This server needs a bearer token: enter it below, then change the endpoint to reload.", "error");
    return;
  }
  state.models = (await r.json()).models;
  fillModels();
}

function fillModels() {
  const endpoint = $("endpoint").value;
  const select = $("model");
  select.replaceChildren();
  for (const m of state.models.filter((m) => m.endpoint === endpoint)) {
    const o = document.createElement("option");
    o.value = m.name;
    o.textContent = `${m.name} (${m.family}${m.task ? ", " + m.task : ""}; ${m.rungs.length} rungs)`;
    o.dataset.task = m.task || "";
    select.append(o);
  }
  $("expression-row").hidden = endpoint !== "/ground";
  $("run").disabled = !select.value || !state.image;
}

async function loadSamples() {
  const r = await fetch("playground/samples/samples.json");
  state.samples = await r.json();
  const box = $("samples");
  for (const [name, s] of Object.entries(state.samples)) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "sample";
    b.dataset.sample = name;
    b.title = `${s.title} for ${s.endpoint}`;
    const img = document.createElement("img");
    img.src = `playground/samples/${name}`;
    img.alt = s.title;
    b.append(img, document.createTextNode(s.endpoint));
    b.addEventListener("click", () => pickSample(name));
    box.append(b);
  }
}

async function pickSample(name) {
  const s = state.samples[name];
  const r = await fetch(`playground/samples/${name}`);
  state.image = await r.blob();
  state.imageName = name;
  $("endpoint").value = s.endpoint;
  if (s.expression) $("expression").value = s.expression;
  fillModels();
  setStatus(`Sample ${s.title} ready: Run.`);
}

function query(extra = {}) {
  const q = new URLSearchParams({ model: $("model").value });
  const deadline = Number($("deadline").value);
  if (deadline > 0) q.set("deadline_ms", String(deadline));
  if (!$("auto-budget").checked) q.set("budget", Number($("budget").value).toFixed(2));
  const task = $("model").selectedOptions[0]?.dataset.task;
  if ($("endpoint").value === "/ground" && task) q.set("task", task);
  for (const [k, v] of Object.entries(extra)) q.set(k, v);
  return q;
}

async function post(path, q) {
  const endpoint = $("endpoint").value;
  const init = { method: "POST", headers: headers() };
  if (endpoint === "/ground") {
    const form = new FormData();
    form.append("image", state.image, state.imageName || "image");
    form.append("expression", $("expression").value);
    init.body = form;
  } else {
    init.body = state.image;
    init.headers["Content-Type"] = "application/octet-stream";
  }
  return fetch(`${path.slice(1)}?${q}`, init);
}

async function errorText(r) {
  try {
    const e = (await r.json()).error;
    const after = r.headers.get("Retry-After");
    return `${r.status}: ${e.message}${e.accepted ? ` (accepted: ${e.accepted})` : ""}${after ? ` - retry after ${after} s` : ""}`;
  } catch {
    return `${r.status} ${r.statusText}`;
  }
}

function showServed(h, body = {}) {
  const rows = [
    ["model", h.get("X-Anytime-Model")],
    ["rung", h.get("X-Anytime-Rung")],
    ["decision", `${h.get("X-Anytime-Decision")} (policy ${h.get("X-Anytime-Policy")})`],
    ["budget", h.get("X-Anytime-Budget")],
    ["FLOPs", `${(100 * Number(h.get("X-Anytime-Flops-Fraction"))).toFixed(1)} % of the top rung (${(Number(h.get("X-Anytime-Flops")) / 1e6).toFixed(1)} MFLOPs)`],
    ["deadline", h.get("X-Anytime-Deadline-Ms") ? `${h.get("X-Anytime-Deadline-Ms")} ms` : "none"],
    ["time", `queue ${h.get("X-Anytime-Queue-Ms")} ms, compute ${h.get("X-Anytime-Compute-Ms")} ms, server ${h.get("X-Anytime-Server-Ms")} ms (predicted ${h.get("X-Anytime-Predicted-Ms")} ms)`],
  ];
  if (h.get("X-Anytime-Rung-Mix")) rows.push(["patches per rung", h.get("X-Anytime-Rung-Mix").replaceAll(",", ", ")]);
  if (h.get("X-Anytime-Predicted-Patch-PSNR")) rows.push(["predicted patch PSNR", `${h.get("X-Anytime-Predicted-Patch-PSNR")} dB`]);
  if (body.expected_accuracy != null) rows.push(["expected accuracy", `${(100 * body.expected_accuracy).toFixed(1)} % (held-out, this rung)`]);
  const dl = $("served");
  dl.replaceChildren();
  for (const [k, v] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v ?? "-";
    dd.dataset.field = k;
    dl.append(dt, dd);
  }
  dl.hidden = false;
}

function figure(caption, child, id) {
  const f = document.createElement("figure");
  if (id) f.id = id;
  const c = document.createElement("figcaption");
  c.textContent = caption;
  f.append(child, c);
  return f;
}

function image(src, alt) {
  const img = document.createElement("img");
  img.src = src;
  img.alt = alt;
  return img;
}

async function superresolve() {
  const r = await post("/superresolve", query());
  if (!r.ok) throw new Error(await errorText(r));
  const sr = urlOf(await r.blob());
  showServed(r.headers);
  const served = r.headers.get("X-Anytime-Budget");
  // Bicubic (the ladder's bottom rung) and the rung map of the served budget: the same plan,
  // computed again without running a network (explain=true).
  const mapQuery = query({ explain: "true" });
  mapQuery.delete("deadline_ms");
  if (served && !served.startsWith("rung:") && served !== "best") mapQuery.set("budget", served);
  const bicQuery = query({ rung: "bicubic" });
  bicQuery.delete("deadline_ms");
  bicQuery.delete("budget");
  const [bic, map] = await Promise.all([post("/superresolve", bicQuery), post("/superresolve", mapQuery)]);
  const out = $("output");
  out.replaceChildren();
  const row = document.createElement("div");
  row.className = "side-by-side";
  if (bic.ok) row.append(figure("bicubic (the bottom rung)", image(urlOf(await bic.blob()), "bicubic x4"), "bicubic"));
  const overlay = document.createElement("div");
  overlay.className = "overlay";
  overlay.append(image(sr, "super-resolved x4"));
  if (map.ok) {
    const m = image(urlOf(await map.blob()), "rung map");
    m.className = "rung-map";
    m.id = "rung-map";
    overlay.append(m);
  }
  row.append(figure(`served: ${r.headers.get("X-Anytime-Rung-Mix") || r.headers.get("X-Anytime-Rung")}`, overlay, "served-image"));
  out.append(row);
  if (map.ok) {
    const legend = document.createElement("div");
    legend.className = "legend";
    legend.id = "rung-legend";
    const toggle = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = true;
    box.addEventListener("change", () => overlay.classList.toggle("hide-map", !box.checked));
    toggle.append(box, " rung map over the image: ");
    legend.append(toggle);
    for (const part of (map.headers.get("X-Anytime-Rung-Colours") || "").split(",").filter(Boolean)) {
      const [name, colour] = part.split("=");
      const chip = document.createElement("span");
      chip.className = "chip";
      chip.style.setProperty("--c", colour);
      chip.textContent = name;
      legend.append(chip);
    }
    out.append(legend);
  }
}

async function classify() {
  const r = await post("/classify", query());
  if (!r.ok) throw new Error(await errorText(r));
  const body = await r.json();
  showServed(r.headers, body);
  const table = document.createElement("table");
  table.id = "predictions";
  table.innerHTML = "<thead><tr><th>label</th><th>probability</th></tr></thead>";
  const tbody = document.createElement("tbody");
  for (const p of body.predictions) {
    const tr = document.createElement("tr");
    const label = document.createElement("td");
    label.textContent = p.label;
    const prob = document.createElement("td");
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${(100 * p.probability).toFixed(1)}%`;
    prob.append(bar, ` ${(100 * p.probability).toFixed(1)} %`);
    tr.append(label, prob);
    tbody.append(tr);
  }
  table.append(tbody);
  const out = $("output");
  out.replaceChildren(figure("input", image(urlOf(state.image), "input"), "input-image"), table);
}

async function ground() {
  const r = await post("/ground", query());
  if (!r.ok) throw new Error(await errorText(r));
  const body = await r.json();
  showServed(r.headers, body);
  const bitmap = await createImageBitmap(state.image);
  const scale = Math.max(1, Math.floor(512 / Math.max(bitmap.width, bitmap.height)));
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width * scale;
  canvas.height = bitmap.height * scale;
  canvas.id = "ground-canvas";
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  ctx.lineWidth = 3;
  ctx.strokeStyle = "#ff2d55";
  if (body.polygon && body.polygon.length) {
    ctx.fillStyle = "rgba(255, 45, 85, 0.35)";
    ctx.beginPath();
    body.polygon.forEach(([x, y], i) => (i ? ctx.lineTo(x * scale, y * scale) : ctx.moveTo(x * scale, y * scale)));
    ctx.closePath();
    ctx.fill();
    ctx.stroke();
  }
  const [x0, y0, x1, y1] = body.box;
  ctx.strokeStyle = "#00e5ff";
  ctx.strokeRect(x0 * scale, y0 * scale, (x1 - x0) * scale, (y1 - y0) * scale);
  canvas.dataset.box = body.box.join(",");
  const out = $("output");
  out.replaceChildren(figure(`"${body.expression}": box ${body.box.map((v) => v.toFixed(0)).join(", ")}, score ${body.score.toFixed(3)}`, canvas, "ground-figure"));
}

async function run(event) {
  event.preventDefault();
  if (!state.image) return;
  forget();
  $("run").disabled = true;
  setStatus("Running...");
  const t0 = performance.now();
  try {
    const endpoint = $("endpoint").value;
    await (endpoint === "/superresolve" ? superresolve() : endpoint === "/classify" ? classify() : ground());
    setStatus(`Served in ${(performance.now() - t0).toFixed(0)} ms (round trip, as this browser saw it).`, "ok");
  } catch (err) {
    setStatus(err.message, "error");
  } finally {
    $("run").disabled = false;
  }
}

function init() {
  $("endpoint").addEventListener("change", () => (state.models.length ? fillModels() : loadModels()));
  $("model").addEventListener("change", fillModels);
  $("file").addEventListener("change", () => {
    const f = $("file").files[0];
    if (!f) return;
    state.image = f;
    state.imageName = f.name;
    fillModels();
    setStatus(`${f.name} ready: Run.`);
  });
  $("deadline").addEventListener("input", () => {
    const v = Number($("deadline").value);
    $("deadline-value").textContent = v > 0 ? `${v} ms` : "none";
  });
  $("auto-budget").addEventListener("change", () => ($("budget").disabled = $("auto-budget").checked));
  $("budget").addEventListener("input", () => ($("budget-value").textContent = Number($("budget").value).toFixed(2)));
  $("token").value = sessionStorage.getItem("anytime-token") || "";
  $("token").addEventListener("change", () => {
    sessionStorage.setItem("anytime-token", $("token").value);
    loadModels();
  });
  $("controls").addEventListener("submit", run);
  loadModels().catch((e) => setStatus(`Could not list the models: ${e.message}`, "error"));
  loadSamples().catch(() => {});
}

init();
