"""Reading a task's event log: ``absurd.stream_events()``, ``absurd.events_sync()`` and what they share.

``stream_events(task_id, after=None)`` yields the log's entries after offset ``after`` as they are
written, and ends with an ``end`` entry once the task is completed, failed or cancelled and
everything it logged has been read. It waits for new entries on ``LISTEN``: one connection per event
loop (so one per ASGI process) listens for every reader of the process, and wakes the readers of
the task a notification names; a reader also polls (every 0.2 s, backing off to 2 s while nothing
happens), which covers a lost listener connection and notices the task's end.

``assemble(entries)`` is what a reader shows: the entries an ``attempt`` marker voids are dropped
(see ``event_log.py``), so each step's events are there exactly once.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import functools
import logging
import uuid
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import AsyncConnection, sql
from psycopg.rows import dict_row

from django_absurd_agents import event_log, tables, validation
from django_absurd_agents.client import absurd
from django_absurd_agents.event_log import ATTEMPT, CHANNEL, EVENT_ADAPTER, RESULT_ADAPTER
from django_absurd_agents.tables import FINISHED_STATES, table
from django_absurd_agents.wakeup import listen_params  # DIRECT_DATABASE_URL behind PgBouncer

logger = logging.getLogger("django_absurd_agents.event_stream")

END = "end"
"""Kind of the last entry a reader gets: the task is over; ``data`` holds its ``state``."""
POLL_FIRST = 0.2
POLL_MAX = 2.0
PAGE = 500
"""Entries read per query."""


@dataclass(frozen=True)
class LoggedEvent:
    """One entry of a task's event log."""

    offset: int
    """Grows with every entry; pass the last one seen as ``after=`` to resume."""
    attempt: int
    """The task attempt that wrote it."""
    kind: str
    """pydantic-ai's ``event_kind`` (``part_delta``, ``function_tool_call``, ``agent_run_result``, ...),
    ``attempt`` for a marker, ``end`` for the last entry a reader gets."""
    data: dict[str, Any]
    """The event as JSON; ``{"attempt": n, "discard_after": offset}`` for a marker, ``{"state": ...}`` for the end."""
    created: datetime | None = None

    def event(self) -> Any:
        """The pydantic-ai event (``PartDeltaEvent``, ``AgentRunResultEvent``, ...); None for a marker or the end."""
        if self.kind in (ATTEMPT, END):
            return None
        if self.kind == "agent_run_result":
            return RESULT_ADAPTER.validate_python(self.data)
        return EVENT_ADAPTER.validate_python(self.data)


def assemble(entries: Iterable[LoggedEvent]) -> list[LoggedEvent]:
    """The agent events a reader shows, in order: voided ones dropped, markers and the end left out.

    An ``attempt`` marker voids the entries between its ``discard_after`` and itself (the events of
    a step that the attempt before did not complete), and entries that a superseded attempt writes
    after it (a worker that lost its lease and did not notice at once).
    """
    kept: list[LoggedEvent] = []
    current = 0
    for entry in entries:
        if entry.kind == ATTEMPT:
            discard_after = int(entry.data.get("discard_after") or 0)
            kept = [e for e in kept if e.offset <= discard_after]
            current = max(current, int(entry.data.get("attempt") or 0))
        elif entry.kind != END and entry.attempt >= current:
            kept.append(entry)
    return kept


def _entry(row: dict[str, Any]) -> LoggedEvent:
    return LoggedEvent(
        offset=int(row["offset"]),
        attempt=int(row["attempt"]),
        kind=str(row["kind"]),
        data=row["payload"],
        created=row["created"],
    )


async def _fetch(conn: AsyncConnection[Any], statement: Any, params: Sequence[Any]) -> list[dict[str, Any]]:
    """Every row of ``statement`` on ``conn`` (the client's own connection), as a dict by column name."""
    async with conn.cursor(row_factory=dict_row) as cursor:
        await cursor.execute(statement, params)
        return await cursor.fetchall()


