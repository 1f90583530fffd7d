"""The project's Absurd app: ``from django_absurd_agents import absurd``.

``absurd`` has the API of ``absurd_sdk.AsyncAbsurd`` (``register_task``, ``spawn``, ``work_batch``,
``start_worker``, ``fetch_task_result``, ...), bound to the database alias and queues in settings,
so the Pydantic AI Absurd tutorial runs with ``absurd`` imported instead of constructed: its calls
are made by absurd-sdk's own client, built on first use (``sdk.BoundAbsurd``). On top of it:

- a web process spawns by task name without importing the task; the queue comes from
  ``TASK_ROUTES`` or the default queue;
- ids come back as strings, and every call takes a str or a UUID;
- params may hold Django's usual values (UUID, datetime, Decimal), or are refused before anything
  is written;
- a default retry strategy with exponential backoff;
- sync helpers (``spawn_sync`` and friends) run on Django's own connection, so a spawn inside
  ``transaction.atomic()`` commits or rolls back with the request's data.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import psycopg
from absurd_sdk import (
    Absurd,
    AbsurdHooks,
    AsyncTaskContext,
    CancellationPolicy,
    ClaimedTask,
    RetryStrategy,
    RetryTaskResult,
    TaskResultSnapshot,
)
from asgiref.sync import async_to_sync, sync_to_async
from django.db import DatabaseError
from psycopg import AsyncConnection
from psycopg.rows import dict_row

from django_absurd_agents import conf, jsonsafe, progress, sdk, spawning, sync_client, tables, validation
from django_absurd_agents.exceptions import InvalidParams as InvalidParams  # re-exported: its old home
from django_absurd_agents.exceptions import TaskNotFound as TaskNotFound  # re-exported: its old home
from django_absurd_agents.exceptions import UnknownQueue as UnknownQueue  # re-exported: its old home
from django_absurd_agents.execution import execute_claimed
from django_absurd_agents.lease import keep_lease
from django_absurd_agents.registry import TaskRegistry
from django_absurd_agents.sdk import BoundAbsurd
from django_absurd_agents.task_context import check_context

if TYPE_CHECKING:
    from django_absurd_agents.event_stream import LoggedEvent

TaskId = str | uuid.UUID
TaskHandler = Callable[[Any, AsyncTaskContext], Awaitable[Any]]


class ProjectAbsurd:
    """The project's Absurd app: registrations made at import time, absurd-sdk's clients built on first use.

    ``absurd`` is created when this module is imported, before settings can be read, so it holds
    only what import time gives: the task registrations and the hooks (procrastinate's blueprint).
    A call that needs absurd-sdk gets, in its event loop, an ``AsyncAbsurd`` built through the SDK's
    own ``__init__`` with the queue and defaults of settings (``sdk.BoundAbsurd``), on that loop's
    connection: Django's sync code runs each call in a loop of its own, a worker in one loop.
    """

    def __init__(
        self, hooks: AbsurdHooks | None = None, *, queue_name: str | None = None, registry: TaskRegistry | None = None
    ) -> None:
        self.hooks: AbsurdHooks = hooks or {}
        self.registry = TaskRegistry() if registry is None else registry
        self._queue_override = queue_name
        self._conns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncConnection[Any]] = (
            weakref.WeakKeyDictionary()
        )
        self._connecting: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, int], BoundAbsurd]] = (
            weakref.WeakKeyDictionary()
        )

    def _checked_queue(self, queue_name: str | None) -> str:
        """``queue_name`` (or this client's queue) once it is known to be a plain identifier."""
        queue = queue_name or self.queue_name
        problem = conf.queue_name_error(queue)
        if problem:
            raise ValueError(problem)
        return queue

    @property
    def queue_name(self) -> str:
        """The queue this client claims from and defaults to."""
        return self._queue_override or conf.get().default_queue

    def for_queue(self, queue_name: str) -> ProjectAbsurd:
        """A client claiming from ``queue_name``, on connections of its own, sharing registrations and hooks."""
        # A view of the same registrations that resolves @task functions for this queue (registry.py).
        return ProjectAbsurd(self.hooks, queue_name=queue_name, registry=self.registry.for_queue(queue_name))

    async def sdk_client(self) -> BoundAbsurd:
        """absurd-sdk's client for this event loop, built on first use (and again if settings changed)."""
        settings = conf.get()
        key = (self._checked_queue(None), settings.default_max_attempts)
        clients = self._clients.setdefault(asyncio.get_running_loop(), {})
        client = clients.get(key)
        if client is None:
            connection = await self.live_connection()
            # setdefault: another task of this loop may have built it while this one waited for the connection.
            client = clients.setdefault(
                key,
                BoundAbsurd(
                    self.live_connection,
                    connection,
                    queue_name=key[0],
                    default_max_attempts=key[1],
                    hooks=self.hooks,
                    registry=self.registry,
                    execute=self.run_claimed,
                ),
            )
        return client

    @property
    def connected(self) -> bool:
        """Whether this event loop already has a connection of this client (a pool prefers those)."""
        try:
            return asyncio.get_running_loop() in self._conns
        except RuntimeError:
            return False

    async def live_connection(self) -> AsyncConnection[Any]:
        """This loop's connection, opened again if it is closed or broke (a database restart).

        One task opens it while the others sharing the client wait: a worker starting 100 tasks at
        once on a fresh client would otherwise open 100 connections and keep one
        (bench/bench_fleet.py), a burst that can hit ``max_connections``.
        """
        loop = asyncio.get_running_loop()
        conn = self._conns.get(loop)
        if conn is None or conn.closed or conn.broken:
            async with self._connecting.setdefault(loop, asyncio.Lock()):
                conn = self._conns.get(loop)
                if conn is None or conn.closed or conn.broken:  # no task sharing it reconnected meanwhile
                    self._conns[loop] = conn = await AsyncConnection.connect(**connection_params(), autocommit=True)
        return conn

    def stop_worker(self) -> None:
        """Stop every ``start_worker`` loop of this client."""
        for clients in list(self._clients.values()):
            for client in clients.values():
                client.stop_worker()

    async def close(self) -> None:
        """Stop this client's workers and close this loop's connection."""
        self.stop_worker()
        loop = asyncio.get_running_loop()
        self._clients.pop(loop, None)
        conn = self._conns.pop(loop, None)
        if conn is not None:
            await conn.close()

    def register_task(
        self,
        name: str,
        queue: str | None = None,
        default_max_attempts: int | None = None,
        default_cancellation: CancellationPolicy | None = None,
    ) -> Callable[[TaskHandler], TaskHandler]:
        """Register a task handler; without ``queue`` it goes where ``TASK_ROUTES`` sends its name.

        The handler gets a context whose ``step``, ``complete_step`` and ``emit_event`` check their
        arguments first (``task_context``); the decorated function itself is returned unchanged.
        """
        validation.task_name(name)
        validation.max_attempts(default_max_attempts, what="default_max_attempts")
        queue = self._checked_queue(queue or conf.get().queue_for(name))

        def decorator(handler: TaskHandler) -> TaskHandler:
            @functools.wraps(handler)
            async def checked(params: Any, ctx: AsyncTaskContext) -> Any:
                return await handler(params, check_context(ctx))

            self.registry[name] = sdk.registration(name, queue, default_max_attempts, default_cancellation, checked)
            return handler

        return decorator

    def resolve_queue(self, task_name: str, queue: str | None = None) -> str:
        """The queue a spawn of ``task_name`` goes to: the registration, else ``queue``, else settings."""
        registration = self.registry.get(task_name)
        if registration is not None:
            if queue is not None and queue != registration["queue"]:
                raise ValueError(
                    f"Task {task_name!r} is registered for queue {registration['queue']!r}, "
                    f"but the spawn asked for {queue!r}. Drop queue= or register the task on that queue."
                )
            return str(registration["queue"])
        return queue or conf.get().queue_for(task_name)

    def _prepare(
        self,
        task_name: str,
        params: Any,
        *,
        max_attempts: int | None,
        retry_strategy: RetryStrategy | None,
        headers: dict[str, Any] | None,
        queue: str | None,
        cancellation: CancellationPolicy | None,
        idempotency_key: str | None,
    ) -> tuple[str, str, str, str]:
        # Everything Postgres would refuse is refused here, before any SQL: a refusal by Postgres would
        # abort the caller's transaction.
        validation.task_name(task_name)
        queue_name = self._checked_queue(self.resolve_queue(task_name, queue))
        registration = self.registry.get(task_name) or {}
        params_json = encode_json(params, limit=conf.get().max_params_bytes)
        if max_attempts is None:
            max_attempts = registration.get("default_max_attempts")
        options_json = spawning.options_json(
            max_attempts=validation.max_attempts(max_attempts),
            retry_strategy=retry_strategy,
            headers=headers,
            cancellation=cancellation or registration.get("default_cancellation"),
            idempotency_key=validation.idempotency_key(idempotency_key),
        )
        return queue_name, task_name, params_json, options_json

    def _before_spawn(
        self, task_name: str, params: Any, options: dict[str, Any]
    ) -> dict[str, Any] | Awaitable[dict[str, Any]]:
        """The options after the user's ``before_spawn`` hook, which ``spawn`` and ``spawn_sync`` both apply."""
        before_spawn = self.hooks.get("before_spawn")
        given = {k: v for k, v in options.items() if v is not None}
        if before_spawn is None:
            return given
        return cast("dict[str, Any] | Awaitable[dict[str, Any]]", before_spawn(task_name, params, given))  # type: ignore[arg-type]

    async def spawn(
        self,
        task_name: str,
        params: Any = None,
        max_attempts: int | None = None,
        retry_strategy: RetryStrategy | None = None,
        headers: dict[str, Any] | None = None,
        queue: str | None = None,
        cancellation: CancellationPolicy | None = None,
        idempotency_key: str | None = None,
    ) -> spawning.SpawnedTask:
        """Enqueue a task on this client's own connection (not inside Django's transaction)."""
        options = {name: value for name, value in locals().items() if name in spawning.SPAWN_OPTIONS}
        changed = self._before_spawn(task_name, params, options)
        if inspect.isawaitable(changed):
            changed = await changed
        args = self._prepare(task_name, params, **{**dict.fromkeys(options), **changed})
        cursor = (await self.live_connection()).cursor(row_factory=dict_row)
        try:
            await cursor.execute(spawning.SPAWN_SQL, (args[0], *args))
        except psycopg.errors.UndefinedTable as exc:
            raise validation.unknown_queue(args[0]) from exc
        return spawning.spawned(await cursor.fetchone() or {})

    def spawn_sync(
        self,
        task_name: str,
        params: Any = None,
        max_attempts: int | None = None,
        retry_strategy: RetryStrategy | None = None,
        headers: dict[str, Any] | None = None,
        queue: str | None = None,
        cancellation: CancellationPolicy | None = None,
        idempotency_key: str | None = None,
    ) -> spawning.SpawnedTask:
        """Enqueue a task on Django's connection: inside ``transaction.atomic()`` it commits or rolls back with it."""
        options = {name: value for name, value in locals().items() if name in spawning.SPAWN_OPTIONS}
        changed = self._before_spawn(task_name, params, options)
        if inspect.isawaitable(changed):  # an async hook, from sync code
            pending = changed

            async def hook() -> dict[str, Any]:
                return await pending

            changed = async_to_sync(hook)()
        args = self._prepare(task_name, params, **{**dict.fromkeys(options), **changed})
        try:
            (row,) = tables.rows(spawning.SPAWN_SQL, (args[0], *args))
        except DatabaseError as exc:
            if spawning.is_missing_queue(exc):
                raise validation.unknown_queue(args[0]) from exc
            raise
        return spawning.spawned(row)

    def _sdk_sync(self, queue: str) -> Absurd:
        """absurd-sdk's own sync client for ``queue``, on Django's connection (``sync_client``)."""
        return sync_client.client(queue, self.hooks)

    def _search(self, task_id: TaskId, queue_name: str | None) -> tuple[uuid.UUID, str | None]:
        """The id as a UUID and the queue to search (None: all), both checked before any SQL.

        Calls by id find the task with plain SELECTs before any Absurd function runs: Absurd raises
        for an unknown id, which would abort the caller's transaction. Without ``queue_name`` the task
        is looked up in every catalogued queue (ids are unique across queues), so a task that
        ``TASK_ROUTES`` sent elsewhere is found too.
        """
        return validation.task_uuid(task_id), None if queue_name is None else self._checked_queue(queue_name)

    def locate_task_sync(self, task_id: TaskId, queue_name: str | None = None) -> tuple[str, str] | None:
        """``(queue, state)`` of the task, in ``queue_name`` or else in any queue; None when there is none."""
        identifier, queue = self._search(task_id, queue_name)
        with tables.connection().cursor() as cursor:
            return tables.locate_sync(cursor, identifier, queue)

    async def locate_task(self, task_id: TaskId, queue_name: str | None = None) -> tuple[str, str] | None:
        """Async counterpart of ``locate_task_sync``, on the client's own connection."""
        identifier, queue = self._search(task_id, queue_name)
        return await tables.locate(await self.live_connection(), identifier, queue)

    def _existing_sync(self, task_id: TaskId, queue_name: str | None) -> tuple[str, str]:
        located = self.locate_task_sync(task_id, queue_name)
        if located is None:
            raise validation.not_found(task_id, queue_name)
        return located

    async def _existing(self, task_id: TaskId, queue_name: str | None) -> tuple[str, str]:
        located = await self.locate_task(task_id, queue_name)
        if located is None:
            raise validation.not_found(task_id, queue_name)
        return located

    async def fetch_task_result(self, task_id: TaskId, queue_name: str | None = None) -> TaskResultSnapshot | None:
        """The task's state and outcome, or None when no task has this id (in ``queue_name``, or anywhere)."""
        located = await self.locate_task(task_id, queue_name)
        if located is None:
            return None
        return await (await self.sdk_client()).fetch_task_result(str(validation.task_uuid(task_id)), located[0])

    def fetch_task_result_sync(self, task_id: TaskId, queue_name: str | None = None) -> TaskResultSnapshot | None:
        """The task's state and outcome, or None when no task has this id (in ``queue_name``, or anywhere)."""
        located = self.locate_task_sync(task_id, queue_name)
        if located is None:
            return None
        return self._sdk_sync(located[0]).fetch_task_result(str(validation.task_uuid(task_id)))

    async def await_task_result(
        self, task_id: TaskId, timeout: float | None = None, queue_name: str | None = None
    ) -> TaskResultSnapshot:
        identifier = validation.task_uuid(task_id)
        if queue_name is not None:
            queue = self._checked_queue(queue_name)
        else:
            queue, _ = await self._existing(identifier, None)
        return await (await self.sdk_client()).await_task_result(str(identifier), timeout, queue)

    def _event_args(self, event_name: str, payload: Any, queue_name: str | None) -> tuple[str, str, str]:
        """Queue, name and JSON payload of an emit, checked before any SQL; payloads share the params' limit."""
        validation.event_name(event_name)
        queue = self._checked_queue(queue_name)
        return queue, event_name, encode_json(payload, what="Event payload", limit=conf.get().max_params_bytes)

    async def emit_event(self, event_name: str, payload: Any = None, queue_name: str | None = None) -> None:
        queue, name, payload_json = self._event_args(event_name, payload, queue_name)
        await (await self.sdk_client()).emit_event(name, json.loads(payload_json), queue)

    def emit_event_sync(self, event_name: str, payload: Any = None, queue_name: str | None = None) -> None:
        queue, name, payload_json = self._event_args(event_name, payload, queue_name)
        self._sdk_sync(queue).emit_event(name, json.loads(payload_json))

    async def cancel_task(self, task_id: TaskId, queue_name: str | None = None) -> None:
        """Cancel the task (a no-op when it has finished); ``TaskNotFound`` when no task has this id."""
        queue, _ = await self._existing(task_id, queue_name)
        await (await self.sdk_client()).cancel_task(str(validation.task_uuid(task_id)), queue)

    def cancel_task_sync(self, task_id: TaskId, queue_name: str | None = None) -> None:
        """Cancel the task on Django's connection; ``TaskNotFound`` (nothing run) when no task has this id."""
        queue, _ = self._existing_sync(task_id, queue_name)
        self._sdk_sync(queue).cancel_task(str(validation.task_uuid(task_id)))

    async def retry_task(
        self,
        task_id: TaskId,
        *,
        max_attempts: int | None = None,
        spawn_new: bool = False,
        queue_name: str | None = None,
    ) -> RetryTaskResult:
        """Retry a failed task; ``TaskNotFound`` when no task has this id."""
        validation.max_attempts(max_attempts)
        queue, _ = await self._existing(task_id, queue_name)
        result = await (await self.sdk_client()).retry_task(
            str(validation.task_uuid(task_id)), max_attempts=max_attempts, spawn_new=spawn_new, queue_name=queue
        )
        return _ids_as_text(result)

    def retry_task_sync(
        self,
        task_id: TaskId,
        *,
        max_attempts: int | None = None,
        spawn_new: bool = False,
        queue_name: str | None = None,
    ) -> RetryTaskResult:
        """Retry a failed task on Django's connection; ``TaskNotFound`` (nothing run) when no task has this id."""
        validation.max_attempts(max_attempts)
        queue, _ = self._existing_sync(task_id, queue_name)
        result = self._sdk_sync(queue).retry_task(
            str(validation.task_uuid(task_id)), max_attempts=max_attempts, spawn_new=spawn_new
        )
        return _ids_as_text(result)

    def stream_events(self, task_id: TaskId, after: int | None = None) -> AsyncIterator[LoggedEvent]:
        """The task's event log after offset ``after``, live, ending with an ``end`` entry once the task is over."""
        from django_absurd_agents.event_stream import stream_events

        return stream_events(task_id, after)

    def events_sync(self, task_id: TaskId, after: int | None = None) -> list[LoggedEvent]:
        """The entries of the task's event log so far (and ``end`` if it is over), read on Django's connection."""
        from django_absurd_agents.event_stream import events_sync

        return events_sync(task_id, after)

    def task_progress_sync(self, task_id: TaskId, queue_name: str | None = None) -> progress.TaskProgress | None:
        """The task's state, attempt, steps done, current wait and outcome (``progress.py``); None if unknown."""
        return progress.read_progress(task_id, queue_name)

    async def task_progress(self, task_id: TaskId, queue_name: str | None = None) -> progress.TaskProgress | None:
        """Async counterpart of ``task_progress_sync``."""
        return await sync_to_async(self.task_progress_sync)(task_id, queue_name)

    async def run_claimed(self, task: ClaimedTask, claim_timeout: int) -> None:
        """Run a task this client claimed; the SDK's ``work_batch`` and ``start_worker`` call this too."""
        await execute_claimed(self, task, claim_timeout)

    async def claim_tasks(
        self, batch_size: int = 1, claim_timeout: int = 120, worker_id: str = "worker"
    ) -> list[ClaimedTask]:
        """absurd-sdk's ``claim_tasks`` on this client's queue."""
        return await (await self.sdk_client()).claim_tasks(batch_size, claim_timeout, worker_id)

    async def work_batch(
        self, worker_id: str = "worker", claim_timeout: int | None = None, batch_size: int = 1
    ) -> None:
        """absurd-sdk's ``work_batch``, with the lease of ``ABSURD_AGENTS['CLAIM_TIMEOUT']`` by default."""
        client = await self.sdk_client()
        await client.work_batch(worker_id, claim_timeout or conf.get().claim_timeout, batch_size)

    async def start_worker(
        self,
        worker_id: str | None = None,
        claim_timeout: int | None = None,
        concurrency: int = 1,
        batch_size: int | None = None,
        poll_interval: float | None = None,
    ) -> None:
        """absurd-sdk's ``start_worker`` with ``CLAIM_TIMEOUT`` and ``POLL_INTERVAL`` from settings by default."""
        settings = conf.get()
        client = await self.sdk_client()
        await client.start_worker(
            worker_id,
            claim_timeout or settings.claim_timeout,
            concurrency,
            batch_size,
            poll_interval or settings.poll_interval,
        )

    async def create_queue(self, queue_name: str | None = None, **policy: Any) -> None:
        """absurd-sdk's ``create_queue`` (storage and policy as keywords); ``migrate`` creates the configured ones."""
        await (await self.sdk_client()).create_queue(self._checked_queue(queue_name), **policy)

    async def drop_queue(self, queue_name: str | None = None) -> None:
        """absurd-sdk's ``drop_queue``: the queue's tables and everything in them."""
        await (await self.sdk_client()).drop_queue(self._checked_queue(queue_name))

    async def list_queues(self) -> list[str]:
        """absurd-sdk's ``list_queues``."""
        return await (await self.sdk_client()).list_queues()

    async def wrap_task_execution(self, ctx: Any, execute: Callable[[], Any]) -> Any:
        """Keep the lease around the handler, inside the project's own ``wrap_task_execution`` hook."""
        user_hook = self.hooks.get("wrap_task_execution")
        async with keep_lease(ctx):
            if user_hook is None:
                return await execute()
            result = user_hook(ctx, execute)
            return await result if asyncio.iscoroutine(result) else result


def _ids_as_text(result: RetryTaskResult) -> RetryTaskResult:
    """A retry's result with its ids as strings, like every id the client returns."""
    return {**result, "task_id": str(result["task_id"]), "run_id": str(result["run_id"])}


def encode_json(value: Any, *, what: str = "Task params", limit: int | None = None) -> str:
    """JSON text for ``value`` that Postgres will store (Django's usual values accepted), or
    ``InvalidParams`` naming the problem, where it is, and the fix (see ``jsonsafe``)."""
    return jsonsafe.encode(value, what=what, limit=limit)


def connection_params() -> dict[str, Any]:
    """libpq parameters of the configured Django database, for the client's own connections.

    ``prepare_threshold`` is kept as Django sets it (``None`` unless ``OPTIONS`` says otherwise): no
    prepared statements, so the client works behind PgBouncer in transaction pooling like Django does.
    """
    params = dict(tables.connection().get_connection_params())
    for key in ("cursor_factory", "context", "server_side_binding", "pool"):
        params.pop(key, None)
    return params


absurd = ProjectAbsurd()
"""The project-wide Absurd app."""
