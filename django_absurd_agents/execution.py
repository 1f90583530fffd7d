"""Run one claimed task, the same way for ``absurd_worker``, ``absurd.work_batch`` and ``start_worker``.

absurd-sdk's own ``_execute_task`` creates the task's context, runs the handler and writes the
outcome. We keep its building blocks (``sdk.py``) and change what happens around them:

* the context and the outcome write through a ``TaskConnection``, so a database restart in the
  middle of a run costs a reconnect, not a second execution of the step in flight;
* a task no handler is registered for is put back without using an attempt, for
  ``UNKNOWN_TASK_GRACE`` seconds: in a rolling deploy the old workers claim what only the new ones know;
* a connection error raised inside the task's own code (an ORM tool that found the server out of
  connection slots) hands the run back without using an attempt, a bounded number of times;
* a handler that caught absurd-sdk's ``SuspendTask`` with a broad ``except Exception`` fails
  with a message saying so, instead of Absurd's "is not currently running";
* the caller learns how the task ended, to log it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import psycopg
from absurd_sdk import CancelledTask, ClaimedTask, FailedTask, SuspendTask

from django_absurd_agents import conf, jsonsafe, sdk
from django_absurd_agents.attempts import last_attempt_statement
from django_absurd_agents.exceptions import SwallowedSuspension, UnknownTask, UnrecordableTaskResult
from django_absurd_agents.reconnect import Lease, TaskConnection, is_transient

if TYPE_CHECKING:
    from django_absurd_agents.client import ProjectAbsurd

logger = logging.getLogger("django_absurd_agents.worker")

Outcome = Literal["completed", "failed", "suspended", "cancelled", "lost", "unknown", "misrouted", "handed back"]

UNKNOWN_TASK_CHECKPOINT = "$unknown_task"
"""Checkpoint holding when a task was first claimed by a worker that did not know it, and why."""
HANDBACK_CHECKPOINT = "$connection_handbacks"
"""Checkpoint counting the runs handed back because the task's own database connection failed."""

_UNKNOWN_RECHECK = 15.0


@dataclass
class Ended:
    """How one execution ended, for the worker's log."""

    outcome: Outcome
    error: BaseException | None = None


def unknown_task_message(name: str) -> str:
    return (
        f"No handler is registered for task {name!r} in this worker. Register it with "
        f"@absurd.register_task(name={name!r}) in an installed app's tasks.py, or list its module in "
        "ABSURD_AGENTS['TASK_MODULES'], then restart the worker and retry the task."
    )


def is_connection_failure(exc: BaseException) -> bool:
    """A failed database session, also when Django wrapped psycopg's error in its own class."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, psycopg.Error | OSError) and is_transient(seen):
            return True
        seen = seen.__cause__
    return False


async def execute_claimed(
    client: ProjectAbsurd, task: ClaimedTask, claim_timeout: int, *, claimed_at: float | None = None
) -> Ended:
    """Run ``task`` (claimed by ``client`` on its queue) and record its outcome."""
    queue = client.queue_name
    lease = Lease(claim_timeout, claimed_at)
    conn = TaskConnection(client.live_connection, lease, f"{task['task_name']} {task['task_id']}")
    registration = client.registry.get(task["task_name"])
    if registration is None:
        await _put_back_unknown(conn, queue, task)
        return Ended("unknown")
    if registration["queue"] != queue:
        error = Exception(
            f"Task {task['task_name']!r} is registered for queue {registration['queue']!r}, not {queue!r}."
        )
        await _fail(conn, queue, task, error)
        return Ended("misrouted", error)

    ctx = await sdk.create_context(conn, queue, task, claim_timeout)

    async def execute() -> Any:
        return await registration["handler"](task["params"], ctx)

    try:
        with sdk.current_context(ctx):
            result = await client.wrap_task_execution(ctx, execute)
            await _complete(conn, queue, task, _encoded_result(task, result))
    except SuspendTask:
        return Ended("suspended")
    except CancelledTask:
        return Ended("cancelled")
    except FailedTask:
        return Ended("lost")
    except Exception as exc:
        return await _after_error(conn, queue, task, exc)
    return Ended("completed")


def _encoded_result(task: ClaimedTask, result: Any) -> str:
    """The task's result as the JSON text Absurd stores (pydantic models and messages included).

    ``result.all_messages()`` becomes the list ``all_messages_json()`` holds; a value Postgres could
    not store is refused with the task's name.
    """
    try:
        return jsonsafe.encode(result, what=f"The result of task {task['task_name']!r}")
    except ValueError as exc:
        raise UnrecordableTaskResult(
            f"{exc} Return JSON data from the task (no NaN or Infinity, no NUL characters)."
        ) from exc


async def _complete(conn: TaskConnection, queue: str, task: ClaimedTask, encoded: str) -> None:
    """Absurd's completion with the result encoded once (absurd-sdk's own ``json.dumps`` it again, so the text
    would have to be decoded first), Absurd's errors mapped to ``CancelledTask``/``FailedTask`` as the SDK does."""
    with sdk.task_state_errors():
        await conn.execute("select absurd.complete_run(%s, %s, %s)", (queue, task["run_id"], encoded))


async def _after_error(conn: TaskConnection, queue: str, task: ClaimedTask, exc: Exception) -> Ended:
    if "is not currently running" in str(exc) and await _task_state(conn, queue, task) == "sleeping":
        error: Exception = SwallowedSuspension(
            f"Task {task['task_name']!r} went on after it was suspended: absurd-sdk suspends a task for "
            "ctx.sleep_for / ctx.await_event (and durable approvals) by raising SuspendTask, and a broad "
            "`except Exception` caught it. Put `except SuspendTask: raise` (from absurd_sdk) before it, or catch "
            "narrower exceptions."
        )
        error.__cause__ = exc
        await _fail(conn, queue, task, error)
        return Ended("failed", error)
    if is_connection_failure(exc) and await _hand_back(conn, queue, task, exc):
        return Ended("handed back", exc)
    await _fail(conn, queue, task, exc)
    return Ended("failed", exc)


