// The alignDRAW demo page. Plain JS, no build step, no dependencies.
//
// Draw: POST /api/draw → a text/event-stream of `start`, T+1 `frame`s and `done` (see app.py).
// fetch() rather than EventSource, because EventSource can only GET and cannot read the 422
// body that names an unknown word. Frames are decoded as they arrive and played back at
// STEP_MS per step (the server sends them faster than the eye can follow); the slider scrubs.
// <body data-state> is loading | ready | drawing | done | error (the browser test waits on it).
"use strict";

const STEP_MS = 90;             // playback speed: T = 32 steps take about 3 s
const STAGE_PX = 360;           // main canvas side in CSS pixels
const THUMB_PX = 84;
const ACCENT = "255, 176, 0";   // attention colour: write box, lit words, heatmap
const TOKEN_RE = /\w+(?:'\w+)*|[^\w\s]/g;  // the same rule as aligndraw.text.tokenize

const $ = (id) => document.getElementById(id);
const ui = {
  form: $("form"), caption: $("caption"), draw: $("draw"), message: $("message"),
  seed: $("seed"), dice: $("dice"), num: $("num"), vocab: $("vocab"), temperature: $("temperature"),
  examples: $("examples"), examplesHeld: $("examples-held"),
  canvas: $("canvas"), placeholder: $("placeholder"), play: $("play"), slider: $("slider"),
  step: $("step"), words: $("words"), heatmap: $("heatmap"), heldout: $("heldout"),
  thumbs: $("thumbs"), dlPng: $("dl-png"), dlGif: $("dl-gif"), status: $("status"),
  model: $("model"),
};
let info = null;     // /api/info
let run = null;      // the current drawing: {words, steps, frames, done, downloads, ...}
let selected = 0;    // which sample the big canvas, words and heatmap follow
let shown = -1;      // the step on screen (-1: none yet)
let timer = null;    // playback interval
let controller = null;

function setState(name) { document.body.dataset.state = name; }

// ------------------------------------------------------------------------------ set-up
async function init() {
  try {
    const resp = await fetch("/api/info");
    info = await resp.json();
  } catch (err) {
    showMessage(`Could not reach the server: ${err}`, "error");
    setState("error");
    return;
  }
  ui.model.textContent = `model: ${info.model} · T = ${info.steps} steps · ${info.width}×${info.height}`;
  ui.caption.maxLength = info.limits.max_caption_chars;
  ui.num.max = info.limits.max_images;
  ui.seed.max = info.limits.max_seed;
  for (const ex of info.examples) (ex.held_out ? ui.examplesHeld : ui.examples).append(exampleChip(ex));
  for (const word of info.words) ui.vocab.append(wordChip(word));
  ui.caption.value = info.examples.length ? info.examples[0].caption : "";
  checkCaption();
  setState("ready");
}

function exampleChip(ex) {
  const li = document.createElement("li");
  const b = document.createElement("button");
  b.type = "button";
  b.className = "chip example" + (ex.held_out ? " held-out" : "");
  b.textContent = ex.caption;
  if (ex.held_out) b.title = "held out of training: a composition the model never saw";
  b.addEventListener("click", () => { ui.caption.value = ex.caption; checkCaption(); startDraw(); });
  li.append(b);
  return li;
}

function wordChip(word) {
  const li = document.createElement("li");
  const b = document.createElement("button");
  b.type = "button";
  b.className = "chip word-chip";
  b.dataset.word = word;
  b.textContent = word;
  b.addEventListener("click", () => insertWord(word));
  li.append(b);
  return li;
}

// The partial word ending at the cursor, replaced by (or completed to) the clicked word.
function insertWord(word) {
  const el = ui.caption, at = el.selectionStart ?? el.value.length;
  const before = el.value.slice(0, at), after = el.value.slice(at);
  const partial = before.match(/[\w']*$/)[0];
  const head = before.slice(0, before.length - partial.length);
  const lead = head && !/\s$/.test(head) ? " " : "";
  const tail = after.startsWith(" ") ? "" : " ";
  el.value = head + lead + word + tail + after;
  const cursor = (head + lead + word + tail).length;
  el.focus();
  el.setSelectionRange(cursor, cursor);
  checkCaption();
}

function tokenize(text) { return text.toLowerCase().match(TOKEN_RE) || []; }

function isKnown(token) { return info.words.includes(token) || token in info.aliases; }

// Live hint while typing (the server has the last word): unknown words, vocabulary matches.
function checkCaption() {
  if (!info) return;
  const unknown = [...new Set(tokenize(ui.caption.value).filter((t) => !isKnown(t)))];
  ui.caption.classList.toggle("invalid", unknown.length > 0);
  if (unknown.length) showMessage(unknownText(unknown), "hint");
  else if (ui.message.classList.contains("hint")) showMessage("", "");
  const at = ui.caption.selectionStart ?? ui.caption.value.length;
  const partial = ui.caption.value.slice(0, at).match(/[\w']*$/)[0].toLowerCase();
  for (const chip of ui.vocab.querySelectorAll(".word-chip")) {
    chip.classList.toggle("match", partial.length > 0 && chip.dataset.word.startsWith(partial));
  }
}

function unknownText(words) {
  const list = words.map((w) => `“${w}”`).join(", ");
  return `Unknown word${words.length > 1 ? "s" : ""} ${list}: the model only knows the words ` +
         "listed under Vocabulary (spelled digits such as “seven” work too).";
}

function showMessage(text, kind) {
  ui.message.textContent = text;
  ui.message.className = "message" + (kind ? ` ${kind}` : "");
}

// ------------------------------------------------------------------------------ drawing
async function startDraw() {
  if (!info) return;
  if (controller) controller.abort();
  controller = new AbortController();
  stopPlayback();
  const body = {
    caption: ui.caption.value,
    num_images: Number(ui.num.value),
    seed: Number(ui.seed.value),
    temperature: Number(ui.temperature.value),
  };
  setState("drawing");
  ui.draw.disabled = true;
  ui.status.textContent = "drawing…";
  try {
    const resp = await fetch("/api/draw", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) return failed(resp);  // the previous drawing stays on screen
    run = null;
    showMessage("", "");
    ui.caption.classList.remove("invalid");
    await readEvents(resp.body, handleEvent);
    if (!run || !run.done) throw new Error("the stream ended early; try again");
  } catch (err) {
    if (err.name === "AbortError") return;
    showMessage(`Drawing failed: ${err.message}`, "error");
    setState("error");
  } finally {
    ui.draw.disabled = false;
  }
}

async function failed(resp) {
  let detail = `${resp.status} ${resp.statusText}`, words = [];
  try {
    const data = await resp.json();
    detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
    words = data.words || [];
  } catch (_) { /* not JSON: keep the status line */ }
  showMessage(words.length ? unknownText(words) : detail, "error");
  ui.caption.classList.toggle("invalid", words.length > 0 || resp.status === 422);
  ui.status.textContent = "";
  setState("error");
}

// Minimal Server-Sent Events reader over a fetch body: events are separated by a blank line.
async function readEvents(stream, onEvent) {
  const reader = stream.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      await onEvent(event, JSON.parse(data));
    }
  }
}

async function handleEvent(event, data) {
  if (event === "start") begin(data);
  else if (event === "frame") await addFrame(data);
  else if (event === "done") finish(data);
}

function begin(data) {
  run = {...data, frames: [], done: false, downloads: null};
  selected = 0;
  shown = -1;
  const scale = Math.max(1, Math.floor(STAGE_PX / Math.max(data.height, data.width)));
  ui.canvas.width = data.width * scale;
  ui.canvas.height = data.height * scale;
  ui.placeholder.hidden = true;
  ui.slider.max = data.steps;
  ui.slider.value = 0;
  ui.slider.disabled = false;
  ui.play.disabled = false;
  ui.heldout.hidden = data.held_out !== true;
  buildWords(data.words);
  buildThumbs(data.num_images);
  sizeHeatmap(data.words, data.steps);
  setDownloads(null);
  startPlayback();
}

async function addFrame(frame) {
  const images = frame.images.map((b64) => {
    const img = new Image();
    img.src = `data:image/png;base64,${b64}`;
    return img;
  });
  await Promise.all(images.map((img) => img.decode()));
  run.frames[frame.step] = {images, boxes: frame.boxes, alignments: frame.alignments};
}

function finish(data) {
  run.done = true;
  run.downloads = data.downloads;
  setDownloads(run.downloads[selected]);
  const n = run.num_images;
  ui.status.textContent = `${n} image${n > 1 ? "s" : ""} in ${Math.round(data.elapsed_ms)} ms`;
  if (!timer && shown >= 0) setState("done");  // the user scrubbed while frames arrived
}

// ------------------------------------------------------------------------------ playback
function startPlayback() {
  stopPlayback();
  ui.play.innerHTML = "&#10074;&#10074;";
  timer = setInterval(tick, STEP_MS);
  tick();
}

function stopPlayback() {
  if (timer) clearInterval(timer);
  timer = null;
  ui.play.innerHTML = "&#9654;";
}

function tick() {
  if (!run) return;
  const next = shown + 1;
  if (next <= run.steps && run.frames[next]) return show(next);
  if (run.done && shown >= run.steps) {
    stopPlayback();
    setState("done");
  }
}

function show(t) {
  shown = t;
  const frame = run.frames[t];
  if (!frame) return;
  drawCanvas(ui.canvas, frame.images[selected], frame.boxes && frame.boxes[selected]);
  frame.images.forEach((img, b) => drawCanvas(ui.thumbs.children[b], img, null));
  const weights = frame.alignments ? frame.alignments[selected] : null;
  lightWords(weights);
  drawHeatmap(t);
  ui.slider.value = t;
  ui.step.textContent = `step ${t} / ${run.steps}`;
  ui.canvas.dataset.step = t;
}

function drawCanvas(canvas, img, box) {
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;  // crisp pixels, as the model drew them
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  if (!box || box.some((v) => v === null)) return;
  // A box (x0, y0, x1, y1) covers pixels x0..x1, y0..y1 inclusive (visualize.draw_box).
  const sx = canvas.width / run.width, sy = canvas.height / run.height;
  const [x0, y0, x1, y1] = box;
  const left = Math.min(x0, x1) * sx, top = Math.min(y0, y1) * sy;
  const w = (Math.abs(x1 - x0) + 1) * sx, h = (Math.abs(y1 - y0) + 1) * sy;
  ctx.lineWidth = 2;
  ctx.strokeStyle = `rgb(${ACCENT})`;
  ctx.strokeRect(left + 1, top + 1, Math.max(w - 2, 1), Math.max(h - 2, 1));
}

// ------------------------------------------------------------------------------ words
function buildWords(words) {
  ui.words.replaceChildren(...words.map((word, j) => {
    const span = document.createElement("span");
    span.className = "word";
    span.dataset.index = j;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = word;
    const weight = document.createElement("span");
    weight.className = "weight";
    span.append(text, weight);
    return span;
  }));
}

// Each word lit in proportion to its weight relative to the step's strongest word.
function lightWords(weights) {
  const spans = ui.words.children;
  const top = weights ? Math.max(...weights) : 0;
  for (let j = 0; j < spans.length; j++) {
    const w = weights ? weights[j] : 0;
    const rel = top > 0 ? w / top : 0;
    spans[j].style.setProperty("--lit", rel.toFixed(3));
    spans[j].classList.toggle("top", weights !== null && w === top && top > 0);
    spans[j].classList.toggle("bright", rel > 0.55);  // dark text on a bright background
    spans[j].querySelector(".weight").textContent = weights ? w.toFixed(2) : "";
    spans[j].title = weights ? `alignment weight ${w.toFixed(3)}` : "";
  }
}

function buildThumbs(n) {
  ui.thumbs.replaceChildren(...Array.from({length: n}, (_, b) => {
    const c = document.createElement("canvas");
    c.width = THUMB_PX;
    c.height = Math.round(THUMB_PX * run.height / run.width);
    c.className = "thumb" + (b === selected ? " selected" : "");
    c.title = `sample ${b + 1}`;
    c.addEventListener("click", () => select(b));
    return c;
  }));
}

function select(b) {
  selected = b;
  [...ui.thumbs.children].forEach((c, i) => c.classList.toggle("selected", i === b));
  if (run.downloads) setDownloads(run.downloads[b]);
  if (shown >= 0) show(shown);
}

function setDownloads(urls) {
  for (const [a, key] of [[ui.dlPng, "png"], [ui.dlGif, "gif"]]) {
    if (urls) a.href = urls[key]; else a.removeAttribute("href");
    a.classList.toggle("disabled", !urls);
    a.setAttribute("aria-disabled", String(!urls));
  }
}

// ------------------------------------------------------------------------------ heatmap
const HEAT = {col: 10, row: 14, left: 0, top: 4};  // row: fits a 12 px word label

function sizeHeatmap(words, steps) {
  const ctx = ui.heatmap.getContext("2d");
  ctx.font = "12px system-ui, sans-serif";
  HEAT.left = Math.ceil(Math.max(...words.map((w) => ctx.measureText(w).width))) + 8;
  HEAT.col = Math.max(3, Math.min(14, Math.floor((380 - HEAT.left) / steps)));
  ui.heatmap.width = HEAT.left + steps * HEAT.col + 2;
  ui.heatmap.height = HEAT.top + words.length * HEAT.row + 2;
}

// Steps 1..t of the selected sample; the column of step t is outlined.
function drawHeatmap(t) {
  const ctx = ui.heatmap.getContext("2d"), {col, row, left, top} = HEAT;
  ctx.clearRect(0, 0, ui.heatmap.width, ui.heatmap.height);
  ctx.font = "12px system-ui, sans-serif";
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  ctx.fillStyle = "#8b93a7";
  run.words.forEach((w, j) => ctx.fillText(w, left - 6, top + j * row + row / 2));
  ctx.fillStyle = "#0b0d12";
  ctx.fillRect(left, top, run.steps * col, run.words.length * row);
  let max = 0;
  for (let s = 1; s <= run.steps; s++) {
    const a = run.frames[s] && run.frames[s].alignments;
    if (a) max = Math.max(max, ...a[selected]);
  }
  for (let s = 1; s <= t; s++) {
    const weights = run.frames[s] && run.frames[s].alignments && run.frames[s].alignments[selected];
    if (!weights) continue;
    weights.forEach((w, j) => {
      ctx.fillStyle = `rgba(${ACCENT}, ${max > 0 ? (w / max).toFixed(3) : 0})`;
      ctx.fillRect(left + (s - 1) * col, top + j * row, col, row);
    });
  }
  if (t > 0) {
    ctx.strokeStyle = "#ffffff";
    ctx.lineWidth = 1;
    ctx.strokeRect(left + (t - 1) * col + 0.5, top + 0.5, col - 1, run.words.length * row - 1);
  }
}

// ------------------------------------------------------------------------------ wiring
ui.form.addEventListener("submit", (e) => { e.preventDefault(); startDraw(); });
ui.caption.addEventListener("input", checkCaption);
ui.caption.addEventListener("keydown", (e) => {  // Enter draws; a caption is one line
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); ui.form.requestSubmit(); }
});
ui.caption.addEventListener("click", checkCaption);
ui.caption.addEventListener("keyup", checkCaption);
ui.dice.addEventListener("click", () => { ui.seed.value = Math.floor(Math.random() * 100000); });
ui.slider.addEventListener("input", () => {
  if (!run) return;
  stopPlayback();
  show(Number(ui.slider.value));
  if (run.done) setState("done");
});
ui.play.addEventListener("click", () => {
  if (!run) return;
  if (timer) return stopPlayback();
  if (shown >= run.steps) shown = -1;  // replay from the blank canvas
  startPlayback();
});
init();
