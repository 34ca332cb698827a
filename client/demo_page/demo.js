// The demo page: photos go to this page's own server (client/demo.py), which asks TorchServe.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const modelSelect = $("#model");
const versionSelect = $("#version");
const statusLine = $("#status");
let models = [];

async function api(path, body) {
  // The page server's JSON answer; an error carries the server's own message and status.
  let response;
  try {
    response = await fetch(path, body === undefined ? {} : {
      method: "POST", body, headers: {"Content-Type": "application/octet-stream"},
    });
  } catch (err) {
    throw new Error("the demo server is not reachable: is `make demo` still running?");
  }
  const type = response.headers.get("Content-Type") || "";
  const answer = type.includes("json") ? await response.json() : await response.blob();
  if (!response.ok) {
    throw new Error(`${response.status}: ${answer.message || response.statusText}`);
  }
  return {answer, response};
}

async function loadModels() {
  try {
    models = (await api("/api/models")).answer.models;
  } catch (err) {
    statusLine.textContent = `TorchServe: ${err.message}`;
    statusLine.className = "down";
    return;
  }
  modelSelect.replaceChildren(...models.map((m) => new Option(m.name, m.name)));
  statusLine.textContent = `TorchServe: ${models.length} model(s)`;
  showVersions();
}

function showVersions() {
  const model = models.find((m) => m.name === modelSelect.value);
  const options = [new Option("default", "")];
  for (const v of (model ? model.versions : [])) {
    options.push(new Option(v.default ? `${v.version} (default)` : v.version, v.version));
  }
  versionSelect.replaceChildren(...options);
}

function query() {
  // no model listed (TorchServe down): the page server asks its default model
  const params = new URLSearchParams();
  if (modelSelect.value) params.set("model", modelSelect.value);
  if (versionSelect.value) params.set("version", versionSelect.value);
  return params.toString();
}

async function showPhoto(card, file) {
  // The photo as the browser shows it, or (HEIC, ...) as the page server decodes it; `size` is the
  // photo's own pixel size, in which the server's box is given.
  const img = $("img", card);
  const loaded = (src) => new Promise((resolve, reject) => {
    img.onload = resolve;
    img.onerror = reject;
    img.src = src;
  });
  try {
    await loaded(URL.createObjectURL(file));
    return {width: img.naturalWidth, height: img.naturalHeight};
  } catch (err) {
    try {
      const {answer, response} = await api("/api/preview", file);
      const [width, height] = response.headers.get("X-Image-Size").split(" ").map(Number);
      await loaded(URL.createObjectURL(answer));
      return {width, height};
    } catch (err2) {
      img.hidden = true;  // not an image the page server can read either: the answer will say why
      return null;
    }
  }
}

function place(element, rect, size, img) {
  const scale = img.clientWidth / size.width;
  element.style.left = `${rect[0] * scale}px`;
  element.style.top = `${rect[1] * scale}px`;
  element.style.width = `${(rect[2] - rect[0]) * scale}px`;
  element.style.height = `${(rect[3] - rect[1]) * scale}px`;
  element.hidden = false;
}

const percent = (probability) => `${(100 * probability).toFixed(1)} %`;

