"""The AG-UI protocol on a conversation: ``/agents/conversations/<id>/agui``.

``POST`` takes AG-UI's ``RunAgentInput`` (``{"threadId", "runId", "messages", ...}``), sends the last
message, a user's, as the conversation's next turn (``Conversation.asend()``: the turn and its durable
task are created in one transaction) and streams that turn's events from the task's event log as the
worker produces them, encoded by pydantic-ai's ``AGUIEventStream`` (what ``AGUIAdapter`` streams with):
``RUN_STARTED``, ``TEXT_MESSAGE_*``, ``TOOL_CALL_*``, then ``RUN_FINISHED``, or ``RUN_ERROR`` for a
turn that failed or was cancelled. The conversation keeps its history on the server: the client's
earlier messages, tools, state and context are not read. ``RUN_STARTED`` and ``RUN_FINISHED`` carry the
request's ``threadId`` and ``runId``; the ``X-Absurd-Turn-Id`` header is the turn's id.

``GET`` with ``?turn=<turn id>`` streams that turn again from its start; without it, the conversation's
unfinished turn, or ``204 No Content`` when there is none (a page reloaded mid-answer picks it up).
Its ``threadId`` is the conversation's id and its ``runId`` the turn's. Who may post and who may follow
a turn is ``turn_stream``'s rule, the same as the ``useChat`` endpoint's (``chat.py``).

A worker that dies in the middle of an answer leaves the start of that answer in the stream. When the
new attempt starts, the stream ends the message being written (``TEXT_MESSAGE_END``) and sends a
``CUSTOM`` event named ``absurd-attempt`` (``{"attempt": n, "discardAfter": offset, "voidMessageIds":
[...]}``, see ``agui_events.py``): the client removes those messages, and the new attempt's answer
follows in messages of new ids.

Needs ``ag-ui-protocol`` (``pip install "django-absurd-agents[ag-ui]"``); without it the endpoint
answers 501 saying so.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING

from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, JsonResponse
from django.http.response import HttpResponseBase
from pydantic import ValidationError

from django_absurd_agents.exceptions import AbsurdAgentsError
from django_absurd_agents.turn_stream import requested_turn, send_turn, stream_turn

if TYPE_CHECKING:
    from ag_ui.core import RunAgentInput

MISSING = 'AG-UI needs the ag-ui-protocol package: pip install "django-absurd-agents[ag-ui]"\n'


class NotATurn(AbsurdAgentsError, ValueError):
    """A valid ``RunAgentInput`` that does not end with a user's message with text."""


async def conversation_agui(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponseBase:
    """``POST``/``GET /agents/conversations/<id>/agui``: the AG-UI protocol (see this module)."""
    if request.method not in ("GET", "POST"):
        return HttpResponseNotAllowed(["GET", "POST"])
    try:
        import ag_ui.core  # noqa: F401
        import pydantic_ai.ui.ag_ui  # noqa: F401
    except ImportError:  # ag-ui-protocol is an extra
        return HttpResponse(MISSING, status=501, content_type="text/plain")
    if request.method == "POST":
        return await post(request, conversation_id)
    return await get(request, conversation_id)


def _prompt(run_input: RunAgentInput) -> str:
    """The text of the input's last message, which must be the user's new message."""
    from ag_ui.core import TextInputContent

    for message in reversed(run_input.messages):
        if message.role in ("system", "developer"):  # context a client adds; the server's agent has its own
            continue
        if message.role != "user":
            raise NotATurn(
                f"The last message is the {message.role}'s: send the user's new message last "
                "(the conversation keeps its history on the server)."
            )
        content = message.content
        parts = [content] if isinstance(content, str) else [p.text for p in content if isinstance(p, TextInputContent)]
        if text := "".join(parts).strip():
            return text
        raise NotATurn("The last user message has no text.")
    raise NotATurn("The input has no user message: send the user's new message in messages.")


async def post(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponseBase:
    from pydantic_ai.ui.ag_ui import AGUIAdapter

    from django_absurd_agents.agui_events import TurnEventStream

    try:  # bad input is refused before any query
        run_input = AGUIAdapter.build_run_input(request.body)
        prompt = _prompt(run_input)
    except ValidationError as exc:
        detail = json.loads(exc.json(include_url=False, include_input=False))
        return JsonResponse({"error": "Not an AG-UI RunAgentInput.", "detail": detail}, status=400)
    except NotATurn as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    turn = await send_turn(request, conversation_id, prompt)
    if isinstance(turn, HttpResponseBase):
        return turn
    encoder = TurnEventStream(run_input, accept=request.headers.get("Accept"))
    return stream_turn(request, turn, encoder, None)


async def get(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponseBase:
    from django_absurd_agents.agui_events import TurnEventStream

    turn = await requested_turn(request, conversation_id)
    if isinstance(turn, HttpResponseBase):
        return turn
    encoder = TurnEventStream(
        None, accept=request.headers.get("Accept"), thread_id=str(conversation_id), run_id=str(turn.pk)
    )
    return stream_turn(request, turn, encoder, None)
