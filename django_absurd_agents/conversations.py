"""Conversations: chat histories kept in Django models, each turn one durable Absurd task.

Register a chat agent once, in a module the worker imports (an app's ``tasks.py``)::

    tutor = register_chat_agent(AbsurdAgent(Agent("openai:gpt-5.2", name="tutor"), absurd))

then, anywhere::

    conversation = Conversation.objects.create(agent="tutor", owner=request.user)
    turn = conversation.send("What is a monad?")      # inside the request's transaction
    turn.wait(timeout=60).output                       # from a script; views poll or push instead

One Absurd task (``absurd_agents.turn``) serves every chat agent. A turn's task:

1. waits until every earlier turn of its conversation has finished. The finishing turn emits
   ``turn-done:<its task id>``; the waiting task awaits that event durably, and every
   ``previous_turn_recheck`` seconds looks at the earlier turn's Absurd task itself, so a turn whose
   worker died on its last attempt (and so never said goodbye) is recorded as failed and skipped
   instead of blocking the conversation forever;
2. loads the messages of the earlier *completed* turns inside the step ``load_history``, so a replay
   of the task sees the very list the first attempt saw;
3. runs the agent; every model and tool call is a checkpoint of its own (``AbsurdDurability``);
4. writes the turn's new messages, output and usage back in the step ``save_turn`` with an update
   guarded on the task id and on the turn not being finished yet, so a worker killed anywhere
   around it leaves exactly one stored answer.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from absurd_sdk import AsyncTaskContext, CancelledTask, FailedTask, SuspendTask
from absurd_sdk import TimeoutError as AbsurdTimeout
from asgiref.sync import sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, transaction
from django.db.models import Max
from django.utils import timezone
from pydantic import ValidationError
from pydantic_ai.messages import ModelMessage, ModelMessagesTypeAdapter
from pydantic_core import to_jsonable_python

from django_absurd_agents import conf, sdk
from django_absurd_agents.agent import AbsurdAgent
from django_absurd_agents.client import absurd, encode_json
from django_absurd_agents.models import Conversation, Turn

logger = logging.getLogger("django_absurd_agents.conversations")

TURN_TASK = "absurd_agents.turn"
"""The Absurd task name of every conversation turn; route it with ``TASK_ROUTES``."""

UNFINISHED = (Turn.State.PENDING, Turn.State.RUNNING)

DepsFactory = Callable[[Turn], Any]


class TurnTimeout(TimeoutError):
    """A turn did not finish within the time a caller was willing to wait."""


class UnknownChatAgent(LookupError):
    """A turn names a chat agent this worker has not registered."""


class CorruptHistory(ValueError):
    """The stored messages of an earlier turn do not load as Pydantic AI messages."""


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
    if TURN_TASK not in sdk.registry(absurd):
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


# --- sending and reading (web side, sync on Django's connection) -----------------------------


def _alias() -> str:
    return conf.get().database_alias


def send(conversation: Conversation, prompt: str) -> Turn:
    """Create the next turn of ``conversation`` and spawn its task, atomically.

    The conversation row is locked while the sequence number is chosen, so two concurrent sends get
    consecutive numbers instead of a unique-constraint error. Inside the caller's ``atomic()`` block
    the turn and its task commit or roll back with the caller's data.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("A turn's prompt must be a non-empty string.")
    if conversation.pk is None or conversation._state.adding:
        raise ValueError("Save the conversation before sending to it: Conversation.objects.create(agent=...).")
    alias = _alias()
    with transaction.atomic(using=alias):
        locked = Conversation.objects.using(alias).select_for_update().get(pk=conversation.pk)
        last = Turn.objects.using(alias).filter(conversation=locked).aggregate(last=Max("sequence"))["last"]
        turn_id = uuid.uuid4()
        queue = absurd.resolve_queue(TURN_TASK)
        spawned = absurd.spawn_sync(TURN_TASK, {"turn_id": str(turn_id)}, idempotency_key=str(turn_id))
        turn = Turn.objects.using(alias).create(
            id=turn_id,
            conversation=locked,
            sequence=(last or 0) + 1,
            prompt=prompt,
            queue=queue,
            task_id=spawned["task_id"],
        )
        now = timezone.now()
        Conversation.objects.using(alias).filter(pk=locked.pk).update(updated_at=now)
        conversation.updated_at = now
    turn.conversation = conversation
    return turn


async def asend(conversation: Conversation, prompt: str) -> Turn:
    return await sync_to_async(send)(conversation, prompt)


