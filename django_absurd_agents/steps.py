"""What an agent run recorded, decoded into plain records: no HTML, no Django, no pydantic-ai types.

A durable agent run leaves one checkpoint per model request and per tool call, named by pydantic-ai's
journal convention: ``<agent>__model.request[#n]`` holds the model's response (pydantic-ai's
``ModelResponse`` as JSON) and ``<agent>__function_toolset__<id>.call_tool:<tool>[#n]`` holds the tool
call's recorded outcome (the tool's return, or a ``ModelRetry``/``CallDeferred``/``ApprovalRequired``
recorded as data). The tool step does not store its arguments; they are in the tool call of the model
response before it, so :func:`decode_steps` reads the steps in the order they were written and matches
them up. ``<agent>__external_event.<wait>...`` steps belong to an event wait; anything else (a task's
own ``ctx.step`` values) is a plain step.

A conversation's stored messages (pydantic-ai's ``ModelMessage`` list as JSON) decode into transcript
entries with :func:`transcript_entries`.

Reading never imports pydantic-ai: checkpoints and histories must read back even when the code that
wrote them has changed since. The admin renders these records with templates, the progress API
(``progress``) hands them out.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from django_absurd_agents.json_text import compact_json

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
_RETURNED = {"tool_return", "tool_content_result"}
_FAILURES = {"model_retry", "validation_error", "tool_failed", "run_cancelled"}
_WAIT_PARTS = {"token": "resume token made", "ask": "asked for input", "outcome": "wait ended", "": "event received"}


@dataclass(frozen=True)
class StepName:
    """What a checkpoint's name says: the kind of step, its agent, its number, the tool it ran."""

    kind: str  # "model", "tool", "event" or "step"
    agent: str | None = None
    number: int = 1
    tool: str | None = None  # tool steps whose name carries the tool (MCP calls do not)
    streamed: bool = False  # model steps made with request_stream
    wait: str | None = None  # event steps: the wait's name
    wait_part: str = ""  # event steps: "token", "ask", "outcome", or "" for the event itself


def _number(match: re.Match[str]) -> int:
    return int(match.group("n")) if match.group("n") else 1


def parse_step_name(name: str) -> StepName:
    if match := _MODEL_STEP.match(name):
        return StepName("model", match.group("agent"), _number(match), streamed=match.group("op") == "request_stream")
    if match := _TOOL_STEP.match(name):
        return StepName("tool", match.group("agent"), _number(match), tool=match.group("tool"))
    if match := _EVENT_STEP.match(name):
        return StepName(
            "event", match.group("agent"), wait=match.group("wait"), wait_part=(match.group("part") or "")[1:]
        )
    return StepName("step")


class CheckpointLike(Protocol):
    """A recorded step as ``task_records.Checkpoint`` holds it."""

    @property
    def name(self) -> str: ...
    @property
    def state(self) -> Any: ...
    @property
    def status(self) -> str: ...
    @property
    def owner_run_id(self) -> str | None: ...
    @property
    def updated_at(self) -> datetime.datetime: ...


@dataclass(frozen=True)
class ToolCall:
    """A tool call a model asked for; ``args`` decoded when the model sent them as JSON text."""

    tool_name: str
    args: Any
    tool_call_id: str | None


@dataclass
class Step:
    """One checkpoint, decoded. Model steps fill the model fields, tool steps the tool fields."""

    checkpoint: CheckpointLike
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

    @property
    def state(self) -> Any:
        return self.checkpoint.state

    @property
    def is_failure(self) -> bool:
        return self.outcome_kind in _FAILURES

    @property
    def returned(self) -> bool:
        return self.outcome_kind in _RETURNED


