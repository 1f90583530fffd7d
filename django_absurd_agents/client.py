"""The project's Absurd app: ``from django_absurd_agents import absurd``.

``absurd`` has the API of ``absurd_sdk.AsyncAbsurd`` (``register_task``, ``spawn``, ``work_batch``,
``start_worker``, ``fetch_task_result``, ...), bound to the database alias and queues in settings,
so the Pydantic AI Absurd tutorial runs with ``absurd`` imported instead of constructed. On top of it:

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
import json
import uuid
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, cast

import psycopg
from absurd_sdk import (
    AbsurdHooks,
    AsyncAbsurd,
    AsyncTaskContext,
    CancellationPolicy,
    ClaimedTask,
    RetryStrategy,
    RetryTaskResult,
    SpawnResult,
    TaskResultSnapshot,
)
from absurd_sdk import _fail_task_run_async as fail_task_run
from django.core.serializers.json import DjangoJSONEncoder
from django.db import DatabaseError, connections
from psycopg import AsyncConnection

from django_absurd_agents import conf
from django_absurd_agents.lease import keep_lease

TaskId = str | uuid.UUID
TaskHandler = Callable[[Any, AsyncTaskContext], Awaitable[Any]]


class InvalidParams(ValueError):
    """Task params that cannot be stored; nothing was written."""


class UnknownTask(Exception):
    """A claimed task whose name this worker has not registered."""


class UnknownQueue(ValueError):
    """A spawn to a queue that does not exist in the database; nothing was written."""


def _unknown_queue(queue: str) -> UnknownQueue:
    return UnknownQueue(
        f"Queue {queue!r} does not exist in the database. Add it to ABSURD_AGENTS['QUEUES'] and run "
        "`manage.py migrate`, or spawn to a queue that exists."
    )


def _is_missing_queue(exc: BaseException) -> bool:
    """A statement failed because a queue's table does not exist (Django wraps psycopg's error)."""
    return isinstance(exc, psycopg.errors.UndefinedTable) or isinstance(exc.__cause__, psycopg.errors.UndefinedTable)


def encode_json(value: Any, *, what: str = "Task params", limit: int | None = None) -> str:
    """JSON text for ``value``, accepting Django's usual values, or a clear error naming the fix."""
    try:
        text = json.dumps(value, cls=DjangoJSONEncoder, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidParams(
            f"{what} must be JSON: {exc}. Pass dicts, lists, strings, numbers, booleans, None, or "
            "UUID/datetime/date/Decimal values; pass a model instance by its primary key."
        ) from exc
    if limit is not None and len(text.encode()) > limit:
        raise InvalidParams(
            f"{what} are {len(text.encode())} bytes of JSON, over the limit of {limit} "
            "(ABSURD_AGENTS['MAX_PARAMS_BYTES']). Store large inputs in your own table and pass its id."
        )
    return text


def _spawn_options(
    *,
    max_attempts: int | None,
    retry_strategy: RetryStrategy | None,
    headers: dict[str, Any] | None,
    cancellation: CancellationPolicy | None,
    idempotency_key: str | None,
) -> str:
    settings = conf.get()
    options: dict[str, Any] = {"max_attempts": max_attempts or settings.default_max_attempts}
    strategy = retry_strategy if retry_strategy is not None else settings.retry_strategy
    if strategy:
        options["retry_strategy"] = dict(strategy)
    if headers is not None:
        options["headers"] = headers
    if cancellation:
        options["cancellation"] = dict(cancellation)
    if idempotency_key is not None:
        options["idempotency_key"] = idempotency_key
    return encode_json(options, what="Spawn options")


def _spawn_result(row: Any) -> SpawnResult:
    return {"task_id": str(row[0]), "run_id": str(row[1]), "attempt": row[2]}


_SPAWN_SQL = "select task_id, run_id, attempt from absurd.spawn_task(%s, %s, %s::jsonb, %s::jsonb)"
_RESULT_SQL = "select state, result, failure_reason from absurd.get_task_result(%s, %s)"


class ProjectAbsurd(AsyncAbsurd):
    """``AsyncAbsurd`` bound to Django's settings, with one connection per event loop."""

    def __init__(self, hooks: AbsurdHooks | None = None) -> None:
        # Settings are read lazily (this object is created at import time), so AsyncAbsurd's
        # constructor, which fixes the queue and opens a connection, is not called.
        self._user_hooks: AbsurdHooks = hooks or {}
        self._hooks = {**self._user_hooks, "wrap_task_execution": self._wrap_task_execution}
        self._registry: dict[str, dict[str, Any]] = {}
        self._worker_running = False
        self._owned_conn = True
        self._conn_string = None
        self._conns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncConnection[Any]] = (
            weakref.WeakKeyDictionary()
        )
        self._queue_override: str | None = None

    # --- configuration read from settings -------------------------------------------------

    @property
    def _queue_name(self) -> str:  # type: ignore[override]
        return self._queue_override or conf.get().default_queue

    @property
    def _default_max_attempts(self) -> int:  # type: ignore[override]
        return conf.get().default_max_attempts

    def _checked_queue(self, queue_name: str | None) -> str:
        """``queue_name`` (or this client's queue) once it is known to be a plain identifier."""
        queue = queue_name or self._queue_name
        problem = conf.queue_name_error(queue)
        if problem:
            raise ValueError(problem)
        return queue

    @property
    def queue_name(self) -> str:
        """The queue this client claims from and defaults to."""
        return self._queue_name

    def for_queue(self, queue_name: str) -> ProjectAbsurd:
        """A client claiming from ``queue_name`` that shares this one's registry and hooks."""
        clone = ProjectAbsurd(hooks=self._user_hooks)
        clone._registry = self._registry
        clone._queue_override = queue_name
        return clone

    @property
    def _conn(self) -> AsyncConnection[Any] | None:  # type: ignore[override]
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        return self._conns.get(loop)

    async def _ensure_connected(self) -> None:
        loop = asyncio.get_running_loop()
        conn = self._conns.get(loop)
        if conn is None or conn.closed or conn.broken:
            self._conns[loop] = await AsyncConnection.connect(**connection_params(), autocommit=True)

    async def close(self) -> None:
        self.stop_worker()
        conn = self._conn
        if conn is not None:
            await conn.close()
            self._conns.pop(asyncio.get_running_loop(), None)

    # --- registration and spawning ---------------------------------------------------------

    def register_task(  # type: ignore[override]
        self,
        name: str,
        queue: str | None = None,
        default_max_attempts: int | None = None,
        default_cancellation: CancellationPolicy | None = None,
    ) -> Callable[[TaskHandler], TaskHandler]:
        """Register a task handler; without ``queue`` it goes where ``TASK_ROUTES`` sends its name."""
        return super().register_task(
            name,
            queue=queue or conf.get().queue_for(name),
            default_max_attempts=default_max_attempts,
            default_cancellation=default_cancellation,
        )

    def resolve_queue(self, task_name: str, queue: str | None = None) -> str:
        """The queue a spawn of ``task_name`` goes to: the registration, else ``queue``, else settings."""
        registration = self._registry.get(task_name)
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
        queue_name = self._checked_queue(self.resolve_queue(task_name, queue))
        registration = self._registry.get(task_name) or {}
        params_json = encode_json(params, limit=conf.get().max_params_bytes)
        options_json = _spawn_options(
            max_attempts=max_attempts or registration.get("default_max_attempts"),
            retry_strategy=retry_strategy,
            headers=headers,
            cancellation=cancellation or registration.get("default_cancellation"),
            idempotency_key=idempotency_key,
        )
        return queue_name, task_name, params_json, options_json

    async def spawn(  # type: ignore[override]
        self,
        task_name: str,
        params: Any = None,
        max_attempts: int | None = None,
        retry_strategy: RetryStrategy | None = None,
        headers: dict[str, Any] | None = None,
        queue: str | None = None,
        cancellation: CancellationPolicy | None = None,
        idempotency_key: str | None = None,
    ) -> SpawnResult:
        """Enqueue a task on this client's own connection (not inside Django's transaction)."""
        options: dict[str, Any] = {
            "max_attempts": max_attempts,
            "retry_strategy": retry_strategy,
            "headers": headers,
            "queue": queue,
            "cancellation": cancellation,
            "idempotency_key": idempotency_key,
        }
        before_spawn = self._hooks.get("before_spawn")
        if before_spawn is not None:
            changed = before_spawn(task_name, params, {k: v for k, v in options.items() if v is not None})  # type: ignore[arg-type]
            if asyncio.iscoroutine(changed):
                changed = await changed
            options = {**dict.fromkeys(options), **cast(dict[str, Any], changed)}
        args = self._prepare(task_name, params, **options)
        await self._ensure_connected()
        assert self._conn is not None
        try:
            cursor = await self._conn.execute(_SPAWN_SQL, args)
        except psycopg.errors.UndefinedTable as exc:
            raise _unknown_queue(args[0]) from exc
        return _spawn_result(await cursor.fetchone())

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
    ) -> SpawnResult:
        """Enqueue a task on Django's connection: inside ``transaction.atomic()`` it commits or rolls back with it."""
        args = self._prepare(
            task_name,
            params,
            max_attempts=max_attempts,
            retry_strategy=retry_strategy,
            headers=headers,
            queue=queue,
            cancellation=cancellation,
            idempotency_key=idempotency_key,
        )
        with django_connection().cursor() as cursor:
            try:
                cursor.execute(_SPAWN_SQL, args)
            except DatabaseError as exc:
                if _is_missing_queue(exc):
                    raise _unknown_queue(args[0]) from exc
                raise
            return _spawn_result(cursor.fetchone())

    # --- results, events, cancel, retry -----------------------------------------------------

    async def fetch_task_result(  # type: ignore[override]
        self, task_id: TaskId, queue_name: str | None = None
    ) -> TaskResultSnapshot | None:
        return await super().fetch_task_result(str(task_id), self._checked_queue(queue_name))

    def fetch_task_result_sync(self, task_id: TaskId, queue_name: str | None = None) -> TaskResultSnapshot | None:
        with django_connection().cursor() as cursor:
            cursor.execute(_RESULT_SQL, [self._checked_queue(queue_name), str(task_id)])
            row = cursor.fetchone()
        if row is None:
            return None
        # Django's cursor leaves jsonb as text.
        return TaskResultSnapshot(state=row[0], result=load_json(row[1]), failure=load_json(row[2]))

    async def await_task_result(  # type: ignore[override]
        self, task_id: TaskId, timeout: float | None = None, queue_name: str | None = None
    ) -> TaskResultSnapshot:
        return await super().await_task_result(str(task_id), timeout, self._checked_queue(queue_name))

    async def emit_event(self, event_name: str, payload: Any = None, queue_name: str | None = None) -> None:  # type: ignore[override]
        queue = self._checked_queue(queue_name)
        await super().emit_event(event_name, json.loads(encode_json(payload, what="Event payload")), queue)

    def emit_event_sync(self, event_name: str, payload: Any = None, queue_name: str | None = None) -> None:
        if not event_name:
            raise ValueError("event_name must be a non-empty string")
        with django_connection().cursor() as cursor:
            cursor.execute(
                "select absurd.emit_event(%s, %s, %s::jsonb)",
                [self._checked_queue(queue_name), event_name, encode_json(payload, what="Event payload")],
            )

    async def cancel_task(self, task_id: TaskId, queue_name: str | None = None) -> None:  # type: ignore[override]
        await super().cancel_task(str(task_id), self._checked_queue(queue_name))

    def cancel_task_sync(self, task_id: TaskId, queue_name: str | None = None) -> None:
        with django_connection().cursor() as cursor:
            cursor.execute("select absurd.cancel_task(%s, %s)", [self._checked_queue(queue_name), str(task_id)])

    async def retry_task(  # type: ignore[override]
        self,
        task_id: TaskId,
        *,
        max_attempts: int | None = None,
        spawn_new: bool = False,
        queue_name: str | None = None,
    ) -> RetryTaskResult:
        result = await super().retry_task(
            str(task_id), max_attempts=max_attempts, spawn_new=spawn_new, queue_name=self._checked_queue(queue_name)
        )
        return {**result, "task_id": str(result["task_id"]), "run_id": str(result["run_id"])}

    def retry_task_sync(
        self,
        task_id: TaskId,
        *,
        max_attempts: int | None = None,
        spawn_new: bool = False,
        queue_name: str | None = None,
    ) -> RetryTaskResult:
        options: dict[str, Any] = {}
        if max_attempts is not None:
            options["max_attempts"] = max_attempts
        if spawn_new:
            options["spawn_new"] = True
        with django_connection().cursor() as cursor:
            cursor.execute(
                "select task_id, run_id, attempt, created from absurd.retry_task(%s, %s, %s::jsonb)",
                [self._checked_queue(queue_name), str(task_id), json.dumps(options)],
            )
            row = cursor.fetchone()
        return {"task_id": str(row[0]), "run_id": str(row[1]), "attempt": row[2], "created": row[3]}

    # --- execution --------------------------------------------------------------------------

    async def _execute_task(self, task: ClaimedTask, claim_timeout: int) -> None:
        if task["task_name"] not in self._registry:
            await self._ensure_connected()
            assert self._conn is not None
            await fail_task_run(
                self._conn,
                self._queue_name,
                task["run_id"],
                UnknownTask(
                    f"No handler is registered for task {task['task_name']!r} in this worker. Register it with "
                    f"@absurd.register_task(name={task['task_name']!r}) in an installed app's tasks.py, or list "
                    "its module in ABSURD_AGENTS['TASK_MODULES'], then restart the worker and retry the task."
                ),
            )
            return
        await super()._execute_task(task, claim_timeout)

    async def _wrap_task_execution(self, ctx: Any, execute: Callable[[], Any]) -> Any:
        user_hook = self._user_hooks.get("wrap_task_execution")
        async with keep_lease(ctx):
            if user_hook is None:
                return await execute()
            result = user_hook(ctx, execute)
            return await result if asyncio.iscoroutine(result) else result


def load_json(value: Any) -> Any:
    """A jsonb value read through Django's cursor, which returns it as text."""
    return json.loads(value) if isinstance(value, str) else value


def django_connection() -> Any:
    return connections[conf.get().database_alias]


def connection_params() -> dict[str, Any]:
    """libpq parameters of the configured Django database, for the client's own connections."""
    params = dict(django_connection().get_connection_params())
    for key in ("cursor_factory", "context", "prepare_threshold", "server_side_binding", "pool"):
        params.pop(key, None)
    return params


absurd = ProjectAbsurd()
"""The project-wide Absurd app."""
