"""The event log of a task's agent runs, written by the worker as the runs happen.

An agent built with ``AbsurdAgent(..., event_log=True)`` (or ``AbsurdDurability(event_log=True)``)
appends every event of its runs inside a task to the ``AgentEvent`` table: the model's part
start/delta/end and final-result events while the model streams (from inside the model request's
step), tool calls and results, and the run's result. Each write is one multi-row ``INSERT`` that
also sends a ``NOTIFY``, so readers (``event_stream.py``) wake up at once. Events are buffered and
written ``BATCH_INTERVAL`` seconds after the first of them, so a token stream costs a few commits a
second, not one per token (consecutive text deltas of one part are written as one); whatever is
buffered when a step ends is written by the statement that writes the step's checkpoint.

What a reader assembles has each step's events exactly once, whatever the crashes:

* A model step's events carry the step's checkpoint name and are committed no later than the
  step's checkpoint (the last of them in the same statement), so a completed step always has all
  of its events in the log.
* A replay does not run completed steps, so their events are never written again. Events produced
  outside steps (tool calls and results, the run's result) are produced again by a replay; each
  has a ``position`` (its place in the task's execution, the same on every attempt) and a unique
  index on it drops the copies. (The others' position is unique to the execution that wrote them:
  a statement sent again after a reconnect writes nothing twice.)
* When a new attempt starts, the events of steps that an earlier attempt did not complete (the
  model answer that was streaming when the worker died) are void: the attempt writes an
  ``attempt`` marker ``{"attempt": n, "discard_after": offset}``, and readers drop the entries
  between ``discard_after`` and the marker. The step runs again and writes its events anew.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from absurd_sdk import AsyncTaskContext, StepHandle, get_current_context
from psycopg import sql
from pydantic import TypeAdapter
from pydantic_ai.agent import EventStreamHandler
from pydantic_ai.messages import (
    AgentStreamEvent,
    FinalResultEvent,
    PartDeltaEvent,
    PartEndEvent,
    PartStartEvent,
    TextPartDelta,
    ThinkingPartDelta,
)
from pydantic_ai.run import AgentRunResult, AgentRunResultEvent
from pydantic_ai.tools import RunContext

from django_absurd_agents import sdk

logger = logging.getLogger("django_absurd_agents.event_log")

CHANNEL = "absurd_agents_events"
"""The ``LISTEN``/``NOTIFY`` channel; a notification's payload is the task id."""

BATCH_INTERVAL = 0.1
"""Seconds an event waits in the buffer at most before it is written (Temporal's batch interval)."""

ATTEMPT = "attempt"
"""Kind of the marker written when an attempt (or a re-run of one) starts to log."""

MODEL_EVENT_TYPES = (PartStartEvent, PartDeltaEvent, PartEndEvent, FinalResultEvent)
"""Events of the model's response stream: logged from inside the model step, skipped on its replay."""

EVENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(AgentStreamEvent)
RESULT_ADAPTER: TypeAdapter[AgentRunResultEvent[Any]] = TypeAdapter(AgentRunResultEvent[Any])

_current_step: contextvars.ContextVar[str | None] = contextvars.ContextVar("absurd_agents_log_step", default=None)
_writers: weakref.WeakKeyDictionary[AsyncTaskContext, EventLogWriter] = weakref.WeakKeyDictionary()


@contextmanager
def in_step(checkpoint_name: str) -> Iterator[None]:
    """Mark the code inside as the body of the step ``checkpoint_name`` (``AbsurdOperationBackend``)."""
    token = _current_step.set(checkpoint_name)
    try:
        yield
    finally:
        _current_step.reset(token)


def table() -> str:
    from django_absurd_agents.models import AgentEvent

    return AgentEvent._meta.db_table


@functools.cache
def _statement(template: str) -> sql.Composed:
    """A write statement on the log's table, composed once per process, not once per batch of events."""
    return sql.SQL(template).format(table=sql.Identifier(table()))


