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

from typing import Any, cast

from absurd_sdk import Absurd, AbsurdHooks
from psycopg import Connection

from django_absurd_agents import tables


class _DjangoCursor:
    """The slice of a psycopg cursor absurd-sdk's sync client uses, answered by Django's connection.

    Every statement the SDK sends is a SELECT, so its rows are read at once, by name and with json
    decoded (``tables.rows``, on a Django cursor closed right after), whatever row factory the SDK
    asked for: it asks for dict_row (0.5.1) wherever it reads a row.
    """

    def __init__(self) -> None:
        self._rows: list[dict[str, Any]] = []

    def execute(self, query: str, params: Any = None) -> _DjangoCursor:
        self._rows = tables.rows(query, params or ())
        return self

    def fetchone(self) -> dict[str, Any] | None:
        return self._rows.pop(0) if self._rows else None

    def fetchall(self) -> list[dict[str, Any]]:
        found, self._rows = self._rows, []
        return found


class DjangoConnection:
    """What absurd-sdk's ``Absurd`` calls on its connection (``cursor``), answered by Django's connection."""

    def cursor(self, row_factory: Any = None) -> _DjangoCursor:
        return _DjangoCursor()


def client(queue: str, hooks: AbsurdHooks | None = None) -> Absurd:
    """absurd-sdk's sync client for ``queue`` on Django's connection (it opens nothing of its own)."""
    return Absurd(cast("Connection[Any]", DjangoConnection()), queue_name=queue, hooks=hooks)