function showAnswer(card, answer, size) {
  $(".meta", card).textContent = `${card.dataset.file} · ${answer.model} v${answer.version} · ${answer.ms} ms`;
  if (!answer.car.found) {
    $(".name", card).textContent = "No car found in this photo";
    card.classList.add("nocar");
    return;
  }
  $(".name", card).textContent = answer.predictions[0].class_name;
  $(".unsure", card).hidden = !answer.uncertain;
  const make = $(".make", card);
  make.textContent = answer.make
    ? `${answer.make.name} ${percent(answer.make.probability)} · ${answer.body_type.name} ${percent(answer.body_type.probability)}`
    : `Make not sure · ${answer.body_type.name} ${percent(answer.body_type.probability)}`;
  make.hidden = false;
  $(".top", card).replaceChildren(...answer.predictions.map((p) => {
    const li = document.createElement("li");
    li.innerHTML = '<span class="label"></span> <span class="percent"></span><div class="bar"><div></div></div>';
    $(".label", li).textContent = p.class_name;
    $(".percent", li).textContent = percent(p.probability);
    $(".bar div", li).style.width = `${100 * p.probability}%`;
    return li;
  }));
  // every car found, the answer's own first; a model without a detector: its one box
  const cars = answer.cars || (answer.car.box ? [{...answer, box: answer.car.box}] : []);
  if (size) {
    $(".boxes", card).replaceChildren(...cars.map((car, i) => carBox(car, i, size, $("img", card))));
  }
  if (cars.length > 1) {
    const list = $(".cars", card);
    list.replaceChildren(...cars.map((car) => {
      const li = document.createElement("li");
      li.textContent = carLabel(car);
      return li;
    }));
    list.hidden = false;
    $(".meta", card).textContent += ` · ${cars.length} cars`;
  }
}

function carLabel(car) {
  const top = car.predictions[0];
  return `${top.class_name} ${percent(top.probability)}${car.uncertain ? " (not sure)" : ""}`;
}

function carBox(car, index, size, img) {
  // the car's box on the photo, labelled with its number and top-1 class
  const box = document.createElement("div");
  box.className = "box";
  const tag = document.createElement("span");
  tag.className = "tag";
  tag.textContent = `${index + 1}. ${carLabel(car)}`;
  box.append(tag);
  place(box, car.box, size, img);
  return box;
}

async function explain(card, file, size, version) {
  const link = $(".explain", card);
  link.textContent = "Explaining...";
  try {
    const params = new URLSearchParams({model: card.dataset.model});
    if (version) params.set("version", version);
    const {answer} = await api(`/api/explain?${params}`, file);
    const rows = answer.heatmap;
    const canvas = $(".heatmap", card);
    canvas.width = rows[0].length;
    canvas.height = rows.length;
    const context = canvas.getContext("2d");
    const pixels = context.createImageData(canvas.width, canvas.height);
    rows.forEach((row, y) => row.forEach((value, x) => {
      const i = 4 * (y * canvas.width + x);
      pixels.data.set([255, 40, 0, Math.round(255 * Math.min(1, value * 2))], i);
    }));
    context.putImageData(pixels, 0, 0);
    const region = answer.region || [0, 0, size.width, size.height];
    place(canvas, region, size, $("img", card));
    link.textContent = `Heat map of "${answer.class_name}" shown`;
  } catch (err) {
    link.textContent = `Explanation failed: ${err.message}`;
  }
}

async function classify(file) {
  const card = $("#card").content.firstElementChild.cloneNode(true);
  card.dataset.file = file.name;
  $("#results").append(card);
  $(".name", card).textContent = file.name;
  $(".meta", card).textContent = "asking the model...";
  const size = await showPhoto(card, file);
  try {
    const {answer} = await api(`/api/predict?${query()}`, file);
    showAnswer(card, answer, size);
    card.dataset.model = answer.model;
    card.classList.add("done");
    if (size && answer.car.found) {
      const link = $(".explain", card);
      link.hidden = false;
      link.onclick = (event) => {
        event.preventDefault();
        explain(card, file, size, answer.version);
      };
    }
  } catch (err) {
    $(".name", card).textContent = `${file.name}: not classified`;
    $(".meta", card).textContent = "";
    const error = $(".error", card);
    error.textContent = err.message;
    error.hidden = false;
    card.classList.add("done", "failed");
  }
}

async function classifyAll(files) {
  for (const file of files) await classify(file);
}

const drop = $("#drop");
$("#files").addEventListener("change", (event) => classifyAll([...event.target.files]));
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  classifyAll([...event.dataTransfer.files]);
});
modelSelect.addEventListener("change", showVersions);
loadModels();
