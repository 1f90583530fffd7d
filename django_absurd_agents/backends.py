"""A ``django.tasks`` backend: ``@task`` functions become Absurd tasks run by ``manage.py absurd_worker``.

.. code-block:: python

    TASKS = {"default": {"BACKEND": "django_absurd_agents.backends.AbsurdTaskBackend"}}

* ``.enqueue()`` spawns an Absurd task named by the function's import path (``reports.tasks.send``)
  on Django's own connection, like ``absurd.spawn_sync``: inside ``transaction.atomic()`` the task
  exists exactly when the transaction commits. ``.aenqueue()`` is Django's ``sync_to_async(enqueue)``.
* Django's queue ``"default"`` is ``ABSURD_AGENTS``' default queue (unless a queue is literally named
  ``default``); any other queue name is an Absurd queue of ``ABSURD_AGENTS['QUEUES']``.
* ``run_after`` makes the spawned run available from that time (Absurd 0.5.1's ``spawn_task`` takes no
  start time, so the new run's ``available_at`` is moved in the same transaction).
* ``priority`` is refused: Absurd claims tasks in the order they become available.
* A worker claiming such a task imports the function by that path (``registry.py``) and runs it: async
  functions on the worker's event loop, sync ones through ``sync_to_async`` on the task's thread, with
  Django's ``task_started`` / ``task_finished`` signals around it. A failure is retried like any
  Absurd task (``OPTIONS['MAX_ATTEMPTS']``, ``OPTIONS['RETRY_STRATEGY']``).
* ``takes_context=True`` passes an :class:`AbsurdTaskContext`: Django's ``TaskContext`` whose
  ``attempt`` is Absurd's, plus ``step()`` / ``absurd`` (the Absurd task context) so a ``@task``
  checkpoints its own steps and runs durable agents.

On Django 5.2 the same backend serves the ``django-tasks`` backport (``django_tasks``).
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from absurd_sdk import AsyncTaskContext, CancelledTask, FailedTask, SuspendTask
from asgiref.sync import async_to_sync, sync_to_async
from django.core import checks
from django.db import transaction
from django.utils import timezone
from django.utils.module_loading import import_string

from django_absurd_agents import conf, django_internals, sdk, tables, validation
from django_absurd_agents.client import absurd
from django_absurd_agents.registry import RESOLVERS, Registration
from django_absurd_agents.tables import FINISHED_STATES, table
from django_absurd_agents.task_context import check_context

try:  # Django >= 6.0
    from django.tasks import DEFAULT_TASK_QUEUE_NAME, task_backends
    from django.tasks.backends.base import BaseTaskBackend
    from django.tasks.base import DEFAULT_TASK_PRIORITY, Task, TaskContext, TaskError, TaskResult, TaskResultStatus
    from django.tasks.exceptions import InvalidTask, TaskResultDoesNotExist
    from django.tasks.signals import task_enqueued, task_finished, task_started
    from django.utils.json import normalize_json

    _SIGNALS_MODULE = "django.tasks.signals"
except ImportError:  # Django 5.2 with the django-tasks backport
    from django_tasks import DEFAULT_TASK_QUEUE_NAME, task_backends  # type: ignore[no-redef,assignment]
    from django_tasks.backends.base import BaseTaskBackend  # type: ignore[no-redef,assignment]
    from django_tasks.base import (  # type: ignore[no-redef,assignment]
        DEFAULT_TASK_PRIORITY,
        Task,
        TaskContext,
        TaskError,
        TaskResult,
        TaskResultStatus,
    )
    from django_tasks.exceptions import InvalidTaskError as InvalidTask  # type: ignore[no-redef,assignment]
    from django_tasks.exceptions import TaskResultDoesNotExist  # type: ignore[no-redef,assignment]
    from django_tasks.signals import task_enqueued, task_finished, task_started  # type: ignore[no-redef]
    from django_tasks.utils import normalize_json  # type: ignore[no-redef]

    _SIGNALS_MODULE = "django_tasks.signals"

logger = logging.getLogger("django_absurd_agents.worker")

__all__ = ["AbsurdTaskBackend", "AbsurdTaskContext", "InvalidTask", "TaskResultDoesNotExist"]

BACKEND_HEADER = "django_tasks_backend"
"""Spawn header naming the ``TASKS`` alias a task was enqueued through."""

OPTION_KEYS = frozenset({"MAX_ATTEMPTS", "RETRY_STRATEGY"})


@dataclass(frozen=True, slots=True, kw_only=True)
class AbsurdTaskContext(TaskContext):  # type: ignore[misc]
    """What a ``takes_context=True`` task gets: Django's ``TaskContext`` plus Absurd's step API.

    ``attempt`` is Absurd's attempt number (1 on the first run, 2 on the first retry, ...).
    ``absurd`` is the Absurd task context (``step``, ``sleep_for``, ``await_event``, ``emit_event``,
    ``heartbeat``); an ``AbsurdAgent`` run inside an async task checkpoints its model and tool calls
    in this task without it being passed anywhere.
    """

    absurd: AsyncTaskContext

    @property
    def attempt(self) -> int:
        return int(sdk.claimed_task(self.absurd)["attempt"])

    @property
    def task_id(self) -> str:
        return str(self.absurd.task_id)

    async def step(self, name: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Run ``fn`` once, as a checkpointed step: a retry returns the recorded value instead."""
        return await self.absurd.step(name, fn)

    def step_sync(self, name: str, fn: Callable[[], Any]) -> Any:
        """``step`` for a sync task: ``fn`` is a plain function, run on the task's thread."""
        return async_to_sync(self.absurd.step)(name, sync_to_async(fn))


