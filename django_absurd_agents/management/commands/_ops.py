"""Shared by the operations commands (``absurd_task``, ``absurd_tasks``, ``absurd_retry``, ...).

Queue names end up inside table names (``absurd.t_<queue>``), which SQL cannot bind as parameters:
a queue given on the command line is validated first, and every table name is quoted by psycopg's
``sql.Identifier`` (queues created by other tools may use names our settings would refuse).
Everything else is a bound parameter.
"""

from __future__ import annotations

import datetime
import json
import uuid
from typing import Any

from django.core.management.base import CommandError
from django.db import DatabaseError
from psycopg import sql

from django_absurd_agents import conf
from django_absurd_agents.client import django_connection, load_json

STATES = ("pending", "running", "sleeping", "completed", "failed", "cancelled")
TERMINAL_STATES = ("completed", "failed", "cancelled")


def connection() -> Any:
    return django_connection()


def table(prefix: str, queue: str) -> str:
    """``absurd."<prefix>_<queue>"``, quoted so that any catalogued queue name is safe.

    A ``%`` is doubled: the name goes into statements run with ``%s`` parameters.
    """
    conn = connection()
    conn.ensure_connection()
    return sql.Identifier("absurd", f"{prefix}_{queue}").as_string(conn.connection).replace("%", "%%")


def fetch(query: str, params: list[Any] | tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with connection().cursor() as cursor:
        cursor.execute(query, params)
        return list(cursor.fetchall())


def known_queues() -> list[str]:
    try:
        return [row[0] for row in fetch("select queue_name from absurd.queues order by queue_name")]
    except DatabaseError as exc:
        raise CommandError(
            f"Cannot read the Absurd queues ({exc}). Is the schema installed? Run `manage.py migrate`."
        ) from exc


def checked_queue(name: str) -> str:
    """``name`` if it is a valid queue that exists, else a CommandError naming the queues there are."""
    problem = conf.queue_name_error(name)
    if problem:
        raise CommandError(problem)
    queues = known_queues()
    if name not in queues:
        raise CommandError(
            f"Queue {name!r} does not exist. Queues in the database: {', '.join(queues) or '(none)'}. "
            "Declare queues in ABSURD_AGENTS['QUEUES'] and run `manage.py migrate`."
        )
    return name


def task_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise CommandError(f"{value!r} is not a task id (a UUID such as 0190c3e2-...).") from None


def locate_task(identifier: str, queue: str | None = None) -> tuple[str, str]:
    """(queue, state) of a task, looked up in ``queue`` or else in every queue."""
    queues = [checked_queue(queue)] if queue else known_queues()
    for name in queues:
        rows = fetch(f"select state from {table('t', name)} where task_id = %s", [identifier])
        if rows:
            return name, rows[0][0]
    where = f"queue {queue!r}" if queue else f"any queue ({', '.join(queues) or 'there are none'})"
    raise CommandError(f"Task {identifier} was not found in {where}.")


def as_json(value: Any) -> Any:
    """A jsonb value read through Django's cursor (text) as Python data."""
    return load_json(value)


def timestamp(value: datetime.datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else "-"


def dumps(value: Any, *, indent: int | None = 2) -> str:
    return json.dumps(value, indent=indent, default=str, ensure_ascii=False)


def shortened(text: str, limit: int) -> str:
    if limit <= 0 or len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters; --full or --json shows everything)"
