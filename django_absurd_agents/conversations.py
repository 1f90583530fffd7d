"""The worker side of conversations: chat agents, and the Absurd task that answers each turn.

Register a chat agent once, in a module the worker imports (an app's ``tasks.py``)::

    tutor = register_chat_agent(AbsurdAgent(Agent("openai:gpt-5.2", name="tutor"), absurd))

then, in a view, ``conversation.send("What is a monad?")`` (see ``conversation_models``). One Absurd
task (``absurd_agents.turn``) serves every chat agent. A turn's task:

1. waits until every earlier turn of its conversation has finished. The finishing turn emits
   ``turn-done:<its task id>``; the waiting task awaits that event durably, and every
   ``previous_turn_recheck`` seconds looks at the earlier turn's Absurd task itself, so a turn whose
   worker died on its last attempt (and so never said goodbye) is recorded as failed and skipped
   instead of blocking the conversation forever;
2. records, in the step ``load_conversation``, which stored state of the conversation it continues:
   the store's record (newest entry, usage, pending tool calls, revision). Entries never change, so
   every attempt reads the very same messages back from that record;
3. runs ``agent.run(prompt, conversation=...)``; every model and tool call is a checkpoint of its own;
4. saves the result through ``DjangoConversationStore`` in the step ``save_turn``, in one transaction
   with the turn's completion. A worker killed after that commit but before the step's checkpoint
   replays the step, finds its turn completed, and stores nothing twice.
"""

from __future__ import annotations

import inspect
import itertools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from absurd_sdk import AsyncTaskContext, CancelledTask, FailedTask, SuspendTask
from absurd_sdk import TimeoutError as AbsurdTimeout
from asgiref.sync import sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone
from pydantic import TypeAdapter
from pydantic_ai.conversation import Conversation as PydanticConversation
from pydantic_ai.conversation_store import ConversationConflict, ConversationRecord
from pydantic_ai.run import AgentRunResult
from pydantic_core import to_jsonable_python

from django_absurd_agents import conf, sdk
from django_absurd_agents.agent import AbsurdAgent
from django_absurd_agents.client import absurd, encode_json
from django_absurd_agents.conversation_entries import Entry
from django_absurd_agents.conversation_models import (
    DEFERRED_RESULTS,
    TURN_TASK,
    UNFINISHED,
    Turn,
    TurnTimeout,
    done_event,
)
from django_absurd_agents.conversation_store import DjangoConversationStore
from django_absurd_agents.exceptions import AbsurdAgentsError, CorruptHistory, StaleConversation, UnknownChatAgent

__all__ = ["TURN_TASK", "CorruptHistory", "TurnTimeout", "UnknownChatAgent", "chat_agent", "register_chat_agent"]

logger = logging.getLogger("django_absurd_agents.conversations")

RECORD: TypeAdapter[ConversationRecord] = TypeAdapter(ConversationRecord)

DepsFactory = Callable[[Turn], Any]


@dataclass(frozen=True)
class ChatAgent:
    agent: AbsurdAgent
    deps: DepsFactory | None
    previous_turn_recheck: int


_chat_agents: dict[str, ChatAgent] = {}


def register_chat_agent(
    agent: AbsurdAgent,
    *,
    deps: DepsFactory | None = None,
    previous_turn_recheck: int = 60,
) -> AbsurdAgent:
    """Make ``agent`` answer the conversations whose ``agent`` field is its name.

    Call it once per agent in a module the worker imports. The first call registers the turn task
    (``absurd_agents.turn``) on the project's ``absurd`` client.

    Args:
        agent: The durable agent; its name is what ``Conversation.agent`` holds.
        deps: Called with the ``Turn`` (its ``conversation`` loaded) in the worker to build the run's
            deps, sync or async; say, the conversation's owner.
        previous_turn_recheck: Seconds between two looks at an earlier turn that has not reported
            its end. An earlier turn normally wakes the next one at once with an event; the recheck
            only bounds how long a turn waits behind one whose worker died on its last attempt.
    """
    if not isinstance(agent, AbsurdAgent):
        raise ImproperlyConfigured(
            f"register_chat_agent() takes an AbsurdAgent, not {type(agent).__name__}: wrap the agent first, "
            '`register_chat_agent(AbsurdAgent(Agent(model, name="tutor"), absurd))`, so that its model and '
            "tool calls are checkpoints of the turn's task."
        )
    if previous_turn_recheck < 1:
        raise ImproperlyConfigured("previous_turn_recheck must be at least 1 second.")
    name = str(agent.name)
    registered = _chat_agents.get(name)
    if registered is not None and registered.agent is not agent:
        raise ImproperlyConfigured(
            f"Another chat agent is already registered as {name!r}. Conversations store the agent's name, so "
            "each chat agent needs a name of its own: `Agent(..., name='...')`."
        )
    _chat_agents[name] = ChatAgent(agent=agent, deps=deps, previous_turn_recheck=previous_turn_recheck)
    if TURN_TASK not in absurd.registry:
        absurd.register_task(name=TURN_TASK)(run_turn)
    return agent


