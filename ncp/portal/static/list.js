/* The list page: renders the view model (ncp.portal.listview) as a table that sorts, filters,
   groups and selects, with tabs by modality and a timeline. Every value from the other country
   is written with textContent (never as HTML).

   The table is virtualised: only the rows in view (and a few around them) are in the document,
   each row a fixed height (CSS clamps its cells), positioned between two spacer rows. A sort or
   a filter reorders an array and renders one screenful, so 1,000 rows change in a few
   milliseconds to the last row shown. Screen readers get the whole table's size
   (aria-rowcount) and each row's place (aria-rowindex); arrow keys move between rows (the
   table scrolls); printing renders every row. Row nodes are built once, when first shown, and
   reused. window.ncpList exposes the state for the tests and the benchmark. */
(function () {
  "use strict";
  var scriptStart = performance.now();

  var model = JSON.parse(document.getElementById("list-model").textContent);
  var messages = JSON.parse(document.getElementById("list-messages").textContent);
  var table = document.getElementById("list-table");
  var tbody = table.tBodies[0];
  var wrap = document.getElementById("list-wrap");
  var filtersForm = document.getElementById("list-filters");
  var countEl = document.getElementById("list-count");
  var emptyEl = document.getElementById("list-empty");
  var tabsEl = document.getElementById("list-tabs");
  var timelineEl = document.getElementById("list-timeline");
  var selectAll = document.getElementById("select-all");
  var selectedEl = document.getElementById("selected-count");
  var selectionForm = document.getElementById("list-selection");
  var actionButtons = Array.prototype.slice.call(document.querySelectorAll("#list-selection .needs-selection"));
  var COLUMNS = model.columns;
  var STORE_KEY = "ncp.list.hidden";
  var OVERSCAN = 8;

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

  /* --- rows: data now, nodes when first shown ---------------------------------------------- */

  var STATUS_ORDER = { preliminary: 0, amended: 1, final: 2, "entered-in-error": 3, unknown: 4 };
  var selected = {};
  var rows = model.rows.map(function (r, i) {
    var report = r.report;
    return {
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
      reportRank: report ? (report.status in STATUS_ORDER ? STATUS_ORDER[report.status] : 4) - (report.urgent ? 10 : 0) : 99,
      checkbox: null,
      node: null
    };
  });
  var byId = {};
  rows.forEach(function (e) { byId[e.data.id] = e; });

  function clamp(text) { return el("span", "clamp", text); }

  function buildRow(entry) {
    var r = entry.data;
    var tr = el("tr", "row");
    tr.id = "study-" + r.id;
    if (r.report && r.report.urgent) tr.className += " urgent";
    COLUMNS.forEach(function (col) {
      var td = el("td", "c-" + col);
      switch (col) {
        case "select":
          if (r.kind === "study") {
            var box = el("input");
            box.type = "checkbox";
            box.value = r.id;
            box.checked = !!selected[r.id];
            box.setAttribute("aria-label", msg("list.select_row", { date: r.started_display }) + " " + r.description);
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
          td.appendChild(clamp(r.body_site_display));
          break;
        case "description":
          var cell = el("div", "desc");
          if (r.thumbnail) {
            var img = el("img", "thumb");
            img.alt = msg("list.thumbnail");
            img.loading = "lazy";
            img.decoding = "async";
            img.width = 40;
            img.height = 40;
            img.addEventListener("error", function () { img.hidden = true; });
            img.src = r.thumbnail;
            cell.appendChild(img);
          }
          var words = el("div", "words");
          var text = el("span", "line", r.kind === "report" ? msg("list.report_only") + ": " + r.description : r.description);
          text.title = r.description;
          words.appendChild(text);
          if (r.viewer) {
            var view = el("button", "link view-b", msg("list.view_at", { country: r.country }));
            view.type = "submit";
            view.setAttribute("form", "view-one");
            view.name = "study";
            view.value = r.id;
            view.formTarget = "_blank";
            view.setAttribute("aria-label", msg("list.view_at", { country: r.country }) + ": " + r.description + ", " + r.started_display);
            words.appendChild(view);
          }
          cell.appendChild(words);
          td.appendChild(cell);
          break;
        case "study_type":
          td.appendChild(clamp(display(r.study_type)));
          break;
        case "requesting_specialty":
          td.appendChild(clamp(display(r.requesting_specialty)));
          break;
        case "organisation":
          var org = clamp(r.organisation + " (" + r.country + ")");
          org.title = r.organisation;
          td.appendChild(org);
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
            target.setAttribute("aria-label", msg("list.open_report") + ": " + report.title + " (" + label + (report.urgent ? ", " + msg("list.urgent") : "") + ")");
          } else {
            target = el("span", "report-link", label);
          }
          if (report.preliminary) target.className += " flag preliminary";
          td.appendChild(target);
          if (report.urgent) td.appendChild(el("span", "flag urgent", msg("list.urgent")));
          break;
      }
      tr.appendChild(td);
    });
    return tr;
  }

  function nodeOf(entry) {
    if (!entry.node) entry.node = buildRow(entry);
    return entry.node;
  }

  /* --- state ------------------------------------------------------------------------------- */

  var state = {
    sort: "started", dir: -1, tab: "", group: "", view: "table",
    from: "", to: "", modality: "", body_site: "", study_type: "", requesting_specialty: "", text: ""
  };
  var visible = rows.slice();
  var items = [];  /* what the table shows in order: {entry} or {group, label} */

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

  function sorted(list) {
    // Keys computed once per sort (a collator call per comparison is the cost of a sort).
    var key = SORT_KEYS[state.sort] || SORT_KEYS.started;
    var keyed = list.map(function (e) { return { e: e, k: key(e) }; });
    var numeric = keyed.length && typeof keyed[0].k === "number";
    keyed.sort(function (a, b) {
      var c = numeric ? a.k - b.k : collator.compare(String(a.k), String(b.k));
      if (c !== 0) return c * state.dir;
      return (b.e.time - a.e.time) || (a.e.index - b.e.index);  // ties: newest first
    });
    return keyed.map(function (x) { return x.e; });
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

  /* --- the virtual window ------------------------------------------------------------------ */

  var rowHeight = 0, groupHeight = 0, printing = false, groupNodes = {};
  var topSpacer = el("tr", "spacer"), bottomSpacer = el("tr", "spacer");
  [topSpacer, bottomSpacer].forEach(function (s) {
    s.setAttribute("aria-hidden", "true");
    s.appendChild(el("td"));
  });
  var offsets = [0];  /* offsets[i]: where item i starts, offsets[n]: the total height */

  function itemHeight(item) { return item.group ? groupHeight : rowHeight; }

  function measure() {
    // One real row and one group header, laid out off screen, give the heights CSS fixes.
    var probe = rows.length ? nodeOf(rows[0]) : null;
    var head = groupRow("—", 0);
    tbody.replaceChildren(head);
    if (probe) tbody.appendChild(probe);
    groupHeight = head.getBoundingClientRect().height || 32;
    rowHeight = probe ? probe.getBoundingClientRect().height || 48 : 48;
    tbody.replaceChildren();
  }

  function groupRow(label, count) {
    var key = label + "\u0000" + count + "\u0000" + (COLUMNS.length - hidden.length);
    if (groupNodes[key]) return groupNodes[key];
    var head = el("tr", "group");
    var th = el("th", null, label + " · " + count);
    th.colSpan = COLUMNS.length - hidden.length;  // a fixed-layout table would size hidden ones
    th.scope = "colgroup";
    head.appendChild(th);
    groupNodes[key] = head;
    return head;
  }

  function layoutItems() {
    offsets = new Array(items.length + 1);
    offsets[0] = 0;
    for (var i = 0; i < items.length; i++) offsets[i + 1] = offsets[i] + itemHeight(items[i]);
    table.setAttribute("aria-rowcount", String(items.length + 1));
  }

  function firstAt(y) {  // the item at height y (binary search)
    var lo = 0, hi = items.length;
    while (lo < hi) {
      var mid = (lo + hi) >> 1;
      if (offsets[mid + 1] <= y) lo = mid + 1; else hi = mid;
    }
    return lo;
  }

  var shownFrom = 0, shownTo = 0;
  function renderWindow(force) {
    var top = wrap.scrollTop - headHeight();
    var height = wrap.clientHeight || window.innerHeight;
    var from = printing ? 0 : Math.max(0, firstAt(Math.max(0, top)) - OVERSCAN);
    var to = printing ? items.length : Math.min(items.length, firstAt(top + height) + 1 + OVERSCAN);
    if (!force && from === shownFrom && to === shownTo) return;
    shownFrom = from; shownTo = to;
    var nodes = [];
    topSpacer.firstChild.style.height = offsets[from] + "px";
    bottomSpacer.firstChild.style.height = (offsets[items.length] - offsets[to]) + "px";
    if (from > 0) nodes.push(topSpacer);
    for (var i = from; i < to; i++) {
      var item = items[i];
      var node = item.group ? groupRow(item.label, item.count) : nodeOf(item.entry);
      node.setAttribute("aria-rowindex", String(i + 2));
      if (item.entry && item.entry.checkbox) item.entry.checkbox.checked = !!selected[item.entry.data.id];
      nodes.push(node);
    }
    if (to < items.length) nodes.push(bottomSpacer);
    place(nodes);
  }

  function place(nodes) {
    // Rows that stay are not moved (a moved node would lose the keyboard focus): those that
    // leave go, then each node is put where it belongs if it is not there yet.
    var keep = new Set(nodes);
    Array.prototype.slice.call(tbody.children).forEach(function (child) {
      if (!keep.has(child)) child.remove();
    });
    for (var i = 0; i < nodes.length; i++) {
      var current = tbody.children[i];
      if (current !== nodes[i]) tbody.insertBefore(nodes[i], current || null);
    }
  }

  var headCache = 0;
  function headHeight() {
    if (!headCache) headCache = table.tHead.getBoundingClientRect().height;
    return headCache;
  }

  var scheduled = false;
  wrap.addEventListener("scroll", function () {
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(function () { scheduled = false; renderWindow(false); });
  }, { passive: true });

  function fitWrap() {
    // The table scrolls inside its frame, which fills the window below the filters (the
    // header row sticks, the selection bar stays in view).
    if (printing) return;
    var top = wrap.getBoundingClientRect().top + window.scrollY;
    var below = document.querySelector(".selbar").getBoundingClientRect().height + 24;
    wrap.style.height = Math.max(320, window.innerHeight - top - below) + "px";
    renderWindow(true);
  }
  window.addEventListener("resize", function () { headCache = 0; fitWrap(); });

  function scrollToItem(i) {
    var top = offsets[i], bottom = offsets[i + 1], view = wrap.scrollTop, h = wrap.clientHeight - headHeight();
    if (top < view) wrap.scrollTop = top;
    else if (bottom > view + h) wrap.scrollTop = bottom - h;
    renderWindow(false);
  }

  function apply() {
    visible = sorted(rows.filter(function (e) { return matches(e, false); }));
    items = [];
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
        items.push({ group: true, label: k, count: groups[k].length });
        groups[k].forEach(function (e) { items.push({ entry: e }); });
      });
    } else {
      items = visible.map(function (e) { return { entry: e }; });
    }
    layoutItems();
    wrap.scrollTop = 0;
    renderWindow(true);
    emptyEl.hidden = visible.length > 0;
    countEl.textContent = msg("list.count", { shown: visible.length, total: rows.length });
    updateSortHeaders();
    updateTabs();
    if (state.view === "timeline") renderTimeline();
    updateSelection();
  }

  /* --- keyboard: arrows move between rows ---------------------------------------------------- */

  function itemIndexOf(node) {
    var tr = node && node.closest ? node.closest("tr") : null;
    if (!tr || !tbody.contains(tr)) return -1;
    return parseInt(tr.getAttribute("aria-rowindex") || "0", 10) - 2;
  }
  function focusItem(i) {
    if (i < 0 || i >= items.length) return;
    scrollToItem(i);
    var node = items[i].group ? groupRow(items[i].label, items[i].count) : nodeOf(items[i].entry);
    var target = node.querySelector("input, a, button") || node;
    if (target === node) node.tabIndex = -1;
    target.focus();
  }
  tbody.addEventListener("keydown", function (event) {
    var i = itemIndexOf(event.target);
    if (i < 0) return;
    var next = null;
    if (event.key === "ArrowDown") next = i + 1;
    else if (event.key === "ArrowUp") next = i - 1;
    else if (event.key === "PageDown") next = Math.min(items.length - 1, i + 10);
    else if (event.key === "PageUp") next = Math.max(0, i - 10);
    else if (event.key === "Home" && event.ctrlKey) next = 0;
    else if (event.key === "End" && event.ctrlKey) next = items.length - 1;
    if (next === null) return;
    event.preventDefault();
    focusItem(next);
  });

  /* --- printing: every row ------------------------------------------------------------------ */

  window.addEventListener("beforeprint", function () { printing = true; wrap.style.height = "auto"; renderWindow(true); });
  window.addEventListener("afterprint", function () { printing = false; fitWrap(); });

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
  document.getElementById("f-group").addEventListener("change", function () { readFilters(); apply(); });
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
    // A spacer spans the shown columns only: more would add phantom columns to the fixed
    // layout, which would take width from the real ones.
    topSpacer.firstChild.colSpan = bottomSpacer.firstChild.colSpan = COLUMNS.length - hidden.length;
    headCache = 0;
  }
  columnBoxes.forEach(function (box) {
    box.addEventListener("change", function () {
      hidden = columnBoxes.filter(function (b) { return !b.checked; }).map(function (b) { return b.value; });
      try { window.localStorage.setItem(STORE_KEY, JSON.stringify(hidden)); } catch (e) { /* ignore */ }
      applyColumns();
      if (state.group) apply(); else renderWindow(true);
    });
  });

  /* --- selection --------------------------------------------------------------------------- */

  function selectedIds() {
    return Object.keys(selected).filter(function (id) { return selected[id]; });
  }
  function updateSelection() {
    var count = selectedIds().length;
    selectedEl.textContent = count ? msg("list.selected", { count: count }) : "";
    actionButtons.forEach(function (b) { b.disabled = count === 0; });
    var shown = visible.filter(function (e) { return e.data.kind === "study"; });
    var shownChecked = shown.filter(function (e) { return selected[e.data.id]; }).length;
    selectAll.checked = shown.length > 0 && shownChecked === shown.length;
    selectAll.indeterminate = shownChecked > 0 && shownChecked < shown.length;
  }
  tbody.addEventListener("change", function (event) {
    var box = event.target;
    if (box.type !== "checkbox") return;
    selected[box.value] = box.checked;
    updateSelection();
  });
  // The chosen studies, shown or not (a filter may hide a chosen one: it is still asked for),
  // go with the form as hidden fields: the rows' boxes are not all in the document.
  selectionForm.addEventListener("submit", function () {
    Array.prototype.forEach.call(selectionForm.querySelectorAll("input[data-carried]"),
      function (node) { node.remove(); });
    selectedIds().forEach(function (id) {
      var carried = el("input");
      carried.type = "hidden";
      carried.name = "study";
      carried.value = id;
      carried.setAttribute("data-carried", "1");
      selectionForm.appendChild(carried);
    });
  });
  selectAll.addEventListener("change", function () {
    visible.forEach(function (e) { if (e.data.kind === "study") selected[e.data.id] = selectAll.checked; });
    renderWindow(true);
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
    fitWrap();
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

  function showTarget() {
    // #study-<uid> (the report page's "show study"): that row, scrolled to and marked.
    if (!location.hash || location.hash.indexOf("#study-") !== 0) return;
    var entry = byId[decodeURIComponent(location.hash.slice(7))];
    if (!entry) return;
    var i = items.findIndex(function (item) { return item.entry === entry; });
    if (i < 0) return;
    nodeOf(entry).classList.add("target");
    wrap.scrollTop = Math.max(0, offsets[i] - wrap.clientHeight / 3);
    renderWindow(true);
    var focus = entry.node.querySelector("a, input, button");
    if (focus) focus.focus({ preventScroll: true });
  }

  buildTabs();
  applyColumns();
  readFilters();
  measure();
  apply();
  fitWrap();
  showTarget();
  window.addEventListener("hashchange", showTarget);
  table.tabIndex = -1;

  window.ncpList = {
    apply: apply,
    state: state,
    rows: rows.length,
    visible: function () { return visible.length; },
    order: function () { return visible.map(function (e) { return e.data.id; }); },
    rendered: function () { return tbody.querySelectorAll("tr.row").length; },
    pending: function () { return false; },
    whenComplete: function () { return Promise.resolve(); },
    scrollTo: function (i) { scrollToItem(i); },
    selected: selectedIds,
    set: function (changes) {
      Object.keys(changes).forEach(function (k) {
        state[k] = changes[k];
        if (filtersForm.elements[k]) filtersForm.elements[k].value = changes[k];
      });
      apply();
    },
    renderMs: performance.now() - scriptStart,
    readyAt: performance.now(),
    ready: true
  };
})();
