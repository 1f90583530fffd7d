"""Wake idle workers the moment a task is spawned, instead of at their next poll.

A spawn through the project client also sends ``NOTIFY absurd_agents_spawned, '<queue>'`` in the
spawning statement, so it is delivered when the spawning transaction commits and never for a
rolled-back spawn. Each worker process LISTENs on one connection and wakes the claimer of that
queue. Polling stays: spawns by other clients (absurdctl, the raw SDK), retries and sleeps that come
due are found at the next poll, and a notification lost while the listener reconnects only delays
a task by one poll interval.

LISTEN needs a session of its own: behind PgBouncer in transaction pooling it goes through
``ABSURD_AGENTS["DIRECT_DATABASE_URL"]`` when that is set.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from psycopg import AsyncConnection, sql

from django_absurd_agents import conf
from django_absurd_agents.client import connection_params

logger = logging.getLogger("django_absurd_agents.worker")

CHANNEL = "absurd_agents_spawned"
_BACKOFF_CAP = 15.0


def listen_params() -> dict[str, Any]:
    """Where the LISTEN session connects: the direct URL when one is set, else the Django database."""
    direct = conf.get().direct_database_url
    return {"conninfo": direct} if direct else connection_params()


async def listen_for_spawns(queues: tuple[str, ...], wake: Callable[[str], None]) -> None:
    """Call ``wake(queue)`` for each spawn notified on one of ``queues``, reconnecting forever; cancel to stop."""
    failures = 0
    while True:
        try:
            conn = await AsyncConnection.connect(**listen_params(), autocommit=True)
        except Exception as exc:
            failures += 1
            delay = min(_BACKOFF_CAP, 0.25 * 2 ** (failures - 1))
            if failures == 1:
                logger.warning("Cannot LISTEN for spawns (%s); polling only until it works again.", exc)
            await asyncio.sleep(delay)
            continue
        try:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
            if failures:
                logger.info("Listening for spawns again.")
            failures = 0
            for queue in queues:  # whatever was spawned while the listener was away
                wake(queue)
            async for notification in conn.notifies():
                if notification.payload in queues:
                    wake(notification.payload)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures += 1
            if failures == 1:
                logger.warning("The LISTEN connection failed (%s); reconnecting.", exc)
            await asyncio.sleep(min(_BACKOFF_CAP, 0.25 * 2 ** (failures - 1)))
        finally:
            await conn.close()