def chat_agent(name: str) -> ChatAgent:
    try:
        return _chat_agents[name]
    except KeyError:
        known = ", ".join(sorted(_chat_agents)) or "none"
        raise UnknownChatAgent(
            f"No chat agent named {name!r} is registered in this worker (registered: {known}). Call "
            f"register_chat_agent(...) for it in a module the worker imports, such as an app's tasks.py, "
            "then restart the worker and retry the turn."
        ) from None


# The store as a turn's task uses it.


class _Checkpointed(DjangoConversationStore):
    """Reads the record the turn checkpointed instead of the current one, so every attempt of the turn
    continues the same stored state (entries never change, so the messages read back are the same)."""

    def __init__(self, record: ConversationRecord) -> None:
        super().__init__()
        self._snapshot = record

    async def read_record(self, conversation_id: str) -> ConversationRecord | None:
        return self._snapshot if conversation_id == self._snapshot.conversation_id else None


class _AlreadyStored(AbsurdAgentsError, Exception):
    """The turn was completed by an earlier execution of its save: roll this one back."""


class _TurnStore(DjangoConversationStore):
    """Stores a turn's messages linked to the turn, and completes the turn in the same transaction."""

    def __init__(self, turn: Turn, values: dict[str, Any]) -> None:
        super().__init__()
        self._turn = turn
        self._values = values

    def _entry_rows(self, record: ConversationRecord, entries: list[Any]) -> list[Entry]:
        rows = super()._entry_rows(record, entries)
        for row in rows:
            row.turn_id = self._turn.pk
        return rows

    def _stored(self, conversation_pk: Any, record: ConversationRecord, entries: list[Entry]) -> None:
        now = timezone.now()
        completed = (
            Turn.objects.using(self.using)
            .filter(pk=self._turn.pk, task_id=self._turn.task_id, state__in=UNFINISHED)
            .update(state=Turn.State.COMPLETED, error="", finished_at=now, updated_at=now, **self._values)
        )
        if not completed:
            raise _AlreadyStored


# The turn task.


def _turns() -> Any:
    return Turn.objects.using(conf.get().database_alias)


def _turn_for_task(turn_id: str, task_id: str) -> Turn | None:
    """The turn this task works for; None when the turn is gone or has been given another task."""
    return _turns().select_related("conversation").filter(pk=turn_id, task_id=task_id).first()


def _blocking_turn(turn: Turn) -> dict[str, str] | None:
    """The latest earlier turn of the conversation that is still unfinished, if any."""
    earlier = (
        _turns()
        .filter(conversation_id=turn.conversation_id, sequence__lt=turn.sequence, state__in=UNFINISHED)
        .order_by("-sequence")
    )
    for candidate in earlier:
        if not candidate.reconcile():
            return {"task_id": str(candidate.task_id), "turn_id": str(candidate.pk)}
    return None


def _start(turn: Turn) -> Any:
    """Mark the turn running; the store's record of its conversation, as JSON, for the checkpoint."""
    now = timezone.now()
    _turns().filter(pk=turn.pk, task_id=turn.task_id, state=Turn.State.PENDING).update(
        state=Turn.State.RUNNING, started_at=now, updated_at=now
    )
    record = DjangoConversationStore().read_record_sync(turn.conversation.key)
    assert record is not None  # the turn's row holds the conversation's
    return RECORD.dump_python(record, mode="json")


async def _continued(turn: Turn, checkpointed: Any) -> PydanticConversation:
    record = RECORD.validate_json(json.dumps(checkpointed))
    try:
        conversation = await _Checkpointed(record).load(record.conversation_id)
    except CorruptHistory as exc:
        raise CorruptHistory(f"{exc} (conversation {turn.conversation_id})") from None
    assert conversation is not None
    return conversation


def _is_completed_by(turn: Turn) -> bool:
    return _turns().filter(pk=turn.pk, task_id=turn.task_id, state=Turn.State.COMPLETED).exists()


async def _store_answer(turn: Turn, result: AgentRunResult[Any], values: dict[str, Any]) -> bool:
    """Save the run's conversation and complete the turn, once; whether this call stored it."""
    if await sync_to_async(_is_completed_by)(turn):  # stored by an execution killed before its checkpoint
        return False
    try:
        await _TurnStore(turn, values).save(result)
    except _AlreadyStored:
        return False
    except ConversationConflict:
        raise StaleConversation(
            f"Conversation {turn.conversation_id} was saved by something other than its turns while turn "
            f"{turn.sequence} ran, so storing this answer would overwrite that save. Nothing was stored. Retry "
            "the turn (turn.retry()) to answer on the conversation as it is now."
        ) from None
    return True