@functools.cache
def _select() -> sql.Composed:
    """Composed once per process: every poll and every notification of every reader runs it."""
    return sql.SQL(
        'select "offset", attempt, kind, payload, created from {} where task_id = %s and "offset" > %s '
        'order by "offset" limit %s'
    ).format(sql.Identifier(event_log.table()))


def _checked_after(after: int | str | None) -> int:
    if after is None or after == "":
        return 0
    try:
        value = int(after)
    except (TypeError, ValueError):
        raise ValueError(f"after must be an offset (an integer >= 0), not {after!r}.") from None
    if value < 0:
        raise ValueError(f"after must be an offset (an integer >= 0), not {after!r}.")
    return value


def end_entry(offset: int, state: str, failure: Any = None) -> LoggedEvent:
    data: dict[str, Any] = {"state": state}
    if isinstance(failure, dict) and (failure.get("name") or failure.get("message")):
        data["failure"] = {"name": failure.get("name"), "message": str(failure.get("message") or "")[:2000]}
    return LoggedEvent(offset=offset, attempt=0, kind=END, data=data)


def events_sync(task_id: Any, after: int | str | None = None) -> list[LoggedEvent]:
    """The entries logged so far after ``after``, ending with an ``end`` entry if the task is over.

    For scripts and tests; reads on Django's connection. ``TaskNotFound`` when no queue has the task.
    """
    identifier = validation.task_uuid(task_id)
    position = _checked_after(after)
    located = absurd.locate_task_sync(identifier)
    if located is None:
        raise validation.not_found(task_id, None)
    entries: list[LoggedEvent] = []
    while True:
        page = [_entry(row) for row in tables.rows(_select().as_string(None), [identifier, position, PAGE])]
        entries.extend(page)
        if len(page) < PAGE:
            break
        position = page[-1].offset
    if located[1] in FINISHED_STATES:
        snapshot = absurd.fetch_task_result_sync(identifier, queue_name=located[0])
        last = entries[-1].offset if entries else position
        entries.append(end_entry(last, located[1], snapshot.failure if snapshot else None))
    return entries


class _Feed:
    """The entries of one task that the readers of this process share: one query serves all of them.

    ``entries`` are every row with an offset in ``(base, top]``; a notification marks the feed
    ``stale``, and the first reader to look afterwards reads what follows ``top`` for everyone.
    """

    KEEP = 2000

    def __init__(self, identifier: uuid.UUID) -> None:
        self.identifier = identifier
        self.entries: list[LoggedEvent] = []
        self.base: int | None = None
        self.top = 0
        self.stale = True
        self.lock = asyncio.Lock()

    async def _fetch(self, conn: AsyncConnection[Any], after: int, limit: int = PAGE) -> list[LoggedEvent]:
        return [_entry(row) for row in await _fetch(conn, _select(), (self.identifier, after, limit))]

    async def after(self, conn: AsyncConnection[Any], position: int, *, fresh: bool = False) -> list[LoggedEvent]:
        """Up to ``PAGE`` entries after ``position``; ``fresh`` reads the database even without a notification."""
        async with self.lock:
            if self.base is None:
                self.base, self.top, self.stale = position, position, True
            if position < self.base:  # far behind the shared entries (a reader resuming): on its own
                return await self._fetch(conn, position)
            if self.stale or fresh:
                self.stale = False
                rows = await self._fetch(conn, self.top)
                if len(rows) == PAGE:
                    self.stale = True  # more to read
                if rows:
                    self.entries.extend(rows)
                    self.top = rows[-1].offset
                if len(self.entries) > self.KEEP:
                    dropped = len(self.entries) - self.KEEP
                    self.base = self.entries[dropped - 1].offset
                    del self.entries[:dropped]
            start = bisect.bisect_right(self.entries, position, key=lambda entry: entry.offset)
            return self.entries[start : start + PAGE]


