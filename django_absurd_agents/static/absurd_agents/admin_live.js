/* Live pages of the Absurd admin: regions refreshed in place, and a task's event log as it is written.
 *
 * Plain JavaScript, no build step, nothing fetched from elsewhere. Two kinds of marked elements:
 *
 *   [data-live-refresh="5"]  (with an id) re-read every 5 seconds: the page's own URL is fetched again
 *       (the same view, so the same permission check), and the region's content is replaced by the
 *       element of the same id in the fetched page. One fetch serves every region of the page, at the
 *       shortest interval asked for. Nothing is fetched while the tab is hidden. A region carrying
 *       data-live-final (a task that is over) stops the refresh. A 403, a 404 or a redirect (to the login
 *       page) stops it too, and the page says so in its [data-live-status] element.
 *
 *   [data-live-events="<url>"]  follows GET /agents/tasks/<task_id>/events with EventSource and shows
 *       the model's text as it is streamed, the tool calls and their results, "worker lost, resuming"
 *       when a new attempt starts (dropping what the dead attempt left unfinished, as
 *       django_absurd_agents.event_stream.assemble does), and the task's end.
 */
(function () {
  "use strict";

  var HEADER = "X-Absurd-Live";
  var EVENT_KINDS = [
    "part_start", "part_delta", "part_end", "final_result", "function_tool_call", "function_tool_result",
    "output_tool_call", "output_tool_result", "agent_run_result", "attempt", "end"
  ];

  function clock() {
    return new Date().toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  }

  function short(value, limit) {
    var text = typeof value === "string" ? value : JSON.stringify(value);
    text = text === undefined ? "" : text;
    return text.length > limit ? text.slice(0, limit - 1) + "\u2026" : text;
  }

  /* --- regions refreshed from the page's own URL --- */

  function Refresher(regions, status) {
    this.regions = regions;
    this.status = status;
    this.seconds = Math.min.apply(null, regions.map(function (region) {
      return Math.max(1, Number(region.getAttribute("data-live-refresh")) || 5);
    }));
    this.timer = null;
    this.busy = false;
    this.stopped = false;
  }

  Refresher.prototype.say = function (text, state) {
    if (!this.status) { return; }
    this.status.textContent = text;
    this.status.setAttribute("data-live-state", state);
  };

  Refresher.prototype.stop = function (text, state) {
    this.stopped = true;
    window.clearTimeout(this.timer);
    this.say(text, state || "stopped");
  };

  Refresher.prototype.final = function () {
    return this.regions.some(function (region) { return region.hasAttribute("data-live-final"); });
  };

  Refresher.prototype.schedule = function () {
    var self = this;
    window.clearTimeout(this.timer);
    if (!this.stopped) { this.timer = window.setTimeout(function () { self.tick(); }, this.seconds * 1000); }
  };

  Refresher.prototype.tick = function () {
    var self = this;
    if (this.stopped || this.busy) { return; }
    if (document.hidden) {
      this.say("live \u00b7 paused while the tab is hidden", "paused");
      return;  // the visibilitychange listener starts again
    }
    this.busy = true;
    var headers = { Accept: "text/html" };
    headers[HEADER] = "refresh";  // the view can tell a refresh from a visit
    fetch(window.location.href, {
      headers: headers,
      credentials: "same-origin",
      cache: "no-store",
      redirect: "manual"
    }).then(function (response) {
      if (response.type === "opaqueredirect" || (response.status >= 300 && response.status < 400)) {
        self.stop("stopped: you were logged out; reload the page to log in again");
      } else if (response.status === 403) {
        self.stop("stopped: you may no longer view this page (403)");
      } else if (response.status === 404) {
        self.stop("stopped: this page is gone (404)");
      } else if (!response.ok) {
        self.say("update failed (HTTP " + response.status + "), trying again", "error");
      } else {
        return response.text().then(function (html) { self.swap(html); });
      }
    }).catch(function () {
      self.say("update failed (the server did not answer), trying again", "error");
    }).then(function () {
      self.busy = false;
      self.schedule();
    });
  };

  Refresher.prototype.swap = function (html) {
    var fetched = new DOMParser().parseFromString(html, "text/html");
    this.regions.forEach(function (region) {
      var fresh = fetched.getElementById(region.id);
      if (!fresh) { return; }
      var open = [];
      region.querySelectorAll("details").forEach(function (details, index) { if (details.open) { open.push(index); } });
      region.innerHTML = fresh.innerHTML;
      var all = region.querySelectorAll("details");
      open.forEach(function (index) { if (all[index]) { all[index].open = true; } });
      if (fresh.hasAttribute("data-live-final")) { region.setAttribute("data-live-final", ""); }
    });
    if (this.final()) {
      this.stop("updated " + clock() + " \u00b7 the task is over, no more updates", "done");
    } else {
      this.say("live \u00b7 updated " + clock(), "live");
    }
  };

  Refresher.prototype.start = function () {
    var self = this;
    if (this.final()) {
      this.stop("the task is over; this page no longer changes", "done");
      return;
    }
    this.say("live \u00b7 updated " + clock() + " \u00b7 every " + this.seconds + " s", "live");
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden && !self.stopped) { self.tick(); }
    });
    this.schedule();
  };

  /* --- a task's event log, followed with EventSource --- */

  function assembled(entries) {
    // Items in the order they happened: text written by the model, tool calls, attempt markers, the end.
    var items = [];
    var calls = {};
    var text = null;
    entries.forEach(function (entry) {
      var data = entry.data;
      if (entry.kind === "part_start" && data.part && data.part.part_kind === "text") {
        text = { kind: "text", text: data.part.content || "" };
        items.push(text);
      } else if (entry.kind === "part_delta" && data.delta && data.delta.part_delta_kind === "text") {
        if (text === null) { text = { kind: "text", text: "" }; items.push(text); }
        text.text += data.delta.content_delta;
      } else if (entry.kind === "function_tool_call") {
        var call = { kind: "tool", name: data.part.tool_name, args: data.part.args, result: undefined };
        calls[data.part.tool_call_id] = call;
        items.push(call);
        text = null;
      } else if (entry.kind === "function_tool_result" && calls[data.part.tool_call_id]) {
        calls[data.part.tool_call_id].result = data.part.content;
      } else if (entry.kind === "attempt") {
        items.push({ kind: "attempt", attempt: data.attempt });
        text = null;
      } else if (entry.kind === "end") {
        items.push({ kind: "end", state: data.state, failure: data.failure });
      }
    });
    return items;
  }

  function line(kind, text) {
    var element = document.createElement(kind === "text" ? "div" : "p");
    element.className = "absurd-live-" + kind;
    element.textContent = text;
    return element;
  }

  function describe(item) {
    if (item.kind === "text") { return item.text; }
    if (item.kind === "tool") {
      var args = typeof item.args === "string" ? item.args : JSON.stringify(item.args || {});
      return "\u2192 " + item.name + "(" + short(args, 160) + ")" +
        (item.result === undefined ? " \u2026" : " = " + short(item.result, 240));
    }
    if (item.kind === "attempt") { return "worker lost, resuming\u2026 (attempt " + item.attempt + ")"; }
    return "\u25a0 " + item.state + (item.failure && item.failure.message ? ": " + item.failure.message : "");
  }

  function followEvents(panel) {
    var log = panel.querySelector("[data-live-events-log]");
    var status = panel.querySelector("[data-live-events-status]");
    var hint = panel.getAttribute("data-live-events-hint") || "";
    var entries = [];
    var timer = null;
    var source = new EventSource(panel.getAttribute("data-live-events"));

    function say(text) { if (status) { status.textContent = text; } }

    function render() {
      timer = null;
      log.textContent = "";
      assembled(entries).forEach(function (item) { log.appendChild(line(item.kind, describe(item))); });
      panel.setAttribute("data-live-count", String(entries.length));
    }

    EVENT_KINDS.forEach(function (kind) { source.addEventListener(kind, function (message) { receive(kind, message); }); });

    function receive(kind, message) {
      var data = JSON.parse(message.data);
      if (kind === "attempt") {  // the entries the dead attempt wrote after discard_after are void
        entries = entries.filter(function (entry) { return entry.offset <= data.discard_after; });
      }
      entries.push({ offset: Number(message.lastEventId), kind: kind, data: data });
      if (kind === "end") {
        source.close();
        render();
        panel.setAttribute("data-live-done", data.state);
        say(entries.length > 1 ? "The task is " + data.state + "; this is its whole event log." :
          "This task logged no events. " + hint);
        return;
      }
      say("Following the event log as the worker writes it\u2026");
      if (timer === null) { timer = window.setTimeout(render, 50); }
    }

    source.addEventListener("open", function () {
      if (!entries.length) { say("Waiting for events\u2026 " + hint); }
    });
    source.addEventListener("error", function () {
      if (source.readyState === EventSource.CLOSED) {
        say("The event log could not be read: you may not read it (ABSURD_AGENTS[\"EVENTS_ACCESS\"]), " +
          "or the task is gone.");
        panel.setAttribute("data-live-done", "error");
      } else {
        say("The connection to the event log was lost; reconnecting\u2026");
      }
    });
  }

  function start() {
    var regions = Array.prototype.filter.call(
      document.querySelectorAll("[data-live-refresh]"), function (region) { return region.id; }
    );
    if (regions.length) {
      new Refresher(regions, document.querySelector("[data-live-status]")).start();
    }
    document.querySelectorAll("[data-live-events]").forEach(followEvents);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
}());