def load_messages(value: list[Any]) -> list[ModelMessage]:
    """Pydantic AI messages from their stored JSON form (bytes, timestamps and all)."""
    if not value:
        return []
    return ModelMessagesTypeAdapter.validate_json(json.dumps(value))


def _completed_messages(conversation_id: Any, before: int | None = None) -> list[Any]:
    turns = Turn.objects.using(_alias()).filter(conversation_id=conversation_id, state=Turn.State.COMPLETED)
    if before is not None:
        turns = turns.filter(sequence__lt=before)
    stored = turns.order_by("sequence").values_list("new_messages", flat=True)
    return [message for messages in stored for message in (messages or [])]


def history(conversation: Conversation) -> list[ModelMessage]:
    return load_messages(_completed_messages(conversation.pk))


async def ahistory(conversation: Conversation) -> list[ModelMessage]:
    return await sync_to_async(history)(conversation)


# --- waiting, retrying, cancelling -----------------------------------------------------------


def _poll_delays() -> itertools.chain[float]:
    return itertools.chain((0.02, 0.05, 0.1, 0.2, 0.5), itertools.repeat(1.0))


def _timeout_error(turn: Turn, timeout: float) -> TurnTimeout:
    return TurnTimeout(
        f"Turn {turn.sequence} of conversation {turn.conversation_id} is still {turn.state} after {timeout} s. "
        "Is a worker running for its queue? Start one with `python manage.py absurd_worker`, or wait longer."
    )


def wait_for_turn(turn: Turn, timeout: float) -> Turn:
    deadline = time.monotonic() + timeout
    for delay in _poll_delays():
        turn.refresh_from_db(using=_alias())
        if turn.is_terminal or reconcile_turn(turn):
            return turn
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timeout_error(turn, timeout)
        time.sleep(min(delay, remaining))
    raise AssertionError("unreachable")


async def await_turn(turn: Turn, timeout: float) -> Turn:
    deadline = time.monotonic() + timeout
    for delay in _poll_delays():
        await turn.arefresh_from_db(using=_alias())
        if turn.is_terminal or await sync_to_async(reconcile_turn)(turn):
            return turn
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timeout_error(turn, timeout)
        await asyncio.sleep(min(delay, remaining))
    raise AssertionError("unreachable")


def _done_event(task_id: Any) -> str:
    return f"turn-done:{task_id}"


def _release(turn: Turn, state: str) -> None:
    """Emit the turn's ``turn-done`` event, waking a turn queued behind it (first emit wins)."""
    absurd.emit_event_sync(_done_event(turn.task_id), {"turn_id": str(turn.pk), "state": state}, queue_name=turn.queue)


def _finish(turn: Turn, state: str, error: str) -> bool:
    """Record an end on an unfinished turn of the same task; whether it was recorded."""
    now = timezone.now()
    changed = (
        Turn.objects.using(_alias())
        .filter(pk=turn.pk, task_id=turn.task_id, state__in=UNFINISHED)
        .update(state=state, error=error, finished_at=now, updated_at=now)
    )
    if changed:
        turn.state, turn.error, turn.finished_at, turn.updated_at = state, error, now, now
    return bool(changed)


def _failure_text(failure: Any) -> str:
    if isinstance(failure, dict):
        name, message = failure.get("name"), failure.get("message")
        if name or message:
            return f"{name}: {message}" if name and message else str(name or message)
    return json.dumps(failure) if failure is not None else "unknown error"


def reconcile_turn(turn: Turn) -> bool:
    """If the turn's task ended without recording it (its worker died on the last attempt, or the task
    was cancelled from the admin), record that end now and release the turns behind it.

    Returns whether the turn is finished afterwards.
    """
    if turn.is_terminal:
        return True
    snapshot = absurd.fetch_task_result_sync(turn.task_id, queue_name=turn.queue)
    if snapshot is None:
        state, error = Turn.State.FAILED, f"Its Absurd task {turn.task_id} no longer exists in queue {turn.queue!r}."
    elif snapshot.state == "failed":
        state, error = Turn.State.FAILED, _failure_text(snapshot.failure)
    elif snapshot.state == "cancelled":
        state, error = Turn.State.CANCELLED, "Its Absurd task was cancelled."
    elif snapshot.state == "completed":
        # The task writes the answer back before it completes; a completed task without one skipped the turn.
        turn.refresh_from_db(using=_alias())
        if turn.is_terminal:
            return True
        state, error = Turn.State.FAILED, "Its Absurd task completed without writing the answer back."
    else:
        return False
    if _finish(turn, state, error):
        _release(turn, state)
    else:
        turn.refresh_from_db(using=_alias())
    return turn.is_terminal


