"""A conversation turn streamed to a chat front end: what the chat protocols' endpoints share.

``chat.py`` (the Vercel AI SDK's ``useChat``) and ``agui.py`` (AG-UI) differ only in how they read a
request and how they encode events. The rest is here, once: who may post to a conversation, which turn
a ``GET`` asks for and who may follow it (the event log's one rule, ``event_access``), and the turn's
pydantic-ai events read live from its task's event log, which a protocol's ``UIEventStream`` encodes.

A worker that dies in the middle of an answer leaves the start of that answer in the log. When the
new attempt starts, ``native_events`` ends the parts the dead attempt left open (a client sees them
finish, not hang) and yields an ``AttemptStarted`` custom event, which each protocol encodes its own
way (``data-absurd-attempt`` for ``useChat``, a ``CUSTOM`` event ``absurd-attempt`` for AG-UI).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.response import HttpResponseBase
from pydantic_ai.messages import CustomEvent, PartDeltaEvent, PartEndEvent, PartStartEvent, TextPart
from pydantic_ai.ui import UIEventStream

from django_absurd_agents.conversation_entries import database_alias
from django_absurd_agents.event_access import may_read_any, may_read_events
from django_absurd_agents.event_log import ATTEMPT
from django_absurd_agents.event_stream import END, follow
from django_absurd_agents.exceptions import TurnFailed
from django_absurd_agents.sse import streaming


@dataclass(kw_only=True)
class AttemptStarted(CustomEvent, name="absurd-attempt"):
    """A new attempt of the turn's task started: what was streamed since ``discard_after`` is void."""

    attempt: int
    discard_after: int
    voided: int = 0
    """How many events this stream yielded that the new attempt voids (the dead attempt's ends included)."""

    def to_payload(self) -> Any:
        return {"attempt": self.attempt, "discardAfter": self.discard_after}


async def own_conversation(request: HttpRequest, conversation_id: uuid.UUID) -> Any:
    """The conversation if the request's user is its active owner, else None."""
    from django_absurd_agents.models import Conversation

    user = await request.auser()
    if not user.is_authenticated or not user.is_active:
        return None
    return await Conversation.objects.using(database_alias()).filter(pk=conversation_id, owner=user).afirst()


def forbidden() -> HttpResponse:
    return HttpResponse("You may not read this conversation.", status=403, content_type="text/plain")


async def send_turn(request: HttpRequest, conversation_id: uuid.UUID, prompt: str) -> Any:
    """The conversation's next turn, created with its durable task in one transaction; 403 unless the owner posts."""
    conversation = await own_conversation(request, conversation_id)
    if conversation is None:
        return forbidden()
    return await conversation.asend(prompt)


async def requested_turn(request: HttpRequest, conversation_id: uuid.UUID) -> Any:
    """The turn a ``GET`` asks for (``?turn=``, or the unfinished one), or the response refusing it.

    Only the owner learns whether a turn exists or which one is unfinished; whoever follows a turn,
    the owner included, passes the event log's rule on its task, decided before the task or its log is
    read. A request the rule refuses every log is refused before the turn is looked up.
    """
    from django_absurd_agents.models import Turn

    if not await may_read_any(request):
        return forbidden()
    raw_turn = request.GET.get("turn")
    try:
        turn_id = uuid.UUID(raw_turn) if raw_turn else None
    except ValueError:
        return JsonResponse({"error": "?turn= takes a turn id."}, status=400)
    turns = Turn.objects.using(database_alias()).filter(conversation_id=conversation_id)
    if turn_id is not None:
        turn = await turns.filter(pk=turn_id).afirst()
        if turn is None:
            if await own_conversation(request, conversation_id) is None:
                return forbidden()
            return JsonResponse({"error": "No such turn in this conversation."}, status=404)
    else:
        if await own_conversation(request, conversation_id) is None:
            return forbidden()
        turn = await turns.filter(state__in=["pending", "running"]).order_by("sequence").afirst()
        if turn is None:
            return HttpResponse(status=204)
    if not await may_read_events(request, str(turn.task_id)):
        return forbidden()
    return turn


def stream_turn(
    request: HttpRequest, turn: Any, encoder: UIEventStream[Any, Any, Any, Any], after: int | None
) -> HttpResponseBase:
    """The turn's events from its log (after offset ``after``), live, as ``encoder``'s protocol streams them."""

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


class _Streamed:
    """What a stream yielded since the last attempt marker: the parts still open, the offsets of its events."""

    def __init__(self) -> None:
        self.open_parts: dict[int, Any] = {}
        self.offsets: list[int] = []

    def record(self, event: Any, offset: int) -> None:
        self.offsets.append(offset)
        if isinstance(event, PartStartEvent):
            self.open_parts[event.index] = event.part
        elif isinstance(event, PartDeltaEvent) and event.index in self.open_parts:
            with contextlib.suppress(Exception):  # only used to close it, should the attempt die
                self.open_parts[event.index] = event.delta.apply(self.open_parts[event.index])  # type: ignore[arg-type]
        elif isinstance(event, PartEndEvent):
            self.open_parts.pop(event.index, None)

    def void(self, attempt: int, discard_after: int) -> list[Any]:
        """The ends of the parts a dead attempt left streaming, then the marker saying how many events it voids."""
        closing: list[Any] = [PartEndEvent(index=index, part=part) for index, part in sorted(self.open_parts.items())]
        voided = sum(1 for offset in self.offsets if offset > discard_after) + len(closing)
        self.open_parts.clear()
        self.offsets.clear()
        return [*closing, AttemptStarted(attempt=attempt, discard_after=discard_after, voided=voided)]


async def native_events(task_id: str, after: int | None, turn: Any) -> AsyncIterator[Any]:
    """The turn's pydantic-ai events from the log; a failed turn raises ``TurnFailed`` at the end.

    ``follow`` already leaves out what a superseded attempt wrote after a newer attempt's marker.
    """
    streamed = _Streamed()
    answered = False
    async for entry in follow(task_id, after):
        if entry is None:
            continue
        if entry.kind == ATTEMPT:
            for event in streamed.void(int(entry.data["attempt"]), int(entry.data["discard_after"])):
                yield event
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
            streamed.record(event, entry.offset)
            answered = answered or entry.kind == "agent_run_result"
            yield event


async def _stored_answer(turn: Any) -> AsyncIterator[Any]:
    await turn.arefresh_from_db(using=database_alias())
    output = turn.output
    text = output if isinstance(output, str) else json.dumps(output)
    part = TextPart(content=text)
    yield PartStartEvent(index=0, part=part)
    yield PartEndEvent(index=0, part=part)
