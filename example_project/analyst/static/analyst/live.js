/* Live output of a durable agent run, read from its task's event log as Server-Sent Events.
 *
 * Plain JavaScript, no build step. Any element with a data-live-events attribute (the URL of
 * GET /agents/tasks/<task_id>/events) is followed; inside it, optional children show:
 *
 *   [data-live-text]    the text the model writes, token by token
 *   [data-live-tools]   the tool calls and what they returned
 *   [data-live-notice]  "worker lost, resuming..." when a new attempt of the task starts
 *   [data-live-state]   the task's state once it is over
 *
 * What is shown is assembled from the log exactly as django_absurd_agents.event_stream.assemble()
 * does: an "attempt" marker voids the entries after its discard_after offset (the part of an answer
 * that a killed worker was writing), so no token is shown twice. When the task is over the element
 * receives a "live:end" event whose detail is the end event's data ({state, failure?}); with a
 * data-progress-url attribute the report status page's answer and reports are then filled in from
 * that JSON, without reloading the page.
 */
(function () {
  "use strict";

  var KINDS = [
    "part_start", "part_delta", "part_end", "final_result",
    "function_tool_call", "function_tool_result", "output_tool_call", "output_tool_result",
    "agent_run_result", "attempt", "end"
  ];

  function short(value, limit) {
    var text = typeof value === "string" ? value : JSON.stringify(value);
    return text.length > limit ? text.slice(0, limit - 1) + "\u2026" : text;
  }

  function assembled(entries) {
    var text = "";
    var calls = [];
    var byId = {};
    var lastKind = null;
    entries.forEach(function (entry) {
      var data = entry.data;
      if (entry.kind === "part_start" && data.part.part_kind === "text") {
        if (text && lastKind !== "part_end") { text += "\n\n"; }  // the text of a later response
        text += data.part.content;
      } else if (entry.kind === "part_delta" && data.delta.part_delta_kind === "text") {
        text += data.delta.content_delta;
      } else if (entry.kind === "function_tool_call") {
        var call = { name: data.part.tool_name, args: data.part.args, result: undefined };
        byId[data.part.tool_call_id] = call;
        calls.push(call);
      } else if (entry.kind === "function_tool_result" && byId[data.part.tool_call_id]) {
        byId[data.part.tool_call_id].result = data.part.content;
      }
      lastKind = entry.kind;
    });
    return { text: text, calls: calls };
  }

  function follow(element) {
    var entries = [];
    var timer = null;
    var lost = false;
    var source = new EventSource(element.getAttribute("data-live-events"));

    function child(name) { return element.querySelector("[data-live-" + name + "]"); }

    function render() {
      timer = null;
      var view = assembled(entries);
      var text = child("text");
      if (text) { text.textContent = view.text; }
      var tools = child("tools");
      if (tools) {
        tools.textContent = "";
        view.calls.forEach(function (call) {
          var line = document.createElement("div");
          line.className = "live-call";
          var args = typeof call.args === "string" ? call.args : JSON.stringify(call.args);
          line.textContent = "\u2192 " + call.name + "(" + short(args || "", 120) + ")" +
            (call.result === undefined ? " \u2026" : " = " + short(call.result, 160));
          tools.appendChild(line);
        });
      }
    }

    function later() {
      if (timer === null) { timer = window.setTimeout(render, 30); }
    }

    function notice(text) {
      var box = child("notice");
      if (box) { box.textContent = text; }
    }

    KINDS.forEach(function (kind) {
      source.addEventListener(kind, function (message) {
        var data = JSON.parse(message.data);
        if (kind === "end") {
          source.close();
          render();
          var state = child("state");
          if (state) {
            state.textContent = data.state === "completed" ? "" : data.state +
              (data.failure ? ": " + data.failure.message : "");
          }
          if (lost) { notice("the answer was resumed after a worker was lost"); }
          element.setAttribute("data-live-done", data.state);
          element.dispatchEvent(new CustomEvent("live:end", { detail: data }));
          return;
        }
        var offset = Number(message.lastEventId);
        if (kind === "attempt") {
          // A new attempt: what the one before left unfinished is void, and is written again.
          entries = entries.filter(function (entry) { return entry.offset <= data.discard_after; });
          lost = true;
          notice("worker lost, resuming\u2026");
        }
        entries.push({ offset: offset, kind: kind, data: data });
        later();
      });
    });
    element.liveSource = source;
  }

  function fillProgress(element) {
    var url = element.getAttribute("data-progress-url");
    if (!url) { return; }
    fetch(url, { headers: { Accept: "application/json" } })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (data) {
        if (!data) { return; }
        var state = document.querySelector("[data-task-state]");
        if (state) { state.textContent = data.state; state.className = "state " + data.state; }
        var answer = document.querySelector("[data-answer]");
        if (answer && data.answer) { answer.textContent = data.answer; answer.closest(".card").hidden = false; }
        var reports = document.querySelector("[data-reports]");
        if (reports) {
          reports.textContent = "";
          (data.reports || []).forEach(function (report) {
            var card = document.createElement("div");
            card.className = "card";
            var title = document.createElement("strong");
            title.textContent = "Report #" + report.id + ": " + report.title;
            var summary = document.createElement("p");
            summary.textContent = report.summary;
            card.appendChild(title);
            card.appendChild(summary);
            reports.appendChild(card);
          });
        }
      });
  }

  function start() {
    document.querySelectorAll("[data-live-events]").forEach(function (element) {
      element.addEventListener("live:end", function () { fillProgress(element); });
      follow(element);
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
}());