def absurd_queue(django_queue: str) -> str:
    """The Absurd queue a ``django.tasks`` queue name stands for."""
    settings = conf.get()
    if django_queue == DEFAULT_TASK_QUEUE_NAME and django_queue not in settings.all_queues:
        return settings.default_queue
    return django_queue


class AbsurdTaskBackend(BaseTaskBackend):
    """``TASKS`` backend spawning Absurd tasks; ``QUEUES`` defaults to every queue of ``ABSURD_AGENTS``."""

    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = False

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        if "QUEUES" not in params:
            self.queues = set()  # any queue of ABSURD_AGENTS, checked at enqueue (settings may change)
        self.max_attempts: int | None = self.options.get("MAX_ATTEMPTS")
        self.retry_strategy: dict[str, Any] | None = self.options.get("RETRY_STRATEGY")
        self._spawn_arguments: dict[Any, tuple[conf.AgentsSettings, dict[str, Any]]] = {}

    def validate_task(self, task: Any) -> None:
        if task.priority != DEFAULT_TASK_PRIORITY:
            raise InvalidTask(
                "AbsurdTaskBackend does not support priority: Absurd claims tasks in the order they become "
                "available. Give urgent tasks a queue of their own (queue_name=...) served by its own workers."
            )
        super().validate_task(task)
        queue = absurd_queue(task.queue_name)
        known = conf.get().all_queues
        if queue not in known:
            raise InvalidTask(
                f"Queue {task.queue_name!r} is not an Absurd queue: add it to ABSURD_AGENTS['QUEUES'] and run "
                f"`manage.py migrate` (known queues: {', '.join(known)})."
            )

    def _spawn_of(self, task: Any) -> dict[str, Any]:
        """The arguments of ``spawn_sync`` but the params, once the task is valid.

        Worked out once per task while the settings stay (the same object): an enqueue then costs one
        dict lookup instead of validating the task, resolving its queue and building the options.
        """
        settings = conf.get()
        known = self._spawn_arguments.get(task) if task.run_after is None else None
        if known is not None and known[0] is settings:
            return known[1]
        self.validate_task(task)
        spawn = {
            "task_name": task.module_path,
            "queue": absurd_queue(task.queue_name),
            "max_attempts": self.max_attempts,
            "retry_strategy": self.retry_strategy,
            # The worker runs the task through the alias its decorator names, unless told otherwise.
            "headers": None if task.backend == self.alias else {BACKEND_HEADER: self.alias},
        }
        if task.run_after is None:  # a task with run_after is a new object per call: not worth keeping
            self._spawn_arguments[task] = (settings, spawn)
        return spawn

    def enqueue(self, task: Any, args: Any, kwargs: Any) -> Any:
        spawn = self._spawn_of(task)
        result: Any = TaskResult(
            task=task,
            id="",
            status=TaskResultStatus.READY,
            enqueued_at=None,
            started_at=None,
            finished_at=None,
            last_attempted_at=None,
            args=list(args),  # Django checks these are JSON values (TypeError otherwise) before anything is written
            kwargs=dict(kwargs),
            backend=self.alias,
            errors=[],
            worker_ids=[],
        )
        params = {"args": result.args, "kwargs": result.kwargs}
        headers = spawn["headers"]
        if headers is not None:  # a before_spawn hook may change the headers it is given: never the kept ones
            spawn = {**spawn, "headers": dict(headers)}
        if task.run_after is None:
            spawned = absurd.spawn_sync(params=params, **spawn)
        else:
            with transaction.atomic(using=conf.get().database_alias):
                spawned = absurd.spawn_sync(params=params, **spawn)
                with tables.connection().cursor() as cursor:
                    cursor.execute(_defer_statement(spawn["queue"]), [task.run_after, spawned["run_id"]])
        object.__setattr__(result, "id", spawned["task_id"])
        object.__setattr__(result, "enqueued_at", timezone.now())
        # send() itself: with only django.tasks' logger connected it costs what calling the logger does (2 µs).
        task_enqueued.send(type(self), task_result=result)
        return result

    def get_result(self, result_id: str) -> Any:
        try:
            task_id = validation.task_uuid(result_id)
        except ValueError:
            raise TaskResultDoesNotExist(result_id) from None
        row = tables.over_queues(self._absurd_queues(), lambda queues: _result_row(queues, task_id))
        if row is None:
            raise TaskResultDoesNotExist(result_id)
        return self._result(str(task_id), row)

    def _absurd_queues(self) -> list[str]:
        if self.queues:
            return list(dict.fromkeys(absurd_queue(q) for q in sorted(self.queues)))
        return list(conf.get().all_queues)

    def _result(self, result_id: str, row: dict[str, Any]) -> Any:
        queue, state, run_started = row["queue"], row["state"], row["run_started"]
        task = import_task(row["task_name"])
        if task is None:
            raise TaskResultDoesNotExist(
                f"{result_id}: task {row['task_name']!r} is not a django.tasks task that imports here."
            )
        if absurd_queue(task.queue_name) != queue or task.backend != self.alias:
            task = task.using(queue_name=queue, backend=self.alias)
        params = row["params"] or {}
        finished = row["completed_at"] or row["failed_at"] or row["cancelled_at"]
        result: Any = TaskResult(
            task=task,
            id=result_id,
            status=_status(state, run_started),
            enqueued_at=row["enqueue_at"],
            started_at=row["first_started_at"],
            finished_at=finished if state in FINISHED_STATES else None,
            last_attempted_at=run_started,
            args=params.get("args", []),
            kwargs=params.get("kwargs", {}),
            backend=self.alias,
            errors=[task_error(reason) for reason in row["failures"] or []],
            worker_ids=list(row["worker_ids"] or []),
        )
        if state == "completed":
            object.__setattr__(result, "_return_value", row["completed_payload"])
        return result

    def check(self, **kwargs: Any) -> list[Any]:
        messages: list[checks.CheckMessage] = []
        for key in sorted(set(self.options) - OPTION_KEYS):
            messages.append(
                checks.Error(
                    f"Unknown key {key!r} in TASKS[{self.alias!r}]['OPTIONS'].",
                    hint=f"Valid keys: {', '.join(sorted(OPTION_KEYS))}.",
                    id="absurd_agents.E020",
                )
            )
        known = conf.get().all_queues
        for queue in sorted(self.queues):
            if absurd_queue(queue) not in known:
                messages.append(
                    checks.Error(
                        f"TASKS[{self.alias!r}]['QUEUES'] names {queue!r}, which is not an Absurd queue.",
                        hint=f"Add it to ABSURD_AGENTS['QUEUES'] and run `manage.py migrate` "
                        f"(known: {', '.join(known)}).",
                        id="absurd_agents.E021",
                    )
                )
        return messages