def encode(event: Any) -> str:
    """The JSON text of a pydantic-ai event; a result event carries only the run's new messages."""
    if isinstance(event, AgentRunResultEvent):
        data = RESULT_ADAPTER.dump_python(event, mode="json")
        result = data["result"]
        result["messages"] = result["messages"][result.get("new_message_index") or 0 :]
        result["new_message_index"] = 0
    else:
        data = EVENT_ADAPTER.dump_python(event, mode="json")
    return storable(json.dumps(data, ensure_ascii=False))


def storable(text: str) -> str:
    """``text`` with what Postgres's ``jsonb`` refuses replaced by U+FFFD.

    A NUL character or a lone surrogate in a model's text makes the step itself fail (its checkpoint
    cannot hold it, and the error names the step); the log, a display channel, must not fail first.
    """
    if "\\u0000" in text:
        text = text.replace("\\u0000", "\ufffd")
    return text.encode("utf-8", "replace").decode("utf-8")


@dataclass
class _Entry:
    kind: str
    event: Any  # a pydantic-ai event, or the dict of a marker
    step: str | None = None
    position: str | None = None
    more: list[str] | None = None
    """Content deltas merged into this one (a text or thinking delta), joined when it is written."""

    def payload(self) -> str:
        if isinstance(self.event, dict):
            return json.dumps(self.event)
        event = self.event
        if self.more:
            delta = event.delta
            event = replace(event, delta=replace(delta, content_delta=delta.content_delta + "".join(self.more)))
        return encode(event)


def _mergeable(event: Any) -> bool:
    """A plain text or thinking delta: consecutive ones of the same part are written as one."""
    if not isinstance(event, PartDeltaEvent):
        return False
    delta = event.delta
    if isinstance(delta, TextPartDelta):
        return delta.citations_delta is None and delta.provider_details is None
    if isinstance(delta, ThinkingPartDelta):
        return delta.content_delta is not None and delta.signature_delta is None and delta.provider_details is None
    return False


def _merge(previous: _Entry, entry: _Entry) -> bool:
    """Fold ``entry`` into ``previous`` when both are plain deltas of the same part; whether it was."""
    a, b = previous.event, entry.event
    if previous.step != entry.step or not (_mergeable(a) and _mergeable(b)):
        return False
    if a.index != b.index or type(a.delta) is not type(b.delta) or a.delta.provider_name != b.delta.provider_name:
        return False
    if previous.more is None:
        previous.more = []
    previous.more.append(b.delta.content_delta)
    return True


_INSERT = """
with written as (
    insert into {table} (task_id, attempt, kind, step, position, payload, created)
    select %(task)s, %(attempt)s, entry.kind, entry.step, entry.position, entry.payload::jsonb, clock_timestamp()
    from unnest(%(kinds)s::text[], %(steps)s::text[], %(positions)s::text[], %(payloads)s::text[]) with ordinality
        as entry(kind, step, position, payload, n)
    order by entry.n
    on conflict (task_id, position) where position is not null do nothing
    returning 1
), notified as (
    select pg_notify(%(channel)s, %(task)s::text) from (select 1 from written limit 1) as any_written
)
"""
_WRITE = _INSERT + "select count(*) from notified"
_WRITE_WITH_CHECKPOINT = (
    _INSERT
    + "select absurd.set_task_checkpoint_state(%(queue)s, %(task)s, %(checkpoint)s, %(state)s, %(run)s, %(claim)s), "
    "(select count(*) from notified)"
)