def decode_json_text(value: Any) -> Any:
    """Tool-call arguments arrive as a dict or as the model's raw JSON string."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _model_step(step: Step, name: StepName) -> None:
    step.title = f"Model request {name.number}" + (" (streamed)" if name.streamed else "")
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
            step.tool_calls.append(_tool_call(part))
        else:
            step.other_parts.append(str(kind))


def _tool_call(part: Mapping[str, Any]) -> ToolCall:
    return ToolCall(
        tool_name=str(part.get("tool_name")),
        args=decode_json_text(part.get("args")),
        tool_call_id=part.get("tool_call_id"),
    )


def _take_call(calls: list[ToolCall], tool: str | None) -> ToolCall | None:
    """The first call the model asked for that this step ran (removed from ``calls``)."""
    for index, call in enumerate(calls):
        if tool is None or call.tool_name == tool:
            return calls.pop(index)
    return None


def _tool_step(step: Step, name: StepName, calls: list[ToolCall]) -> None:
    step.call = _take_call(calls, name.tool)
    step.tool_name = name.tool or (step.call.tool_name if step.call else None) or "tool"
    step.title = f"Tool {step.tool_name}"
    state = step.checkpoint.state
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind not in _OUTCOMES:  # recorded by an engine that stored the bare return value
        step.outcome, step.outcome_kind = "returned", "tool_return"
        step.result, step.has_result = state, True
        return
    assert isinstance(state, dict)
    step.outcome_kind, step.outcome = kind, _OUTCOMES[kind]
    if kind in _RETURNED:
        step.result, step.has_result = state.get("result"), True
    elif kind == "validation_error":
        step.message = str(state.get("title") or "")
        step.result, step.has_result = state.get("errors"), True
    elif kind in {"call_deferred", "approval_required"}:
        step.result = state.get("metadata")
        step.has_result = step.result is not None
    else:
        step.message = str(state.get("message") or "")


def decode_steps(checkpoints: Iterable[CheckpointLike], attempts: Mapping[str, int] | None = None) -> list[Step]:
    """Steps in written order, model responses and tool calls decoded, tool arguments matched up.

    ``attempts`` (run id -> attempt) says which attempt wrote each step.
    """
    pending: dict[str, list[ToolCall]] = {}
    steps: list[Step] = []
    for checkpoint in checkpoints:
        name = parse_step_name(checkpoint.name)
        step = Step(checkpoint=checkpoint, kind=name.kind, agent=name.agent, number=name.number, title=checkpoint.name)
        if attempts is not None:
            step.owner_attempt = attempts.get(checkpoint.owner_run_id or "")
        if name.kind == "model":
            _model_step(step, name)
            # A new response replaces calls the previous one made but that never ran (e.g. deferred).
            pending[name.agent or ""] = list(step.tool_calls)
        elif name.kind == "tool":
            _tool_step(step, name, pending.setdefault(name.agent or "", []))
        elif name.kind == "event":
            step.title = f"Wait {name.wait}: {_WAIT_PARTS[name.wait_part]}"
        steps.append(step)
    return steps


@dataclass
class TranscriptEntry:
    """One line of a conversation: instructions, the user, the assistant (text or thinking), a tool, a retry.

    A tool entry holds the call (``args``) and, once it returned, its ``result`` (``failed`` when the
    tool's outcome was not a success); ``has_call`` is False for a result whose call is not in the log.
    """

    kind: str  # "instructions", "user", "assistant", "thinking", "tool" or "retry"
    text: str = ""
    name: str = ""
    args: Any = None
    result: Any = None
    has_call: bool = True
    has_result: bool = False
    failed: bool = False


def _media(item: Any) -> str:
    if isinstance(item, dict):
        label = item.get("media_type") or item.get("kind") or "content"
        where = item.get("url") or item.get("identifier") or ""
        return f"[{label}{' ' + where if where else ''}]"
    return compact_json(item)


def _prompt_text(content: Any) -> str:
    """A user prompt's content: text as is, multimodal parts summarised."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(_prompt_text(item) if isinstance(item, str) else _media(item) for item in content)
    return compact_json(content)


_TEXT_PARTS = {"system-prompt": "instructions", "text": "assistant", "thinking": "thinking"}


def _part_entry(part: Mapping[str, Any], calls: dict[str, TranscriptEntry]) -> TranscriptEntry | None:
    """The entry for one message part (None when the part completes an entry made before)."""
    kind = part.get("part_kind")
    if kind in _TEXT_PARTS:
        return TranscriptEntry(_TEXT_PARTS[str(kind)], text=str(part.get("content") or ""))
    if kind == "user-prompt":
        return TranscriptEntry("user", text=_prompt_text(part.get("content")))
    if kind in ("tool-call", "builtin-tool-call"):
        call = TranscriptEntry("tool", name=str(part.get("tool_name") or ""), args=decode_json_text(part.get("args")))
        calls[str(part.get("tool_call_id"))] = call
        return call
    if kind in ("tool-return", "builtin-tool-return"):
        entry = calls.get(str(part.get("tool_call_id")))
        made = entry is None
        if entry is None:
            entry = TranscriptEntry("tool", name=str(part.get("tool_name") or ""), has_call=False)
        entry.result, entry.has_result = part.get("content"), True
        entry.failed = part.get("outcome") not in (None, "success")
        return entry if made else None
    if kind in ("retry-prompt", "retry-feedback"):
        content = part.get("content")
        text = content if isinstance(content, str) else compact_json(content)
        return TranscriptEntry("retry", name=str(part.get("tool_name") or ""), text=text)
    if kind == "file":
        return TranscriptEntry("assistant", text=_media(part.get("content")))
    return None


def transcript_entries(stored: Any) -> list[TranscriptEntry]:
    """Readable entries for stored pydantic-ai messages; a tool's result joins its call's entry.

    Hand-edited or corrupted JSON shows what can be read rather than failing.
    """
    entries: list[TranscriptEntry] = []
    calls: dict[str, TranscriptEntry] = {}
    for message in stored if isinstance(stored, list) else []:
        if not isinstance(message, dict):
            continue
        if message.get("kind") == "request" and message.get("instructions"):
            entries.append(TranscriptEntry("instructions", text=str(message["instructions"])))
        parts = message.get("parts")
        for part in parts if isinstance(parts, list) else []:
            entry = _part_entry(part, calls) if isinstance(part, dict) else None
            if entry is not None:
                entries.append(entry)
    return entries
