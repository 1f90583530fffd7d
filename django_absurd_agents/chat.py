"""The Vercel AI SDK ``useChat`` protocol on a conversation: ``/agents/conversations/<id>/chat``.

``POST`` takes ``useChat``'s request (``{"id", "messages", "trigger"}``), sends the last user message
as the conversation's next turn (``Conversation.asend()``: the turn and its durable task are created
in one transaction) and streams that turn's events from the task's event log as the worker produces
them, encoded by pydantic-ai's ``VercelAIEventStream`` (what ``VercelAIAdapter`` streams with). The
response's ``X-Absurd-Turn-Id`` header and the stream's message id are the turn's id.

``GET`` with ``?turn=<turn id>`` streams that turn again (from its start, or after ``Last-Event-ID`` /
``?after=``); without it, the conversation's unfinished turn, or ``204 No Content`` when there is
none (what ``useChat``'s ``resumeStream()`` expects). Who may post and who may follow a turn is
``turn_stream``'s rule, shared with the AG-UI endpoint (``agui.py``).

A worker that dies in the middle of an answer leaves the start of that answer in the stream. When
the new attempt starts, the stream closes the part that was being written and sends a
``data-absurd-attempt`` part (``{"attempt": n, "discardAfter": offset}``); the parts of that response
streamed before it (since its ``step-start``) are void, and the new attempt's answer follows.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase
from pydantic import ValidationError
from pydantic_ai.ui.vercel_ai import VercelAIAdapter, VercelAIEventStream
from pydantic_ai.ui.vercel_ai.request_types import TextUIPart

from django_absurd_agents.exceptions import TurnFailed as TurnFailed  # its old import path
from django_absurd_agents.sse import resume_offset
from django_absurd_agents.turn_stream import requested_turn, send_turn, stream_turn

SDK_VERSION: Literal[5, 6, 7] = 5


def _prompt(body: bytes) -> str:
    """The text of the last user message of a ``useChat`` request."""
    run_input = VercelAIAdapter.build_run_input(body)
    for message in reversed(run_input.messages):
        if message.role == "user":
            return "".join(part.text for part in message.parts if isinstance(part, TextUIPart)).strip()
    return ""


def _stream(request: HttpRequest, turn: Any, after: int | None) -> HttpResponseBase:
    encoder = VercelAIEventStream(
        None, accept=request.headers.get("Accept"), sdk_version=SDK_VERSION, server_message_id=str(turn.pk)
    )
    return stream_turn(request, turn, encoder, after)


async def post(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponseBase:
    try:  # bad input is refused before any query
        prompt = _prompt(request.body)
    except ValidationError as exc:
        return JsonResponse({"error": "Not a useChat request.", "detail": json.loads(exc.json())}, status=400)
    if not prompt:
        return JsonResponse({"error": "The last user message has no text."}, status=400)
    turn = await send_turn(request, conversation_id, prompt)
    if isinstance(turn, HttpResponseBase):
        return turn
    return _stream(request, turn, None)


async def get(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponseBase:
    after = resume_offset(request)
    if isinstance(after, HttpResponse):
        return after
    turn = await requested_turn(request, conversation_id)
    if isinstance(turn, HttpResponseBase):
        return turn
    return _stream(request, turn, after)
