// ncp viewer: the page of the server-side viewer. Frames are rendered by the server (PS3.18
// rendered resources); this script lists studies and series, asks for frames with the window
// chosen, and moves, zooms and windows them. No framework, nothing from another origin.
// The page's HTML asks for its first image itself (decision 0018); its data (the session's
// context, the study, its series, the first series' images) comes with it as a JSON data block
// when the page's request had the session, else in one request beside the image. Nothing here
// is asked for before the first image.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const TAG = {
    studyDate: "00080020", studyTime: "00080030", accession: "00080050",
    modalities: "00080061", institution: "00080080", studyDesc: "00081030",
    patientName: "00100010", patientId: "00100020", birth: "00100030", sex: "00100040",
    studyUid: "0020000D", bodyParts: "00180015", nSeries: "00201206", nInstances: "00201208",
    modality: "00080060", seriesDesc: "0008103E", bodyPart: "00180015", seriesUid: "0020000E",
    seriesNumber: "00200011", seriesInstances: "00201209", laterality: "00200060",
    sopUid: "00080018", sopClass: "00080016", instanceNumber: "00200013", frames: "00280008",
    rows: "00280010", columns: "00280011", center: "00281050", width: "00281051",
    voiFunction: "00281056", spacing: "00280030", thickness: "00180050",
    location: "00201041", photometric: "00280004", syntax: "00083002", bits: "00280101",
    slope: "00281053", intercept: "00281052", kvp: "00180060", imageType: "00080008",
    acqDate: "00080022", acqTime: "00080032", lossy: "00282110",
    aspect: "00280034", imagerSpacing: "00181164", displayRate: "00082144",
    cineRate: "00180040", frameTime: "00181063",
  };
  const CINE_RATES = [2, 5, 10, 15, 20, 25, 30, 50];
  const VOI_FUNCTIONS = ["linear", "linear-exact", "sigmoid"];
  const PREFETCH = 6;
  const LOSSLESS_AFTER_MS = 220;

  const state = {
    ctx: null, L: {}, studies: [], study: null, series: [], seriesUid: null,
    instances: [], frames: [], pos: 0, window: null, imageWindow: null,
    zoom: 1, panX: 0, panY: 0, tool: "window", cine: null,
    shown: { url: null, lossless: false }, blobs: new Map(), pending: null,
    busy: false, losslessTimer: null, base: { scale: 1, left: 0, top: 0 },
    cineRate: null, firstShown: false, ended: false,
  };
  // For tests and the curious: what is shown now.
  window.__viewer = state;

  // -- DICOM JSON --------------------------------------------------------------------------
  const vals = (item, tag) => (item && item[tag] && item[tag].Value) || [];
  const val = (item, tag) => {
    const v = vals(item, tag)[0];
    if (v && typeof v === "object" && "Alphabetic" in v) return v.Alphabetic;
    return v === undefined || v === null ? "" : v;
  };
  const num = (item, tag) => {
    const v = parseFloat(val(item, tag));
    return Number.isFinite(v) ? v : null;
  };
  const personName = (pn) => {
    const [family, given] = String(pn || "").split("^");
    return [family, given].filter(Boolean).join(", ");
  };
  const fmtDate = (da) => {
    if (!/^\d{8}$/.test(da || "")) return da || "";
    const d = new Date(Date.UTC(+da.slice(0, 4), +da.slice(4, 6) - 1, +da.slice(6, 8)));
    return new Intl.DateTimeFormat(state.ctx.locale, { dateStyle: "medium", timeZone: "UTC" }).format(d);
  };
  const fmtTime = (tm) => (/^\d{4}/.test(tm || "") ? `${tm.slice(0, 2)}:${tm.slice(2, 4)}` : "");
  const round = (x, d = 0) => (x === null ? "" : Number(x.toFixed(d)).toString());
  const L = (key) => state.L[key] || key;
  const modalityName = (code) => state.ctx.displays.modality[code] || code;
  const bodyPartName = (code) => state.ctx.displays.bodyPart[code] || code;
  const el = (tag, attrs = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (v !== null && v !== undefined) node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  };

  // -- talking to the server -----------------------------------------------------------------
  async function getJson(url) {
    const answer = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json, application/dicom+json" } });
    if (!answer.ok) throw await failure(answer);
    return answer.json();
  }
  async function failure(answer) {
    const text = (await answer.text()).trim();
    const error = new Error(text || `HTTP ${answer.status}`);
    error.status = answer.status;
    return error;
  }
  function fail(error) {
    if (error && error.status === 401) return endSession();
    message(error && error.message ? error.message : String(error));
  }
  function message(text) {
    $("message").textContent = text || "";
  }
  function endSession(text) {
    stopCine();
    state.ended = true;
    $("app").dataset.state = "ended";
    message(text || L("session_over"));
    $("image").classList.add("hidden");
    // The images shown are dropped from the page's memory too.
    for (const promise of state.blobs.values()) promise.then((u) => URL.revokeObjectURL(u), () => {});
    state.blobs.clear();
    for (const img of document.querySelectorAll(".series-item img")) img.removeAttribute("src");
  }

  // -- start ----------------------------------------------------------------------------------
  function readInitial() {
    const block = document.getElementById("ncp-initial");
    try {
      return JSON.parse((block && block.textContent) || "{}");
    } catch (error) {
      return {};
    }
  }

  async function start() {
    let initial = readInitial();
    if (!initial.context) {
      // The page came without its data (a launch from another site: the session's cookie
      // does not travel on that navigation): one request for it, while the image loads.
      state.L = initial.labels || {};
      try {
        initial = await getJson(`initial${location.search}`);
      } catch (error) {
        $("app").dataset.state = "refused";
        $("image").classList.add("hidden");
        return fail(error);
      }
    }
    state.ctx = initial.context;
    state.L = state.ctx.labels;
    buildToolbar();
    if (state.ctx.expires) {
      const ends = new Date(state.ctx.expires);
      $("session").textContent = `${L("session_ends")} ${ends.toLocaleTimeString(state.ctx.locale, { hour: "2-digit", minute: "2-digit" })}`;
      setTimeout(() => endSession(), Math.max(0, ends - Date.now()));
    }
    state.studies = initial.studies || [];
    buildSidebar();
    if (!initial.study) return message(L("no_images"));
    await openStudy(initial.study, initial);
    // With several studies, the page came with the one it opens: the others are listed now.
    if (!initial.complete) {
      try {
        state.studies = await getJson("studies");
        buildSidebar();
      } catch (error) {
        fail(error);
      }
    }
  }

  // -- toolbar ----------------------------------------------------------------------------------
  function buildToolbar() {
    const tools = $("tools");
    tools.setAttribute("aria-label", L("tool_window"));
    for (const [tool, key] of [["window", "W"], ["pan", "P"], ["zoom", "Z"], ["scroll", "S"]]) {
      tools.append(el("button", { class: "tool", type: "button", "data-tool": tool, "aria-pressed": String(tool === state.tool), title: `${L("tool_" + tool)} (${key})`, onclick: () => setTool(tool) }, L("tool_" + tool), el("span", { class: "key" }, key)));
    }
    tools.append(el("button", { class: "tool", type: "button", id: "reset", title: `${L("reset")} (R)`, onclick: reset }, L("reset")));
    tools.append(el("button", { class: "tool", type: "button", id: "cine", "aria-pressed": "false", title: `${L("cine")} (Space)`, onclick: toggleCine }, L("cine")));
    const rate = el("select", { class: "rate", id: "cine-rate", title: `${L("cine_rate")} ([ ])`, "aria-label": L("cine_rate"), onchange: (e) => setCineRate(e.target.value) },
      el("option", { value: "auto" }, L("cine_auto")),
      ...CINE_RATES.map((r) => el("option", { value: String(r) }, `${r} ${L("fps")}`)));
    tools.append(rate);
    tools.append(el("button", { class: "tool", type: "button", id: "info-button", "aria-pressed": "false", title: `${L("info")} (I)`, onclick: toggleInfo }, L("info")));
    tools.append(el("button", { class: "tool", type: "button", title: `${L("help")} (?)`, onclick: toggleHelp }, "?"));
    if (state.ctx.can_end) {
      $("end").append(el("button", { class: "tool", type: "button", id: "end-session", title: L("end_session_hint"), onclick: logout }, L("end_session")));
    }
    const presets = $("presets");
    presets.setAttribute("aria-label", L("presets"));
    presets.append(el("button", { class: "preset", type: "button", "data-preset": "default", "aria-pressed": "true", title: `${L("preset_default")} (0)`, onclick: () => setWindow(null) }, L("preset_default"), el("span", { class: "key" }, "0")));
    state.ctx.presets.forEach((p, i) => {
      presets.append(el("button", { class: "preset", type: "button", "data-preset": p.key, "aria-pressed": "false", title: `${L(p.key)} (${i + 1})`, onclick: () => setWindow({ center: p.center, width: p.width, fn: "linear" }, p.key) }, L(p.key), el("span", { class: "key" }, String(i + 1))));
    });
  }
  function setTool(tool) {
    state.tool = tool;
    $("viewport").dataset.tool = tool;
    for (const b of document.querySelectorAll(".tool[data-tool]")) b.setAttribute("aria-pressed", String(b.dataset.tool === tool));
  }
  function markPreset(key) {
    for (const b of document.querySelectorAll(".preset")) b.setAttribute("aria-pressed", String(b.dataset.preset === key));
  }

  // -- studies and series ------------------------------------------------------------------------
  function buildSidebar() {
    const side = $("sidebar");
    // Boxes already shown (with their series and thumbnails) are kept, in the list's order.
    const kept = new Map([...side.querySelectorAll(".study")].map((box) => [box.dataset.study, box]));
    const boxes = state.studies.map((study) => {
      const uid = val(study, TAG.studyUid);
      const mods = vals(study, TAG.modalities).map(modalityName).join(", ");
      const head = el("button", { class: "study-head", type: "button", onclick: () => openStudy(uid) },
        el("div", { class: "study-date" }, `${fmtDate(val(study, TAG.studyDate))} ${fmtTime(val(study, TAG.studyTime))}`.trim()),
        el("div", { class: "study-desc" }, val(study, TAG.studyDesc) || "—"),
        el("div", { class: "study-meta" }, `${mods} · ${L("series")}: ${val(study, TAG.nSeries)} · ${L("images")}: ${val(study, TAG.nInstances)}`));
      const box = kept.get(uid);
      if (box) {
        box.querySelector(".study-head").replaceWith(head);
        return box;
      }
      return el("section", { class: "study" + (uid === state.study ? " current" : ""), "data-study": uid }, head, el("div", { class: "series-list" }));
    });
    side.replaceChildren(el("h2", {}, L("studies")), ...boxes);
  }

  async function openStudy(uid, given) {
    if (state.study === uid && state.series.length) return;
    state.study = uid;
    for (const box of document.querySelectorAll(".study")) box.classList.toggle("current", box.dataset.study === uid);
    let series;
    if (given && given.study === uid && given.series) {
      series = given.series;
    } else {
      try {
        series = await getJson(`studies/${uid}/series`);
      } catch (error) {
        return fail(error);
      }
    }
    state.series = series;
    const list = document.querySelector(`.study[data-study="${uid}"] .series-list`);
    list.replaceChildren();
    for (const s of series) {
      const suid = val(s, TAG.seriesUid);
      const mod = val(s, TAG.modality);
      const part = val(s, TAG.bodyPart);
      list.append(el("button", { class: "series-item", type: "button", "data-series": suid, title: `${modalityName(mod)}${part ? " · " + bodyPartName(part) : ""}`, onclick: () => openSeries(suid) },
        el("img", { "data-src": `studies/${uid}/series/${suid}/thumbnail`, alt: val(s, TAG.seriesDesc) || mod }),
        el("span", { class: "series-caption" }, el("b", {}, `${mod} ${val(s, TAG.seriesNumber)}`), el("span", {}, val(s, TAG.seriesDesc) || "—"), el("span", {}, `${L("images")}: ${val(s, TAG.seriesInstances)}`))));
    }
    if (series.length) await openSeries(val(series[0], TAG.seriesUid), given);
  }

  // The window of an image as the server reads it: its first Window Center/Width and its VOI
  // LUT Function (an unknown one read as linear).
  function imageWindowOf(inst) {
    const c = num(inst, TAG.center);
    const w = num(inst, TAG.width);
    if (c === null || w === null || w < 1) return null;
    const fn = (val(inst, TAG.voiFunction) || "LINEAR").toLowerCase().replace("_", "-");
    return { center: c, width: w, fn: VOI_FUNCTIONS.includes(fn) ? fn : "linear" };
  }

  async function openSeries(suid, given) {
    stopCine();
    clearTimeout(state.losslessTimer);
    state.seriesUid = suid;
    for (const b of document.querySelectorAll(".series-item")) b.setAttribute("aria-current", String(b.dataset.series === suid));
    let instances;
    if (given && given.seriesUid === suid && given.instances) {
      instances = given.instances;
    } else {
      try {
        instances = await getJson(`studies/${state.study}/series/${suid}/instances`);
      } catch (error) {
        return fail(error);
      }
    }
    state.instances = instances;
    state.frames = [];
    for (const inst of instances) {
      const n = Math.max(1, parseInt(val(inst, TAG.frames) || "1", 10) || 1);
      for (let f = 1; f <= n; f += 1) state.frames.push({ inst, frame: f, frames: n, study: state.study, series: suid });
    }
    state.imageWindow = instances.length ? imageWindowOf(instances[0]) : null;
    state.window = null;
    markPreset("default");
    state.pos = 0;
    state.zoom = 1; state.panX = 0; state.panY = 0;
    const img = $("image");
    // The page's HTML asked for this series' first frame already (the study's first-image):
    // it is shown as it comes, in place of the same frame asked for by the script.
    const asked = img.getAttribute("src");
    if (given && given.first && asked === `studies/${given.study}/first-image` && state.frames.length) {
      const key = frameUrl(state.frames[0], activeWindow(), "image/jpeg", 90);
      state.blobs.set(key, loaded(img).then(() => asked, () => {
        state.blobs.delete(key);
        img.removeAttribute("src");
        return blobUrl(key); // asked again by the script, whose failure says why
      }));
    }
    img.classList.remove("hidden");
    message("");
    layout();
    await show(0);
    if ($("info").classList.contains("hidden") === false) fillInfo();
  }

  function loaded(img) {
    return new Promise((resolve, reject) => {
      if (img.complete) return img.naturalWidth ? resolve() : reject(new Error("image"));
      img.addEventListener("load", () => resolve(), { once: true });
      img.addEventListener("error", () => reject(new Error("image")), { once: true });
    });
  }

  // -- frames ------------------------------------------------------------------------------------
  function current() { return state.frames[state.pos]; }
  function activeWindow() { return state.window || state.imageWindow; }
  function frameUrl(entry, win, media, quality) {
    const i = entry.inst;
    // The frame's own study and series: a request made while another series opens stays right.
    let url = `studies/${entry.study}/series/${entry.series}/instances/${val(i, TAG.sopUid)}/frames/${entry.frame}/rendered?accept=${encodeURIComponent(media)}`;
    if (win) url += `&window=${round(win.center, 2)},${round(win.width, 2)},${win.fn || "linear"}`;
    if (quality) url += `&quality=${quality}`;
    return url;
  }
  async function blobUrl(url) {
    const kept = state.blobs.get(url);
    if (kept) return kept;
    const promise = fetch(url, { credentials: "same-origin" }).then(async (answer) => {
      if (!answer.ok) throw await failure(answer);
      return URL.createObjectURL(await answer.blob());
    });
    state.blobs.set(url, promise);
    promise.catch(() => state.blobs.delete(url));
    // A bounded memory of images: the oldest go first.
    if (state.blobs.size > 400) {
      const [oldest, value] = state.blobs.entries().next().value;
      state.blobs.delete(oldest);
      value.then((u) => URL.revokeObjectURL(u), () => {});
    }
    return promise;
  }

  async function show(pos, { quality = 90 } = {}) {
    if (!state.frames.length) return;
    state.pos = Math.max(0, Math.min(state.frames.length - 1, pos));
    const entry = current();
    const win = activeWindow();
    const url = frameUrl(entry, win, "image/jpeg", quality);
    clearTimeout(state.losslessTimer);
    state.pending = { url, pos: state.pos };
    if (state.busy) return; // the newest request is sent when this one is back
    state.busy = true;
    try {
      while (state.pending) {
        const job = state.pending;
        state.pending = null;
        try {
          const src = await blobUrl(job.url);
          paint(src, job, false);
        } catch (error) {
          fail(error);
        }
      }
    } finally {
      state.busy = false;
    }
    if (state.ended) return;
    if (!state.firstShown && $("image").dataset.pos !== undefined) firstShown();
    drawOverlays();
    loadThumbnails();
    prefetch();
    state.losslessTimer = setTimeout(showLossless, LOSSLESS_AFTER_MS);
  }

  // Once, when the first image is on the screen: a mark in the page's performance timeline
  // ("ncp-first-image", from the start of the navigation, the launch included) and an event.
  function firstShown() {
    state.firstShown = true;
    $("app").dataset.state = "ready";
    performance.mark("ncp-first-image");
    document.dispatchEvent(new CustomEvent("ncp:first-image"));
  }

  // Thumbnails are asked for once the first image is shown: it comes first.
  function loadThumbnails() {
    for (const img of document.querySelectorAll(".series-item img[data-src]")) {
      img.src = img.dataset.src;
      img.removeAttribute("data-src");
    }
  }

  function paint(src, job, lossless) {
    const img = $("image");
    if (state.ended) return;
    if (img.getAttribute("src") !== src) img.src = src;
    img.dataset.pos = String(job.pos);
    img.dataset.lossless = lossless ? "1" : "0";
    const win = activeWindow();
    img.dataset.window = win ? `${round(win.center, 2)},${round(win.width, 2)}` : "default";
    state.shown = { url: job.url, lossless };
  }

  async function showLossless() {
    if (!state.frames.length || state.cine) return;
    const job = { url: frameUrl(current(), activeWindow(), "image/png"), pos: state.pos };
    try {
      const src = await blobUrl(job.url);
      if (job.pos === state.pos && job.url === frameUrl(current(), activeWindow(), "image/png")) {
        paint(src, job, true);
        drawOverlays();
      }
    } catch (error) {
      fail(error);
    }
  }

  function prefetch() {
    const win = activeWindow();
    // Six frames each way, nearest first; while cine plays, a second of frames ahead only.
    const ahead = state.cine ? Math.max(PREFETCH, Math.ceil(cineRate())) : PREFETCH;
    const behind = state.cine ? 0 : PREFETCH;
    for (let d = 1; d <= ahead; d += 1) {
      for (const p of d <= behind ? [state.pos + d, state.pos - d] : [state.pos + d]) {
        if (p >= 0 && p < state.frames.length) blobUrl(frameUrl(state.frames[p], win, "image/jpeg", 90)).catch(() => {});
      }
    }
  }

  function step(delta) { show(state.pos + delta); }

  // -- window ----------------------------------------------------------------------------------------
  function setWindow(win, key = "default") {
    state.window = win;
    markPreset(win ? key : "default");
    show(state.pos);
  }

  // -- geometry: fit, zoom, pan ---------------------------------------------------------------------
  // How much taller than wide a pixel is: Pixel Spacing (row / column spacing), Imager Pixel
  // Spacing, or Pixel Aspect Ratio (vertical / horizontal); the server does the same for the
  // images it sizes (thumbnails, viewport=).
  function pixelAspect(inst) {
    for (const tag of [TAG.spacing, TAG.imagerSpacing, TAG.aspect]) {
      const [v, h] = vals(inst, tag).map((x) => parseFloat(x));
      if (v > 0 && h > 0 && Number.isFinite(v / h)) return Math.abs(v / h - 1) < 1e-3 ? 1 : Math.min(10, Math.max(0.1, v / h));
    }
    return 1;
  }
  function layout() {
    const entry = current();
    if (!entry) return;
    const rows = parseInt(val(entry.inst, TAG.rows), 10) || 512;
    const cols = parseInt(val(entry.inst, TAG.columns), 10) || 512;
    const high = rows * pixelAspect(entry.inst);
    const box = $("viewport").getBoundingClientRect();
    const scale = Math.min(box.width / cols, box.height / high);
    state.base = { scale, left: (box.width - cols * scale) / 2, top: (box.height - high * scale) / 2, rows, cols };
    const img = $("image");
    img.classList.add("placed");
    img.style.width = `${cols * scale}px`;
    img.style.height = `${high * scale}px`;
    applyTransform();
  }
  function applyTransform() {
    const img = $("image");
    const b = state.base;
    img.style.transform = `translate(${b.left + state.panX}px, ${b.top + state.panY}px) scale(${state.zoom})`;
    img.classList.toggle("pixelated", b.scale * state.zoom >= 3);
  }
  function zoomBy(factor, cx, cy) {
    const box = $("viewport").getBoundingClientRect();
    const x = cx === undefined ? box.width / 2 : cx;
    const y = cy === undefined ? box.height / 2 : cy;
    const z = Math.max(0.25, Math.min(16, state.zoom * factor));
    const k = z / state.zoom;
    // Keep the point under the cursor where it is.
    const ox = state.base.left + state.panX;
    const oy = state.base.top + state.panY;
    state.panX = x - (x - ox) * k - state.base.left;
    state.panY = y - (y - oy) * k - state.base.top;
    state.zoom = z;
    applyTransform();
    drawOverlays();
  }
  function reset() {
    state.zoom = 1; state.panX = 0; state.panY = 0;
    applyTransform();
    setWindow(null);
  }

  // -- mouse -------------------------------------------------------------------------------------------
  function bindMouse() {
    const vp = $("viewport");
    let drag = null;
    vp.addEventListener("contextmenu", (e) => e.preventDefault());
    vp.addEventListener("pointerdown", (e) => {
      if (!state.frames.length) return;
      vp.focus();
      vp.setPointerCapture(e.pointerId);
      const tool = e.button === 1 || e.shiftKey ? "pan" : e.button === 2 ? "zoom" : state.tool;
      const win = activeWindow() || { center: 0, width: 1000, fn: "linear" };
      drag = { tool, x: e.clientX, y: e.clientY, panX: state.panX, panY: state.panY, zoom: state.zoom, win: { ...win }, pos: state.pos };
    });
    vp.addEventListener("pointermove", (e) => {
      if (!drag) return;
      const dx = e.clientX - drag.x;
      const dy = e.clientY - drag.y;
      if (drag.tool === "pan") {
        state.panX = drag.panX + dx; state.panY = drag.panY + dy; applyTransform();
      } else if (drag.tool === "zoom") {
        const box = vp.getBoundingClientRect();
        zoomBy((drag.zoom * Math.exp(-dy / 150)) / state.zoom, drag.x - box.left, drag.y - box.top);
      } else if (drag.tool === "scroll") {
        show(drag.pos + Math.round(dy / 8));
      } else {
        // Right for a wider window, down for a higher level; sensitivity follows the width.
        const k = Math.max(0.5, drag.win.width / 300);
        state.window = { center: drag.win.center + dy * k, width: Math.max(1, drag.win.width + dx * k * 2), fn: drag.win.fn || "linear" };
        markPreset("custom");
        show(state.pos, { quality: 75 });
      }
    });
    const end = () => { drag = null; };
    vp.addEventListener("pointerup", end);
    vp.addEventListener("pointercancel", end);
    vp.addEventListener("wheel", (e) => {
      e.preventDefault();
      if (e.ctrlKey) {
        const box = vp.getBoundingClientRect();
        zoomBy(e.deltaY < 0 ? 1.15 : 1 / 1.15, e.clientX - box.left, e.clientY - box.top);
      } else {
        step(e.deltaY > 0 ? 1 : -1);
      }
    }, { passive: false });
    window.addEventListener("resize", layout);
  }

  // -- keyboard -------------------------------------------------------------------------------------
  function bindKeys() {
    document.addEventListener("keydown", (e) => {
      if (e.altKey || e.metaKey || (e.ctrlKey && e.key !== "0")) return;
      if (e.target && /^(SELECT|INPUT|TEXTAREA)$/.test(e.target.tagName)) return;
      if (state.ended || !state.ctx) return;
      const k = e.key;
      let handled = true;
      if (k === "ArrowDown" || k === "PageDown" || k === "j") step(1);
      else if (k === "ArrowUp" || k === "PageUp" || k === "k") step(-1);
      else if (k === "Home") show(0);
      else if (k === "End") show(state.frames.length - 1);
      else if (k === "ArrowRight" || k === "ArrowLeft") nextSeries(k === "ArrowRight" ? 1 : -1);
      else if (k === " ") toggleCine();
      else if (k === "[" || k === "]") stepCineRate(k === "]" ? 1 : -1);
      else if (/^[1-5]$/.test(k)) { const p = state.ctx.presets[+k - 1]; setWindow({ center: p.center, width: p.width, fn: "linear" }, p.key); }
      else if (k === "0") setWindow(null);
      else if (k === "+" || k === "=") zoomBy(1.25);
      else if (k === "-") zoomBy(0.8);
      else if (k === "r" || k === "R") reset();
      else if (k === "w") setTool("window");
      else if (k === "p") setTool("pan");
      else if (k === "z") setTool("zoom");
      else if (k === "s") setTool("scroll");
      else if (k === "i") toggleInfo();
      else if (k === "?" || k === "h") toggleHelp();
      else if (k === "Escape") $("help").classList.add("hidden");
      else handled = false;
      if (handled) e.preventDefault();
    });
  }
  function nextSeries(delta) {
    const uids = state.series.map((s) => val(s, TAG.seriesUid));
    const i = uids.indexOf(state.seriesUid);
    const j = i + delta;
    if (j >= 0 && j < uids.length) openSeries(uids[j]);
  }

  // -- cine --------------------------------------------------------------------------------------------
  // Frames per second: the HP's choice, else the image's own (Recommended Display Frame Rate,
  // Cine Rate, or 1000 / Frame Time), else 10. A frame is never skipped: when the server is
  // slower than the rate, cine slows down rather than jump.
  function seriesRate() {
    const entry = current();
    const inst = entry ? entry.inst : null;
    const rate = num(inst, TAG.displayRate) || num(inst, TAG.cineRate);
    if (rate > 0) return Math.min(60, rate);
    const ms = num(inst, TAG.frameTime);
    return ms > 0 ? Math.min(60, 1000 / ms) : 10;
  }
  function cineRate() { return state.cineRate || seriesRate(); }
  function setCineRate(value) {
    state.cineRate = value === "auto" ? null : Math.max(1, Math.min(60, parseFloat(value) || 10));
    const select = $("cine-rate");
    if (select) select.value = state.cineRate ? String(state.cineRate) : "auto";
    if (state.cine) { stopCine(); toggleCine(); }
    drawOverlays();
  }
  function stepCineRate(delta) {
    const now = cineRate();
    const next = delta > 0 ? CINE_RATES.find((r) => r > now) : [...CINE_RATES].reverse().find((r) => r < now);
    if (next) setCineRate(String(next));
  }
  function toggleCine() {
    if (state.cine) return stopCine();
    if (!state.frames.length) return;
    state.cine = setInterval(() => {
      if (!state.busy) show((state.pos + 1) % state.frames.length);
    }, 1000 / cineRate());
    $("cine").setAttribute("aria-pressed", "true");
    $("cine").dataset.rate = round(cineRate(), 1);
    drawOverlays();
  }
  function stopCine() {
    if (state.cine) clearInterval(state.cine);
    state.cine = null;
    const b = $("cine");
    if (b) b.setAttribute("aria-pressed", "false");
  }

  // -- the session's end -------------------------------------------------------------------------------
  async function logout() {
    try {
      const answer = await fetch("logout", { method: "POST", credentials: "same-origin" });
      if (!answer.ok && answer.status !== 401) throw await failure(answer);
    } catch (error) {
      return fail(error);
    }
    endSession(L("session_closed"));
    $("app").dataset.state = "closed";
  }

  // -- overlays, information, help ---------------------------------------------------------------------
  function line(text, cls) { return el("div", cls ? { class: cls } : {}, text); }
  function drawOverlays() {
    const entry = current();
    if (!entry) return;
    const study = state.studies.find((s) => val(s, TAG.studyUid) === state.study) || {};
    const series = state.series.find((s) => val(s, TAG.seriesUid) === state.seriesUid) || {};
    const i = entry.inst;
    const birth = val(study, TAG.birth);
    $("ov-tl").replaceChildren(
      line(personName(val(study, TAG.patientName)) || "—", "strong"),
      line(`ID ${val(study, TAG.patientId)}`),
      line([birth ? `${L("born")} ${fmtDate(birth)}` : "", val(study, TAG.sex) ? `${L("sex")} ${val(study, TAG.sex)}` : ""].filter(Boolean).join(" · ")));
    $("ov-tr").replaceChildren(
      line(val(study, TAG.institution), "strong"),
      line(val(study, TAG.studyDesc)),
      line(`${fmtDate(val(study, TAG.studyDate))} ${fmtTime(val(study, TAG.studyTime))}`),
      line(val(study, TAG.accession) ? `${L("accession")} ${val(study, TAG.accession)}` : ""));
    const imageIndex = state.instances.indexOf(i) + 1;
    const loc = num(i, TAG.location);
    const thick = num(i, TAG.thickness);
    $("ov-bl").replaceChildren(
      line(`${L("series")} ${val(series, TAG.seriesNumber)}: ${val(series, TAG.seriesDesc)}`, "strong"),
      line([modalityName(val(series, TAG.modality)), val(series, TAG.bodyPart) ? bodyPartName(val(series, TAG.bodyPart)) : ""].filter(Boolean).join(" · "), "dim"),
      line(`${L("image")}: ${imageIndex} / ${state.instances.length}` + (entry.frames > 1 ? `   ${L("frame")}: ${entry.frame} / ${entry.frames}` : "")),
      line([loc !== null ? `${L("location")} ${round(loc, 1)} mm` : "", thick !== null ? `${L("thickness")} ${round(thick, 1)} mm` : ""].filter(Boolean).join(" · ")));
    const win = activeWindow();
    $("ov-br").replaceChildren(
      line(win ? `${L("window")}: ${round(win.width)}  ${L("level")}: ${round(win.center)}` : `${L("window")}/${L("level")}: ${L("preset_default")}`, "strong"),
      line(`${L("zoom")}: ${Math.round(state.base.scale * state.zoom * 100)}%`),
      line(state.cine ? `${L("cine")}: ${round(cineRate(), 1)} ${L("fps")}` : ""),
      line(`${val(i, TAG.columns)} × ${val(i, TAG.rows)}`, "dim"),
      line(state.shown.lossless ? L("lossless") : L("lossy"), state.shown.lossless ? "ok" : "warn"));
    const bar = $("scrollthumb");
    const n = state.frames.length;
    bar.style.height = `${Math.max(2, 100 / n)}%`;
    bar.style.top = `${n > 1 ? (state.pos / (n - 1)) * (100 - Math.max(2, 100 / n)) : 0}%`;
    if (!$("info").classList.contains("hidden")) fillInfo();
  }
  function toggleInfo() {
    const box = $("info");
    box.classList.toggle("hidden");
    $("info-button").setAttribute("aria-pressed", String(!box.classList.contains("hidden")));
    if (!box.classList.contains("hidden")) fillInfo();
    layout();
  }
  function table(rows) {
    return el("table", {}, ...rows.filter(([, v]) => v !== "" && v !== null && v !== undefined).map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v))));
  }
  function fillInfo() {
    const entry = current();
    if (!entry) return;
    const i = entry.inst;
    const s = state.series.find((x) => val(x, TAG.seriesUid) === state.seriesUid) || {};
    $("info").replaceChildren(
      el("h3", {}, L("series_info")),
      table([[L("number"), val(s, TAG.seriesNumber)], [L("description"), val(s, TAG.seriesDesc)], [L("modality"), modalityName(val(s, TAG.modality))], [L("body_part"), bodyPartName(val(s, TAG.bodyPart))], [L("images"), val(s, TAG.seriesInstances)]]),
      el("h3", {}, L("instance_info")),
      table([[L("number"), val(i, TAG.instanceNumber)], [L("size"), `${val(i, TAG.columns)} × ${val(i, TAG.rows)}`], [L("frames"), val(i, TAG.frames) || "1"], [L("spacing"), vals(i, TAG.spacing).map((x) => round(parseFloat(x), 3)).join(" × ")], [L("thickness"), val(i, TAG.thickness)], [L("location"), val(i, TAG.location)], [L("photometric"), val(i, TAG.photometric)], ["Bits", val(i, TAG.bits)], ["Rescale", val(i, TAG.slope) !== "" ? `${val(i, TAG.slope)} / ${val(i, TAG.intercept)}` : ""], ["kVp", val(i, TAG.kvp)], [L("date"), fmtDate(val(i, TAG.acqDate))], [L("syntax"), val(i, TAG.syntax)], ["SOP", val(i, TAG.sopUid)]]));
  }
  function toggleHelp() {
    const box = $("help");
    if (!box.classList.contains("hidden")) return box.classList.add("hidden");
    const rows = [
      [["↑", "↓"], "key_scroll"], [["←", "→"], "key_series"], [["Home", "End"], "key_first_last"],
      [["Space"], "key_cine"], [["[", "]"], "key_cine_rate"], [["1", "…", "5"], "key_presets"], [["0"], "key_default"],
      [["+", "−"], "key_zoom"], [["R"], "key_reset"], [["W", "P", "Z", "S"], "key_tools"],
      [["I"], "key_info"], [["?"], "key_help"],
    ];
    box.replaceChildren(el("h2", {}, L("shortcuts")),
      el("table", {}, ...rows.map(([keys, label]) => el("tr", {}, el("td", {}, ...keys.map((k) => el("kbd", {}, k))), el("td", {}, L(label))))),
      el("button", { class: "tool close", type: "button", onclick: toggleHelp }, L("close")));
    box.classList.remove("hidden");
  }

  document.addEventListener("DOMContentLoaded", () => {
    bindMouse();
    bindKeys();
    setTool("window");
    start();
  });
})();
