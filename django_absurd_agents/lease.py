"""Keep a claimed run's lease alive while its code runs, through database restarts.

absurd-sdk moves a lease forward only when a checkpoint is written or ``ctx.heartbeat()`` is called,
so a single step longer than ``claim_timeout`` (a slow model call) would be claimed again by another
worker and run twice. While a task executes, a companion coroutine extends the lease every sixth of
``claim_timeout``. When a renewal fails because the database connection broke (a restart, a
failover), it is retried on a new connection, so an outage shorter than five sixths of the lease
(less ``_stop_margin``) never hands the task to a second worker. A worker that is really gone stops
extending, and its run is reclaimed within ``claim_timeout``.

The task's code is stopped at once, instead of at its next checkpoint, when the extension reports
that the task was cancelled or failed elsewhere, and when no renewal got through before this
worker's estimate of the lease ran out (an outage longer than the lease): from then on another
worker may claim the task, and one task never runs in two places at once. The next claim resumes it
from its checkpoints.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from contextvars import ContextVar

from absurd_sdk import AsyncTaskContext, CancelledTask, FailedTask

from django_absurd_agents import sdk
from django_absurd_agents.reconnect import Lease, TaskConnection, is_transient

logger = logging.getLogger("django_absurd_agents.worker")

_kept: ContextVar[AsyncTaskContext | None] = ContextVar("absurd_agents_lease_kept", default=None)


def lease_kept(ctx: AsyncTaskContext) -> bool:
    """Whether a ``keep_lease`` for ``ctx`` is already running around the current code."""
    return _kept.get() is ctx


def _lease_of(ctx: AsyncTaskContext, claim_timeout: int) -> Lease:
    conn = sdk.task_connection(ctx)
    # A context built by a plain absurd-sdk client has no lease of ours: count from now.
    return conn.lease if isinstance(conn, TaskConnection) else Lease(claim_timeout)


async def renew(ctx: AsyncTaskContext, lease: Lease) -> None:
    """Extend the lease once, retrying through reconnects (see ``reconnect.PAST_LEASE`` for how long).

    A context of ours writes through a ``TaskConnection``, which already retries the heartbeat on a
    new connection; only a context built by a plain absurd-sdk client needs the retry here.
    """
    retries_itself = isinstance(sdk.task_connection(ctx), TaskConnection)
    failures = 0
    while True:
        sent = time.monotonic()
        try:
            await ctx.heartbeat(lease.claim_timeout)
        except (CancelledTask, FailedTask):
            raise
        except Exception as exc:
            failures += 1
            delay = min(1.0, 0.1 * 2 ** (failures - 1))
            if retries_itself or not is_transient(exc) or lease.retry_window() <= delay:
                raise
            await asyncio.sleep(delay)
            continue
        lease.renew(sent)
        return


def _stop_margin(claim_timeout: int) -> float:
    """How long before the estimated expiry an execution without a renewal stops: time for the
    cancellation to reach the task's code before another worker can claim the task."""
    return min(0.2, claim_timeout / 10)


@asynccontextmanager
async def keep_lease(ctx: AsyncTaskContext) -> AsyncIterator[None]:
    claim_timeout = max(sdk.claim_timeout(ctx), 1)
    lease = _lease_of(ctx, claim_timeout)
    interval = max(claim_timeout / 6, 0.2)
    body = asyncio.current_task()
    lost: list[BaseException] = []

    def stop_body(reason: BaseException) -> None:
        lost.append(reason)
        if body is not None:
            body.cancel()

    async def extend() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                async with asyncio.timeout(lease.remaining() - _stop_margin(claim_timeout)):
                    await renew(ctx, lease)
            except (CancelledTask, FailedTask) as exc:
                stop_body(exc)
                return
            except Exception as exc:  # no renewal before the lease ran out: another worker may claim the task now
                logger.warning(
                    "Task %s: its lease could not be extended before it ran out (%s); this execution stops, and "
                    "the next claim resumes the task from its checkpoints.",
                    ctx.task_id,
                    str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                    exc_info=not isinstance(exc, TimeoutError) and not is_transient(exc),
                )
                stop_body(FailedTask())
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
