// The page of `rsitr serve`: text search, "more like this", search by an uploaded image, and the
// scene overview of the selected result. Plain DOM and fetch; every text goes in through
// textContent, never as HTML. Same-origin fetches carry the rsitr_token cookie when a token is set.
"use strict";

const THUMBNAIL_SIZE = 256;
const OVERVIEW_SIZE = 1024;

const page = {};
const state = {
  results: [],       // the Result objects of the last answer, best first
  selected: -1,      // index into results of the card the overview shows
  overviewFile: null, // file_id the overview image shows
  textQuery: null,   // the sentence of the last text query (null after an image query): what the heat map localises
  heat: false,       // whether the overview shows the heat map of textQuery over the file
  latest: 0,         // number of the latest query: answers to older ones are dropped
};

// ------------------------------------------------------------------------------------------ API

/** An answer of the API that is not 2xx: its status and the one-line `detail`. */
class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
    this.detail = detail;
  }
}

/** The JSON body of a request; throws ApiError (status 0 when the server cannot be reached). */
async function callApi(url, options = {}) {
  let response;
  try {
    response = await fetch(url, { credentials: "same-origin", ...options });
  } catch (error) {
    throw new ApiError(0, `cannot reach the server (${error.message})`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = null;
  }
  if (!response.ok) {
    const detail = body && typeof body.detail === "string" ? body.detail : `${response.status} ${response.statusText}`.trim();
    throw new ApiError(response.status, detail);
  }
  return body;
}

/** The sentence #message shows for a failed request: the server's own words for what the user can fix. */
function failureMessage(error) {
  if (!(error instanceof ApiError)) {
    return `the page failed: ${error.message}`;
  }
  if (error.status === 422 || error.status === 413) {
    return error.detail;
  }
  if (error.status === 401) {
    return `not signed in: open the address with ?token=… once (${error.detail})`;
  }
  return `the server failed: ${error.detail}`;
}

// ------------------------------------------------------------------------------------- messages

function showMessage(text, kind = "info") {
  page.message.textContent = text;
  page.message.dataset.kind = text ? kind : "";
}

function clearMessage() {
  showMessage("");
}

// ----------------------------------------------------------------------------------- formatting

function formatCount(n) {
  return Number(n).toLocaleString("en");
}

function formatCoordinate(value, positive, negative, digits) {
  return `${Math.abs(value).toFixed(digits)}° ${value >= 0 ? positive : negative}`;
}

/**
 * Where a result lies: its lon/lat centre when the file is georeferenced (4 decimals, about 10 m,
 * on the card; 6 in its tooltip), else its pixel window in the source file.
 */
function formatLocation(result, digits = 4) {
  if (result.center) {
    return `${formatCoordinate(result.center.lat, "N", "S", digits)} ${formatCoordinate(result.center.lon, "E", "W", digits)}`;
  }
  const w = result.window;
  const scale = result.scale && result.scale !== 1 ? ` at scale ${result.scale}` : "";
  return `pixels x ${w.x}, y ${w.y}, ${w.width}×${w.height}${scale}`;
}

// -------------------------------------------------------------------------------------- queries

/** Runs one query: shows "searching…", then its results under `title`, unless a newer query started. */
async function runQuery(title, request, { focusFirst = false } = {}) {
  const number = ++state.latest;
  showMessage("searching…", "busy");
  page.results.setAttribute("aria-busy", "true");
  try {
    const answer = await request();
    if (number !== state.latest) {
      return;
    }
    showResults(title, answer);
    if (focusFirst && page.results.firstElementChild) {
      page.results.firstElementChild.focus();
    }
  } catch (error) {
    if (number === state.latest) {
      showMessage(failureMessage(error), "error");
    }
  } finally {
    if (number === state.latest) {
      page.results.setAttribute("aria-busy", "false");
    }
  }
}

function searchText(text, k) {
  state.textQuery = text;
  const query = new URLSearchParams({ q: text, k: String(k) });
  return runQuery(`Results for “${text}”`, () => callApi(`/api/search?${query}`));
}

function searchLikeTile(result) {
  state.textQuery = null;
  const form = new FormData();
  form.append("tile_id", String(result.tile_id));
  form.append("k", page.k.value);
  return runQuery(`More like tile ${result.tile_id} (${result.file})`,
    () => callApi("/api/search/image", { method: "POST", body: form }), { focusFirst: true });
}

function searchLikeUpload(file) {
  state.textQuery = null;
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("k", page.k.value);
  return runQuery(`More like the image “${file.name}”`,
    () => callApi("/api/search/image", { method: "POST", body: form }));
}

// -------------------------------------------------------------------------------------- results

function showResults(title, answer) {
  state.results = Array.isArray(answer.results) ? answer.results : [];
  state.selected = -1;
  page.resultsTitle.textContent = title;
  const count = state.results.length;
  page.resultsMeta.textContent = count
    ? `${count} result${count === 1 ? "" : "s"} in ${Number(answer.milliseconds).toFixed(0)} ms`
    : "";
  page.results.replaceChildren(...state.results.map(buildCard));
  if (answer.message) {
    showMessage(answer.message, "info");
  } else if (!count) {
    showMessage("no tile matched this query", "info");
  } else {
    clearMessage();
  }
  if (count) {
    selectResult(0);
  } else {
    hideOverview();
  }
}

/** One result as a focusable card; activating it (click, Enter, Space) asks for more like it. */
function buildCard(result, index) {
  const card = document.createElement("button");
  card.type = "button";
  card.className = "card";
  card.dataset.tileId = String(result.tile_id);
  card.dataset.index = String(index);
  card.title = "Find more like this tile";

  const thumbnail = document.createElement("img");
  thumbnail.className = "thumbnail";
  thumbnail.src = `/api/tiles/${result.tile_id}/thumbnail?size=${THUMBNAIL_SIZE}`;
  thumbnail.alt = `tile ${result.tile_id} of ${result.file}`;
  thumbnail.loading = "lazy";
  thumbnail.decoding = "async";

  const head = document.createElement("span");
  head.className = "card-head";
  head.append(textSpan("rank", `#${result.rank}`), textSpan("score", Number(result.score).toFixed(3)));
  head.lastChild.title = `score ${result.score} (first stage ${result.first_stage_score})`;

  const file = textSpan("file", result.file);
  file.title = result.file;

  const location = textSpan("location", formatLocation(result));
  location.title = formatLocation(result, 6);

  card.append(thumbnail, head, file, location);
  card.addEventListener("click", () => searchLikeTile(result));
  card.addEventListener("focus", () => selectResult(index));
  card.addEventListener("mouseenter", () => selectResult(index));
  return card;
}

function textSpan(className, text) {
  const span = document.createElement("span");
  span.className = className;
  span.textContent = text;
  return span;
}

function selectResult(index) {
  if (index === state.selected || !state.results[index]) {
    return;
  }
  state.selected = index;
  for (const card of page.results.children) {
    card.classList.toggle("selected", Number(card.dataset.index) === index);
  }
  showOverview(state.results[index]);
}

// ------------------------------------------------------------------------------------- overview

/** The selected result's whole file, with every result tile of that file boxed where it lies. */
function showOverview(selected) {
  page.overview.hidden = false;
  page.heatToggle.hidden = state.textQuery === null;
  if (state.textQuery === null) {
    state.heat = false;
  }
  page.heatToggle.setAttribute("aria-pressed", String(state.heat));
  const source = overviewSource(selected);
  if (page.overviewImage.getAttribute("src") !== source) {
    state.overviewFile = selected.file_id;
    page.overviewFrame.style.aspectRatio = `${selected.file_width} / ${selected.file_height}`;
    page.overviewImage.src = source;
    page.overviewImage.alt = state.heat ? `where “${state.textQuery}” is in ${selected.file}` : `overview of ${selected.file}`;
    page.overviewImage.classList.remove("pixelated");
  }
  page.overviewTitle.textContent = selected.file;
  const inFile = state.results.filter((r) => r.file_id === selected.file_id);
  page.overviewMeta.textContent = `${formatCount(selected.file_width)} × ${formatCount(selected.file_height)} px · `
    + `${inFile.length} of these results lie in it`;
  page.overviewBoxes.replaceChildren(...inFile.map((r) => buildBox(r, r === selected)));
}

/** The overview image of a result's file: plain, or with the heat map of the text query over it. */
function overviewSource(result) {
  if (state.heat && state.textQuery !== null) {
    const query = new URLSearchParams({ q: state.textQuery, size: String(OVERVIEW_SIZE) });
    return `/api/files/${result.file_id}/localize?${query}`;
  }
  return `/api/files/${result.file_id}/overview?size=${OVERVIEW_SIZE}`;
}

/** Switches the overview between the file and the heat map of the text query over it. */
function toggleHeat() {
  state.heat = !state.heat;
  if (state.selected >= 0) {
    showOverview(state.results[state.selected]);
  }
}

/**
 * A box over the overview at a result's window. The overview's pixel (u, v) is the source pixel
 * (u·W/w, v·H/h), so a window is placed at the same fractions of the displayed image as of the file.
 */
function buildBox(result, isSelected) {
  const box = document.createElement("div");
  box.className = isSelected ? "overview-box selected" : "overview-box";
  box.dataset.tileId = String(result.tile_id);
  const w = result.window;
  const percent = (value, total) => `${(100 * value / total).toFixed(4)}%`;
  box.style.left = percent(w.x, result.file_width);
  box.style.top = percent(w.y, result.file_height);
  box.style.width = percent(w.width, result.file_width);
  box.style.height = percent(w.height, result.file_height);
  box.title = `#${result.rank} · ${Number(result.score).toFixed(3)}`;
  box.addEventListener("click", () => {
    const card = page.results.querySelector(`.card[data-index="${state.results.indexOf(result)}"]`);
    if (card) {
      card.focus();
      card.scrollIntoView({ block: "nearest" });
    }
  });
  return box;
}

function hideOverview() {
  page.overview.hidden = true;
  state.overviewFile = null;
  page.overviewImage.removeAttribute("src");
  page.overviewBoxes.replaceChildren();
}

// ---------------------------------------------------------------------------------- image input

function firstFile(fileList) {
  return fileList && fileList.length ? fileList[0] : null;
}

function wireDropZone() {
  const zone = page.dropZone;
  const hasFiles = (event) => Array.from(event.dataTransfer ? event.dataTransfer.types : []).includes("Files");
  zone.addEventListener("dragenter", (event) => {
    if (hasFiles(event)) {
      event.preventDefault();
      zone.classList.add("dragging");
    }
  });
  zone.addEventListener("dragover", (event) => {
    if (hasFiles(event)) {
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
    }
  });
  zone.addEventListener("dragleave", (event) => {
    if (!zone.contains(event.relatedTarget)) {
      zone.classList.remove("dragging");
    }
  });
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    const file = firstFile(event.dataTransfer.files);
    if (file) {
      searchLikeUpload(file);
    }
  });
  page.imageInput.addEventListener("change", () => {
    const file = firstFile(page.imageInput.files);
    if (file) {
      searchLikeUpload(file);
    }
    page.imageInput.value = ""; // picking the same file again is a new query
  });
  // A file dropped next to the zone would make the browser open it and leave the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
}

