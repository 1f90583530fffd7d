"""The agent graph's waits as Absurd's durable sleep: a long background model job holds no worker.

pydantic-ai polls a model response that is still running on the provider's side (OpenAI background
mode, a batch: a response with ``state == 'suspended'`` and a ``continuation_delay``) and waits between
polls with the agent-graph sleep, which an engine replaces with ``Agent.using_sleep``. Inside a task,
ours is ``ctx.sleep_for``: it records a checkpoint and suspends the task (``SuspendTask``), so the
worker's slot and the lease are free until the wake-up; the next claim replays the recorded polls and
polls again.

pydantic-ai cancels the remote job when the sleep raises (``except BaseException``), which is right
for a real cancellation and wrong for a suspension: the task is coming back for that job. So the
sleep marks its task attempt as suspending before the ``SuspendTask`` leaves it, and the operation
backend skips ``cancel_suspended_response`` for that attempt (neither run nor recorded). The mark is
per attempt, not a ``ContextVar``: pydantic-ai runs the cancellation in an asyncio task of its own,
and a streamed request may wait in another task than the one that cancels.
"""

from __future__ import annotations

import weakref
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import anyio
from absurd_sdk import AsyncTaskContext, SuspendTask

__all__ = ["durable_sleep", "in_step_body", "sleep_step_name", "suspending"]

_suspending: weakref.WeakSet[AsyncTaskContext] = weakref.WeakSet()
"""Task attempts whose durable sleep raised ``SuspendTask``: their remote jobs are waited for, not abandoned."""

_in_step: ContextVar[bool] = ContextVar("absurd_agents_in_step", default=False)


def sleep_step_name(agent_name: str) -> str:
    """The checkpoint of one wait between polls: ``analyst__agent_graph.sleep``, ``#2``, ..."""
    return f"{agent_name}__agent_graph.sleep"


def suspending(ctx: AsyncTaskContext) -> bool:
    """Whether this attempt of the task is ending in a durable sleep (so its remote job must be kept)."""
    return ctx in _suspending


@contextmanager
def in_step_body() -> Iterator[None]:
    """Mark the body of a step: a wait inside it (a plain agent run in a tool) is an ordinary sleep.

    A suspension there would throw away the step's work and repeat it on the next attempt (a nested
    agent would submit its model job again), as DBOS refuses its durable sleep inside a step.
    """
    token = _in_step.set(True)
    try:
        yield
    finally:
        _in_step.reset(token)


def durable_sleep(ctx: AsyncTaskContext, agent_name: str) -> Callable[[float], Awaitable[None]]:
    """The agent-graph sleep for the runs of ``agent_name`` in the task ``ctx``."""
    step = sleep_step_name(agent_name)

    async def sleep(seconds: float) -> None:
        if _in_step.get():
            await anyio.sleep(max(seconds, 0))
            return
        try:
            await ctx.sleep_for(step, max(seconds, 0))
        except SuspendTask:
            # Before pydantic-ai's `except BaseException` sees it and cancels the job we are waiting for.
            _suspending.add(ctx)
            raise

    return sleep
