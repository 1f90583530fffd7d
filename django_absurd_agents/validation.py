"""Arguments of the client's calls, checked before any SQL, and tasks found by id in any queue.

A statement that Postgres refuses inside ``transaction.atomic()`` aborts the caller's transaction
(every later query fails until the rollback). So the client refuses what Postgres would refuse (a
malformed id, a blank task name, ``max_attempts=0``) in Python first, and looks a task up with a plain
``SELECT`` before calling Absurd functions that raise for an unknown id.

Task ids are unique across queues (Absurd makes UUIDv7s), so a call by id without ``queue_name``
finds the task's queue by looking the id up in every catalogued queue's ``absurd.t_<queue>`` table.
"""

from __future__ import annotations

import uuid
from typing import Any

from psycopg import sql

from django_absurd_agents.exceptions import TaskNotFound, UnknownQueue
from django_absurd_agents.jsonsafe import InvalidParams, name_problem


def task_uuid(task_id: object) -> uuid.UUID:
    """``task_id`` (a UUID or its text) as a UUID, or ``InvalidParams`` naming it (a ``ValueError``)."""
    if isinstance(task_id, uuid.UUID):
        return task_id
    if isinstance(task_id, str):
        try:
            return uuid.UUID(task_id)
        except ValueError:
            pass
    raise InvalidParams(f"{task_id!r} is not a task id: task ids are UUIDs such as '0190c3e2-7a1b-7c3d-...'.")


def task_name(name: object) -> str:
    problem = name_problem(name, "The task name")
    if problem is not None:
        raise InvalidParams(problem)
    assert isinstance(name, str)
    return name


def event_name(name: object) -> str:
    problem = name_problem(name, "The event name")
    if problem is not None:
        raise InvalidParams(problem)
    assert isinstance(name, str)
    return name


def idempotency_key(key: object) -> str | None:
    if key is None:
        return None
    problem = name_problem(key, "The idempotency key")
    if problem is not None:
        raise InvalidParams(problem)
    assert isinstance(key, str)
    return key


def max_attempts(value: object, *, what: str = "max_attempts") -> int | None:
    """``value`` if it is a whole number of attempts (at least 1) or None; else ``InvalidParams``.

    Zero is refused, not read as "the default": a task that may run zero times cannot run.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParams(f"{what} must be a whole number of attempts (at least 1), not {value!r}.")
    if value < 1:
        default = (
            " Leave it out (None) for the default, ABSURD_AGENTS['DEFAULT_MAX_ATTEMPTS']."
            if what == "max_attempts"
            else ""
        )
        raise InvalidParams(
            f"{what} must be at least 1, not {value}: it counts the attempts, the first included.{default}"
        )
    return value


def unknown_queue(queue: str) -> UnknownQueue:
    return UnknownQueue(
        f"Queue {queue!r} does not exist in the database. Add it to ABSURD_AGENTS['QUEUES'] and run "
        "`manage.py migrate`, or use a queue that exists."
    )


CATALOG_SQL = (
    "select q.queue_name from absurd.queues q "
    "where to_regclass('absurd.' || quote_ident('t_' || q.queue_name)) is not null order by q.queue_name"
)
"""Catalogued queues whose task table exists (a catalog row without tables is left out)."""


def _searched(catalog: list[Any], queue: str | None) -> list[str]:
    queues = [str(row[0]) for row in catalog]
    if queue is None:
        return queues
    if queue not in queues:
        raise unknown_queue(queue)
    return [queue]


def _locate_statement(queues: list[str], task_id: uuid.UUID) -> sql.Composed:
    """One statement giving ``(queue, state)`` of the task with ``task_id`` in any of ``queues``.

    Everything is composed by psycopg (identifiers and literals), so the statement takes no
    parameters (no %-formatting) and any catalogued queue name, ``%`` included, is safe.
    """
    parts = [
        sql.SQL("select {queue}::text, state from {table} where task_id = {task_id}").format(
            queue=sql.Literal(queue), table=sql.Identifier("absurd", f"t_{queue}"), task_id=sql.Literal(task_id)
        )
        for queue in queues
    ]
    return sql.SQL(" union all ").join(parts) + sql.SQL(" limit 1")


def _found(row: Any) -> tuple[str, str] | None:
    return None if row is None else (str(row[0]), str(row[1]))


def locate_sync(cursor: Any, task_id: uuid.UUID, queue: str | None) -> tuple[str, str] | None:
    """``(queue, state)`` of the task in ``queue`` (None: any queue), read with ``cursor`` (Django's)."""
    cursor.execute(CATALOG_SQL)
    queues = _searched(cursor.fetchall(), queue)
    if not queues:
        return None
    cursor.execute(_locate_statement(queues, task_id).as_string(None))
    return _found(cursor.fetchone())


async def locate(conn: Any, task_id: uuid.UUID, queue: str | None) -> tuple[str, str] | None:
    """Async counterpart of :func:`locate_sync`, on a psycopg ``AsyncConnection``."""
    cursor = await conn.execute(CATALOG_SQL)
    queues = _searched(await cursor.fetchall(), queue)
    if not queues:
        return None
    cursor = await conn.execute(_locate_statement(queues, task_id))
    return _found(await cursor.fetchone())


def not_found(task_id: object, queue: str | None) -> TaskNotFound:
    where = f"queue {queue!r}" if queue else "any queue"
    return TaskNotFound(f"Task {task_id} was not found in {where}.")
