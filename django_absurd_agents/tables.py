"""Absurd's tables, read: the one helper that names them, rows by column name, the queue catalog, a task by id.

There is no Django model per queue: every queue ``q`` has its own tables (``absurd.t_q`` tasks,
``r_q`` runs, ``c_q`` checkpoints, ``e_q`` events, ``w_q`` waits), and queues come and go while the
site runs. So the queue list is read from ``absurd.queues`` on every call, never cached, and each
statement is built per queue with :func:`table`, the only place a table name is made. A queue dropped
between reading the catalog and reading its tables makes the statement fail with "undefined table";
:func:`over_queues` then runs it again from a fresh catalog, so a page never breaks, nor goes empty,
because of a concurrent drop.

This is the bottom of the read model that the admin, the management commands and the progress API
share; ``task_list`` (pages of tasks across queues), ``task_records`` (one task with its runs,
checkpoints and waits; events) and ``queue_overview`` are built on it. Everything runs on Django's
connection, inside the caller's transaction.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from django.db import ProgrammingError, connections, transaction
from psycopg import sql
from psycopg.rows import dict_row

from django_absurd_agents import conf, validation

STATES: tuple[str, ...] = ("pending", "running", "sleeping", "completed", "failed", "cancelled")
"""Every state of a task (and of a run), in the order a task goes through them."""
ACTIVE_STATES: tuple[str, ...] = ("pending", "running", "sleeping")
FINISHED_STATES: tuple[str, ...] = ("completed", "failed", "cancelled")

_JSON_TYPES = {114, 3802}  # the type OIDs of json and jsonb: Django's cursor hands both over as text
_UNDEFINED_TABLE = "42P01"
_RETRIES_ON_DROPPED_QUEUE = 3


def table(prefix: str, queue: str) -> str:
    """The qualified name of one of a queue's tables, e.g. ``"absurd"."t_agents"``.

    Quoted by psycopg's ``sql.Identifier``, so any name Absurd catalogues (quotes, ``%``, spaces) is
    safe. A ``%`` is doubled: :func:`rows` always runs a statement with a parameter list (``[]`` when
    it has none), so psycopg turns ``%%`` back into ``%`` every time.
    """
    return sql.Identifier("absurd", f"{prefix}_{queue}").as_string(None).replace("%", "%%")


def connection() -> Any:
    """Django's connection to the database that holds Absurd's schema."""
    return connections[conf.get().database_alias]


def rows(statement: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """Every row of ``statement`` as a dict by column name, json and jsonb values decoded."""
    with connection().cursor() as cursor:
        return fetch(cursor, statement, params)


def fetch(cursor: Any, statement: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    """:func:`rows` on a cursor the caller holds (inside its transaction, on its connection)."""
    cursor.execute(statement, list(params))
    columns = [(column.name, column.type_code in _JSON_TYPES) for column in cursor.description]
    return [
        {name: load_json(value) if is_json else value for (name, is_json), value in zip(columns, values, strict=True)}
        for values in cursor.fetchall()
    ]


def first_row(statement: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
    found = rows(statement, params)
    return found[0] if found else None


def load_json(value: Any) -> Any:
    """A json value as Python data (Django's cursor returns json and jsonb as text)."""
    return json.loads(value) if isinstance(value, str) else value


_INSTALLED_SQL = "select to_regclass('absurd.queues') is not null as installed"


def schema_installed() -> bool:
    return bool(rows(_INSTALLED_SQL)[0]["installed"])


CATALOG_SQL = (
    "select q.queue_name, (select bool_and(to_regclass('absurd.' || quote_ident(prefix || '_' || q.queue_name)) "
    "is not null) from unnest(array['t', 'r', 'c', 'e', 'w']) prefix) as has_tables "
    "from absurd.queues q order by q.queue_name"
)
"""Every row of ``absurd.queues`` with ``has_tables``: whether its five tables exist (plain or partitioned)."""


def queue_catalog() -> list[tuple[str, bool]]:
    """``(queue, has_tables)`` for every row of ``absurd.queues`` (empty without Absurd's schema).

    ``has_tables`` is False for a row inserted by hand, or left behind by a tool that failed, without
    the queue's five tables; such a queue is left out of everything else.
    """
    with connection().cursor() as cursor:
        if not fetch(cursor, _INSTALLED_SQL)[0]["installed"]:
            return []
        return [(row["queue_name"], bool(row["has_tables"])) for row in fetch(cursor, CATALOG_SQL)]


def list_queues() -> list[str]:
    """Queues in the database right now, with their tables."""
    return [queue for queue, has_tables in queue_catalog() if has_tables]


def _is_undefined_table(exc: BaseException) -> bool:
    return getattr(exc.__cause__, "sqlstate", None) == _UNDEFINED_TABLE


def retrying[T](run: Callable[[], T]) -> T:
    """``run()``, again (up to three times) when a queue's table vanished under it.

    Each attempt is a savepoint, so a failed statement does not poison a surrounding transaction.
    """
    for attempt in range(_RETRIES_ON_DROPPED_QUEUE + 1):
        try:
            with transaction.atomic(using=connection().alias):
                return run()
        except ProgrammingError as exc:
            if not _is_undefined_table(exc) or attempt == _RETRIES_ON_DROPPED_QUEUE:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def over_queues[T](
    queues: Sequence[str] | None, run: Callable[[list[str]], T], *, present: Sequence[str] | None = None
) -> T:
    """``run(queues)`` (SQL over those queues' tables), surviving a queue dropped meanwhile.

    ``queues=None`` means every queue; otherwise the queues asked for that exist. ``present`` is the
    catalog's queues with tables (:func:`list_queues`) when the caller has read it already, as a page
    does once for everything it shows. A retry intersects with a fresh catalog.
    """
    known = None if present is None else list(present)

    def with_catalog() -> T:
        nonlocal known
        current, known = (list_queues() if known is None else known), None
        return run(current if queues is None else [queue for queue in queues if queue in current])

    return retrying(with_catalog)


def _searched(catalog: list[dict[str, Any]], queue: str | None) -> list[str]:
    queues = [str(row["queue_name"]) for row in catalog if row["has_tables"]]
    if queue is None:
        return queues
    if queue not in queues:
        raise validation.unknown_queue(queue)
    return [queue]


def _locate_statement(queues: list[str], task_id: uuid.UUID) -> tuple[str, list[Any]]:
    """One statement (and its parameters) giving the ``queue`` and ``state`` of the task in any of ``queues``."""
    statement = " union all ".join(
        f"select %s::text as queue, state from {table('t', q)} where task_id = %s" for q in queues
    )
    return f"{statement} limit 1", [value for queue in queues for value in (queue, task_id)]


def locate_sync(cursor: Any, task_id: uuid.UUID, queue: str | None) -> tuple[str, str] | None:
    """``(queue, state)`` of the task in ``queue`` (None: any queue), read with ``cursor`` (Django's).

    Task ids are unique across queues (Absurd makes UUIDv7s), so without ``queue`` the id is looked
    up in every catalogued queue. ``UnknownQueue`` for a ``queue`` the catalog does not have.
    """
    queues = _searched(fetch(cursor, CATALOG_SQL), queue)
    if not queues:
        return None
    found = fetch(cursor, *_locate_statement(queues, task_id))
    return (found[0]["queue"], found[0]["state"]) if found else None


async def locate(conn: Any, task_id: uuid.UUID, queue: str | None) -> tuple[str, str] | None:
    """Async counterpart of :func:`locate_sync`, on a psycopg ``AsyncConnection``."""
    async with conn.cursor(row_factory=dict_row) as cursor:
        await cursor.execute(CATALOG_SQL)
        queues = _searched(await cursor.fetchall(), queue)
        if not queues:
            return None
        await cursor.execute(*_locate_statement(queues, task_id))
        found = await cursor.fetchone()
    return None if found is None else (found["queue"], found["state"])


def locate_task(task_id: uuid.UUID, queue: str | None = None) -> tuple[str, str] | None:
    """``(queue, state)`` of the task, in ``queue`` or else in any queue; None when there is none.

    The statement is the client's own (:func:`locate_sync`), retried when a queue is dropped.
    """

    def locate() -> tuple[str, str] | None:
        with connection().cursor() as cursor:
            return locate_sync(cursor, task_id, queue)

    return retrying(locate)
