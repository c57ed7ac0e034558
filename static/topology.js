// Topology page: draws /api/v1/topology with cytoscape.js and refreshes it in place.
// Positions come from the server (layered layout, stable while the graph's structure is), so a
// refresh only updates figures: zoom, pan, filters and the selected call stay as they are.
(function () {
  "use strict";

  var REFRESH_MS = 5000;
  var container = document.getElementById("topology-graph");
  var form = document.getElementById("topology-filters");
  if (!container || !form || typeof cytoscape !== "function") return;

  var panel = document.getElementById("edge-panel");
  var panelBody = document.getElementById("edge-panel-body");
  var statusLine = document.getElementById("topology-status");
  var selectedEdge = null;
  var timer = null;
  var inFlight = false;
  var generation = 0; // answers to superseded requests are dropped

  var ICONS = { healthy: "✓", degraded: "!", failing: "✕", idle: "–", external: "?" };
  var COLOURS = {
    healthy: "#1f8a4c", degraded: "#c98a00", failing: "#c8322a", idle: "#9aa4b2", external: "#6b7280",
  };

  var cy = cytoscape({
    container: container,
    elements: [],
    layout: { name: "preset" },
    wheelSensitivity: 0.3,
    minZoom: 0.05,
    maxZoom: 3,
    style: [
      {
        selector: "node",
        style: {
          "background-color": function (n) { return COLOURS[n.data("health")] || "#9aa4b2"; },
          "label": "data(display)",
          "text-wrap": "wrap",
          "text-valign": "bottom",
          "text-margin-y": 4,
          "font-size": 11,
          "color": "#1b1f27",
          "text-background-color": "#ffffff",
          "text-background-opacity": 0.85,
          "text-background-padding": 2,
          "width": 30,
          "height": 30,
          "border-width": 2,
          "border-color": "#ffffff",
          "min-zoomed-font-size": 6,
        },
      },
      { selector: "node[kind = 'group']", style: { "shape": "round-rectangle", "width": 46, "height": 34 } },
      { selector: "node[kind = 'external']", style: { "shape": "diamond" } },
      { selector: "node[health = 'failing']", style: { "shape": "octagon" } },
      { selector: "node[health = 'degraded']", style: { "shape": "triangle" } },
      {
        selector: "edge",
        style: {
          "curve-style": "bezier",
          "width": 1.6,
          "line-color": function (e) { return COLOURS[e.data("health")] || "#9aa4b2"; },
          "target-arrow-color": function (e) { return COLOURS[e.data("health")] || "#9aa4b2"; },
          "target-arrow-shape": "triangle",
          "label": "data(display)",
          "font-size": 9,
          "color": "#374151",
          "text-rotation": "autorotate",
          "text-background-color": "#ffffff",
          "text-background-opacity": 0.85,
          "text-background-padding": 1,
          "min-zoomed-font-size": 7,
        },
      },
      { selector: "edge[health = 'failing']", style: { "width": 3, "line-style": "dashed" } },
      { selector: ":selected", style: { "overlay-color": "#2f4bd6", "overlay-opacity": 0.18 } },
      { selector: ".faded", style: { "opacity": 0.18 } },
      { selector: "edge.on-path", style: { "width": 3.5 } },
    ],
  });

  // A handle on the graph for the browser console and the Playwright tests (a canvas cannot be
  // read any other way).
  window.meshTopology = cy;

  function rps(v) {
    if (v === null || v === undefined) return "—";
    if (v === 0) return "0 rps";
    if (v < 0.1) return (v * 60).toFixed(1) + " rpm";
    return (v < 100 ? v.toFixed(1) : Math.round(v).toString()) + " rps";
  }
  function pct(v) { return v === null || v === undefined ? "—" : v.toFixed(2) + " %"; }
  function ms(v) { return v === null || v === undefined ? "—" : (v >= 10 ? Math.round(v) : v.toFixed(1)) + " ms"; }

  function nodeDisplay(n) {
    var lines = [n.label, (ICONS[n.health] || "") + " " + n.health];
    if (n.metrics.requests) lines.push(rps(n.metrics.rps) + " · " + pct(n.metrics.success_rate === null ? null : n.metrics.success_rate * 100) + " ok");
    return lines.join("\n");
  }
  function edgeDisplay(e) {
    return rps(e.metrics.rps) + " · " + pct(e.error_pct) + " err · p99 " + ms(e.metrics.p99_ms);
  }

  function params() {
    var data = new FormData(form);
    var out = new URLSearchParams();
    data.forEach(function (value, key) { if (value !== "") out.append(key, value); });
    return out;
  }

  function apiParams() {
    var p = params();
    p.delete("failing"); // a view option of this page, not of the API
    return p;
  }

  function setStatus(text) { if (statusLine) statusLine.textContent = text; }

  function apply(topology, refit) {
    var wanted = {};
    cy.batch(function () {
      topology.nodes.forEach(function (n) {
        wanted[n.id] = true;
        var data = { id: n.id, kind: n.kind, health: n.health, url: n.url, display: nodeDisplay(n), onPath: n.on_failing_path };
        var existing = cy.getElementById(n.id);
        if (existing.nonempty()) {
          delete data.id; // immutable in cytoscape
          existing.data(data);
          existing.position({ x: n.x, y: n.y });
        } else {
          cy.add({ group: "nodes", data: data, position: { x: n.x, y: n.y } });
        }
      });
      topology.edges.forEach(function (e) {
        wanted[e.id] = true;
        var data = { id: e.id, source: e.source, target: e.target, health: e.health, display: edgeDisplay(e), onPath: e.on_failing_path, raw: e };
        var existing = cy.getElementById(e.id);
        if (existing.nonempty()) {
          delete data.id; delete data.source; delete data.target;
          existing.data(data);
        } else cy.add({ group: "edges", data: data });
      });
      cy.elements().forEach(function (el) { if (!wanted[el.id()]) el.remove(); });
      highlight();
    });
    if (refit) cy.fit(undefined, 40);
    container.setAttribute("data-nodes", String(topology.nodes.length));
    container.setAttribute("data-edges", String(topology.edges.length));
    if (selectedEdge) {
      var edge = cy.getElementById(selectedEdge);
      if (edge.nonempty()) { edge.select(); showEdge(edge.data("raw")); } else hidePanel();
    }
  }

  function highlight() {
    var on = form.elements.namedItem("failing");
    var enabled = on && on.checked;
    cy.elements().removeClass("faded on-path");
    if (!enabled) return;
    cy.elements().forEach(function (el) { el.addClass(el.data("onPath") ? "on-path" : "faded"); });
  }

  function cell(row, label, value) {
    var dt = document.createElement("dt");
    dt.textContent = label;
    var dd = document.createElement("dd");
    dd.textContent = value;
    row.appendChild(dt);
    row.appendChild(dd);
  }

  function showEdge(e) {
    selectedEdge = e.id;
    panelBody.textContent = "";
    var title = document.createElement("p");
    var source = cy.getElementById(e.source), target = cy.getElementById(e.target);
    title.className = "edge-title";
    title.textContent = (source.data("display") || "").split("\n")[0] + " → " + (target.data("display") || "").split("\n")[0];
    panelBody.appendChild(title);
    var list = document.createElement("dl");
    list.className = "kv";
    cell(list, "Health", (ICONS[e.health] || "") + " " + e.health);
    cell(list, "Requests", e.metrics.requests.toLocaleString() + " (" + rps(e.metrics.rps) + ")");
    cell(list, "Failures", e.metrics.failures.toLocaleString() + " (" + pct(e.error_pct) + ")");
    cell(list, "p50", ms(e.metrics.p50_ms));
    cell(list, "p95", ms(e.metrics.p95_ms));
    cell(list, "p99", ms(e.metrics.p99_ms));
    panelBody.appendChild(list);
    if (e.traces_url) {
      var link = document.createElement("a");
      link.href = e.traces_url;
      link.className = "btn";
      link.textContent = "Recent traces →";
      panelBody.appendChild(link);
    }
    panel.hidden = false;
  }

  function hidePanel() {
    selectedEdge = null;
    panel.hidden = true;
    cy.edges().unselect();
  }

  function tableOpen() {
    var details = document.getElementById("topology-table");
    return details && details.open;
  }

  function refreshTable(query, gen) {
    if (!tableOpen()) return Promise.resolve();
    return fetch("/topology?" + query + "&table=open", { headers: { "HX-Request": "true" } })
      .then(function (r) { return r.text(); })
      .then(function (html) {
        if (gen !== generation) return;
        var current = document.getElementById("topology-table");
        var holder = document.createElement("template");
        holder.innerHTML = html; // our own server-rendered, escaped fragment
        var fresh = holder.content.getElementById("topology-table");
        if (current && fresh) current.replaceWith(fresh);
      });
  }

  function load(refit) {
    if (inFlight && !refit) return;
    inFlight = true;
    var gen = ++generation;
    var apiQuery = apiParams().toString();
    var pageQuery = params().toString();
    fetch(container.getAttribute("data-api") + "?" + apiQuery, { headers: { Accept: "application/json" } })
      .then(function (r) {
        return r.json().then(function (body) { return { ok: r.ok, body: body }; });
      })
      .then(function (res) {
        if (gen !== generation) return;
        if (!res.ok) {
          var detail = res.body && res.body.detail;
          setStatus("Not updated: " + (typeof detail === "string" ? detail : "check the filters"));
          cy.elements().remove();
          container.setAttribute("data-nodes", "0");
          return;
        }
        apply(res.body, refit);
        setStatus("Updated " + new Date().toLocaleTimeString());
      })
      .then(function () { return refreshTable(pageQuery, gen); })
      .catch(function () { setStatus("Cannot reach the control plane; retrying."); })
      .then(function () { inFlight = false; });
  }

  function schedule() {
    if (timer) clearInterval(timer);
    timer = setInterval(function () { if (!document.hidden) load(false); }, REFRESH_MS);
  }

  function filtersChanged() {
    var query = params().toString();
    history.replaceState(null, "", "/topology" + (query ? "?" + query : ""));
    hidePanel();
    load(true);
    schedule();
  }

  form.addEventListener("submit", function (evt) { evt.preventDefault(); filtersChanged(); });
  form.addEventListener("change", function (evt) {
    if (evt.target && evt.target.name === "failing") { highlight(); history.replaceState(null, "", "/topology?" + params().toString()); return; }
    if (evt.target && evt.target.name === "focus") return; // typed: applied with Enter or Apply
    filtersChanged();
  });

  // Opened by the reader (mouse or keyboard both click the summary): fill it now rather than
  // at the next refresh. Not on "toggle": a swapped-in <details open> fires it too, which
  // would refresh again, forever.
  document.addEventListener("click", function (evt) {
    var summary = evt.target.closest && evt.target.closest("#topology-table > summary");
    if (!summary) return;
    setTimeout(function () {
      if (tableOpen()) refreshTable(params().toString(), generation);
    }, 0);
  });

  cy.on("tap", "node", function (evt) {
    var url = evt.target.data("url");
    if (url) window.location.href = url;
  });
  cy.on("tap", "edge", function (evt) { showEdge(evt.target.data("raw")); });
  cy.on("tap", function (evt) { if (evt.target === cy) hidePanel(); });
  document.getElementById("edge-panel-close").addEventListener("click", hidePanel);

  load(true);
  schedule();
})();
