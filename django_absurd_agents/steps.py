"""Agent checkpoints, rendered for people.

A durable agent run leaves one checkpoint per model request and per tool call, named by pydantic-ai's
journal convention: ``<agent>__model.request[#n]`` holds the model's response (pydantic-ai's
``ModelResponse`` as JSON) and ``<agent>__function_toolset__<id>.call_tool:<tool>[#n]`` holds the tool
call's recorded outcome (the tool's return, or a ``ModelRetry``/``CallDeferred``/``ApprovalRequired``
recorded as data). The tool step does not store its arguments; they are in the tool call of the model
response before it, so the steps are read in the order they were written and matched up here.

Everything else (a task's own ``ctx.step`` values, event waits) is shown as stored. Reading never
imports pydantic-ai types: the admin must show checkpoints even when the code that wrote them has
changed since.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from django_absurd_agents.queries import Checkpoint

MAX_JSON_CHARS = 200_000
"""Stored JSON longer than this is cut in the page (the database keeps all of it)."""

_MODEL_STEP = re.compile(
    r"^(?P<agent>.+)__model\.(?P<op>request|request_stream)(?:\.(?P<model>[^#]+))?(?:#(?P<n>\d+))?$"
)
_TOOL_STEP = re.compile(
    r"^(?P<agent>.+?)__(?P<kind>[a-z]+_toolset|mcp_server)__(?P<toolset>.+)\.call_tool"
    r"(?::(?P<tool>[^#]+))?(?:#(?P<n>\d+))?$"
)
_EVENT_STEP = re.compile(r"^(?P<agent>.+)__external_event\.(?P<wait>.+?)(?P<part>\.token|\.ask|\.outcome)?(?:#\d+)?$")

_OUTCOMES = {
    "tool_return": "returned",
    "tool_content_result": "returned",
    "model_retry": "asked the model to retry",
    "call_deferred": "was deferred",
    "approval_required": "needs approval",
    "validation_error": "got invalid arguments",
    "tool_failed": "failed",
    "run_cancelled": "was cancelled",
}


LINE_WIDTH = 88
"""Containers whose compact JSON fits in this many columns stay on one line."""


_ENCODER = json.JSONEncoder(ensure_ascii=False, default=str)


def _dumps(value: Any) -> str:
    return _ENCODER.encode(value)


def _pretty(value: Any, indent: int) -> str:
    compact = _dumps(value)
    if not isinstance(value, dict | list) or not value or indent + len(compact) <= LINE_WIDTH:
        return compact
    inner = " " * (indent + 2)
    if isinstance(value, dict):
        items = [f"{inner}{_dumps(str(key))}: {_pretty(item, indent + 2)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    items = [inner + _pretty(item, indent + 2) for item in value]
    return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"


def pretty_json(value: Any, limit: int = MAX_JSON_CHARS) -> str:
    """Indented JSON for a page, short containers kept on one line, cut at ``limit`` characters.

    The compact pieces come from the C encoder (``json.dumps(indent=...)`` falls back to the pure
    Python one, several times slower on a page of 200 checkpoints).
    """
    compact = _dumps(value)
    # Huge values are shown compact: indenting them costs time and cutting them loses the shape anyway.
    text = compact if len(compact) > limit else _pretty(value, 0)
    if len(text) > limit:
        return f"{text[:limit]}\n… ({len(text) - limit:,} more characters not shown)"
    return text


@dataclass
class ToolCall:
    tool_name: str
    args: Any
    tool_call_id: str | None

    @cached_property
    def args_json(self) -> str:
        return pretty_json(self.args)


@dataclass
class Step:
    """One checkpoint, with what a person wants to see of it."""

    checkpoint: Checkpoint
    kind: str = "step"  # model | tool | event | step
    agent: str | None = None
    number: int = 1
    title: str = ""
    owner_attempt: int | None = None
    # model steps
    model_name: str | None = None
    texts: list[str] = field(default_factory=list)
    thinking: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    other_parts: list[str] = field(default_factory=list)
    input_tokens: int | None = None
    output_tokens: int | None = None
    # tool steps
    tool_name: str | None = None
    call: ToolCall | None = None
    outcome: str | None = None
    outcome_kind: str | None = None
    message: str | None = None
    result: Any = None
    has_result: bool = False

    @property
    def name(self) -> str:
        return self.checkpoint.name

    @cached_property
    def stored_json(self) -> str:
        return pretty_json(self.checkpoint.state)

    @cached_property
    def result_json(self) -> str:
        return pretty_json(self.result)

    @property
    def is_failure(self) -> bool:
        return self.outcome_kind in {"model_retry", "validation_error", "tool_failed", "run_cancelled"}

    def html(self, index: int) -> SafeString:
        """The step as an HTML card (built here rather than in a template: a task page can hold hundreds)."""
        pieces = [self._header_html(index)]
        if self.kind == "model":
            pieces.extend(format_html('<div class="absurd-thinking">{}</div>', text) for text in self.thinking)
            pieces.extend(format_html('<div class="absurd-text">{}</div>', text) for text in self.texts)
            pieces.extend(
                format_html(
                    '<div>Calls tool <strong>{}</strong> with<pre class="absurd-json">{}</pre></div>',
                    call.tool_name,
                    call.args_json,
                )
                for call in self.tool_calls
            )
            if self.other_parts:
                pieces.append(format_html('<p class="absurd-note">Other parts: {}</p>', ", ".join(self.other_parts)))
            usage = ""
            if self.input_tokens is not None:
                usage = f" · {self.input_tokens} tokens in, {self.output_tokens} out"
            pieces.append(format_html('<p class="absurd-note">{}{}</p>', self.model_name or "", usage))
        elif self.kind == "tool":
            message = f": {self.message}" if self.message else ""
            pieces.append(
                format_html("<div>Tool <strong>{}</strong> {}{}</div>", self.tool_name, self.outcome or "", message)
            )
            if self.call is not None:
                pieces.append(
                    format_html(
                        '<div class="absurd-note">Arguments</div><pre class="absurd-json">{}</pre>', self.call.args_json
                    )
                )
            if self.has_result:
                label = "Result" if self.outcome_kind in {"tool_return", "tool_content_result"} else "Details"
                pieces.append(
                    format_html(
                        '<div class="absurd-note">{}</div><pre class="absurd-json">{}</pre>', label, self.result_json
                    )
                )
        pieces.append(
            format_html(
                '<details{}><summary>stored JSON</summary><pre class="absurd-json">{}</pre></details>',
                " open" if self.kind in {"step", "event"} else "",
                self.stored_json,
            )
        )
        css = f"absurd-step {self.kind}" + (" failure" if self.is_failure else "")
        return format_html('<section class="{}">{}</section>', css, mark_safe("".join(pieces)))

    def _header_html(self, index: int) -> SafeString:
        notes = []
        if self.agent:
            notes.append(f"agent {self.agent}")
        notes.append(self.checkpoint.status)
        notes.append(timezone.localtime(self.checkpoint.updated_at).strftime("%H:%M:%S.%f"))
        if self.owner_attempt:
            notes.append(f"written by attempt {self.owner_attempt}")
        return format_html(
            "<header><h3>{}. {}</h3>{}</header>",
            index,
            self.title,
            format_html_join("", '<span class="absurd-note">{}</span>', ((note,) for note in notes)),
        )


def _number(match: re.Match[str]) -> int:
    return int(match.group("n")) if match.group("n") else 1


def _maybe_json(value: Any) -> Any:
    """Tool-call arguments arrive as a dict or as the model's raw JSON string."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _model_step(step: Step, match: re.Match[str]) -> None:
    step.kind = "model"
    step.agent = match.group("agent")
    step.number = _number(match)
    step.title = f"Model request {step.number}" + (" (streamed)" if match.group("op") == "request_stream" else "")
    state = step.checkpoint.state
    if not isinstance(state, dict):
        return
    step.model_name = state.get("model_name")
    usage = state.get("usage")
    if isinstance(usage, dict):
        step.input_tokens = usage.get("input_tokens")
        step.output_tokens = usage.get("output_tokens")
    for part in state.get("parts") or []:
        if not isinstance(part, dict):
            continue
        kind = part.get("part_kind")
        if kind == "text":
            step.texts.append(str(part.get("content") or ""))
        elif kind == "thinking":
            step.thinking.append(str(part.get("content") or ""))
        elif kind == "tool-call":
            step.tool_calls.append(
                ToolCall(
                    tool_name=str(part.get("tool_name")),
                    args=_maybe_json(part.get("args")),
                    tool_call_id=part.get("tool_call_id"),
                )
            )
        else:
            step.other_parts.append(str(kind))