def _status(state: str, run_started: datetime | None) -> Any:
    if state == "completed":
        return TaskResultStatus.SUCCESSFUL
    if state in ("failed", "cancelled"):
        return TaskResultStatus.FAILED
    if state == "running" or (state == "sleeping" and run_started is not None):
        return TaskResultStatus.RUNNING  # a sleeping run that started is suspended mid-task (a sleep, an event)
    return TaskResultStatus.READY  # pending, or waiting for a retry


_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?::|$)")


def task_error(reason: Any) -> Any:
    """Django's ``TaskError`` for an Absurd failure record (``name``, ``message``, ``traceback``)."""
    reason = reason if isinstance(reason, dict) else {"message": str(reason)}
    name = str(reason.get("name") or "Exception")
    trace = reason.get("traceback") or f"{name}: {reason.get('message', '')}"
    path = f"builtins.{name}"
    # absurd-sdk records the class name only; the traceback's last exception line has the full path.
    for line in str(trace).splitlines():
        match = _EXCEPTION_LINE.match(line)
        if match and (match.group(1) == name or match.group(1).endswith("." + name)):
            path = match.group(1) if "." in match.group(1) else f"builtins.{name}"
    return TaskError(exception_class_path=path, traceback=str(trace))


def _defer_statement(queue: str) -> str:
    """Make a freshly spawned (pending) run available from ``%s`` only."""
    return (
        f"update {table('r', queue)} set available_at = greatest(available_at, %s) "
        "where run_id = %s and state = 'pending'"
    )


