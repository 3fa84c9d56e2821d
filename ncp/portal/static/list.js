/* The list page: renders the view model (ncp.portal.listview) as a table that sorts, filters,
   groups and selects, with tabs by modality and a timeline. Every value from the other country
   is written with textContent (never as HTML). Rows are built once; a change only reorders,
   hides or shows them (one replaceChildren per change), so 1,000 rows update in milliseconds.
   window.ncpList exposes the state for the tests and the benchmark. */
(function () {
  "use strict";
  var scriptStart = performance.now();

  var model = JSON.parse(document.getElementById("list-model").textContent);
  var messages = JSON.parse(document.getElementById("list-messages").textContent);
  var table = document.getElementById("list-table");
  var tbody = table.tBodies[0];
  var filtersForm = document.getElementById("list-filters");
  var countEl = document.getElementById("list-count");
  var emptyEl = document.getElementById("list-empty");
  var tabsEl = document.getElementById("list-tabs");
  var timelineEl = document.getElementById("list-timeline");
  var selectAll = document.getElementById("select-all");
  var selectedEl = document.getElementById("selected-count");
  var retrieveBtn = document.getElementById("retrieve");
  var COLUMNS = model.columns;
  var STORE_KEY = "ncp.list.hidden";

  function msg(key, values) {
    var text = Object.prototype.hasOwnProperty.call(messages, key) ? messages[key] : key;
    if (values) {
      Object.keys(values).forEach(function (name) {
        text = text.split("{" + name + "}").join(String(values[name]));
      });
    }
    return text;
  }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function display(coded) {
    return coded && coded.display ? coded.display : msg("list.not_recorded");
  }

  /* --- rows, built once ------------------------------------------------------------------- */

  var STATUS_ORDER = { preliminary: 0, amended: 1, final: 2, "entered-in-error": 3, unknown: 4 };
  var rows = model.rows.map(function (r, i) {
    var report = r.report;
    var entry = {
      index: i,
      data: r,
      time: r.started ? Date.parse(r.started) : 0,
      day: r.started ? r.started.slice(0, 10) : "",
      modality: r.modalities.length ? r.modalities[0] : "",
      modalities: r.modalities,
      bodySite: r.body_site_display || "",
      studyType: display(r.study_type),
      specialty: display(r.requesting_specialty),
      text: [r.description, r.modality_display, r.modalities.join(" "), r.body_site_display,
        r.organisation, r.accession || "", display(r.study_type), display(r.requesting_specialty),
        report ? report.title + " " + report.status_display + " " + report.author : ""
      ].join(" ").toLowerCase(),
      reportRank: report ? (STATUS_ORDER[report.status] || 4) - (report.urgent ? 10 : 0) : 99,
      checkbox: null,
      node: null
    };
    entry.node = buildRow(entry);
    return entry;
  });

  function buildRow(entry) {
    var r = entry.data;
    var tr = el("tr");
    tr.id = "study-" + r.id;
    if (r.report && r.report.urgent) tr.className = "urgent";
    COLUMNS.forEach(function (col) {
      var td = el("td", "c-" + col);
      switch (col) {
        case "select":
          if (r.kind === "study") {
            var box = el("input");
            box.type = "checkbox";
            box.name = "study";
            box.value = r.id;
            box.setAttribute("aria-label", msg("list.select_row", { date: r.started_display }));
            entry.checkbox = box;
            td.appendChild(box);
          }
          break;
        case "started":
          var time = el("time", null, r.started_display);
          time.dateTime = r.started;
          td.appendChild(time);
          break;
        case "modality":
          r.modalities.forEach(function (code, k) {
            var abbr = el("abbr", "modality m-" + code.replace(/[^A-Za-z0-9]/g, ""), code);
            abbr.title = (r.modality_display.split(", ")[k]) || code;
            td.appendChild(abbr);
          });
          break;
        case "body_site":
          td.textContent = r.body_site_display;
          break;
        case "description":
          if (r.thumbnail) {
            var img = el("img", "thumb");
            img.src = r.thumbnail;
            img.alt = msg("list.thumbnail");
            img.loading = "lazy";
            img.width = 48;
            img.height = 48;
            td.appendChild(img);
          }
          td.appendChild(el("span", null, r.kind === "report" ? msg("list.report_only") + ": " + r.description : r.description));
          break;
        case "study_type":
          td.textContent = display(r.study_type);
          break;
        case "requesting_specialty":
          td.textContent = display(r.requesting_specialty);
          break;
        case "organisation":
          td.appendChild(el("span", null, r.organisation));
          td.appendChild(el("span", "muted", " (" + r.country + ")"));
          break;
        case "series_instances":
          td.textContent = r.series === null ? "" : r.series + " / " + r.instances;
          td.className += " num";
          break;
        case "size":
          td.textContent = r.size_display;
          td.className += " num";
          break;
        case "download":
          td.textContent = r.download_display;
          td.className += " num";
          break;
        case "report":
          var report = r.report;
          if (!report) {
            td.appendChild(el("span", "muted", msg("list.no_report")));
            break;
          }
          var label = report.status_display;
          var target;
          if (report.url) {
            target = el("a", "report-link", label);
            target.href = report.url;
            target.setAttribute("aria-label", msg("list.open_report") + ": " + report.title + " (" + label + ")");
          } else {
            target = el("span", "report-link", label);
          }
          td.appendChild(target);
          if (report.preliminary) td.appendChild(el("span", "flag preliminary", msg("list.preliminary")));
          if (report.urgent) td.appendChild(el("span", "flag urgent", msg("list.urgent")));
          break;
      }
      tr.appendChild(td);
    });
    return tr;
  }

  /* --- state ------------------------------------------------------------------------------- */

  var state = {
    sort: "started", dir: -1, tab: "", group: "", view: "table",
    from: "", to: "", modality: "", body_site: "", study_type: "", requesting_specialty: "", text: ""
  };
  var visible = rows.slice();

  var SORT_KEYS = {
    started: function (e) { return e.time; },
    modality: function (e) { return e.data.modality_display; },
    body_site: function (e) { return e.bodySite; },
    description: function (e) { return e.data.description.toLowerCase(); },
    study_type: function (e) { return e.studyType; },
    requesting_specialty: function (e) { return e.specialty; },
    organisation: function (e) { return e.data.organisation; },
    series_instances: function (e) { return e.data.instances === null ? -1 : e.data.instances; },
    size: function (e) { return e.data.size_bytes === null ? -1 : e.data.size_bytes; },
    download: function (e) { return e.data.download_s === null ? -1 : e.data.download_s; },
    report: function (e) { return e.reportRank; }
  };
  var collator = new Intl.Collator(model.locale || model.language, { sensitivity: "base", numeric: true });

  function compare(a, b) {
    var key = SORT_KEYS[state.sort] || SORT_KEYS.started;
    var x = key(a), y = key(b), c;
    if (typeof x === "number" && typeof y === "number") c = x - y;
    else c = collator.compare(String(x), String(y));
    if (c === 0) c = b.time - a.time;  // ties: newest first
    return c * (c === 0 ? 1 : state.dir) || a.index - b.index;
  }

  function matches(e, ignoreTab) {
    var r = e.data;
    if (!ignoreTab && state.tab && e.modalities.indexOf(state.tab) < 0) return false;
    if (state.from && e.day < state.from) return false;
    if (state.to && e.day > state.to) return false;
    if (state.modality && e.modalities.indexOf(state.modality) < 0) return false;
    if (state.body_site && !r.body_sites.some(function (s) { return s.display === state.body_site; })) return false;
    if (state.study_type && e.studyType !== state.study_type) return false;
    if (state.requesting_specialty && e.specialty !== state.requesting_specialty) return false;
    if (state.text) {
      var words = state.text.toLowerCase().split(/\s+/);
      for (var i = 0; i < words.length; i++) if (words[i] && e.text.indexOf(words[i]) < 0) return false;
    }
    return true;
  }

  var GROUPS = {
    modality: function (e) { return e.data.modality_display || "—"; },
    body_site: function (e) { return e.bodySite || "—"; },
    year: function (e) { return e.data.year === null ? "—" : String(e.data.year); },
    requesting_specialty: function (e) { return e.specialty; }
  };

  /* The first screenful of rows goes in at once, the rest in chunks on the next animation
     frames: what the HP sees is sorted or filtered in a few milliseconds, and the browser never
     lays out 1,000 rows in one go (a change made meanwhile cancels the chunks still due). */
  var FIRST = 120, CHUNK = 220, generation = 0, waiting = [];
  function settled() {
    var done = waiting;
    waiting = [];
    done.forEach(function (resolve) { resolve(); });
  }
  function render(nodes, sync) {
    var gen = ++generation;
    var at = sync ? nodes.length : Math.min(FIRST, nodes.length);
    tbody.replaceChildren.apply(tbody, nodes.slice(0, at));
    function more() {
      if (gen !== generation) return;
      if (at >= nodes.length) { settled(); return; }
      var fragment = document.createDocumentFragment();
      nodes.slice(at, at + CHUNK).forEach(function (node) { fragment.appendChild(node); });
      tbody.appendChild(fragment);
      at += CHUNK;
      requestAnimationFrame(more);
    }
    if (at < nodes.length) requestAnimationFrame(more); else settled();
  }
  function pending() { return tbody.rows.length < visible.length + groupCount; }
  var groupCount = 0;

  function apply(sync) {
    visible = rows.filter(function (e) { return matches(e, false); });
    visible.sort(compare);
    var nodes = [];
    if (state.group && GROUPS[state.group]) {
      var keyOf = GROUPS[state.group], groups = {}, order = [];
      visible.forEach(function (e) {
        var k = keyOf(e);
        if (!groups[k]) { groups[k] = []; order.push(k); }
        groups[k].push(e);
      });
      if (state.group === "year") order.sort(function (a, b) { return b.localeCompare(a); });
      else order.sort(collator.compare);
      order.forEach(function (k) {
        var head = el("tr", "group");
        var th = el("th", null, k + " · " + groups[k].length);
        // Spans the shown columns only: a fixed-layout table would give hidden ones width.
        th.colSpan = COLUMNS.length - hidden.length;
        th.scope = "colgroup";
        head.appendChild(th);
        nodes.push(head);
        groups[k].forEach(function (e) { nodes.push(e.node); });
      });
      groupCount = order.length;
    } else {
      groupCount = 0;
      nodes = visible.map(function (e) { return e.node; });
    }
    render(nodes, sync === true);
    emptyEl.hidden = visible.length > 0;
    countEl.textContent = msg("list.count", { shown: visible.length, total: rows.length });
    updateSortHeaders();
    updateTabs();
    if (state.view === "timeline") renderTimeline();
    updateSelection();
  }

  /* --- sorting ----------------------------------------------------------------------------- */

  function updateSortHeaders() {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
      var col = th.getAttribute("data-col");
      if (!col) return;
      th.setAttribute("aria-sort", col === state.sort ? (state.dir > 0 ? "ascending" : "descending") : "none");
    });
  }

  table.tHead.addEventListener("click", function (event) {
    var button = event.target.closest("button.sort");
    if (!button) return;
    var key = button.getAttribute("data-sort");
    if (state.sort === key) state.dir = -state.dir;
    else { state.sort = key; state.dir = key === "started" ? -1 : 1; }
    apply();
  });

  /* --- tabs by modality -------------------------------------------------------------------- */

  var tabButtons = [];
  function buildTabs() {
    var counts = {};
    rows.forEach(function (e) { e.modalities.forEach(function (m) { counts[m] = (counts[m] || 0) + 1; }); });
    var codes = Object.keys(counts).sort();
    [""].concat(codes).forEach(function (code) {
      var b = el("button", "tab");
      b.type = "button";
      b.setAttribute("role", "tab");
      b.setAttribute("aria-controls", "list-table");
      b.setAttribute("data-tab", code);
      b.appendChild(el("span", null, code ? code : msg("list.tab.all")));
      b.appendChild(document.createTextNode(" "));
      b.appendChild(el("span", "tabcount", code ? counts[code] : rows.length));
      tabsEl.appendChild(b);
      tabButtons.push(b);
    });
  }
  function updateTabs() {
    tabButtons.forEach(function (b) {
      var on = b.getAttribute("data-tab") === state.tab;
      b.setAttribute("aria-selected", on ? "true" : "false");
      b.tabIndex = on ? 0 : -1;
    });
  }
  tabsEl.addEventListener("click", function (event) {
    var b = event.target.closest("button.tab");
    if (!b) return;
    state.tab = b.getAttribute("data-tab");
    apply();
  });
  tabsEl.addEventListener("keydown", function (event) {
    var i = tabButtons.indexOf(document.activeElement);
    if (i < 0) return;
    var next = null;
    if (event.key === "ArrowRight") next = tabButtons[(i + 1) % tabButtons.length];
    else if (event.key === "ArrowLeft") next = tabButtons[(i - 1 + tabButtons.length) % tabButtons.length];
    else if (event.key === "Home") next = tabButtons[0];
    else if (event.key === "End") next = tabButtons[tabButtons.length - 1];
    if (next) {
      event.preventDefault();
      state.tab = next.getAttribute("data-tab");
      apply();
      next.focus();
    }
  });

  /* --- filters ----------------------------------------------------------------------------- */

  function fillSelect(id, values) {
    var select = document.getElementById(id);
    values.sort(collator.compare).forEach(function (v) {
      var option = el("option", null, v);
      option.value = v;
      select.appendChild(option);
    });
  }
  function distinct(fn) {
    var seen = {};
    rows.forEach(function (e) { fn(e).forEach(function (v) { if (v) seen[v] = true; }); });
    return Object.keys(seen);
  }
  fillSelect("f-modality", distinct(function (e) { return e.modalities; }));
  fillSelect("f-body_site", distinct(function (e) { return e.data.body_sites.map(function (s) { return s.display; }); }));
  fillSelect("f-study_type", distinct(function (e) { return [e.studyType]; }));
  fillSelect("f-requesting_specialty", distinct(function (e) { return [e.specialty]; }));

  var FILTER_FIELDS = ["from", "to", "modality", "body_site", "study_type", "requesting_specialty", "text", "group"];
  function readFilters() {
    FILTER_FIELDS.forEach(function (name) { state[name] = filtersForm.elements[name].value.trim(); });
  }
  var textTimer = null;
  filtersForm.addEventListener("input", function (event) {
    if (event.target.name === "col") return;
    if (event.target.name === "text") {
      clearTimeout(textTimer);
      textTimer = setTimeout(function () { readFilters(); apply(); }, 120);
      return;
    }
    readFilters();
    apply();
  });
  filtersForm.addEventListener("submit", function (event) { event.preventDefault(); });
  filtersForm.addEventListener("reset", function () {
    setTimeout(function () { readFilters(); state.tab = ""; applyColumns(); apply(); }, 0);
  });

  /* --- columns ----------------------------------------------------------------------------- */

  var hidden = model.hidden.slice();
  try {
    var saved = JSON.parse(window.localStorage.getItem(STORE_KEY) || "null");
    if (Array.isArray(saved)) hidden = saved.filter(function (c) { return COLUMNS.indexOf(c) > 0; });
  } catch (e) { /* private mode: the default columns */ }
  var columnBoxes = Array.prototype.slice.call(document.querySelectorAll("#column-choice input"));
  function applyColumns() {
    COLUMNS.forEach(function (c) { table.classList.toggle("hide-" + c, hidden.indexOf(c) >= 0); });
    columnBoxes.forEach(function (box) { box.checked = hidden.indexOf(box.value) < 0; });
  }
  columnBoxes.forEach(function (box) {
    box.addEventListener("change", function () {
      hidden = columnBoxes.filter(function (b) { return !b.checked; }).map(function (b) { return b.value; });
      try { window.localStorage.setItem(STORE_KEY, JSON.stringify(hidden)); } catch (e) { /* ignore */ }
      applyColumns();
      if (state.group) apply();
    });
  });

  /* --- selection --------------------------------------------------------------------------- */

  function updateSelection() {
    var count = rows.filter(function (e) { return e.checkbox && e.checkbox.checked; }).length;
    selectedEl.textContent = count ? msg("list.selected", { count: count }) : "";
    retrieveBtn.disabled = count === 0;
    var shown = visible.filter(function (e) { return e.checkbox; });
    var shownChecked = shown.filter(function (e) { return e.checkbox.checked; }).length;
    selectAll.checked = shown.length > 0 && shownChecked === shown.length;
    selectAll.indeterminate = shownChecked > 0 && shownChecked < shown.length;
  }
  tbody.addEventListener("change", updateSelection);
  // A chosen study that a filter hides (its row out of the table) is still asked for: the
  // counter counts it, so the form sends it too.
  var selectionForm = document.getElementById("list-selection");
  selectionForm.addEventListener("submit", function () {
    Array.prototype.forEach.call(selectionForm.querySelectorAll("input[data-carried]"),
      function (node) { node.remove(); });
    rows.forEach(function (e) {
      if (e.checkbox && e.checkbox.checked && !selectionForm.contains(e.checkbox)) {
        var carried = el("input");
        carried.type = "hidden";
        carried.name = "study";
        carried.value = e.data.id;
        carried.setAttribute("data-carried", "1");
        selectionForm.appendChild(carried);
      }
    });
  });
  selectAll.addEventListener("change", function () {
    visible.forEach(function (e) { if (e.checkbox) e.checkbox.checked = selectAll.checked; });
    updateSelection();
  });

  /* --- views: table and timeline ----------------------------------------------------------- */

  var viewTable = document.getElementById("view-table");
  var viewTimeline = document.getElementById("view-timeline");
  function setView(view) {
    state.view = view;
    viewTable.setAttribute("aria-pressed", view === "table" ? "true" : "false");
    viewTimeline.setAttribute("aria-pressed", view === "timeline" ? "true" : "false");
    timelineEl.hidden = view !== "timeline";
    if (view === "timeline") renderTimeline();
  }
  viewTable.addEventListener("click", function () { setView("table"); });
  viewTimeline.addEventListener("click", function () { setView("timeline"); });

  function renderTimeline() {
    // Studies per year and modality, for the current filters except the date range.
    var saved = [state.from, state.to];
    state.from = ""; state.to = "";
    var shown = rows.filter(function (e) { return matches(e, false); });
    state.from = saved[0]; state.to = saved[1];
    var years = {}, max = 1;
    shown.forEach(function (e) {
      if (e.data.year === null) return;
      var y = years[e.data.year] || (years[e.data.year] = { total: 0, by: {} });
      y.total += 1;
      var m = e.modality || "—";
      y.by[m] = (y.by[m] || 0) + 1;
      if (y.total > max) max = y.total;
    });
    var list = el("ol", "years");
    Object.keys(years).sort().reverse().forEach(function (year) {
      var y = years[year];
      var li = el("li");
      var button = el("button", "year");
      button.type = "button";
      button.setAttribute("data-year", year);
      button.setAttribute("aria-label", msg("list.timeline.year", { year: year }) + ": " + msg("list.timeline.studies", { count: y.total }));
      button.appendChild(el("span", "yearlabel", year));
      var bar = el("span", "bar");
      Object.keys(y.by).sort().forEach(function (m) {
        var seg = el("span", "seg m-" + m.replace(/[^A-Za-z0-9]/g, ""), y.by[m] > 2 ? m : "");
        seg.style.width = (100 * y.by[m] / max) + "%";
        bar.appendChild(seg);
      });
      button.appendChild(bar);
      button.appendChild(el("span", "yearcount", y.total));
      li.appendChild(button);
      list.appendChild(li);
    });
    timelineEl.replaceChildren(list);
  }
  timelineEl.addEventListener("click", function (event) {
    var b = event.target.closest("button.year");
    if (!b) return;
    var year = b.getAttribute("data-year");
    filtersForm.elements.from.value = year + "-01-01";
    filtersForm.elements.to.value = year + "-12-31";
    readFilters();
    setView("table");
    apply();
    table.focus();
  });

  /* --- start ------------------------------------------------------------------------------- */

  buildTabs();
  applyColumns();
  readFilters();
  apply(true);
  table.tabIndex = -1;
  if (location.hash && location.hash.indexOf("#study-") === 0) {
    var target = document.getElementById(decodeURIComponent(location.hash.slice(1)));
    if (target) { target.classList.add("target"); target.scrollIntoView({ block: "center" }); }
  }

  window.ncpList = {
    apply: apply,
    state: state,
    rows: rows.length,
    visible: function () { return visible.length; },
    pending: pending,
    whenComplete: function () {
      return pending() ? new Promise(function (resolve) { waiting.push(resolve); }) : Promise.resolve();
    },
    set: function (changes) {
      Object.keys(changes).forEach(function (k) {
        state[k] = changes[k];
        if (filtersForm.elements[k]) filtersForm.elements[k].value = changes[k];
      });
      apply();
    },
    renderMs: performance.now() - scriptStart,
    ready: true
  };
})();