def retry_turn(turn: Turn) -> Turn:
    """Spawn a new task for a failed or cancelled turn; it runs with the completed turns before it."""
    alias = _alias()
    with transaction.atomic(using=alias):
        locked = Turn.objects.using(alias).select_for_update().get(pk=turn.pk)
        if locked.state not in (Turn.State.FAILED, Turn.State.CANCELLED):
            raise ValueError(
                f"Turn {locked.sequence} is {locked.state}: only a failed or cancelled turn can be retried."
            )
        queue = absurd.resolve_queue(TURN_TASK)
        spawned = absurd.spawn_sync(
            TURN_TASK, {"turn_id": str(locked.pk)}, idempotency_key=f"{locked.pk}:after:{locked.task_id}"
        )
        values: dict[str, Any] = {
            "state": Turn.State.PENDING,
            "queue": queue,
            "task_id": spawned["task_id"],
            "new_messages": None,
            "output": None,
            "usage": None,
            "error": "",
            "started_at": None,
            "finished_at": None,
            "updated_at": timezone.now(),
        }
        Turn.objects.using(alias).filter(pk=locked.pk).update(**values)
    for field, value in values.items():
        setattr(turn, field, value)
    turn.task_id = uuid.UUID(str(spawned["task_id"]))
    return turn


def cancel_turn(turn: Turn) -> Turn:
    """Cancel an unfinished turn's task and release the turns behind it."""
    alias = _alias()
    with transaction.atomic(using=alias):
        locked = Turn.objects.using(alias).select_for_update().get(pk=turn.pk)
        if locked.is_terminal:
            raise ValueError(f"Turn {locked.sequence} is already {locked.state}.")
        _cancel_task(locked)
        _finish(locked, Turn.State.CANCELLED, "Cancelled.")
        _release(locked, Turn.State.CANCELLED)
    turn.refresh_from_db(using=alias)
    return turn


def _cancel_task(turn: Turn) -> None:
    snapshot = absurd.fetch_task_result_sync(turn.task_id, queue_name=turn.queue)
    if snapshot is not None and snapshot.state not in ("completed", "failed", "cancelled"):
        absurd.cancel_task_sync(turn.task_id, queue_name=turn.queue)


def abandon_turn(turn: Turn) -> None:
    """Cancel the task of a turn being deleted and release the turns behind it.

    Runs inside the delete's transaction, in a savepoint: a missing queue or task must not make the
    delete fail, since the rows are going away either way.
    """
    try:
        with transaction.atomic(using=_alias()):
            _cancel_task(turn)
            _release(turn, Turn.State.CANCELLED)
    except DatabaseError:
        logger.warning("Could not cancel the task %s of deleted turn %s", turn.task_id, turn.pk, exc_info=True)


# --- the turn task (worker side) -------------------------------------------------------------


def _turn_for_task(turn_id: str, task_id: str) -> Turn | None:
    """The turn this task works for; None when the turn is gone or has been given another task."""
    return Turn.objects.using(_alias()).select_related("conversation").filter(pk=turn_id, task_id=task_id).first()


def _blocking_turn(turn: Turn) -> dict[str, str] | None:
    """The latest earlier turn of the conversation that is still unfinished, if any."""
    earlier = (
        Turn.objects.using(_alias())
        .filter(conversation_id=turn.conversation_id, sequence__lt=turn.sequence, state__in=UNFINISHED)
        .order_by("-sequence")
    )
    for candidate in earlier:
        if not reconcile_turn(candidate):
            return {"task_id": str(candidate.task_id), "turn_id": str(candidate.pk)}
    return None


def _start(turn: Turn) -> list[Any]:
    """Mark the turn running and return the stored messages of the completed turns before it."""
    now = timezone.now()
    Turn.objects.using(_alias()).filter(pk=turn.pk, task_id=turn.task_id, state=Turn.State.PENDING).update(
        state=Turn.State.RUNNING, started_at=now, updated_at=now
    )
    return _completed_messages(turn.conversation_id, before=turn.sequence)


def _save(turn: Turn, values: dict[str, Any]) -> bool:
    """Write the answer back, once: a second call for the same task finds the turn finished."""
    now = timezone.now()
    saved = (
        Turn.objects.using(_alias())
        .filter(pk=turn.pk, task_id=turn.task_id, state__in=UNFINISHED)
        .update(state=Turn.State.COMPLETED, error="", finished_at=now, updated_at=now, **values)
    )
    if saved:
        Conversation.objects.using(_alias()).filter(pk=turn.conversation_id).update(updated_at=now)
    return bool(saved)


