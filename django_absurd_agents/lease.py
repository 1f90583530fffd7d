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
worker may claim the task, and one task never runs in two places at once (a sync tool on the task's
thread cannot be interrupted: it finishes unrecorded). The next claim resumes it from its checkpoints.
A renewal refused for another reason is tried again while the lease lasts.
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
from django_absurd_agents.worker_log import one_line

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
    """Extend the lease once, retrying through reconnects until ``keep_lease``'s deadline stops it.

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
            if retries_itself or not is_transient(exc):
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
    margin = _stop_margin(claim_timeout)
    body = asyncio.current_task()
    stopped_by: BaseException | None = None

    async def extend() -> None:
        nonlocal stopped_by
        # A plain absurd-sdk context's lease is only estimated from now: renewing at once makes it exact.
        wait = interval if isinstance(sdk.task_connection(ctx), TaskConnection) else 0.0
        last_error: BaseException | None = None
        while True:
            await asyncio.sleep(wait)
            try:
                async with asyncio.timeout(lease.remaining() - margin):
                    await renew(ctx, lease)
                last_error = None
            except (CancelledTask, FailedTask) as exc:
                stopped_by = exc
                break
            except TimeoutError:  # no renewal before the lease ran out: another worker may claim the task now
                logger.warning(
                    "Task %s: its lease could not be extended before it ran out (%s); this execution stops, and "
                    "the next claim resumes the task from its checkpoints.",
                    ctx.task_id,
                    one_line(last_error) if last_error is not None else "no answer from the database in time",
                )
                stopped_by = FailedTask()
                break
            except Exception as exc:  # refused for another reason: tried again while the lease lasts
                last_error = exc
                logger.warning(
                    "Task %s: a lease renewal failed (%s); trying again while the lease lasts.",
                    ctx.task_id,
                    one_line(exc),
                    exc_info=not is_transient(exc),
                )
            # Sooner than the interval when the estimate is short: a renewal that got through late is
            # dated from its first try, so the lease is really longer than this process counts.
            wait = min(interval, max(lease.remaining() - margin, 0) / 2)
        if body is not None:
            body.cancel()

    extender = asyncio.create_task(extend())
    token = _kept.set(ctx)
    try:
        yield
    except asyncio.CancelledError:
        # The extender's own cancel becomes Absurd's outcome; any other (a worker's shutdown) stays a cancel.
        if stopped_by is not None and body is not None and body.uncancel() == 0:
            raise (CancelledTask() if isinstance(stopped_by, CancelledTask) else FailedTask()) from None
        raise
    finally:
        _kept.reset(token)
        extender.cancel()
        with suppress(asyncio.CancelledError):
            await extender
