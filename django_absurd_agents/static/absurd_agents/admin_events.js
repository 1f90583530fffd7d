/* A task's event log in the Absurd admin, followed as the worker writes it.
 *
 * Plain JavaScript, no build step. An element marked [data-live-events="<url>"] follows
 * GET /agents/tasks/<task_id>/events with EventSource and shows the model's text as it is streamed,
 * the tool calls and their results, "worker lost, resuming" when a new attempt starts (dropping what
 * the dead attempt left unfinished, as django_absurd_agents.event_stream.assemble does), and the
 * task's end.
 */
(function () {
  "use strict";

  var EVENT_KINDS = [
    "part_start", "part_delta", "part_end", "final_result", "function_tool_call", "function_tool_result",
    "output_tool_call", "output_tool_result", "agent_run_result", "attempt", "end"
  ];

  function short(value, limit) {
    var text = typeof value === "string" ? value : JSON.stringify(value);
    text = text === undefined ? "" : text;
    return text.length > limit ? text.slice(0, limit - 1) + "\u2026" : text;
  }

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
    document.querySelectorAll("[data-live-events]").forEach(followEvents);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
}());
