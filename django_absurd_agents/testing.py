"""Helpers for testing code that spawns Absurd tasks (agent tasks and ``@task`` functions alike).

Everything here runs tasks through the real engine and database, in the test's process:

* :func:`run_tasks` / :func:`arun_tasks` run what is due on the queues, as ``absurd_worker`` would,
  until nothing is left, and return what ran (:class:`RanTask`).
* :func:`eager_tasks` (a context manager and decorator) makes each spawn run its task at once, as if a
  worker claimed it the moment the spawn committed.
* :func:`clean_queues` empties Absurd's tables; :class:`AbsurdTestCaseMixin` does it after each test of
  a ``TransactionTestCase``, and the pytest plugin (``django_absurd_agents.pytest_plugin``, loaded
  automatically) after each test using pytest-django's ``transactional_db``.
* :func:`count_model_calls` counts the requests a model (a ``FunctionModel``, say) receives: a task
  resumed from its checkpoints does not call the model again.

Tasks run on the worker's own connections, which see only committed rows: test with
``TransactionTestCase`` (pytest: ``transactional_db`` / ``django_db(transaction=True)``), not
``TestCase``, whose transaction is never committed. Nothing here imports pytest.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import ContextDecorator, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from asgiref.sync import async_to_sync
from django.db import connections, transaction
from django.test import TransactionTestCase

from django_absurd_agents import conf
from django_absurd_agents.client import ProjectAbsurd, absurd
from django_absurd_agents.exceptions import TransactionNotCommitted
from django_absurd_agents.execution import execute_claimed
from django_absurd_agents.registry import load_resolvers
from django_absurd_agents.task_thread import on_task_thread

__all__ = [
    "AbsurdTestCaseMixin",
    "AbsurdTransactionTestCase",
    "ModelCalls",
    "RanTask",
    "TransactionNotCommitted",
    "arun_tasks",
    "clean_queues",
    "count_model_calls",
    "eager_tasks",
    "run_tasks",
]

DEFAULT_MAX_TASKS = 1000


@dataclass(frozen=True)
class RanTask:
    """One execution by :func:`run_tasks`: ``outcome`` is the worker's (completed, failed, suspended, ...)."""

    task_id: str
    task_name: str
    queue: str
    attempt: int
    outcome: str
    result: Any = None
    """The task's return value when ``outcome`` is ``"completed"``."""
    error: BaseException | None = None


def _refuse_uncommitted(what: str) -> None:
    connection = connections[conf.get().database_alias]
    blocks = connection.atomic_blocks if connection.in_atomic_block else []
    if any(getattr(block, "_from_testcase", False) for block in blocks):
        raise TransactionNotCommitted(
            f"{what} runs tasks on the worker's own database connections, which cannot see what a TestCase's "
            "transaction has not committed (it never commits). Use TransactionTestCase, or pytest-django's "
            "transactional_db / @pytest.mark.django_db(transaction=True)."
        )


async def arun_tasks(
    queues: Iterable[str] | None = None,
    *,
    max_tasks: int = DEFAULT_MAX_TASKS,
    app: ProjectAbsurd | None = None,
) -> list[RanTask]:
    """Run the tasks that are due on ``queues`` (default: every configured queue) until none is left.

    Tasks spawned meanwhile run too; a task put to sleep (``run_after``, ``ctx.sleep_for``, a retry's
    backoff, an event wait) is not due and stays. More than ``max_tasks`` executions raise
    ``RuntimeError`` (a task spawning itself forever).
    """
    _refuse_uncommitted("run_tasks()")
    load_resolvers()
    settings = conf.get()
    clients = [(app or absurd).for_queue(queue) for queue in (tuple(queues or ()) or settings.all_queues)]
    worker_id = f"run_tasks:{os.getpid()}"
    ran: list[RanTask] = []
    try:
        progress = True
        while progress:
            progress = False
            for client in clients:
                while claimed := await client.claim_tasks(1, settings.claim_timeout, worker_id):
                    if len(ran) >= max_tasks:
                        raise RuntimeError(
                            f"run_tasks() ran {max_tasks} tasks and more are due: a task that spawns another "
                            "every time loops forever. Raise max_tasks if that many are expected."
                        )
                    progress = True
                    ran.append(await _execute(client, claimed[0], settings.claim_timeout))
    finally:
        for client in clients:
            await client.close()
    return ran


def run_tasks(
    queues: Iterable[str] | None = None, *, max_tasks: int = DEFAULT_MAX_TASKS, app: ProjectAbsurd | None = None
) -> list[RanTask]:
    """Synchronous :func:`arun_tasks`, for ``TransactionTestCase`` methods and sync tests."""
    _refuse_uncommitted("run_tasks()")  # here: arun_tasks runs in another thread, with another connection
    return async_to_sync(arun_tasks)(queues, max_tasks=max_tasks, app=app)


async def _execute(client: ProjectAbsurd, task: Any, claim_timeout: int) -> RanTask:
    async def run() -> Any:
        return await execute_claimed(client, task, claim_timeout)

    ended = await on_task_thread(run)  # sync code gets a thread and connection of its own, as in the worker
    result = None
    if ended.outcome == "completed":
        snapshot = await client.fetch_task_result(task["task_id"], client.queue_name)
        result = snapshot.result if snapshot is not None else None
    return RanTask(
        task_id=str(task["task_id"]),
        task_name=task["task_name"],
        queue=client.queue_name,
        attempt=task["attempt"],
        outcome=ended.outcome,
        result=result,
        error=ended.error,
    )