// --------------------------------------------------------------------------------------- health

async function loadHealth() {
  try {
    const health = await callApi("/api/health");
    const model = health.model || {};
    const name = model.architecture && model.architecture !== model.name ? `${model.name} (${model.architecture})` : model.name;
    page.indexSummary.textContent = `model ${name || "unknown"} · ${formatCount(health.tiles)} tiles in `
      + `${formatCount(health.files)} file${health.files === 1 ? "" : "s"}`;
    if (!health.tiles && state.latest === 0) {
      showMessage("the index holds no tiles yet: add images with rsitr index add, then reload this page", "info");
    }
  } catch (error) {
    page.indexSummary.textContent = "index unavailable";
    if (state.latest === 0) {
      showMessage(failureMessage(error), "error");
    }
  }
}

// ----------------------------------------------------------------------------------------- start

function start() {
  for (const [key, id] of Object.entries({
    form: "search-form", query: "query", k: "k", message: "message", results: "results",
    resultsTitle: "results-title", resultsMeta: "results-meta", overview: "overview", overviewTitle: "overview-title",
    overviewMeta: "overview-meta", overviewFrame: "overview-frame", overviewImage: "overview-image",
    overviewBoxes: "overview-boxes", heatToggle: "heat-toggle", dropZone: "drop-zone", imageInput: "image-input", indexSummary: "index-summary",
  })) {
    page[key] = document.getElementById(id);
  }
  page.form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = page.query.value.trim();
    if (text) {
      searchText(text, Number(page.k.value));
    }
  });
  // A file smaller than the frame is shown enlarged: draw its pixels as squares rather than blur them.
  page.overviewImage.addEventListener("load", () => {
    page.overviewImage.classList.toggle("pixelated", page.overviewImage.naturalWidth < page.overviewImage.clientWidth);
  });
  page.heatToggle.addEventListener("click", toggleHeat);
  wireDropZone();
  loadHealth();
  page.query.focus();
}

document.addEventListener("DOMContentLoaded", start);