class EventLogWriter:
    """The log of one execution of one task: buffers events, writes them in order, in batches."""

    def __init__(self, ctx: AsyncTaskContext, interval: float = BATCH_INTERVAL) -> None:
        self.ctx = ctx
        self.task_id = str(ctx.task_id)
        self.attempt = int(sdk.claimed_task(ctx).get("attempt") or 1)
        self.interval = interval
        self._entries: list[_Entry] = []
        self._lock = asyncio.Lock()
        self._timer: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._positions = itertools.count(1)
        self._execution = uuid.uuid4().hex[:12]
        self._rows = itertools.count(1)
        self._started = False

    async def start(self) -> None:
        """Once per execution: write an ``attempt`` marker if this execution follows one that logged."""
        if self._started:
            return
        self._started = True
        recorded = sdk.recorded_checkpoints(self.ctx)
        if self.attempt == 1 and not recorded:
            return  # the task's first execution: nothing can be in its log yet
        conn = sdk.task_connection(self.ctx)
        statement = sql.SQL(
            'select max(attempt), max("offset"), max("offset") filter (where kind = %s) from {} where task_id = %s'
        ).format(sql.Identifier(table()))
        cursor = await conn.execute(statement, (ATTEMPT, self.task_id))
        logged_attempt, last_offset, last_marker = await cursor.fetchone()
        statement = sql.SQL(
            'select step, min("offset") from {} where task_id = %s and "offset" > %s and step is not null group by step'
        ).format(sql.Identifier(table()))
        cursor = await conn.execute(statement, (self.task_id, last_marker or 0))
        unfinished = [offset for step, offset in await cursor.fetchall() if step not in recorded]
        new_attempt = self.attempt > 1 and self.attempt > (logged_attempt or 0)
        if not (new_attempt or unfinished):
            return
        discard_after = min(unfinished) - 1 if unfinished else (last_offset or 0)
        marker = {"attempt": self.attempt, "discard_after": discard_after}
        async with self._lock:
            await self._write([_Entry(ATTEMPT, marker, position=f"{self._execution}:0")])

    def add(self, event: Any, *, step: str | None = None, positioned: bool = False) -> None:
        """Buffer ``event``; it is written within ``interval`` seconds (or at the next ``flush``)."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        kind = str(getattr(event, "event_kind", "event"))
        # Events produced outside steps are produced again by a replay, at the same place: their position
        # is that place, so the copy is dropped. The others' is unique to this execution, so a statement
        # sent again after a reconnect does not write them twice either.
        position = f"w{next(self._positions)}" if positioned else f"{self._execution}:{next(self._rows)}"
        entry = _Entry(kind, event, step, position)
        if not (self._entries and _merge(self._entries[-1], entry)):
            self._entries.append(entry)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.interval)
        self._timer = None  # from here on the flush is no longer cancelled by an explicit one
        try:
            await self._flush_buffer()
        except Exception as exc:  # raised again by the next add() or flush() of the task's own code
            self._error = exc

    async def flush(self) -> None:
        """Write everything buffered so far (and raise what a background write raised)."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        await self._flush_buffer()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    async def _flush_buffer(self) -> None:
        async with self._lock:
            entries, self._entries = self._entries, []
            if entries:
                await self._write(entries)

    def _params(self, entries: list[_Entry]) -> dict[str, Any]:
        return {
            "task": self.task_id,
            "attempt": self.attempt,
            "kinds": [entry.kind for entry in entries],
            "steps": [entry.step for entry in entries],
            "positions": [entry.position for entry in entries],
            "payloads": [entry.payload() for entry in entries],
            "channel": CHANNEL,
        }

    async def _write(self, entries: list[_Entry]) -> None:
        statement = _statement(_WRITE)
        started = time.monotonic()
        await sdk.task_connection(self.ctx).execute(statement, self._params(entries))
        elapsed = (time.monotonic() - started) * 1e3
        logger.debug("task %s: %d event(s) logged in %.1f ms", self.task_id, len(entries), elapsed)

    async def complete_step(self, handle: StepHandle, value: Any) -> bool:
        """Write the step's checkpoint and the buffered events in one statement; False when nothing is buffered.

        Its events are then committed with the checkpoint, never after it, at the cost of one statement.
        """
        async with self._lock:
            if not self._entries or self._error is not None:
                return False
            entries, self._entries = self._entries, []
            timer, self._timer = self._timer, None
            if timer is not None:  # nothing left to wait for: the next event starts a new batch
                timer.cancel()
            ctx = self.ctx
            params = {
                **self._params(entries),
                "queue": sdk.queue_name(ctx),
                "checkpoint": handle.checkpoint_name,
                "state": json.dumps(value),
                "run": sdk.claimed_task(ctx)["run_id"],
                "claim": sdk.claim_timeout(ctx),
            }
            statement = _statement(_WRITE_WITH_CHECKPOINT)
            with sdk.task_state_errors():
                await sdk.task_connection(ctx).execute(statement, params)
        sdk.recorded_checkpoints(ctx)[handle.checkpoint_name] = value
        return True