def _is_last_attempt(ctx: AsyncTaskContext) -> bool:
    claimed = sdk.claimed_task(ctx)
    max_attempts = claimed.get("max_attempts")
    return max_attempts is not None and int(claimed.get("attempt") or 0) >= int(max_attempts)


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
                _done_event(blocker["task_id"]), step_name=f"earlier_turn_done:{round_number}", timeout=recheck
            )
        except AbsurdTimeout:
            payload = None
        if payload is None:
            await ctx.complete_step(timed_out, True)


async def _loaded_history(turn: Turn, stored: list[Any]) -> list[ModelMessage]:
    try:
        return load_messages(stored)
    except ValidationError as exc:
        raise CorruptHistory(await sync_to_async(_corrupt_history_message)(turn, exc)) from None


def _corrupt_history_message(turn: Turn, exc: ValidationError) -> str:
    """Which earlier turns hold messages that do not load, and what to do about it."""
    earlier = (
        Turn.objects.using(_alias())
        .filter(conversation_id=turn.conversation_id, state=Turn.State.COMPLETED, sequence__lt=turn.sequence)
        .order_by("sequence")
        .values_list("sequence", "new_messages")
    )
    bad: list[str] = []
    for sequence, messages in earlier:
        try:
            load_messages(messages or [])
        except (ValidationError, TypeError):
            bad.append(str(sequence))
    which = f"turn {', '.join(bad)}" if bad else "an earlier turn"
    return (
        f"The stored messages of {which} of conversation {turn.conversation_id} do not load as Pydantic AI "
        f"messages ({exc.errors()[0]['msg']}). They were edited by hand or written by an incompatible pydantic-ai "
        "version: repair or delete that turn, then retry this one (retry_turn() or the admin's Retry)."
    )


async def _build_deps(entry: ChatAgent, turn: Turn) -> Any:
    if entry.deps is None:
        return None
    value = entry.deps(turn)
    if inspect.isawaitable(value):
        value = await value
    return value


async def _release_from_task(ctx: AsyncTaskContext, turn_id: str, state: str) -> None:
    await ctx.emit_event(_done_event(ctx.task_id), {"turn_id": turn_id, "state": state})


async def run_turn(params: dict[str, Any], ctx: AsyncTaskContext) -> dict[str, Any]:
    """The Absurd task of one conversation turn (``absurd_agents.turn``)."""
    turn_id = str(params["turn_id"])
    task_id = str(ctx.task_id)
    turn = await sync_to_async(_turn_for_task)(turn_id, task_id)
    if turn is None:  # deleted, or retried under a new task: nothing to answer, nobody to hold up
        await _release_from_task(ctx, turn_id, Turn.State.CANCELLED)
        return {"turn_id": turn_id, "state": "skipped"}
    if turn.is_terminal:  # answered by an attempt killed before the task completed
        await _release_from_task(ctx, turn_id, turn.state)
        return {"turn_id": turn_id, "state": turn.state, "output": turn.output}
    try:
        entry = chat_agent(turn.conversation.agent)
        await _wait_for_earlier_turns(ctx, turn, entry.previous_turn_recheck)
        stored_history = await ctx.step("load_history", sync_to_async(lambda: _start(turn)))
        result = await entry.agent.run(
            turn.prompt,
            message_history=await _loaded_history(turn, stored_history) or None,
            conversation_id=str(turn.conversation_id),
            deps=await _build_deps(entry, turn),
        )
        values = {
            "new_messages": json.loads(result.new_messages_json()),
            "output": json.loads(encode_json(to_jsonable_python(result.output), what="The agent's output")),
            "usage": to_jsonable_python(result.usage),
        }
        await ctx.step("save_turn", sync_to_async(lambda: _save(turn, values)))
    except (SuspendTask, FailedTask):
        raise
    except CancelledTask:
        await sync_to_async(_finish)(turn, Turn.State.CANCELLED, "Its Absurd task was cancelled.")
        await _release_from_task(ctx, turn_id, Turn.State.CANCELLED)
        raise
    except Exception as exc:
        if _is_last_attempt(ctx):
            await sync_to_async(_finish)(turn, Turn.State.FAILED, f"{type(exc).__name__}: {exc}")
            await _release_from_task(ctx, turn_id, Turn.State.FAILED)
        raise
    await _release_from_task(ctx, turn_id, Turn.State.COMPLETED)
    return {"turn_id": turn_id, "state": Turn.State.COMPLETED, "output": values["output"]}