class _Listener:
    """The one ``LISTEN`` connection of an event loop; wakes the readers of the task a notification names."""

    def __init__(self) -> None:
        self.waiters: dict[str, set[asyncio.Event]] = {}
        self.feeds: dict[str, _Feed] = {}
        self.listening = asyncio.Event()
        self.connects = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def readers(self) -> int:
        return sum(len(events) for events in self.waiters.values())

    @contextlib.asynccontextmanager
    async def subscription(
        self, task_id: uuid.UUID, ready_timeout: float = 2.0
    ) -> AsyncIterator[tuple[asyncio.Event, _Feed]]:
        key = str(task_id)
        wake = asyncio.Event()
        self.waiters.setdefault(key, set()).add(wake)
        feed = self.feeds.setdefault(key, _Feed(task_id))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._listen(), name="absurd_agents event listener")
        try:
            # Read only once notifications are flowing, so none is missed; polling covers a slow start.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.listening.wait(), ready_timeout)
            yield wake, feed
        finally:
            waiting = self.waiters.get(key)
            if waiting is not None:
                waiting.discard(wake)
                if not waiting:
                    del self.waiters[key]
                    self.feeds.pop(key, None)
            if not self.waiters and self._task is not None:
                task, self._task = self._task, None
                self.listening.clear()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _wake_all(self) -> None:
        for feed in self.feeds.values():
            feed.stale = True
        for events in self.waiters.values():
            for event in events:
                event.set()

    async def _listen(self) -> None:
        failures = 0
        while True:
            try:
                conn = await AsyncConnection.connect(**listen_params(), autocommit=True)
                async with conn:
                    await conn.execute(sql.SQL("listen {}").format(sql.Identifier(CHANNEL)))
                    self.connects += 1
                    failures = 0
                    self.listening.set()
                    self._wake_all()  # whatever was written while nobody listened
                    async for note in conn.notifies():
                        feed = self.feeds.get(note.payload)
                        if feed is not None:
                            feed.stale = True
                        for event in self.waiters.get(note.payload, ()):
                            event.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.listening.clear()
                failures += 1
                delay = min(5.0, 0.1 * 2 ** (failures - 1))
                if failures == 1:
                    logger.warning("Cannot LISTEN for event log writes (%s); readers poll until it works again.", exc)
                await asyncio.sleep(delay)


_listeners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Listener] = weakref.WeakKeyDictionary()


def listener() -> _Listener:
    """This event loop's listener (created on first use)."""
    loop = asyncio.get_running_loop()
    found = _listeners.get(loop)
    if found is None:
        found = _listeners[loop] = _Listener()
    return found


async def _state(conn: AsyncConnection[Any], queue: str, identifier: uuid.UUID) -> tuple[str | None, Any]:
    statement = (
        f"select t.state, r.failure_reason from {table('t', queue)} t "
        f"left join {table('r', queue)} r on r.run_id = t.last_attempt_run where t.task_id = %s"
    )
    found = await _fetch(conn, statement, (identifier,))
    return (None, None) if not found else (str(found[0]["state"]), found[0]["failure_reason"])


async def _queue_of(task_id: Any, identifier: uuid.UUID) -> str:
    """The queue of the task, or ``TaskNotFound``."""
    located = await absurd.locate_task(identifier)
    if located is None:
        raise validation.not_found(task_id, None)
    return located[0]