class eager_tasks(ContextDecorator):
    """Spawns run their task at once, in-process, through the real engine and database.

    ``absurd.spawn_sync`` (and so ``@task.enqueue()``) runs the task when its transaction commits, at
    once outside ``transaction.atomic()``; ``await absurd.spawn(...)`` runs it before returning. Each
    run drains the task's queue like :func:`run_tasks` (tasks due there run too), and ``ran`` lists
    every execution. A task that is not due (``run_after``, a sleep) stays for :func:`run_tasks`.
    """

    def __init__(self, app: ProjectAbsurd | None = None) -> None:
        self.app = app or absurd
        self.ran: list[RanTask] = []
        self._saved: list[dict[str, Any]] = []

    def __enter__(self) -> eager_tasks:
        app = self.app
        spawn_sync, spawn = app.spawn_sync, app.spawn
        self._saved.append({name: app.__dict__[name] for name in ("spawn_sync", "spawn") if name in app.__dict__})
        sync_signature, async_signature = inspect.signature(spawn_sync), inspect.signature(spawn)

        def eager_spawn_sync(*args: Any, **kwargs: Any) -> Any:
            _refuse_uncommitted("eager_tasks()")
            spawned = spawn_sync(*args, **kwargs)
            queue = self._queue(sync_signature, args, kwargs)
            transaction.on_commit(lambda: self.ran.extend(run_tasks([queue], app=app)), using=conf.get().database_alias)
            return spawned

        async def eager_spawn(*args: Any, **kwargs: Any) -> Any:
            spawned = await spawn(*args, **kwargs)
            self.ran.extend(await arun_tasks([self._queue(async_signature, args, kwargs)], app=app))
            return spawned

        app.spawn_sync = eager_spawn_sync  # type: ignore[method-assign]
        app.spawn = eager_spawn  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        saved = self._saved.pop()
        for name in ("spawn_sync", "spawn"):
            if name in saved:
                setattr(self.app, name, saved[name])
            else:
                self.app.__dict__.pop(name, None)

    def _queue(self, signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        bound = signature.bind(*args, **kwargs)
        return self.app.resolve_queue(bound.arguments["task_name"], bound.arguments.get("queue"))


def clean_queues(using: str | None = None) -> None:
    """Empty every Absurd queue's tables (tasks, runs, checkpoints, events, waits) in one statement.

    Django's ``TransactionTestCase`` flushes the tables of models only; Absurd's are not models. A
    database without the Absurd schema is left alone.
    """
    connection = connections[using or conf.get().database_alias]
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute("select to_regclass('absurd.queues') is not null")
        row = cursor.fetchone()
        if not row or not row[0]:
            return
        cursor.execute(
            "select format('%%I.%%I', %s, kind || '_' || q.queue_name) from absurd.queues q "
            "cross join unnest(array['t', 'r', 'c', 'e', 'w', 'i']) as kind "
            "where to_regclass(format('%%I.%%I', %s, kind || '_' || q.queue_name)) is not null",
            ["absurd", "absurd"],
        )
        tables = [table for (table,) in cursor.fetchall()]
        if tables:
            cursor.execute("truncate " + ", ".join(tables))


class AbsurdTestCaseMixin:
    """For ``TransactionTestCase`` subclasses: Absurd's tables are emptied after each test, with the models'."""

    def _fixture_teardown(self) -> None:
        super()._fixture_teardown()  # type: ignore[misc]
        alias = conf.get().database_alias
        if alias in self._databases_names(include_mirrors=False):  # type: ignore[attr-defined]
            clean_queues(alias)


class AbsurdTransactionTestCase(AbsurdTestCaseMixin, TransactionTestCase):
    """``TransactionTestCase`` that also empties Absurd's tables after each test."""


@dataclass
class ModelCalls:
    """What :func:`count_model_calls` saw: ``count`` requests, each with the messages it was sent."""

    count: int = 0
    requests: list[list[Any]] = field(default_factory=list)


@contextmanager
def count_model_calls(model: Any) -> Iterator[ModelCalls]:
    """Count the requests ``model`` (a pydantic-ai ``Model`` such as ``FunctionModel``, or an agent) receives.

    Streamed requests count too. Only calls made in this process are seen: use it with
    :func:`run_tasks` or :func:`eager_tasks`, not with a worker process.
    """
    target = model if hasattr(model, "request_stream") else getattr(model, "model", None)
    if target is None or isinstance(target, str) or not hasattr(target, "request"):
        raise TypeError(f"count_model_calls() needs a model instance (FunctionModel, ...) or an agent, not {model!r}.")
    calls = ModelCalls()
    request: Callable[..., Any] = target.request
    request_stream: Callable[..., Any] = target.request_stream

    async def counted_request(messages: list[Any], *args: Any, **kwargs: Any) -> Any:
        calls.count += 1
        calls.requests.append(list(messages))
        return await request(messages, *args, **kwargs)

    @asynccontextmanager
    async def counted_stream(messages: list[Any], *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        calls.count += 1
        calls.requests.append(list(messages))
        async with request_stream(messages, *args, **kwargs) as stream:
            yield stream

    saved = {name: target.__dict__[name] for name in ("request", "request_stream") if name in target.__dict__}
    target.request, target.request_stream = counted_request, counted_stream
    try:
        yield calls
    finally:
        for name in ("request", "request_stream"):
            if name in saved:
                setattr(target, name, saved[name])
            else:
                delattr(target, name)
