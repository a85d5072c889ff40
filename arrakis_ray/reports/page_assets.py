"""The script and style every page carries (reports/html.py renders the pages).

``ERROR_HOOK_JS`` records errors on the page for a headless browser to read;
``EMBED_JS`` draws each chart with Vega-Embed and marks its container with the outcome;
``PAGE_CSS`` styles the charts, tables, code and highlighted tokens.
"""

# Installed before the Vega bundle so that errors while loading it are recorded too.
ERROR_HOOK_JS = """
(function () {
  var box = document.getElementById("arrakis-errors");
  window.arrakisRecordError = function (msg) {
    var item = document.createElement("li");
    item.textContent = String(msg);
    box.appendChild(item);
  };
  window.addEventListener("error", function (e) {
    window.arrakisRecordError("error: " + (e.message || e.type));
  });
  window.addEventListener("unhandledrejection", function (e) {
    var r = e.reason;
    window.arrakisRecordError("unhandled rejection: " + (r && r.message ? r.message : r));
  });
})();
"""

# Embeds every chart with the SVG renderer and records the outcome on its container.
EMBED_JS = """
(function () {
  function message(err) { return err && err.message ? err.message : String(err); }
  // Vega reports some failures (bad expressions, data errors) through its logger only.
  function logger(el) {
    var level = 2;  // vega.Warn
    return {
      level: function (l) { if (l === undefined) { return level; } level = l; return this; },
      error: function () {
        var text = Array.prototype.map.call(arguments, message).join(" ");
        window.arrakisRecordError(el.id + ": " + text);
        return this;
      },
      warn: function () {
        var text = Array.prototype.map.call(arguments, message).join(" ");
        var prev = el.getAttribute("data-warnings");
        el.setAttribute("data-warnings", prev ? prev + "\\n" + text : text);
        return this;
      },
      info: function () { return this; },
      debug: function () { return this; }
    };
  }
  var charts = document.querySelectorAll("div.arrakis-chart");
  if (typeof window.vegaEmbed !== "function") {
    charts.forEach(function (el) { el.setAttribute("data-status", "error: vegaEmbed missing"); });
    window.arrakisRecordError("vegaEmbed is not defined: the Vega bundle did not load");
    return;
  }
  charts.forEach(function (el) {
    var spec;
    try {
      spec = JSON.parse(document.getElementById(el.getAttribute("data-spec")).textContent);
    } catch (err) {
      el.setAttribute("data-status", "error: " + message(err));
      return;
    }
    window.vegaEmbed(el, spec, { renderer: "svg", actions: false, logger: logger(el) })
      .then(function () { el.setAttribute("data-status", "rendered"); })
      .catch(function (err) { el.setAttribute("data-status", "error: " + message(err)); });
  });
})();
"""

PAGE_CSS = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; color: #222;
       padding: 0 1rem; }
section { margin: 2.5rem 0; }
.arrakis-chart { overflow-x: auto; }
.arrakis-row { display: flex; flex-wrap: wrap; gap: 1.5rem; align-items: flex-start; }
.arrakis-row figure { margin: 0; }
.arrakis-row figcaption { font-weight: 600; margin-bottom: 0.3rem; }
#arrakis-errors { display: none; }
nav.arrakis-nav { font-size: 0.9rem; margin-bottom: 1rem; color: #555; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
th, td { border-bottom: 1px solid #ddd; padding: 0.2rem 0.6rem; text-align: left;
         vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f6f6f6; padding: 0.6rem; overflow-x: auto; font-size: 0.8rem; }
mark.centre { background: #ffb74d; padding: 0 0.1rem; border-radius: 2px; }
.context { font-family: ui-monospace, monospace; white-space: pre-wrap; }
.muted { color: #777; }
"""