def _result_row(queues: list[str], task_id: Any) -> dict[str, Any] | None:
    """The task with ``task_id`` in any of ``queues``, with its last run and every run's worker and failure."""
    if not queues:
        return None
    statement = " union all ".join(
        f"select %s::text as queue, t.task_name, t.params, t.state, t.enqueue_at, t.first_started_at, "
        f"t.completed_payload, t.cancelled_at, r.started_at as run_started, r.completed_at, r.failed_at, "
        f"(select array_agg(x.claimed_by order by x.attempt) from {table('r', queue)} x "
        f" where x.task_id = t.task_id and x.claimed_by is not null) as worker_ids, "
        f"(select jsonb_agg(x.failure_reason order by x.attempt) from {table('r', queue)} x "
        f" where x.task_id = t.task_id and x.failure_reason is not null) as failures "
        f"from {table('t', queue)} t left join {table('r', queue)} r on r.run_id = t.last_attempt_run "
        "where t.task_id = %s"
        for queue in queues
    )
    return tables.first_row(statement, [value for queue in queues for value in (queue, task_id)])


_tasks: dict[str, Any] = {}
_warned: set[str] = set()


def import_task(name: str) -> Any:
    """The ``@task`` whose import path is ``name``, or None when there is none (logged once)."""
    task = _tasks.get(name)
    if task is not None:
        return task
    try:
        found = import_string(name)
    except ImportError as exc:
        found, problem = None, f"cannot import it ({exc})"
    else:
        problem = f"it is a {type(found).__name__}, not a @task"
    if not isinstance(found, Task):
        if name not in _warned:
            _warned.add(name)
            logger.warning("Task %r is not a django.tasks @task in this worker: %s.", name, problem)
        return None
    _tasks[name] = found
    return found