def _tool_step(step: Step, match: re.Match[str], pending: dict[str, list[ToolCall]]) -> None:
    step.kind = "tool"
    step.agent = match.group("agent")
    step.number = _number(match)
    calls = pending.get(step.agent, [])
    wanted = match.group("tool")
    for index, call in enumerate(calls):
        if wanted is None or call.tool_name == wanted:
            step.call = calls.pop(index)
            break
    step.tool_name = wanted or (step.call.tool_name if step.call else None) or "tool"
    step.title = f"Tool {step.tool_name}"
    state = step.checkpoint.state
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind in _OUTCOMES:
        step.outcome_kind = kind
        step.outcome = _OUTCOMES[kind]
        if kind in {"tool_return", "tool_content_result"}:
            step.result = state.get("result")
            step.has_result = True
        elif kind == "validation_error":
            step.message = str(state.get("title") or "")
            step.result = state.get("errors")
            step.has_result = True
        elif kind in {"call_deferred", "approval_required"}:
            step.result = state.get("metadata")
            step.has_result = state.get("metadata") is not None
        else:
            step.message = str(state.get("message") or "")
    else:  # recorded by an engine that stored the bare return value
        step.outcome = "returned"
        step.outcome_kind = "tool_return"
        step.result = state
        step.has_result = True


def _event_step(step: Step, match: re.Match[str]) -> None:
    step.kind = "event"
    step.agent = match.group("agent")
    part = (match.group("part") or "").lstrip(".")
    labels = {
        "token": "resume token made",
        "ask": "asked for input",
        "outcome": "wait ended",
        "": "event received",
    }
    step.title = f"Wait {match.group('wait')}: {labels[part]}"


def render_steps(checkpoints: Iterable[Checkpoint]) -> list[Step]:
    """Steps in written order, model responses and tool calls decoded, tool arguments matched up."""
    pending: dict[str, list[ToolCall]] = {}
    steps: list[Step] = []
    for checkpoint in checkpoints:
        step = Step(checkpoint=checkpoint, title=checkpoint.name)
        if match := _MODEL_STEP.match(checkpoint.name):
            _model_step(step, match)
            # A new response replaces calls the previous one made but that never ran (e.g. deferred).
            pending[step.agent or ""] = list(step.tool_calls)
        elif match := _TOOL_STEP.match(checkpoint.name):
            _tool_step(step, match, pending)
        elif match := _EVENT_STEP.match(checkpoint.name):
            _event_step(step, match)
        steps.append(step)
    return steps


def format_duration(value: datetime.timedelta | None) -> str:
    """A duration the way a person reads it: "85 ms", "4.2 s", "3 min 5 s", "2 h 10 min", "3 d 4 h"."""
    if value is None:
        return ""
    seconds = value.total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s"
