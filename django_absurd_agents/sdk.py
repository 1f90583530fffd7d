"""Every use of absurd-sdk's private API, in one place (checked against absurd-sdk 0.5.1).

absurd-sdk has no public way to run one claimed task on a connection of our choosing, to read a
task context's claim, or to give a client registrations made before it existed. We need all three
(``execution.py`` writes through a connection that survives restarts; leases are renewed from the
claim timeout; ``absurd`` registers tasks at import time, before settings say which client to
build: ``BoundAbsurd``); each touch below says why. A new absurd-sdk minor version is checked against this module first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import absurd_sdk
from absurd_sdk import AbsurdHooks, AsyncAbsurd, AsyncTaskContext, ClaimedTask
from psycopg import AsyncConnection

CHECKED_RANGE = ((0, 5, 1), (0, 6))
"""The absurd-sdk releases every use below was checked against: from the first, below the second.

``pyproject.toml`` declares the same range, and ``tests/test_sdk_range.py`` fails when the installed
SDK is outside it: check each use in this module (and ``sync_client.py``) against the new release,
then widen both.
"""


async def create_context(conn: Any, queue: str, task: ClaimedTask, claim_timeout: int) -> AsyncTaskContext:
    """A task context that writes through ``conn`` (a ``TaskConnection``), checkpoints preloaded.

    Private: ``_create_async_task_context`` is how ``AsyncAbsurd._execute_task`` builds one (0.5.1);
    the context class refuses to be constructed otherwise.
    """
    return await absurd_sdk._create_async_task_context(task["task_id"], conn, queue, task, claim_timeout)


@contextmanager
def current_context(ctx: AsyncTaskContext) -> Iterator[None]:
    """Make ``absurd_sdk.get_current_context()`` return ``ctx`` while the handler runs.

    Private: the context variable behind the public ``get_current_context`` (0.5.1).
    """
    token = absurd_sdk._current_task_context.set(ctx)
    try:
        yield
    finally:
        absurd_sdk._current_task_context.reset(token)


async def fail_run(conn: Any, queue: str, run_id: Any, error: BaseException) -> None:
    """Private: the SDK's own failure statement, which stores the error the way Absurd's tools show it."""
    await absurd_sdk._fail_task_run_async(conn, queue, run_id, error)


def task_state_errors() -> Any:
    """Turn Absurd's "cancelled" / "already failed" errors into ``CancelledTask`` / ``FailedTask``.

    Private: ``_task_state_exception_handling`` is how the SDK maps SQLSTATE AB001/AB002 (0.5.1).
    """
    return absurd_sdk._task_state_exception_handling()


class BoundAbsurd(AsyncAbsurd):
    """absurd-sdk's own client for one queue, on a connection the project keeps alive.

    Built through ``AsyncAbsurd.__init__`` (the SDK sets its state as it always does), then given
    the project's registrations, its way of running a claimed task and of reaching the database;
    ``client.ProjectAbsurd`` builds one per event loop and queue on first use.
    """

    def __init__(
        self,
        live_connection: Callable[[], Awaitable[AsyncConnection[Any]]],
        connection: AsyncConnection[Any],
        *,
        queue_name: str,
        default_max_attempts: int,
        hooks: AbsurdHooks,
        registry: Mapping[str, dict[str, Any]],
        execute: Callable[[ClaimedTask, int], Awaitable[Any]],
    ) -> None:
        super().__init__(connection, queue_name=queue_name, default_max_attempts=default_max_attempts, hooks=hooks)
        # Private ``_registry`` (0.5.1): what ``register_task`` fills; the project's registrations are
        # kept outside any one client (they are made at import time) and shared by all of them.
        self._registry = registry  # type: ignore[assignment]  # a TaskRegistry: a dict's get, plus resolvers
        self._live_connection = live_connection
        self._execute = execute

    async def _ensure_connected(self) -> None:
        """Private hook (0.5.1): every SDK call awaits it before using ``_conn``; here it also swaps a
        connection broken by a database restart for a live one, so a ``start_worker`` loop survives it."""
        self._conn = await self._live_connection()

    async def _execute_task(self, task: ClaimedTask, claim_timeout: int) -> None:
        """Private hook (0.5.1): ``work_batch`` and ``start_worker`` run each claimed task through it."""
        await self._execute(task, claim_timeout)


def registration(
    name: str, queue: str, default_max_attempts: int | None, default_cancellation: Any, handler: Any
) -> dict[str, Any]:
    """A task's registration as absurd-sdk's ``register_task`` records it in ``_registry`` (0.5.1)."""
    return {
        "name": name,
        "queue": queue,
        "default_max_attempts": default_max_attempts,
        "default_cancellation": default_cancellation,
        "handler": handler,
    }


def checkpoint_name(ctx: AsyncTaskContext, step: str) -> str:
    """The next checkpoint name for ``step`` (``x``, ``x#2``, ...), counting it as used.

    Private ``_get_checkpoint_name`` (0.5.1): the SDK numbers repeated names only inside ``step``.
    """
    return ctx._get_checkpoint_name(step)


def recorded_checkpoints(ctx: AsyncTaskContext) -> dict[str, Any]:
    """Checkpoints the run loaded at claim time plus those it wrote. Private ``_checkpoint_cache`` (0.5.1)."""
    return ctx._checkpoint_cache


def claim_timeout(ctx: AsyncTaskContext) -> int:
    """The lease length the task was claimed with. Private ``_claim_timeout`` (0.5.1): not exposed."""
    return int(ctx._claim_timeout)


def claimed_task(ctx: AsyncTaskContext) -> ClaimedTask:
    """The claimed row (run id, attempt). Private ``_task`` (0.5.1): the SDK exposes only ``task_id``."""
    return ctx._task


def queue_name(ctx: AsyncTaskContext) -> str:
    """The queue the task runs on. Private ``_queue_name`` (0.5.1): not exposed on the context."""
    return ctx._queue_name


def task_connection(ctx: AsyncTaskContext) -> Any:
    """The connection the context writes through. Private ``_conn`` (0.5.1)."""
    return ctx._conn