async def complete_step(ctx: AsyncTaskContext, handle: StepHandle, value: Any) -> bool:
    """Complete the step with the events buffered so far, in one statement; False when there are none."""
    writer = _writers.get(ctx)
    return writer is not None and await writer.complete_step(handle, value)


def writer_for(ctx: AsyncTaskContext) -> EventLogWriter:
    """The log writer of the execution ``ctx`` (one per execution, shared by its agent runs)."""
    writer = _writers.get(ctx)
    if writer is None:
        writer = _writers[ctx] = EventLogWriter(ctx)
    return writer


def current_task_context() -> AsyncTaskContext | None:
    """The Absurd task being executed by this asyncio task, if any (and if it is async)."""
    ctx = get_current_context()
    return ctx if isinstance(ctx, AsyncTaskContext) else None


def model_step_handler(handler: EventStreamHandler[Any] | None) -> EventStreamHandler[Any]:
    """An event stream handler for inside a model step: logs the live model events, then ``handler``'s turn.

    What is left in the buffer when the step's body returns is written in the statement that writes
    its checkpoint (``complete_step``): a step that is recorded has all of its events in the log.
    """

    async def logging_handler(run_context: RunContext[Any], stream: AsyncIterable[Any]) -> None:
        ctx = current_task_context()
        if ctx is None:
            if handler is not None:
                await handler(run_context, stream)
            else:
                async for _ in stream:
                    pass
            return
        writer = writer_for(ctx)
        step = _current_step.get()

        async def logged(events: AsyncIterable[Any]) -> AsyncIterator[Any]:
            async for event in events:
                writer.add(event, step=step)
                yield event

        published = logged(stream)
        if handler is not None:
            await handler(run_context, published)
        async for _ in published:  # what the handler left (or everything, without one)
            pass
        # What is still buffered is written with the step's checkpoint (complete_step), in one statement.

    return logging_handler


async def log_run_events(ctx: AsyncTaskContext, events: AsyncIterable[Any]) -> AsyncIterator[Any]:
    """Pass the run's events through, logging those produced outside steps (tool calls, results, ...).

    Model events are skipped: they were logged live inside their step, and here they are the replay
    of its recorded response.
    """
    writer = writer_for(ctx)
    async for event in events:
        if not isinstance(event, MODEL_EVENT_TYPES):
            writer.add(event, positioned=True)
        yield event


async def logged_run(ctx: AsyncTaskContext, run: Callable[[], Awaitable[AgentRunResult[Any]]]) -> AgentRunResult[Any]:
    """Run an agent run with its events logged; its result is logged (and everything flushed) at its end."""
    writer = writer_for(ctx)
    await writer.start()
    try:
        result = await run()
    except Exception:  # not on cancellation: a run cancelled because its lease was lost is no longer ours
        try:
            await writer.flush()
        except Exception:
            logger.warning("Could not log the last events of task %s", writer.task_id, exc_info=True)
        raise
    writer.add(AgentRunResultEvent(result), positioned=True)
    await writer.flush()
    return result
