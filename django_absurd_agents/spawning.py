"""What a spawn sends and returns: the one statement, its options, its result.

``spawn`` (on the client's own connection) and ``spawn_sync`` (on Django's, in the caller's
transaction) both build their arguments with ``ProjectAbsurd._prepare`` and send ``SPAWN_SQL``:
the ``NOTIFY`` that wakes idle workers rides in the same statement (``wakeup.py``), so it is
delivered on commit and never for a rolled-back spawn. This is the one statement of absurd-sdk's
that the app writes itself: the SDK's ``spawn`` neither says whether an idempotency key created the
task (``created``) nor wakes anyone. The other sync calls are the SDK's own (``sync_client.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
from absurd_sdk import CancellationPolicy, RetryStrategy, SpawnResult

from django_absurd_agents import conf, jsonsafe, validation

SPAWN_SQL = (
    "select s.task_id, s.run_id, s.attempt, s.created, pg_notify('absurd_agents_spawned', %s) "  # wakeup.CHANNEL
    "from absurd.spawn_task(%s, %s, %s::jsonb, %s::jsonb) s"
)
SPAWN_OPTIONS = ("max_attempts", "retry_strategy", "headers", "queue", "cancellation", "idempotency_key")
"""The keyword arguments of ``spawn``/``spawn_sync`` that the ``before_spawn`` hook sees and may change."""


class SpawnedTask(SpawnResult):
    """What a spawn returns: absurd-sdk's ids (as strings), and whether this call created the task.

    ``created`` is False when ``idempotency_key`` already named a task: the ids are that task's, and
    the params (and options) of this call were not used.
    """

    created: bool


def is_missing_queue(exc: BaseException) -> bool:
    """A statement failed because a queue's table does not exist (Django wraps psycopg's error)."""
    return isinstance(exc, psycopg.errors.UndefinedTable) or isinstance(exc.__cause__, psycopg.errors.UndefinedTable)


def options_json(
    *,
    max_attempts: int | None,
    retry_strategy: RetryStrategy | None,
    headers: dict[str, Any] | None,
    cancellation: CancellationPolicy | None,
    idempotency_key: str | None,
) -> str:
    """The spawn options as Absurd takes them, with the settings' defaults filled in."""
    settings = conf.get()
    if max_attempts is None:  # 0 is not "unset": _prepare refuses it
        max_attempts = validation.max_attempts(
            settings.default_max_attempts, what="ABSURD_AGENTS['DEFAULT_MAX_ATTEMPTS']"
        )
    options: dict[str, Any] = {"max_attempts": max_attempts}
    strategy = retry_strategy if retry_strategy is not None else settings.retry_strategy
    if strategy:
        options["retry_strategy"] = dict(strategy)
    if headers is not None:
        options["headers"] = headers
    if cancellation:
        options["cancellation"] = dict(cancellation)
    if idempotency_key is not None:
        options["idempotency_key"] = idempotency_key
    return jsonsafe.encode(options, what="Spawn options")


def spawned(row: Mapping[str, Any]) -> SpawnedTask:
    """The result of ``SPAWN_SQL``, read by column name."""
    return {
        "task_id": str(row["task_id"]),
        "run_id": str(row["run_id"]),
        "attempt": row["attempt"],
        "created": bool(row["created"]),
    }
