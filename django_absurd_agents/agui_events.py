"""pydantic-ai's AG-UI event stream, told about a turn's attempts: which messages a dead attempt voids.

``AGUIEventStream`` turns the turn's pydantic-ai events into AG-UI events; this subclass adds one
thing. When ``turn_stream.native_events`` says a new attempt started (``AttemptStarted``, after
ending what the dead attempt left open), the stream sends a ``CUSTOM`` event ``absurd-attempt`` with
``{"attempt", "discardAfter", "voidMessageIds"}``: the ids of the messages the dead attempt streamed
and the new one replaces, which a client removes from its message list. Those ids are the AG-UI
messages of the events being voided, known only here, where they are minted. The new attempt's
events then go to messages of new ids.

Imported only once ``ag-ui-protocol`` is known to be installed (``agui.py`` checks).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ag_ui.core import BaseEvent
from ag_ui.core import CustomEvent as AGUICustomEvent
from pydantic_ai.ui import NativeEvent
from pydantic_ai.ui.ag_ui import AGUIEventStream

from django_absurd_agents.turn_stream import AttemptStarted


@dataclass
class TurnEventStream(AGUIEventStream[Any, Any]):
    """``AGUIEventStream`` that names the messages an ``absurd-attempt`` voids."""

    _messages_by_event: list[list[str]] = field(default_factory=list)
    """For each pydantic-ai event since the last attempt, the ids of the AG-UI messages its events belong to."""

    async def handle_event(self, event: NativeEvent) -> AsyncIterator[BaseEvent]:
        if isinstance(event, AttemptStarted):
            yield self._attempt_started(event)
            return
        ids: list[str] = []
        async for agui_event in super().handle_event(event):
            ids.extend(_message_ids(agui_event))
            yield agui_event
        self._messages_by_event.append(ids)

    def _attempt_started(self, event: AttemptStarted) -> BaseEvent:
        voided = self._messages_by_event[max(0, len(self._messages_by_event) - event.voided) :] if event.voided else []
        void_ids = list(dict.fromkeys(message_id for ids in voided for message_id in ids))
        self._messages_by_event.clear()
        self.new_message_id()  # the new attempt's response must not extend a voided message
        value = {"attempt": event.attempt, "discardAfter": event.discard_after, "voidMessageIds": void_ids}
        return AGUICustomEvent(name=event.name, value=value, timestamp=int(time.time() * 1000))


def _message_ids(event: BaseEvent) -> list[str]:
    """The AG-UI messages an event writes to: its own message, or the assistant message holding its tool call."""
    found = [getattr(event, "message_id", None), getattr(event, "parent_message_id", None)]
    return [message_id for message_id in found if isinstance(message_id, str)]
