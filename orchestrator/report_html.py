"""The report as one self-contained HTML page: the comparison table and every plot of
orchestrator/plots.py drawn as SVG by a small script inside the page (hover a point or bar for its
trial and values, click a legend entry to hide or show that series). No network, no CDN: the page
works from a file, an MLflow artifact view or an air-gapped cluster.

`render(...)` returns the page; opening it with `#selftest` appended to the URL makes the script
hover the first point, toggle the first legend entry and write what happened into
`<pre id="selftest">` (the headless-browser test reads it).
"""

from __future__ import annotations

import dataclasses
import html
import json

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; }
.sub, .note { color: #666; font-size: 12px; }
.table-wrap { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: #f4f4f4; cursor: pointer; user-select: none; }
td:first-child, th:first-child { text-align: left; }
tr:hover td { background: #fafafa; }
.figure { margin: 18px 0 30px; } .figure h3 { font-size: 16px; margin: 0 0 6px; }
.panels { display: flex; flex-wrap: wrap; gap: 18px; }
.panel { border: 1px solid #e4e4e4; border-radius: 6px; padding: 8px 10px; }
.panel h4 { margin: 0; font-size: 14px; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 12px; margin: 4px 0; max-width: 620px; }
.legend button { border: 0; background: none; cursor: pointer; font: inherit; font-size: 12px; padding: 1px 2px; }
.legend button.off { opacity: 0.35; text-decoration: line-through; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin-right: 4px;
  vertical-align: -1px; }
svg.chart text { font-size: 11px; fill: #333; }
svg.chart .axis-label { font-size: 12px; fill: #222; }
svg.chart .point { cursor: pointer; }
svg.chart .point:hover { stroke: #000; stroke-width: 2px; }
.tooltip { position: fixed; pointer-events: none; background: rgba(255,255,255,0.97); border: 1px solid #999;
  border-radius: 4px; padding: 6px 8px; font-size: 12px; box-shadow: 0 2px 6px rgba(0,0,0,0.2); z-index: 10; }
.tooltip b { display: block; margin-bottom: 2px; }
"""

SCRIPT = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var NS = "http://www.w3.org/2000/svg";
  var tip = document.getElementById("tooltip");
  var W = 600, H = 380;

  function svgEl(name, attrs, parent) {
    var e = document.createElementNS(NS, name);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function htmlEl(tag, cls, text, parent) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  function fmt(v) {
    if (Math.abs(v) >= 1000) return v.toLocaleString("en-US", {maximumFractionDigits: 0});
    return String(+v.toPrecision(3));
  }
  function niceTicks(lo, hi, count) {
    var span = hi - lo || Math.abs(hi) || 1;
    var raw = span / count, mag = Math.pow(10, Math.floor(Math.log10(raw))), norm = raw / mag;
    var step = (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag, ticks = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(+v.toPrecision(12));
    return ticks;
  }
  function logTicks(lo, hi) {
    var ticks = [];
    for (var e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
      [1, 2, 5].forEach(function (m) { var v = m * Math.pow(10, e); if (v >= lo && v <= hi) ticks.push(v); });
    }
    return ticks.length > 8 ? ticks.filter(function (v) { return Math.abs(Math.log10(v) % 1) < 1e-9; }) : ticks;
  }
  function scale(lo, hi, a, b, log) {
    if (log) { lo = Math.log10(lo); hi = Math.log10(hi); }
    var k = hi === lo ? 0 : (b - a) / (hi - lo);
    return function (v) { return a + ((log ? Math.log10(v) : v) - lo) * k + (hi === lo ? (b - a) / 2 : 0); };
  }
  function padded(lo, hi, log) {
    if (log) return [lo / 1.25, hi * 1.25];
    var pad = (hi - lo) * 0.06 || Math.abs(hi) * 0.1 || 1;
    return [lo - pad, hi + pad];
  }

  function showTip(evt, p, series) {
    tip.textContent = "";
    htmlEl("b", null, p.label || series.name, tip);
    if (p.label && p.label !== series.name) htmlEl("div", null, "series: " + series.name, tip);
    (p.info || []).forEach(function (line) { htmlEl("div", null, line, tip); });
    tip.hidden = false;
    moveTip(evt);
  }
  function moveTip(evt) {
    var x = evt.clientX + 14, y = evt.clientY + 14;
    if (x + tip.offsetWidth > window.innerWidth) x = evt.clientX - tip.offsetWidth - 10;
    if (y + tip.offsetHeight > window.innerHeight) y = evt.clientY - tip.offsetHeight - 10;
    tip.style.left = x + "px"; tip.style.top = y + "px";
  }
  function hideTip() { tip.hidden = true; }
  function hover(node, p, series) {
    node.addEventListener("mouseenter", function (e) { showTip(e, p, series); });
    node.addEventListener("mousemove", moveTip);
    node.addEventListener("mouseleave", hideTip);
    node.setAttribute("data-label", p.label || series.name);
    svgEl("title", {}, node).textContent = [p.label || series.name].concat(p.info || []).join("\n");
  }

  function axes(svg, m, xs, ys, panel, xTicks, yTicks, xLabelOf) {
    var g = svgEl("g", {"class": "axes"}, svg);
    yTicks.forEach(function (t) {
      var y = ys(t);
      svgEl("line", {x1: m.l, x2: W - m.r, y1: y, y2: y, stroke: "#e6e6e6"}, g);
      svgEl("text", {x: m.l - 6, y: y + 4, "text-anchor": "end"}, g).textContent = fmt(t);
    });
    xTicks.forEach(function (t, i) {
      var x = xs(t);
      svgEl("line", {x1: x, x2: x, y1: m.t, y2: H - m.b, stroke: "#f0f0f0"}, g);
      var label = svgEl("text", {x: x, y: H - m.b + 16, "text-anchor": "middle"}, g);
      label.textContent = xLabelOf ? xLabelOf(t, i) : fmt(t);
      if (panel.kind === "bar" && panel.categories.length > 3) {
        label.setAttribute("text-anchor", "end");
        label.setAttribute("transform", "rotate(-30 " + x + " " + (H - m.b + 12) + ")");
      }
    });
    svgEl("rect", {x: m.l, y: m.t, width: W - m.l - m.r, height: H - m.t - m.b, fill: "none", stroke: "#999"}, g);
    svgEl("text", {"class": "axis-label", x: (m.l + W - m.r) / 2, y: H - 6, "text-anchor": "middle"}, g)
      .textContent = panel.x_label;
    var cy = (m.t + H - m.b) / 2;
    svgEl("text", {"class": "axis-label", x: 14, y: cy, "text-anchor": "middle",
                   transform: "rotate(-90 14 " + cy + ")"}, g).textContent = panel.y_label;
  }

  function xyPanel(svg, panel, groups) {
    var m = {l: 72, r: 20, t: 14, b: 48};
    var xv = [], yv = [];
    panel.series.forEach(function (s) {
      s.points.forEach(function (p) {
        if (p.x !== null) xv.push(p.x);
        yv.push(p.y - (p.err || 0), p.y + (p.err || 0));
      });
      s.band.forEach(function (b) { yv.push(b[1], b[2]); });
    });
    var xd = padded(Math.min.apply(null, xv), Math.max.apply(null, xv), panel.x_log);
    var yd = padded(Math.min.apply(null, yv), Math.max.apply(null, yv), false);
    var xs = scale(xd[0], xd[1], m.l, W - m.r, panel.x_log), ys = scale(yd[0], yd[1], H - m.b, m.t, false);
    var xTicks = panel.x_ticks.length ? panel.x_ticks
               : (panel.x_log ? logTicks(xd[0], xd[1]) : niceTicks(xd[0], xd[1], 6));
    axes(svg, m, xs, ys, panel, xTicks, niceTicks(yd[0], yd[1], 6));
    panel.series.forEach(function (s, i) {
      var g = groups[i] = svgEl("g", {"class": "series", "data-series": s.name, "data-index": i}, svg);
      var dash = s.dashed ? "6 4" : null;
      if (s.band.length) {
        var top = s.band.map(function (b) { return xs(b[0]) + "," + ys(b[2]); });
        var bottom = s.band.slice().reverse().map(function (b) { return xs(b[0]) + "," + ys(b[1]); });
        svgEl("polygon", {points: top.concat(bottom).join(" "), fill: s.color, "fill-opacity": 0.18}, g);
      }
      if (s.kind === "hline") {
        var p = s.points[0], y = ys(p.y);
        var line = svgEl("line", {x1: m.l, x2: W - m.r, y1: y, y2: y, stroke: s.color, "stroke-width": 2,
                                  "stroke-dasharray": "6 4", "class": "point"}, g);
        hover(line, p, s);
        svgEl("text", {x: W - m.r - 4, y: y - 4, "text-anchor": "end", fill: s.color}, g).textContent = s.name;
        return;
      }
      var pts = s.points.map(function (p) { return [xs(p.x), ys(p.y)]; });
      if (s.kind === "lines" && pts.length > 1) {
        svgEl("path", {d: "M" + pts.map(function (q) { return q.join(","); }).join("L"), fill: "none",
                       stroke: s.color, "stroke-width": 1.8, "stroke-dasharray": dash || "none"}, g);
      }
      if (s.kind === "frontier") {
        var d = "M" + pts[0].join(",");
        for (var k = 1; k < pts.length; k++) d += "H" + pts[k][0] + "V" + pts[k][1];
        svgEl("path", {d: d, fill: "none", stroke: s.color, "stroke-width": 1.5, "stroke-dasharray": "6 4"}, g);
      }
      var radius = s.kind === "markers" ? 5.5 : s.kind === "frontier" ? 8 : (pts.length > 40 ? 2.5 : 4);
      s.points.forEach(function (p, j) {
        if (p.err && s.kind !== "frontier" && !s.band.length) {  // a band already shows the spread
          svgEl("line", {x1: pts[j][0], x2: pts[j][0], y1: ys(p.y - p.err), y2: ys(p.y + p.err),
                         stroke: s.color, "stroke-width": 1.2}, g);
        }
        var c = svgEl("circle", {cx: pts[j][0], cy: pts[j][1], r: radius, "class": "point",
                                 fill: s.kind === "frontier" ? "none" : s.color,
                                 stroke: s.kind === "frontier" ? s.color : "#fff", "stroke-width": 1.2}, g);
        hover(c, p, s);
        if (s.kind === "markers") {
          var right = pts[j][0] > m.l + (W - m.l - m.r) * 0.75;  // near the right edge: label on the left
          svgEl("text", {x: pts[j][0] + (right ? -7 : 7), y: pts[j][1] - 7, "font-size": 10,
                         "text-anchor": right ? "end" : "start"}, g).textContent = p.label;
        }
      });
    });
  }

  function barPanel(svg, panel, groups) {
    var longest = Math.max.apply(null, panel.categories.map(function (c) { return c.length; }));
    var rotated = panel.categories.length > 3;
    var m = {l: 72, r: 20, t: 14, b: rotated ? Math.min(150, 40 + longest * 5.2) : 48};
    var top = 0, placed = {}, shared = false;
    panel.series.forEach(function (s) {
      s.points.forEach(function (p) {
        top = Math.max(top, p.y + (p.err || 0));
        if (placed[p.x]) shared = true;
        placed[p.x] = true;
      });
    });
    var n = panel.categories.length, band = (W - m.l - m.r) / n;
    var xs = function (i) { return m.l + band * (i + 0.5); };
    var ys = scale(0, top * 1.08 || 1, H - m.b, m.t, false);
    axes(svg, m, xs, ys, panel, panel.categories.map(function (_, i) { return i; }), niceTicks(0, top * 1.08 || 1, 6),
         function (t) { return panel.categories[t]; });
    var width = shared ? band * 0.8 / panel.series.length : band * 0.6;
    panel.series.forEach(function (s, i) {
      var g = groups[i] = svgEl("g", {"class": "series", "data-series": s.name, "data-index": i}, svg);
      var offset = shared ? (i - (panel.series.length - 1) / 2) * width : 0;
      s.points.forEach(function (p) {
        var x = xs(panel.categories.indexOf(p.x)) + offset;
        var rect = svgEl("rect", {x: x - width / 2, y: ys(p.y), width: width, height: Math.max(0, ys(0) - ys(p.y)),
                                  fill: s.color, "class": "point bar"}, g);
        hover(rect, p, s);
        if (p.err) {
          svgEl("line", {x1: x, x2: x, y1: ys(p.y - p.err), y2: ys(p.y + p.err), stroke: "#333",
                         "stroke-width": 1.2}, g);
        }
      });
    });
  }

  function renderPanel(panel, parent) {
    var box = htmlEl("div", "panel", null, parent);
    htmlEl("h4", null, panel.title, box);
    var legend = htmlEl("div", "legend", null, box);
    var svg = svgEl("svg", {"class": "chart", width: W, height: H, viewBox: "0 0 " + W + " " + H,
                            role: "img", "aria-label": panel.title}, box);
    var groups = [];
    (panel.kind === "bar" ? barPanel : xyPanel)(svg, panel, groups);
    panel.series.forEach(function (s, i) {
      var button = htmlEl("button", null, null, legend);
      button.type = "button";
      button.setAttribute("data-index", i);
      button.title = "click to hide or show";
      var swatch = htmlEl("span", "swatch", null, button);
      swatch.style.background = s.color;
      button.appendChild(document.createTextNode(s.name));
      button.addEventListener("click", function () {
        var off = groups[i].style.display !== "none";
        groups[i].style.display = off ? "none" : "";
        button.classList.toggle("off", off);
      });
    });
    if (panel.note) htmlEl("div", "note", panel.note, box);
  }

  var root = document.getElementById("figures");
  data.figures.forEach(function (f) {
    var box = htmlEl("section", "figure", null, root);
    box.id = "figure-" + f.name;
    htmlEl("h3", null, f.title, box);
    var panels = htmlEl("div", "panels", null, box);
    f.panels.forEach(function (p) { renderPanel(p, panels); });
  });

  // Click a header to sort the table by that column (numbers by value, "-" last).
  document.querySelectorAll("#comparison th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var body = th.closest("table").tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var key = function (r) {
        var t = r.cells[col].textContent.split(" ± ")[0].replace(/,/g, "");
        var v = parseFloat(t);
        return isNaN(v) ? t : v;
      };
      var dir = th.getAttribute("data-dir") === "asc" ? -1 : 1;
      th.setAttribute("data-dir", dir === 1 ? "asc" : "desc");
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === "-") return 1; if (y === "-") return -1;
        return (x < y ? -1 : x > y ? 1 : 0) * dir;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });

  if (location.hash === "#selftest") {
    var out = {charts: document.querySelectorAll("svg.chart").length,
               points: document.querySelectorAll("svg.chart .point").length,
               labels: Array.prototype.map.call(document.querySelectorAll("svg.chart .point"),
                                                function (e) { return e.getAttribute("data-label"); })};
    var first = document.querySelector("svg.chart .point");
    if (first) {
      var r = first.getBoundingClientRect();
      first.dispatchEvent(new MouseEvent("mouseenter", {clientX: r.x + 1, clientY: r.y + 1}));
      out.tooltip_visible = !tip.hidden;
      out.tooltip = tip.textContent;
      first.dispatchEvent(new MouseEvent("mouseleave", {}));
      out.tooltip_hidden_after = tip.hidden;
      var button = document.querySelector(".legend button");
      var group = button.closest(".panel").querySelector('g.series[data-index="0"]');
      button.click();
      out.series_hidden_on_click = group.style.display === "none" && button.classList.contains("off");
      button.click();
      out.series_shown_on_second_click = group.style.display === "" && !button.classList.contains("off");
    }
    var pre = document.getElementById("selftest");
    pre.textContent = JSON.stringify(out);
    pre.hidden = false;
  }
})();
"""


def _json_for_script(value) -> str:
    # "</" would end the <script> element early; JSON allows the escaped form.
    return json.dumps(value, allow_nan=False).replace("</", "<\\/")


def _table(headers: list[str], rows: list[list[str]], table_id: str = "") -> list[str]:
    esc = html.escape
    attribute = f" id=\"{table_id}\"" if table_id else ""
    out = [f"<div class=\"table-wrap\"><table{attribute}><thead><tr>", *[f"<th>{esc(h)}</th>" for h in headers],
           "</tr></thead><tbody>"]
    out += ["<tr>" + "".join(f"<td>{esc(cell)}</td>" for cell in row) + "</tr>" for row in rows]
    return out + ["</tbody></table></div>"]


def render(title: str, subtitle: str, headers: list[str], rows: list[list[str]], figures: list,
           skipped: list[tuple[str, str]], not_finished: list[str], environment: list[str],
           tables: list = ()) -> str:
    """The page; `tables`: further tables (orchestrator.answer.Table: title, headers, rows, notes)
    under "Which method for my budget?"."""
    esc = html.escape
    table = _table(headers, rows, "comparison")
    parts = [
        "<!doctype html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{esc(title)}</title>", f"<style>{STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>", f"<div class=\"sub\">{esc(subtitle)}</div>",
        "<h2>Comparison</h2>", *table,
        ("<p class=\"note\">Rows group trials that differ only by train.seed: mean ± sample standard deviation "
         "over the n finished seeds. Click a column header to sort.</p>"),
    ]
    if not_finished:
        parts += ["<h3>Not finished</h3><ul>", *[f"<li>{esc(line)}</li>" for line in not_finished], "</ul>"]
    if tables:
        parts.append("<h2>Which method for my budget?</h2>")
    for extra in tables:
        parts += [f"<h3>{esc(extra.title)}</h3>", *_table(extra.headers, extra.rows),
                  *[f"<p class=\"note\">{esc(note)}</p>" for note in extra.notes]]
    parts += ["<h2>Plots</h2>", ("<p class=\"note\">Hover a point or bar for its trial and values; click a legend "
                                 "entry to hide or show that series.</p>"), "<div id=\"figures\"></div>"]
    if skipped:
        not_drawn = "; ".join(f"{esc(name)} ({esc(why)})" for name, why in skipped)
        parts += [f"<p class=\"note\">Not drawn: {not_drawn}</p>"]
    if environment:
        parts += ["<h2>Environment</h2><ul>", *[f"<li>{esc(line.lstrip('- '))}</li>" for line in environment], "</ul>"]
    data = {"figures": [dataclasses.asdict(f) for f in figures]}
    parts += [
        "<div id=\"tooltip\" class=\"tooltip\" hidden></div>", "<pre id=\"selftest\" hidden></pre>",
        f"<script type=\"application/json\" id=\"report-data\">{_json_for_script(data)}</script>",
        f"<script>{SCRIPT}</script>", "</body></html>",
    ]
    return "\n".join(parts) + "\n"
