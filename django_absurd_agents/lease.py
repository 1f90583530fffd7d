"""Keep a claimed run's lease alive while its code runs.

absurd-sdk moves a lease forward only when a checkpoint is written or ``ctx.heartbeat()`` is called,
so a single step longer than ``claim_timeout`` (a slow model call) would be claimed again by another
worker and run twice. While a task executes, a companion coroutine extends the lease every third of
``claim_timeout``. A worker that is really gone stops extending, and its run is reclaimed within
``claim_timeout``. When the extension reports that the task was cancelled, the task's code is
cancelled at once instead of at its next checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from contextvars import ContextVar

import psycopg
from absurd_sdk import AsyncTaskContext, CancelledTask, FailedTask

logger = logging.getLogger("django_absurd_agents.worker")

_kept: ContextVar[AsyncTaskContext | None] = ContextVar("absurd_agents_lease_kept", default=None)


def lease_kept(ctx: AsyncTaskContext) -> bool:
    """Whether a ``keep_lease`` for ``ctx`` is already running around the current code."""
    return _kept.get() is ctx


class LeaseLost(Exception):
    """The run was cancelled or failed elsewhere while its code ran; the code was stopped."""


@asynccontextmanager
async def keep_lease(ctx: AsyncTaskContext) -> AsyncIterator[None]:
    claim_timeout = max(int(ctx._claim_timeout), 1)
    interval = max(claim_timeout / 3, 0.2)
    body = asyncio.current_task()
    lost: list[BaseException] = []

    async def extend() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await ctx.heartbeat(claim_timeout)
            except (CancelledTask, FailedTask) as exc:
                lost.append(exc)
                if body is not None:
                    body.cancel()
                return
            except Exception as exc:  # a dropped connection: the body's next write reports it
                logger.warning(
                    "Could not extend the lease of task %s: %s",
                    ctx.task_id,
                    exc,
                    exc_info=not isinstance(exc, psycopg.OperationalError),
                )
                return

    extender = asyncio.create_task(extend())
    token = _kept.set(ctx)
    try:
        yield
    except asyncio.CancelledError:
        if lost:
            raise CancelledTask() if isinstance(lost[0], CancelledTask) else FailedTask() from None
        raise
    finally:
        _kept.reset(token)
        extender.cancel()
        with suppress(asyncio.CancelledError):
            await extender
