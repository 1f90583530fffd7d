"""The connection a running task writes through, reopened after a database restart.

absurd-sdk binds a task's context to the connection the task was claimed with, so after a restart
(a failover, a deploy of Postgres, a killed backend) that connection is dead for the rest of the
run: the lease could not be renewed, the next checkpoint and the outcome could not be written, and
another worker would claim the task once the lease ran out and run its step in flight a second time.

``TaskConnection`` stands in for that connection. Each statement goes to the executor's current
connection, a new one is opened when the old one broke, and a statement that failed because the
connection broke is sent again, while the lease lasts (at least every ``_RETRY_CAP_IN_LEASE``) and
for ``PAST_LEASE`` seconds after it. The task's code itself is stopped as the lease runs out without
a renewal (``lease.py``), so past the lease only writes already under way are retried. That is
safe, because Absurd decides: until another worker claims the task the run is still this worker's
(a write even extends its lease), and once one has, Absurd refuses
the old run's writes ("already failed"), which ends its execution as lost. Every statement
absurd-sdk sends for a running task may be sent twice: checkpoints are upserts, a claim extension
only moves a time forward, and completing or failing a run that is no longer running is refused.
After that the error propagates, and the run is left to the worker that claims it next.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg import AsyncConnection, AsyncCursor

logger = logging.getLogger("django_absurd_agents.worker")

# SQLSTATEs after which a new session may succeed: the server is shutting down or starting up,
# out of connection slots, or the connection itself failed (class 08).
_TRANSIENT_STATES = {"57P01", "57P02", "57P03", "53300", "53400"}
_RETRY_FIRST = 0.1
_RETRY_CAP = 2.0
_RETRY_CAP_IN_LEASE = 0.25
"""While the lease lasts, retries come at least this often: a renewal must land soon after the
database is back, before the lease runs out and the task's execution stops (``lease.py``)."""
PAST_LEASE = 30.0
"""Seconds a write is still retried after this worker's estimate of its lease has run out."""


# Connection failures no retry can heal: libpq reports them without a SQLSTATE, so by their text.
_MISCONFIGURED = re.compile(
    r"password authentication failed|authentication failed for user|no pg_hba\.conf entry|"
    r"role \"[^\"]*\" does not exist|database \"[^\"]*\" does not exist|password is required|"
    r"password supplied|permission denied for database"
)


def is_misconfigured(exc: BaseException) -> bool:
    """A connection refused for a reason only a settings change fixes (credentials, database name)."""
    return isinstance(exc, psycopg.OperationalError) and bool(_MISCONFIGURED.search(str(exc)))


def is_transient(exc: BaseException, conn: AsyncConnection[Any] | None = None) -> bool:
    """Whether ``exc`` means the session is gone (or could not start) rather than that the statement is wrong."""
    if is_misconfigured(exc):
        return False
    if conn is not None and (conn.broken or conn.closed):
        return True
    if isinstance(exc, psycopg.InterfaceError | OSError):
        return True
    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate
    return state is None or state.startswith("08") or state in _TRANSIENT_STATES


class Lease:
    """When this worker's claim on a run expires, as far as this process can tell.

    Renewed from the moment a renewal (or the claim) was sent, which is never later than the moment
    Absurd computed the new expiry from, so the estimate errs on the early side.
    """

    def __init__(self, claim_timeout: int, claimed_at: float | None = None) -> None:
        self.claim_timeout = claim_timeout
        self.expires_at = (time.monotonic() if claimed_at is None else claimed_at) + claim_timeout

    def renew(self, sent_at: float) -> None:
        self.expires_at = max(self.expires_at, sent_at + self.claim_timeout)

    def remaining(self) -> float:
        return self.expires_at - time.monotonic()

    def retry_window(self) -> float:
        """Seconds left to retry a write: the lease, then ``PAST_LEASE`` more (Absurd refuses it if the task moved)."""
        return self.remaining() + PAST_LEASE


class TaskConnection:
    """Quacks like the ``AsyncConnection`` absurd-sdk's task code uses: ``cursor()`` and ``execute()``."""

    def __init__(self, connect: Callable[[], Awaitable[AsyncConnection[Any]]], lease: Lease, label: str) -> None:
        self._connect = connect
        self.lease = lease
        self.label = label

    def cursor(self, *args: Any, **kwargs: Any) -> RetryingCursor:
        return RetryingCursor(self, args, kwargs)

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> RetryingCursor:
        cursor = self.cursor()
        await cursor.execute(query, params, **kwargs)
        return cursor

    async def run(self, statement: Callable[[AsyncConnection[Any]], Awaitable[Any]]) -> Any:
        """Run ``statement`` on a live connection, again on a new one while the lease lasts."""
        failures = 0
        while True:
            conn: AsyncConnection[Any] | None = None
            try:
                conn = await self._connect()
                return await statement(conn)
            except Exception as exc:
                if not is_transient(exc, conn):
                    raise
                failures += 1
                cap = _RETRY_CAP_IN_LEASE if self.lease.remaining() > 0 else _RETRY_CAP
                delay = min(cap, _RETRY_FIRST * 2 ** (failures - 1))
                if self.lease.retry_window() <= delay:
                    raise
                if failures == 1:
                    logger.warning(
                        "Task %s: the database connection failed (%s); retrying on a new connection while its "
                        "lease lasts (%.1fs) and up to %gs after.",
                        self.label,
                        str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                        max(self.lease.remaining(), 0),
                        PAST_LEASE,
                    )
                await asyncio.sleep(delay)


class RetryingCursor:
    """A cursor whose ``execute`` survives a reconnect; results are read from the cursor that succeeded."""

    def __init__(self, connection: TaskConnection, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._connection = connection
        self._args = args
        self._kwargs = kwargs
        self._cursor: AsyncCursor[Any] | None = None

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> RetryingCursor:
        async def statement(conn: AsyncConnection[Any]) -> AsyncCursor[Any]:
            cursor = conn.cursor(*self._args, **self._kwargs)
            await cursor.execute(query, params, **kwargs)
            return cursor

        self._cursor = await self._connection.run(statement)
        return self

    def __getattr__(self, name: str) -> Any:
        if self._cursor is None:
            raise AttributeError(f"{name}: the cursor has not executed anything")
        return getattr(self._cursor, name)