async def _wait_for_earlier_turns(ctx: AsyncTaskContext, turn: Turn, recheck: int) -> None:
    """Return once no earlier turn of the conversation is unfinished.

    Every wait has a step of its own, named by its round, and a timed-out round is recorded, so a
    replay walks the rounds already decided without waiting again and resumes at the open one.
    """
    for round_number in itertools.count(1):
        blocker = await ctx.step(f"earlier_turn:{round_number}", sync_to_async(lambda: _blocking_turn(turn)))
        if blocker is None:
            return
        timed_out = await ctx.begin_step(f"earlier_turn_timeout:{round_number}")
        if timed_out.done:
            continue
        try:
            payload = await ctx.await_event(
                done_event(blocker["task_id"]), step_name=f"earlier_turn_done:{round_number}", timeout=recheck
            )
        except AbsurdTimeout:
            payload = None
        if payload is None:
            await ctx.complete_step(timed_out, True)


async def _build_deps(entry: ChatAgent, turn: Turn) -> Any:
    if entry.deps is None:
        return None
    value = entry.deps(turn)
    if inspect.isawaitable(value):
        value = await value
    return value


async def _release_from_task(ctx: AsyncTaskContext, turn_id: str, state: str) -> None:
    await ctx.emit_event(done_event(ctx.task_id), {"turn_id": turn_id, "state": state})


def _is_last_attempt(ctx: AsyncTaskContext) -> bool:
    claimed = sdk.claimed_task(ctx)
    max_attempts = claimed.get("max_attempts")
    return max_attempts is not None and int(claimed.get("attempt") or 0) >= int(max_attempts)


def _spent(total: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """This turn's usage: a run continuing a conversation counts on from the conversation's usage."""
    return {
        name: _spent(value, before.get(name) or {})
        if isinstance(value, dict)
        else value - (before.get(name) or 0)
        if isinstance(value, int)
        else value
        for name, value in total.items()
    }


async def _answer(ctx: AsyncTaskContext, turn: Turn) -> Any:
    """Wait for the earlier turns, run the agent on the stored conversation, store the answer; its output."""
    entry = chat_agent(turn.conversation.agent)
    await _wait_for_earlier_turns(ctx, turn, entry.previous_turn_recheck)
    checkpointed = await ctx.step("load_conversation", sync_to_async(lambda: _start(turn)))
    conversation = await _continued(turn, checkpointed)
    results = turn.deferred_tool_results
    result = await entry.agent.run(
        turn.prompt or None,
        conversation=conversation,
        deferred_tool_results=None if results is None else DEFERRED_RESULTS.validate_json(json.dumps(results)),
        deps=await _build_deps(entry, turn),
    )
    values = {
        "output": json.loads(encode_json(to_jsonable_python(result.output), what="The agent's output")),
        "usage": _spent(to_jsonable_python(result.usage), to_jsonable_python(conversation.usage)),
    }
    await ctx.step("save_turn", lambda: _store_answer(turn, result, values))
    return values["output"]


async def run_turn(params: dict[str, Any], ctx: AsyncTaskContext) -> dict[str, Any]:
    """The Absurd task of one conversation turn (``absurd_agents.turn``)."""
    turn_id = str(params["turn_id"])
    turn = await sync_to_async(_turn_for_task)(turn_id, str(ctx.task_id))
    if turn is None:  # deleted, or retried under a new task: nothing to answer, nobody to hold up
        await _release_from_task(ctx, turn_id, Turn.State.CANCELLED)
        return {"turn_id": turn_id, "state": "skipped"}
    if turn.is_terminal:  # answered by an attempt killed before the task completed
        await _release_from_task(ctx, turn_id, turn.state)
        return {"turn_id": turn_id, "state": turn.state, "output": turn.output}
    try:
        output = await _answer(ctx, turn)
    except (SuspendTask, FailedTask):
        raise
    except CancelledTask:
        await sync_to_async(turn.finish)(Turn.State.CANCELLED, "Its Absurd task was cancelled.")
        await _release_from_task(ctx, turn_id, Turn.State.CANCELLED)
        raise
    except Exception as exc:
        if _is_last_attempt(ctx):
            await sync_to_async(turn.finish)(Turn.State.FAILED, f"{type(exc).__name__}: {exc}")
            await _release_from_task(ctx, turn_id, Turn.State.FAILED)
        raise
    await _release_from_task(ctx, turn_id, Turn.State.COMPLETED)
    return {"turn_id": turn_id, "state": Turn.State.COMPLETED, "output": output}
