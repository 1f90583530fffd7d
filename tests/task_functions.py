"""``@task`` functions of ``django.tasks`` (the ``django-tasks`` backport on Django 5.2) for the backend's tests.

Worker processes import this module by the tasks' import paths, as they would a project's.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from django.db import connection

try:
    from django.tasks import task
except ImportError:  # Django 5.2
    from django_tasks import task  # type: ignore[no-redef]

from tests.agents import analyst, log_call


@task
def add(a: int, b: int) -> int:
    return a + b


@task
async def multiply(a: int, b: int) -> int:
    return a * b


@task(queue_name="other")
def on_other(x: Any) -> dict[str, Any]:
    return {"queue": "other", "x": x}


class PaymentDeclined(Exception):
    pass


@task
def decline(reason: str) -> None:
    raise PaymentDeclined(reason)


@task
def returns_unstorable() -> Any:
    return {1, 2}  # a set is no JSON value


@task(takes_context=True)
async def flaky(context: Any, fail_times: int) -> dict[str, Any]:
    """Fails on its first ``fail_times`` attempts."""
    if context.attempt <= fail_times:
        raise RuntimeError(f"attempt {context.attempt} fails")
    return {"attempt": context.attempt, "task_id": context.task_id, "workers": len(context.task_result.worker_ids)}


@task(takes_context=True)
async def checkpointed(context: Any, log: str) -> dict[str, Any]:
    """A step whose body runs once although the first attempt fails after it."""

    async def side_effect() -> str:
        with open(log, "a") as f:
            f.write("side effect\n")
        return "done"

    value = await context.step("side-effect", side_effect)
    if context.attempt == 1:
        raise RuntimeError("fails after the step, to force a retry")
    return {"step": value, "attempt": context.attempt}


@task(takes_context=True)
def checkpointed_sync(context: Any, log: str) -> dict[str, Any]:
    """``checkpointed`` for a sync task, through ``context.step_sync``."""

    def side_effect() -> str:
        with open(log, "a") as f:
            f.write("sync side effect\n")
        return "done"

    value = context.step_sync("side-effect", side_effect)
    if context.attempt == 1:
        raise RuntimeError("fails after the step, to force a retry")
    return {"step": value, "attempt": context.attempt}


@task
def where_am_i() -> dict[str, Any]:
    """The thread and database session a sync task runs on."""
    with connection.cursor() as cursor:
        cursor.execute("select pg_backend_pid()")
        pid = cursor.fetchone()[0]
    return {"thread": threading.current_thread().name, "backend_pid": pid, "process": os.getpid()}


@task
def enqueue_child(n: int) -> str:
    """A task that enqueues another one."""
    return str(add.enqueue(n, 1).id)


@task(takes_context=True)
async def analyse_report(context: Any, prompt: str) -> dict[str, Any]:
    """A durable agent run inside a ``@task``: every model and tool call is a checkpoint of this task."""
    log_call(f"attempt:{context.attempt}")
    result = await analyst.run(prompt)
    return {"output": result.output, "attempt": context.attempt}


not_a_task = 42
