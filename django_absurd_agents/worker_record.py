"""Workers record themselves: a row per ``absurd_worker`` process, refreshed every few seconds.

The admin lists them (alive, silent, gone), a task page links to the worker that holds it (a run's
``claimed_by`` is the worker id), and the row is deleted on a clean exit. A worker that died without
exiting cleanly leaves its row behind: it shows as gone, and any worker's heartbeat deletes rows
that have been silent for ``PRUNE_AFTER`` heartbeats.

The heartbeat writes with one statement on the worker's own claim connection (autocommit), never
through Django's ORM, so it costs one short ``insert ... on conflict`` per worker per interval.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import socket
from datetime import datetime
from typing import Any

from django.db import models
from django.utils import timezone
from psycopg import AsyncConnection, sql

SILENT_AFTER = 3
"""Missed heartbeats after which a worker shows as silent (busy, stalled or cut off)."""
GONE_AFTER = 12
"""Missed heartbeats after which a worker shows as gone."""
PRUNE_AFTER = 720
"""Missed heartbeats after which a worker's row is deleted (an hour at the default 5 s)."""


class Worker(models.Model):
    """One ``absurd_worker`` process, as it last reported itself."""

    worker_id: models.CharField[str, str] = models.CharField(max_length=255, primary_key=True)
    host: models.CharField[str, str] = models.CharField(max_length=255)
    pid: models.PositiveIntegerField[int, int] = models.PositiveIntegerField()
    queues: models.JSONField[Any, Any] = models.JSONField(default=list)
    concurrency: models.PositiveIntegerField[int, int] = models.PositiveIntegerField()
    version: models.CharField[str, str] = models.CharField(max_length=64)
    heartbeat_interval: models.FloatField[float, float] = models.FloatField()
    started: models.DateTimeField[datetime, datetime] = models.DateTimeField()
    last_heartbeat: models.DateTimeField[datetime, datetime] = models.DateTimeField(db_index=True)
    tasks_in_flight: models.PositiveIntegerField[int, int] = models.PositiveIntegerField(default=0)
    tasks_done: models.PositiveBigIntegerField[int, int] = models.PositiveBigIntegerField(default=0)
    last_error: models.TextField[str, str] = models.TextField(blank=True, default="")

    class Meta:
        app_label = "absurd_agents"
        ordering = ["-started"]
        default_permissions = ("view",)

    def __str__(self) -> str:
        return self.worker_id

    @property
    def missed_heartbeats(self) -> float:
        return (timezone.now() - self.last_heartbeat).total_seconds() / max(self.heartbeat_interval, 0.1)

    @property
    def status(self) -> str:
        """``alive``, ``silent`` (a few heartbeats missed) or ``gone``."""
        missed = self.missed_heartbeats
        if missed < SILENT_AFTER:
            return "alive"
        return "silent" if missed < GONE_AFTER else "gone"


@functools.cache
def _version() -> str:
    try:
        return importlib.metadata.version("django-absurd-agents")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _table() -> sql.Identifier:
    return sql.Identifier(Worker._meta.db_table)


async def beat(conn: AsyncConnection[Any], report: dict[str, Any]) -> None:
    """Insert or refresh this worker's row, and delete long-silent rows of other workers."""
    row = {
        "worker_id": report["worker_id"],
        "host": socket.gethostname(),
        "pid": report["pid"],
        "queues": json.dumps(list(report["queues"])),
        "concurrency": report["concurrency"],
        "version": _version(),
        "heartbeat_interval": report["interval"],
        "started": report["started"],
        "tasks_in_flight": report["in_flight"],
        "tasks_done": report["done"],
        "last_error": report["last_error"][:2000],
    }
    columns = sql.SQL(", ").join(sql.Identifier(name) for name in row)
    values = sql.SQL(", ").join(sql.Placeholder(name) for name in row)
    updates = sql.SQL(", ").join(
        sql.SQL("{0} = excluded.{0}").format(sql.Identifier(name)) for name in row if name != "worker_id"
    )
    await conn.execute(
        sql.SQL(
            "insert into {table} ({columns}, last_heartbeat) values ({values}, now()) "
            "on conflict (worker_id) do update set {updates}, last_heartbeat = now()"
        ).format(table=_table(), columns=columns, values=values, updates=updates),
        row,
    )
    await conn.execute(
        sql.SQL(
            "delete from {table} where last_heartbeat < now() - make_interval(secs => heartbeat_interval * %s)"
        ).format(table=_table()),
        [PRUNE_AFTER],
    )


async def leave(conn: AsyncConnection[Any], worker_id: str) -> None:
    """Delete this worker's row: a clean exit."""
    await conn.execute(sql.SQL("delete from {table} where worker_id = %s").format(table=_table()), [worker_id])
