// torchserve-explain viewer: one page, no build step, nothing loaded from elsewhere.
// Sends the request to TorchServe's /explanations/{model} (the server must allow this
// page's origin through its CORS settings) and shows what comes back.
"use strict";

const $ = (id) => document.getElementById(id);
let imageData = null; // base64 of the chosen image, without the data: prefix

function kind() {
  return $("kind-text").checked ? "text" : "image";
}

function showKind() {
  $("image-input").hidden = kind() !== "image";
  $("text-input").hidden = kind() !== "text";
}

function readImage(file) {
  const reader = new FileReader();
  reader.onload = () => {
    const url = String(reader.result);
    imageData = url.slice(url.indexOf(",") + 1);
    $("preview").src = url;
    $("preview").hidden = false;
  };
  reader.readAsDataURL(file);
}

// A value typed in a field: a number when it is one ("3"), else the string; "" means unset.
function fieldValue(id, numeric) {
  const raw = $(id).value.trim();
  if (!raw) return undefined;
  if (/^-?\d+$/.test(raw)) return parseInt(raw, 10);
  return numeric ? undefined : raw;
}

function requestBody() {
  const body = { data: kind() === "image" ? imageData : $("text").value };
  const options = { target: fieldValue("target"), method: fieldValue("method"),
                    contrast: fieldValue("contrast"), n_steps: fieldValue("n_steps", true) };
  for (const [name, value] of Object.entries(options)) if (value !== undefined) body[name] = value;
  if (kind() === "image") body.outputs = ["heatmap", "overlay_png"];
  return body;
}

function requestHeaders() {
  const headers = { "Content-Type": "application/json" };
  if ($("key").value.trim()) headers["Authorization"] = "Bearer " + $("key").value.trim();
  if ($("token").value.trim()) headers["X-Explain-Token"] = $("token").value.trim();
  if ($("priority").value.trim()) headers["X-Priority"] = $("priority").value.trim();
  return headers;
}

function clearResult() {
  $("result").hidden = false;
  $("error").hidden = true;
  $("predictions").querySelector("tbody").replaceChildren();
  $("explained").textContent = "";
  $("overlay-box").hidden = true;
  $("overlay").removeAttribute("src");
  $("words").hidden = true;
  $("words").replaceChildren();
  $("delta").hidden = true;
  $("json").textContent = "";
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = false;
}

function showPredictions(predictions) {
  const body = $("predictions").querySelector("tbody");
  for (const p of predictions) {
    const row = document.createElement("tr");
    const label = document.createElement("td");
    label.className = "label";
    label.textContent = p.label;
    const probability = document.createElement("td");
    probability.textContent = p.probability.toFixed(4);
    row.append(label, probability);
    body.append(row);
  }
}

// Words coloured by attribution: green for the target, red against, strength by |a| / max|a|.
function showWords(text, words) {
  const box = $("words");
  const peak = Math.max(1e-12, ...words.map((w) => Math.abs(w.attribution)));
  let position = 0;
  for (const w of [...words].sort((a, b) => a.start - b.start)) {
    if (w.start < position) continue;
    box.append(document.createTextNode(text.slice(position, w.start)));
    const span = document.createElement("span");
    span.className = "word " + (w.attribution >= 0 ? "pos" : "neg");
    span.textContent = text.slice(w.start, w.end);
    const strength = Math.abs(w.attribution) / peak;
    const rgb = w.attribution >= 0 ? "22, 163, 74" : "220, 38, 38";
    span.style.backgroundColor = `rgba(${rgb}, ${strength.toFixed(3)})`;
    span.title = `${w.word}: ${w.attribution.toPrecision(3)}`;
    span.dataset.attribution = String(w.attribution);
    box.append(span);
    position = w.end;
  }
  box.append(document.createTextNode(text.slice(position)));
  box.hidden = false;
}

function showAnswer(answer, text) {
  showPredictions(answer.predictions || []);
  const explanation = answer.explanation;
  if (!explanation) {
    $("explained").textContent = "No explanation: " + (answer.explanation_skipped || "none returned");
    return;
  }
  const target = explanation.target || {};
  $("explained").textContent = `Explained: ${target.label} (method ${explanation.method}, ${explanation.elapsed_ms} ms)`;
  if (explanation.overlay_png) {
    $("overlay").src = "data:image/png;base64," + explanation.overlay_png;
    $("overlay-box").hidden = false;
  }
  if (explanation.words) showWords(text, explanation.words);
  const delta = explanation.convergence_delta;
  if (delta) {
    $("delta").textContent = `Approximation error (convergence delta): ${delta.absolute.toPrecision(3)}` +
      ` (relative ${delta.relative.toPrecision(3)})`;
    $("delta").hidden = false;
  }
}

async function explain(event) {
  event.preventDefault();
  clearResult();
  if (kind() === "image" && !imageData) return showError("Choose or drop an image first.");
  if (kind() === "text" && !$("text").value.trim()) return showError("Type a text first.");
  // An empty server URL means this page's origin (the viewer served behind the same proxy as the API).
  const url = $("url").value.trim().replace(/\/+$/, "") + "/explanations/" + encodeURIComponent($("model").value.trim());
  const text = $("text").value;
  $("status").textContent = "waiting for the server...";
  let response;
  try {
    response = await fetch(url, { method: "POST", headers: requestHeaders(), body: JSON.stringify(requestBody()) });
  } catch (error) {
    $("status").textContent = "";
    return showError(`Cannot reach ${url}: ${error.message}. Is the server up, and does its CORS setting allow ` +
                     `this page's origin (${window.location.origin})?`);
  }
  const raw = await response.text();
  $("status").textContent = `HTTP ${response.status}`;
  let answer;
  try {
    answer = JSON.parse(raw);
  } catch (error) {
    return showError(`HTTP ${response.status}: ${raw.slice(0, 300)}`);
  }
  $("json").textContent = JSON.stringify(answer, (k, v) => (k === "overlay_png" ? v.slice(0, 40) + "..." : v), 2);
  if (!response.ok) {
    return showError(`HTTP ${response.status} ${answer.type || ""}: ${answer.message || raw.slice(0, 300)}`);
  }
  showAnswer(answer, text);
}

$("form").addEventListener("submit", explain);
$("kind-image").addEventListener("change", showKind);
$("kind-text").addEventListener("change", showKind);
$("file").addEventListener("change", () => $("file").files[0] && readImage($("file").files[0]));
$("drop").addEventListener("dragover", (event) => { event.preventDefault(); $("drop").classList.add("over"); });
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (event) => {
  event.preventDefault();
  $("drop").classList.remove("over");
  const file = event.dataTransfer.files[0];
  if (file) readImage(file);
});
const params = new URLSearchParams(window.location.search);
for (const name of ["url", "model"]) if (params.get(name)) $(name).value = params.get(name);
showKind();
