// tilesweep view: the page. Everything it loads comes from the server that served it.
"use strict";

const state = { info: null, model: null, threshold: 0.5, progressVersion: null, progressUpdates: 0, map: null };
window.tilesweep = state; // read by the browser tests

const $ = (id) => document.getElementById(id);

function tileOf(lngLat, z) {
  const n = 2 ** z;
  const x = Math.floor(((lngLat.lng + 180) / 360) * n);
  const r = (lngLat.lat * Math.PI) / 180;
  const y = Math.floor(((1 - Math.log(Math.tan(r) + 1 / Math.cos(r)) / Math.PI) / 2) * n);
  return { z, x: Math.min(Math.max(x, 0), n - 1), y: Math.min(Math.max(y, 0), n - 1) };
}

function tileBounds(t) {
  const n = 2 ** t.z;
  const lon = (x) => (x / n) * 360 - 180;
  const lat = (y) => (Math.atan(Math.sinh(Math.PI * (1 - (2 * y) / n))) * 180) / Math.PI;
  return [lon(t.x), lat(t.y + 1), lon(t.x + 1), lat(t.y)];
}

function esc(s) {
  return String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

function overlayUrl() {
  const v = state.progressVersion || "0";
  return `${location.origin}/overlay/${encodeURIComponent(state.model)}/{z}/{x}/{y}.mvt?t=${state.threshold.toFixed(2)}&v=${encodeURIComponent(v)}`;
}

function blocksUrl() {
  const v = state.progressVersion || "0";
  return `${location.origin}/blocks/{z}/{x}/{y}.mvt?v=${encodeURIComponent(v)}`;
}

function linesUrl() {
  const v = state.progressVersion || "0";
  return `api/lines.geojson?model=${encodeURIComponent(state.model)}&t=${state.threshold.toFixed(2)}&v=${encodeURIComponent(v)}`;
}

// The lines are fetched here, not by the map: a refresh that overtakes another, or a
// sweep whose parts are being written, is then simply tried again at the next refresh.
async function refreshLines() {
  const map = state.map;
  if (!map || !map.getSource("lines")) return;
  const url = linesUrl();
  state.linesUrl = url;
  try {
    const r = await fetch(url);
    if (!r.ok || state.linesUrl !== url) return;
    const doc = await r.json();
    if (state.linesUrl === url && map.getSource("lines")) map.getSource("lines").setData(doc);
  } catch (e) {
    // the next progress refresh tries again
  }
}

function tileFilter() {
  return ["all", ["==", ["get", "kind"], "tile"], [">=", ["get", "s"], state.threshold]];
}

function addOverlay(map) {
  if (map.getLayer("cells")) map.removeLayer("cells");
  if (map.getLayer("squares")) map.removeLayer("squares");
  if (map.getLayer("squares-line")) map.removeLayer("squares-line");
  if (map.getSource("overlay")) map.removeSource("overlay");
  if (map.getLayer("lines")) map.removeLayer("lines");
  if (map.getSource("lines")) map.removeSource("lines");
  if (!state.model) return;
  // traced power lines (tilesweep lines): computed by the server from the detections
  map.addSource("lines", { type: "geojson", data: { type: "FeatureCollection", features: [] } });
  map.addLayer({
    id: "lines", type: "line", source: "lines",
    paint: { "line-color": "#00e5ff", "line-width": 3, "line-opacity": ["interpolate", ["linear"], ["get", "confidence"], 0, 0.35, 1, 1] },
  }, "area-line");
  refreshLines();
  map.addSource("overlay", { type: "vector", tiles: [overlayUrl()], minzoom: 0, maxzoom: state.info.zoom, bounds: state.info.bbox });
  map.addLayer({
    id: "cells", type: "fill", source: "overlay", "source-layer": "overlay",
    filter: ["==", ["get", "kind"], "cell"],
    paint: {
      "fill-color": ["interpolate", ["linear"], ["ln", ["+", 1, ["get", "det"]]], 0, "#fee08b", 2, "#fc8d59", 5, "#d73027"],
      "fill-opacity": 0.8,
    },
  }, "area-line");
  map.addLayer({
    id: "squares", type: "fill", source: "overlay", "source-layer": "overlay", filter: tileFilter(),
    paint: {
      "fill-color": ["interpolate", ["linear"], ["get", "s"], 0, "#ffffb2", 0.5, "#fd8d3c", 1, "#bd0026"],
      "fill-opacity": ["interpolate", ["linear"], ["zoom"], state.info.zoom - 2, 0.55, state.info.zoom, 0.25],
    },
  }, "area-line");
  map.addLayer({
    id: "squares-line", type: "line", source: "overlay", "source-layer": "overlay", filter: tileFilter(),
    paint: { "line-color": "#bd0026", "line-width": 1 },
  }, "area-line");
}

function addImagery(map, info) {
  let source = null;
  if (info.imagery.mode === "pmtiles") {
    const protocol = new pmtiles.Protocol();
    maplibregl.addProtocol("pmtiles", protocol.tile);
    source = { type: "raster", url: `pmtiles://${location.origin}/pmtiles/imagery.pmtiles`, tileSize: 256 };
  } else if (info.imagery.mode !== "none") {
    source = {
      type: "raster", tiles: [`${location.origin}/imagery/{z}/{x}/{y}`], tileSize: 256,
      minzoom: info.imagery.minzoom, maxzoom: info.imagery.maxzoom, bounds: info.bbox,
    };
  }
  if (!source || map.getSource("imagery")) return;
  map.addSource("imagery", source);
  const below = map.getLayer("blocks") ? "blocks" : undefined;
  map.addLayer({ id: "imagery", type: "raster", source: "imagery" }, below);
}

function setThreshold(t) {
  state.threshold = t;
  $("threshold-value").textContent = t.toFixed(2);
  const map = state.map;
  if (!map.getSource("overlay")) return;
  map.setFilter("squares", tileFilter());
  map.setFilter("squares-line", tileFilter());
  clearTimeout(state._tTimer);
  state._tTimer = setTimeout(() => {
    map.getSource("overlay").setTiles([overlayUrl()]);
    refreshLines();
  }, 150);
}

function table(rows) {
  return "<table>" + rows.map(([k, v]) => `<tr><td>${esc(k)}</td><td>${v}</td></tr>`).join("") + "</table>";
}

async function refreshProgress() {
  let p;
  try {
    const r = await fetch("api/progress", { cache: "no-store" });
    if (!r.ok) throw new Error(`progress: HTTP ${r.status}`);
    p = await r.json();
  } catch (e) {
    $("progress").textContent = "server unreachable";
    return;
  }
  const b = p.blocks;
  const total = b.pending + b.leased + b.done + b.dead;
  const rows = [
    ["done", `<span class="swatch" style="background:#1a9850"></span>${b.done.toLocaleString()} blocks (${p.tiles.done.toLocaleString()} tiles)`],
    ["leased", `<span class="swatch" style="background:#fdae61"></span>${b.leased.toLocaleString()}`],
    ["dead", `<span class="swatch" style="background:#d73027"></span>${b.dead.toLocaleString()}`],
    ["pending", b.pending.toLocaleString()],
    ["of", `${total.toLocaleString()} blocks, ${state.info.tiles.toLocaleString()} tiles`],
  ];
  for (const [m, n] of Object.entries(p.predicted_blocks)) rows.push([`predicted (${m})`, `${n.toLocaleString()} blocks`]);
  $("progress").innerHTML = table(rows) + (p.running ? '<div class="muted">running: refreshed every 3 s</div>' : "");
  $("progress").dataset.done = String(b.done);
  if (p.version !== state.progressVersion) {
    const first = state.progressVersion === null;
    state.progressVersion = p.version;
    state.progressUpdates += 1;
    if (!first) {
      state.map.getSource("blocks").setTiles([blocksUrl()]);
      if (state.map.getSource("overlay")) state.map.getSource("overlay").setTiles([overlayUrl()]);
      refreshLines();
      await loadModels();
    }
  }
}

async function loadModels() {
  const info = await (await fetch("api/info", { cache: "no-store" })).json();
  if (state.info.imagery.mode === "none" && info.imagery.mode !== "none") {
    state.info.imagery = info.imagery; // a run began: its source (or store) is there now
    $("imagery-note").textContent = `${info.tiles.toLocaleString()} tiles at zoom ${info.zoom}; ${info.imagery.note}`;
    addImagery(state.map, info);
  }
  const known = (state.info.models || []).map((m) => m.id).join(",");
  state.info.models = info.models;
  if (known === info.models.map((m) => m.id).join(",") && state.model) return;
  const sel = $("model");
  sel.innerHTML = "";
  for (const m of info.models) {
    const o = document.createElement("option");
    o.value = m.id;
    o.textContent = `${m.name} (${m.labels.join(", ")})`;
    sel.appendChild(o);
  }
  if (!info.models.length) {
    sel.innerHTML = "<option value=''>no predictions yet</option>";
    sel.disabled = true;
    $("download").disabled = true;
    return;
  }
  sel.disabled = false;
  $("download").disabled = false;
  if (!state.model || !info.models.find((m) => m.id === state.model)) {
    state.model = info.models[0].id;
    sel.value = state.model;
    setThreshold(info.models[0].threshold);
    $("threshold").value = String(info.models[0].threshold);
    addOverlay(state.map);
  }
}

async function showTile(lngLat) {
  const t = tileOf(lngLat, state.info.zoom);
  const r = await fetch(`api/tile?z=${t.z}&x=${t.x}&y=${t.y}`, { cache: "no-store" });
  const d = await r.json();
  const rows = [
    ["tile", `${d.z}/${d.x}/${d.y}`],
    ["lon, lat", `${d.lon.toFixed(6)}, ${d.lat.toFixed(6)}`],
    ["block", `${d.block.z}/${d.block.x}/${d.block.y} (${esc(d.block.state || "not planned")})`],
  ];
  if (!d.predictions.length) rows.push(["scores", "not predicted"]);
  for (const p of d.predictions) {
    for (const [k, v] of Object.entries(p.scores)) rows.push([`${p.name}: ${k}`, v === null ? "undecodable" : v.toFixed(4)]);
    rows.push([`${p.name}: label`, p.label === null ? "none" : String(p.label)]);
  }
  $("info").innerHTML = table(rows);
  $("info").dataset.tile = `${d.z}/${d.x}/${d.y}`;
  const [w, s, e, n] = tileBounds(t);
  state.map.getSource("selected").setData({
    type: "Feature", properties: {}, geometry: { type: "Polygon", coordinates: [[[w, s], [e, s], [e, n], [w, n], [w, s]]] },
  });
}

function download() {
  const b = state.map.getBounds();
  const clamp = (v, lo, hi) => Math.min(Math.max(v, lo), hi);
  const box = [clamp(b.getWest(), -180, 180), clamp(b.getSouth(), -85, 85), clamp(b.getEast(), -180, 180), clamp(b.getNorth(), -85, 85)];
  const a = document.createElement("a");
  a.href = `api/detections.geojson?model=${encodeURIComponent(state.model)}&t=${state.threshold.toFixed(2)}&bbox=${box.map((v) => v.toFixed(6)).join(",")}`;
  a.download = "";
  document.body.appendChild(a);
  a.click();
  a.remove();
}

async function main() {
  const info = await (await fetch("api/info", { cache: "no-store" })).json();
  state.info = info;
  $("title").textContent = info.sweep;
  $("imagery-note").textContent = `${info.tiles.toLocaleString()} tiles at zoom ${info.zoom}; ${info.imagery.note}`;
  const sources = {};
  const layers = [{ id: "background", type: "background", paint: { "background-color": "#15181c" } }];
  const map = new maplibregl.Map({
    container: "map",
    style: { version: 8, sources, layers },
    bounds: [[info.bbox[0], info.bbox[1]], [info.bbox[2], info.bbox[3]]],
    fitBoundsOptions: { padding: 20 },
    maxZoom: info.zoom + 3,
    attributionControl: false,
    preserveDrawingBuffer: true, // the tests read the pixels
  });
  state.map = map;
  map.addControl(new maplibregl.NavigationControl({ showCompass: false }));
  map.addControl(new maplibregl.ScaleControl());
  await new Promise((resolve) => map.on("load", resolve));
  addImagery(map, info);
  map.addSource("area", { type: "geojson", data: "api/area.geojson" });
  map.addSource("blocks", { type: "vector", tiles: [blocksUrl()], minzoom: info.blocks_minzoom, maxzoom: info.block_zoom, bounds: info.bbox });
  map.addLayer({
    id: "blocks", type: "line", source: "blocks", "source-layer": "blocks",
    paint: { "line-color": ["match", ["get", "state"], "done", "#1a9850", "leased", "#fdae61", "dead", "#d73027", "#888"], "line-width": 1.5, "line-opacity": 0.8 },
  });
  map.addLayer({
    id: "blocks-fill", type: "fill", source: "blocks", "source-layer": "blocks", filter: ["!=", ["get", "state"], "done"],
    paint: { "fill-color": ["match", ["get", "state"], "leased", "#fdae61", "dead", "#d73027", "#888"], "fill-opacity": 0.25 },
  });
  map.addLayer({ id: "area-line", type: "line", source: "area", paint: { "line-color": "#4fc3f7", "line-width": 2 } });
  map.addSource("selected", { type: "geojson", data: { type: "FeatureCollection", features: [] } });
  map.addLayer({ id: "selected", type: "line", source: "selected", paint: { "line-color": "#ffffff", "line-width": 2 } });

  await refreshProgress();
  await loadModels();
  $("legend").innerHTML = `zoom &ge; ${Math.max(0, info.zoom - info.overlay.square_levels)}: tiles scoring &ge; threshold, coloured by score; ` +
    `below: detections per cell (up to ${4 ** info.overlay.cell_levels} cells per overlay tile), red = more; cyan: detections traced into power lines.`;
  $("model").addEventListener("change", (e) => { state.model = e.target.value; addOverlay(map); });
  $("threshold").addEventListener("input", (e) => setThreshold(parseFloat(e.target.value)));
  $("download").addEventListener("click", download);
  map.on("click", (e) => showTile(e.lngLat));
  setInterval(refreshProgress, 3000);
  state.ready = true;
}

main().catch((e) => { console.error(e); $("info").textContent = `error: ${e.message}`; });