async def _fail(conn: TaskConnection, queue: str, task: ClaimedTask, error: BaseException) -> None:
    with contextlib.suppress(CancelledTask, FailedTask):
        await sdk.fail_run(conn, queue, task["run_id"], error)


async def _task_state(conn: TaskConnection, queue: str, task: ClaimedTask) -> str | None:
    cursor = await conn.execute("select state from absurd.get_task_result(%s, %s)", (queue, task["task_id"]))
    row = await cursor.fetchone()
    return None if row is None else str(row[0])


async def _checkpoint(conn: TaskConnection, queue: str, task: ClaimedTask, name: str) -> Any:
    cursor = await conn.execute(
        "select state from absurd.get_task_checkpoint_state(%s, %s, %s)", (queue, task["task_id"], name)
    )
    row = await cursor.fetchone()
    return None if row is None else row[0]


async def _save_checkpoint(conn: TaskConnection, queue: str, task: ClaimedTask, name: str, state: Any) -> None:
    with sdk.task_state_errors():
        await conn.execute(
            "select absurd.set_task_checkpoint_state(%s, %s, %s, %s, %s, null)",
            (queue, task["task_id"], name, json.dumps(state), task["run_id"]),
        )


async def _schedule(conn: TaskConnection, queue: str, task: ClaimedTask, delay: float) -> None:
    """Put the run back to sleep for ``delay`` seconds: the same run, so no attempt is used."""
    try:
        await conn.execute(
            "select absurd.schedule_run(%s, %s, absurd.current_time() + make_interval(secs => %s))",
            (queue, task["run_id"], delay),
        )
    except psycopg.errors.RaiseException as exc:
        if "is not currently running" in str(exc):  # swept after its lease expired: no longer ours
            raise FailedTask() from exc
        raise


async def _hand_back(conn: TaskConnection, queue: str, task: ClaimedTask, exc: BaseException) -> bool:
    """Hand a run whose own connection failed back to the queue, unless it has been handed back too often."""
    try:
        state = await _checkpoint(conn, queue, task, HANDBACK_CHECKPOINT) or {}
        count = int(state.get("count", 0)) + 1
        limit = conf.get().max_connection_handbacks
        if count > limit:
            return False
        await _save_checkpoint(conn, queue, task, HANDBACK_CHECKPOINT, {"count": count, "last_error": str(exc)[:500]})
        delay = min(30.0, 0.5 * 2 ** (count - 1))
        await _schedule(conn, queue, task, delay)
    except (CancelledTask, FailedTask):
        return True  # the run is no longer ours; nothing to hand back
    logger.warning(
        "task handed back name=%s id=%s queue=%s: its database connection failed (%s); it runs again in %.1fs "
        "without using an attempt (%d/%d).",
        task["task_name"],
        task["task_id"],
        queue,
        str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
        delay,
        count,
        limit,
    )
    return True


async def _put_back_unknown(conn: TaskConnection, queue: str, task: ClaimedTask) -> None:
    """Defer a task this worker cannot run; fail it for good once the grace period is over."""
    grace = conf.get().unknown_task_grace
    reason = unknown_task_message(task["task_name"])
    cursor = await conn.execute("select absurd.current_time()")
    row = await cursor.fetchone()
    now = row[0]
    state = await _checkpoint(conn, queue, task, UNKNOWN_TASK_CHECKPOINT) or {}
    first_seen = state.get("first_seen") or now.isoformat()
    elapsed = (now - datetime.fromisoformat(first_seen)).total_seconds()
    claims = int(state.get("claims", 0)) + 1
    try:
        await _save_checkpoint(
            conn,
            queue,
            task,
            UNKNOWN_TASK_CHECKPOINT,
            {"first_seen": first_seen, "last_seen": now.isoformat(), "claims": claims, "reason": reason},
        )
        if elapsed < grace:
            delay = min(_UNKNOWN_RECHECK * random.uniform(1, 2), max(grace - elapsed, 0.05))
            await _schedule(conn, queue, task, delay)
            logger.error(
                "task put back name=%s id=%s queue=%s: no handler is registered for %r in this worker; it is "
                "offered again in %.0fs, and fails %.0fs after it was first claimed unknown "
                "(ABSURD_AGENTS['UNKNOWN_TASK_GRACE']). Register it with @absurd.register_task(name=%r) in an "
                "installed app's tasks.py or list its module in ABSURD_AGENTS['TASK_MODULES'].",
                task["task_name"],
                task["task_id"],
                queue,
                task["task_name"],
                delay,
                grace,
                task["task_name"],
            )
            return
        error = UnknownTask(f"{reason} (unknown to every worker that claimed it for {elapsed:.0f}s)")
        await conn.run(lambda live: _fail_for_good(live, queue, task, error))
    except (CancelledTask, FailedTask):
        return


async def _fail_for_good(live: psycopg.AsyncConnection[Any], queue: str, task: ClaimedTask, error: Exception) -> None:
    """Fail the task with no retry left: its attempts are capped at this one, in the same transaction."""
    async with live.transaction():
        await live.execute(last_attempt_statement(queue), (task["run_id"],))
        await sdk.fail_run(live, queue, task["run_id"], error)
    logger.error(
        "task failed name=%s id=%s queue=%s: %s", task["task_name"], task["task_id"], queue, error, exc_info=False
    )
