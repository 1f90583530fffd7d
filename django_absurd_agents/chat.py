"""The Vercel AI SDK ``useChat`` protocol on a conversation: ``/agents/conversations/<id>/chat``.

``POST`` takes ``useChat``'s request (``{"id", "messages", "trigger"}``), sends the last user message
as the conversation's next turn (``Conversation.asend()``: the turn and its durable task are created
in one transaction) and streams that turn's events from the task's event log as the worker produces
them, encoded by pydantic-ai's ``VercelAIEventStream`` (what ``VercelAIAdapter`` streams with). The
response's ``X-Absurd-Turn-Id`` header and the stream's message id are the turn's id.

``GET`` with ``?turn=<turn id>`` streams that turn again (from its start, or after ``Last-Event-ID`` /
``?after=``); without it, the conversation's unfinished turn, or ``204 No Content`` when there is
none (what ``useChat``'s ``resumeStream()`` expects). Who may read a turn's stream is decided by the
event log's one rule (``event_access``, ``ABSURD_AGENTS["EVENTS_ACCESS"]`` included) on the turn's task,
before the task or its log is read; only the owner may ask for the unfinished turn, and only the owner
may post.

A worker that dies in the middle of an answer leaves the start of that answer in the stream. When
the new attempt starts, the stream closes the part that was being written and sends a
``data-absurd-attempt`` part (``{"attempt": n, "discardAfter": offset}``); the parts of that response
streamed before it (since its ``step-start``) are void, and the new attempt's answer follows.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase
from pydantic import ValidationError
from pydantic_ai.messages import CustomEvent, PartDeltaEvent, PartEndEvent, PartStartEvent
from pydantic_ai.ui.vercel_ai import VercelAIAdapter, VercelAIEventStream
from pydantic_ai.ui.vercel_ai.request_types import TextUIPart

from django_absurd_agents import conf
from django_absurd_agents.event_access import may_read_events
from django_absurd_agents.event_log import ATTEMPT
from django_absurd_agents.event_stream import END, follow
from django_absurd_agents.exceptions import TurnFailed
from django_absurd_agents.sse import resume_offset, streaming

SDK_VERSION: Literal[5, 6, 7] = 5


@dataclass(kw_only=True)
class AttemptStarted(CustomEvent, name="absurd-attempt"):
    """A new attempt of the turn's task started: what was streamed since ``discard_after`` is void."""

    attempt: int
    discard_after: int

    def to_payload(self) -> Any:
        return {"attempt": self.attempt, "discardAfter": self.discard_after}


def _alias() -> str:
    return conf.get().database_alias


async def _own_conversation(request: HttpRequest, conversation_id: uuid.UUID) -> Any:
    from django_absurd_agents.models import Conversation

    user = await request.auser()
    if not user.is_authenticated or not user.is_active:
        return None
    return await Conversation.objects.using(_alias()).filter(pk=conversation_id, owner=user).afirst()


def _forbidden() -> HttpResponse:
    return HttpResponse("You may not read this conversation.", status=403, content_type="text/plain")


def _prompt(body: bytes) -> str:
    """The text of the last user message of a ``useChat`` request."""
    run_input = VercelAIAdapter.build_run_input(body)
    for message in reversed(run_input.messages):
        if message.role == "user":
            return "".join(part.text for part in message.parts if isinstance(part, TextUIPart)).strip()
    return ""


async def native_events(task_id: str, after: int | None, turn: Any) -> AsyncIterator[Any]:
    """The turn's pydantic-ai events from the log; a failed turn raises ``TurnFailed`` at the end."""
    open_parts: dict[int, Any] = {}
    answered = False
    async for entry in follow(task_id, after):
        if entry is None:
            continue
        if entry.kind == ATTEMPT:
            for index, part in sorted(open_parts.items()):  # close what the dead attempt left streaming
                yield PartEndEvent(index=index, part=part)
            open_parts.clear()
            yield AttemptStarted(attempt=int(entry.data["attempt"]), discard_after=int(entry.data["discard_after"]))
        elif entry.kind == END:
            state = entry.data.get("state")
            if state != "completed":
                failure = entry.data.get("failure") or {}
                raise TurnFailed(f"The turn {state}: {failure.get('message') or 'see the conversation'}.")
            if not answered:  # an agent without event_log=True: the stored answer, in one piece
                async for event in _stored_answer(turn):
                    yield event
            return
        else:
            event = entry.event()
            if isinstance(event, PartStartEvent):
                open_parts[event.index] = event.part
            elif isinstance(event, PartDeltaEvent) and event.index in open_parts:
                with contextlib.suppress(Exception):  # only used to close it, should the attempt die
                    open_parts[event.index] = event.delta.apply(open_parts[event.index])  # type: ignore[arg-type]
            elif isinstance(event, PartEndEvent):
                open_parts.pop(event.index, None)
            answered = answered or entry.kind == "agent_run_result"
            yield event


async def _stored_answer(turn: Any) -> AsyncIterator[Any]:
    from pydantic_ai.messages import TextPart

    await turn.arefresh_from_db(using=_alias())
    output = turn.output
    text = output if isinstance(output, str) else json.dumps(output)
    part = TextPart(content=text)
    yield PartStartEvent(index=0, part=part)
    yield PartEndEvent(index=0, part=part)


def _stream(request: HttpRequest, turn: Any, after: int | None) -> HttpResponseBase:
    encoder = VercelAIEventStream(
        None, accept=request.headers.get("Accept"), sdk_version=SDK_VERSION, server_message_id=str(turn.pk)
    )

    async def lines() -> AsyncIterator[str]:
        async for line in encoder.encode_stream(
            encoder.transform_stream(native_events(str(turn.task_id), after, turn))
        ):
            yield line

    response = streaming(request, lines, encoder.content_type)
    for header, value in (encoder.response_headers or {}).items():
        response[header] = value
    response["X-Absurd-Turn-Id"] = str(turn.pk)
    response["X-Absurd-Task-Id"] = str(turn.task_id)
    return response


async def post(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponseBase:
    conversation = await _own_conversation(request, conversation_id)
    if conversation is None:
        return _forbidden()
    try:
        prompt = _prompt(request.body)
    except ValidationError as exc:
        return JsonResponse({"error": "Not a useChat request.", "detail": json.loads(exc.json())}, status=400)
    if not prompt:
        return JsonResponse({"error": "The last user message has no text."}, status=400)
    turn = await conversation.asend(prompt)
    return _stream(request, turn, None)


async def get(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponseBase:
    from django_absurd_agents.models import Turn

    after = resume_offset(request)
    if isinstance(after, HttpResponse):
        return after
    raw_turn = request.GET.get("turn")
    try:
        turn_id = uuid.UUID(raw_turn) if raw_turn else None
    except ValueError:
        return JsonResponse({"error": "?turn= takes a turn id."}, status=400)
    turns = Turn.objects.using(_alias()).filter(conversation_id=conversation_id)
    if turn_id is not None:
        turn = await turns.filter(pk=turn_id).afirst()
        if turn is None:  # only the owner learns that the turn does not exist
            if await _own_conversation(request, conversation_id) is None:
                return _forbidden()
            return JsonResponse({"error": "No such turn in this conversation."}, status=404)
    else:
        if await _own_conversation(request, conversation_id) is None:
            return _forbidden()
        turn = await turns.filter(state__in=["pending", "running"]).order_by("sequence").afirst()
        if turn is None:
            return HttpResponse(status=204)
    # The SSE endpoint's rule, on the turn's task: decided before the task or its log is read.
    if not await may_read_events(request, str(turn.task_id)):
        return _forbidden()
    return _stream(request, turn, after)
