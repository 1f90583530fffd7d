"""absurd-sdk's own sync client (``absurd_sdk.Absurd``) on Django's database connection.

The client's sync helpers (``cancel_task_sync``, ``retry_task_sync``, ``emit_event_sync``,
``fetch_task_result_sync``) call the SDK's sync methods instead of re-writing their SQL, and run
them through Django's cursor: inside ``transaction.atomic()`` they commit or roll back with the
request, errors arrive as Django's ``DatabaseError`` family, and the statements show where Django
shows queries (``CaptureQueriesContext``, ``connection.execute_wrapper``, the debug toolbar).

The SDK asks its connection for ``cursor(row_factory=dict_row)``, which a Django cursor does not
take, and expects json values decoded, which Django leaves as text (its ``JSONField`` decodes
them); ``DjangoConnection`` answers that call and gives back rows by column name, json decoded.
That is all of its connection the SDK's sync ``fetch_task_result``, ``emit_event``, ``cancel_task``
and ``retry_task`` use (checked against absurd-sdk 0.5.1, the range ``sdk.py`` is pinned to).
"""

from __future__ import annotations

import json
from typing import Any, cast

from absurd_sdk import Absurd, AbsurdHooks
from psycopg import Connection

from django_absurd_agents import tables

_JSON_TYPES = frozenset({114, 3802})
"""Type OIDs of json and jsonb (PostgreSQL's catalog; fixed since 9.4)."""


class _DjangoCursor:
    """The slice of a psycopg cursor absurd-sdk's sync client uses, on a Django cursor."""

    def __init__(self, cursor: Any, by_name: bool) -> None:
        self._cursor = cursor
        self._by_name = by_name

    def execute(self, query: str, params: Any = None) -> _DjangoCursor:
        self._cursor.execute(query, params)
        return self

    def _row(self, row: Any) -> Any:
        if row is None or not self._by_name:
            return row
        return {
            column.name: json.loads(value) if column.type_code in _JSON_TYPES and isinstance(value, str) else value
            for column, value in zip(self._cursor.description, row, strict=True)
        }

    def fetchone(self) -> Any:
        return self._row(self._cursor.fetchone())

    def fetchall(self) -> list[Any]:
        return [self._row(row) for row in self._cursor.fetchall()]


class DjangoConnection:
    """What absurd-sdk's ``Absurd`` calls on its connection (``cursor``), answered by Django's connection."""

    def cursor(self, row_factory: Any = None) -> _DjangoCursor:
        # Any row factory the SDK asks for is its dict_row (0.5.1): rows by column name.
        return _DjangoCursor(tables.connection().cursor(), by_name=row_factory is not None)


def client(queue: str, hooks: AbsurdHooks | None = None) -> Absurd:
    """absurd-sdk's sync client for ``queue`` on Django's connection (it opens nothing of its own)."""
    return Absurd(cast("Connection[Any]", DjangoConnection()), queue_name=queue, hooks=hooks)