def _resolve(name: str, queue: str) -> Registration | None:
    """A registration running the ``@task`` at ``name`` for ``queue`` (``registry.RESOLVERS``)."""
    if "." not in name or import_task(name) is None:
        return None
    return sdk.registration(name, queue, None, None, run_django_task)


RESOLVERS.append(_resolve)

_HISTORY = (
    "select t.enqueue_at, t.first_started_at, "
    "(select array_agg(r.claimed_by order by r.attempt) from {runs} r "
    " where r.task_id = t.task_id and r.claimed_by is not null) "
    "from {tasks} t where t.task_id = %s"
)


async def run_django_task(params: Any, ctx: AsyncTaskContext) -> Any:
    """The Absurd handler of every ``@task``: run the function named by the task, with Django's signals."""
    ctx = check_context(ctx)
    claimed = sdk.claimed_task(ctx)
    task = import_task(claimed["task_name"])
    alias = str((claimed.get("headers") or {}).get(BACKEND_HEADER) or task.backend)
    queue = sdk.queue_name(ctx)
    cursor = await sdk.task_connection(ctx).execute(
        _HISTORY.format(runs=table("r", queue), tasks=table("t", queue)),
        (ctx.task_id,),
    )
    enqueued, first_started, worker_ids = await cursor.fetchone() or (None, None, None)
    params = params if isinstance(params, dict) else {}
    args, kwargs = params.get("args", []), params.get("kwargs", {})
    sender = type(task_backends[alias]) if alias in task_backends.settings else AbsurdTaskBackend
    result: Any = TaskResult(
        task=task,
        id=str(ctx.task_id),
        status=TaskResultStatus.RUNNING,
        enqueued_at=enqueued,
        started_at=first_started,
        finished_at=None,
        last_attempted_at=timezone.now(),
        args=args,
        kwargs=kwargs,
        backend=alias,
        errors=[],
        worker_ids=list(worker_ids or []),
    )
    await _send(task_started, sender, result)
    try:
        if task.takes_context:
            value = await task.acall(AbsurdTaskContext(task_result=result, absurd=ctx), *args, **kwargs)
        else:
            value = await task.acall(*args, **kwargs)
        value = normalize_json(value)
    except (SuspendTask, CancelledTask, FailedTask):
        raise  # a durable sleep or wait, or a run no longer ours: not the task's failure
    except Exception as exc:
        object.__setattr__(result, "status", TaskResultStatus.FAILED)
        object.__setattr__(result, "finished_at", timezone.now())
        result.errors.append(TaskError(exception_class_path=_class_path(type(exc)), traceback=_traceback(exc)))
        await _send(task_finished, sender, result)  # inside the except: Django's log receiver logs the traceback
        raise
    object.__setattr__(result, "status", TaskResultStatus.SUCCESSFUL)
    object.__setattr__(result, "finished_at", timezone.now())
    object.__setattr__(result, "_return_value", value)
    await _send(task_finished, sender, result)
    return value


def _django_own(receivers: list[Any]) -> bool:
    """Whether these are only the receivers django.tasks connects itself (loggers: no database, no I/O)."""
    return all(getattr(receiver, "__module__", None) == _SIGNALS_MODULE for receiver in receivers)


async def _send(signal: Any, sender: type, result: Any) -> None:
    """``signal.asend``, except that Django's own log receivers run here, without a trip to a thread.

    ``asend`` runs sync receivers through ``sync_to_async`` (they may use the ORM); the only ones
    connected by default are django.tasks' loggers, which touch no database.
    """
    sync_receivers, async_receivers = django_internals.live_receivers(signal, sender)
    if async_receivers or not _django_own(sync_receivers):
        await signal.asend(sender, task_result=result)
        return
    for receiver in sync_receivers:
        receiver(signal=signal, sender=sender, task_result=result)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))
