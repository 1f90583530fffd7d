"""Shared by the operations commands (``absurd_task``, ``absurd_tasks``, ``absurd_retry``, ...).

Queue names end up inside table names (``absurd.t_<queue>``), which SQL cannot bind as parameters:
a queue given on the command line is validated first, and every table name is quoted by psycopg's
``sql.Identifier`` (queues created by other tools may use names our settings would refuse).
Everything else is a bound parameter.
"""

from __future__ import annotations

import datetime
import json
import re
import uuid
from typing import Any

from django.core.management.base import CommandError
from django.db import DatabaseError
from psycopg import sql

from django_absurd_agents import conf, jsonsafe, queries
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


def fetch_named(query: str, params: list[Any] | tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Like ``fetch``, each row as a dict by column name."""
    with connection().cursor() as cursor:
        cursor.execute(query, params)
        names = [column.name for column in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def known_queues() -> list[str]:
    try:
        catalog = fetch_named(queries.QUEUE_CATALOG_SQL)
    except DatabaseError as exc:
        raise CommandError(
            f"Cannot read the Absurd queues ({exc}). Is the schema installed? Run `manage.py migrate`."
        ) from exc
    # A row inserted into absurd.queues without its tables (by hand, or by a tool that failed) is left out.
    return [row["queue_name"] for row in catalog if row["has_tables"]]


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


def queue_option(value: str | None) -> str | None:
    """A ``--queue`` value checked: None when the option was left out.

    An empty value is an error, never "every queue" or "the default queue": ``--queue "$UNSET"``
    must not widen a command to every queue.
    """
    if value is None:
        return None
    return checked_queue(queue_name_given(value))


def queue_name_given(value: str) -> str:
    """``value`` unless it is empty (or blank): then a CommandError, before any SQL."""
    if not value.strip():
        raise CommandError(
            "--queue needs a queue name (it was given an empty value, e.g. an unset shell variable). "
            "Name the queue, or leave --queue out."
        )
    return value


_UUID_RE = re.compile(r"\{?[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}\}?", re.IGNORECASE)


def task_id(value: str) -> str:
    """``value`` as a canonical task id, or a CommandError naming it; checked before any SQL."""
    if not isinstance(value, str) or not _UUID_RE.fullmatch(value.strip()):
        raise CommandError(f"{value!r} is not a task id (a UUID such as 0190c3e2-8f4e-7c2a-9d1b-3f5e6a7b8c9d).")
    return str(uuid.UUID(value.strip()))


def locate_task(identifier: str, queue: str | None = None) -> tuple[str, str]:
    """(queue, state) of a task, looked up in ``queue`` or else (``queue`` None) in every queue."""
    checked = queue_option(queue)
    queues = [checked] if checked is not None else known_queues()
    for name in queues:
        rows = fetch(f"select state from {table('t', name)} where task_id = %s", [identifier])
        if rows:
            return name, rows[0][0]
    where = f"queue {queue!r}" if queue else f"any queue ({', '.join(queues) or 'there are none'})"
    raise CommandError(f"Task {identifier} was not found in {where}.")


class UnstorableJSON(ValueError):
    """Valid JSON text (or nearly: NaN, Infinity) that PostgreSQL's jsonb cannot store."""


def _refuse_constant(name: str) -> Any:
    raise UnstorableJSON(
        f'{name} is not a JSON number and PostgreSQL refuses it: write null, or a string such as "{name}".'
    )


def text_problem(text: str) -> str | None:
    """Why PostgreSQL cannot store ``text`` (a NUL character, a lone surrogate), or None."""
    problem = jsonsafe.find_problem(text)
    return None if problem is None else f"it contains {problem.detail.removesuffix(' of the string')}. {problem.hint}"


def loads_storable_json(text: str) -> Any:
    """``text`` parsed as JSON that PostgreSQL can store (the client's own rules, ``jsonsafe``).

    Raises ``UnstorableJSON`` naming what to fix (NaN, Infinity, too deep, NUL, lone surrogates) and
    ``ValueError`` (``json.JSONDecodeError``) for text that is not JSON at all.
    """
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise UnstorableJSON(f"It is nested more than {jsonsafe.MAX_DEPTH} levels deep: flatten it.") from None
    problem = jsonsafe.find_problem(value)
    if problem is not None:
        raise UnstorableJSON(f"{str(problem)[0].upper()}{str(problem)[1:]}: {problem.hint}")
    return value


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