async def follow(
    task_id: Any, after: int | str | None = None, *, keepalive: float | None = None, queue: str | None = None
) -> AsyncIterator[LoggedEvent | None]:
    """``stream_events``, also yielding None after ``keepalive`` idle seconds (the SSE view's comments).

    ``queue`` is the task's queue when the caller has located the task already (the SSE view does,
    to answer 404 before streaming); otherwise the task is located here.
    """
    identifier = validation.task_uuid(task_id)
    position = _checked_after(after)
    if queue is None:
        queue = await _queue_of(task_id, identifier)
    loop = asyncio.get_running_loop()
    async with listener().subscription(identifier) as (wake, feed):
        conn = await absurd.live_connection()
        floor = await _superseded_below(conn, identifier, position)
        delay = POLL_FIRST
        idle_since = loop.time()
        fresh = True
        while True:
            wake.clear()
            rows = await feed.after(conn, position, fresh=fresh)
            fresh = False
            for entry in rows:
                position = entry.offset
                if entry.kind == ATTEMPT:
                    floor = max(floor, int(entry.data.get("attempt") or 0))
                elif entry.attempt < floor:
                    continue  # written by an attempt a newer one superseded
                yield entry
            if len(rows) == PAGE:
                continue
            if rows:
                delay, idle_since = POLL_FIRST, loop.time()
            else:
                state, failure = await _state(conn, queue, identifier)
                if state is None or state in FINISHED_STATES:
                    if not await feed.after(conn, position, fresh=True):  # drained: all the task wrote was read
                        yield end_entry(position, state or "deleted", failure)
                        return
                    continue
            try:
                await asyncio.wait_for(wake.wait(), delay)
            except TimeoutError:
                delay = min(delay * 2, POLL_MAX)
                fresh = True  # no notification: look anyway (a lost listener connection, a missed wake-up)
            if keepalive is not None and loop.time() - idle_since >= keepalive:
                idle_since = loop.time()
                yield None


async def _superseded_below(conn: AsyncConnection[Any], identifier: uuid.UUID, after: int) -> int:
    """The newest attempt a marker at or before ``after`` announced (0 without one): a resumed reader's floor."""
    if not after:
        return 0
    statement = sql.SQL(
        "select coalesce(max((payload->>'attempt')::int), 0) as attempt from {} "
        'where task_id = %s and kind = %s and "offset" <= %s'
    ).format(sql.Identifier(event_log.table()))
    found = await _fetch(conn, statement, (identifier, ATTEMPT, after))
    return int(found[0]["attempt"]) if found else 0


async def stream_events(task_id: Any, after: int | str | None = None) -> AsyncIterator[LoggedEvent]:
    """The task's log entries after offset ``after``, as they are written, then an ``end`` entry."""
    async for entry in follow(task_id, after):
        if entry is not None:
            yield entry


def iterate_in_own_loop(make: Any) -> Iterator[Any]:
    """Drive the async iterator ``make()`` from sync code (a WSGI response), in an event loop of its own."""
    loop = asyncio.new_event_loop()
    iterator = make()
    try:
        while True:
            try:
                item = loop.run_until_complete(anext(iterator))
            except StopAsyncIteration:
                return
            yield item
    finally:
        try:
            loop.run_until_complete(iterator.aclose())
            loop.run_until_complete(absurd.close())
        finally:
            loop.close()


def delete_orphaned_events(batch: int = 1000) -> int:
    """Delete the log entries of tasks no queue holds any more; returns how many were deleted.

    ``manage.py absurd_cleanup`` calls it after ``absurd.cleanup_all_queues()``, so a task's log goes
    with the task. Each batch of tasks is one statement, committed on its own, over the queues of the
    catalog read for it (again if a queue is dropped meanwhile). Without Absurd's schema it deletes nothing.
    """
    if not tables.schema_installed():
        return 0

    def delete_batch(queues: list[str]) -> int:
        held = " and ".join(
            f"not exists (select 1 from {table('t', queue)} t where t.task_id = e.task_id)" for queue in queues
        )
        statement = sql.SQL(
            "delete from {events} where task_id in (select distinct e.task_id from {events} e where {held} limit %s)"
        ).format(events=sql.Identifier(event_log.table()), held=sql.SQL(held or "true"))
        with tables.connection().cursor() as cursor:
            cursor.execute(statement.as_string(None), [batch])
            return int(cursor.rowcount)

    deleted = 0
    while True:
        count = tables.over_queues(None, delete_batch)
        deleted += count
        if count == 0:
            return deleted
