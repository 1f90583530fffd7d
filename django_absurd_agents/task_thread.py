"""The one thread a running task's synchronous code gets, like a request under ASGI.

Django's ``sync_to_async`` (and so the async ORM) and pydantic-ai's sync tools and callbacks all run
on it, so a task uses one Django connection of its own, closed when the task ends whatever
``CONN_MAX_AGE`` says. Left to themselves, sync tools would run on anyio's shared threads, whose
connections stay open, go stale across a database restart, and add up.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from asgiref.sync import SyncToAsync, ThreadSensitiveContext, sync_to_async
from django.db import connections
from pydantic_ai import Agent

# Recent asgiref lets a ThreadSensitiveContext run on an executor the caller owns; older ones start their own thread.
_CONTEXT_TAKES_EXECUTOR = "executor" in inspect.signature(ThreadSensitiveContext.__init__).parameters


class _TaskThread(ThreadPoolExecutor):
    """The task's thread, started only if the task has synchronous code.

    Django's ``sync_to_async`` (and so the async ORM) and pydantic-ai's sync tools and callbacks
    all run here, so a task uses one Django connection of its own, like a request under ASGI, and
    the worker closes it when the task ends. Left to themselves, sync tools would run on anyio's
    shared threads, whose connections stay open, go stale across a database restart, and add up.
    """

    def __init__(self) -> None:
        super().__init__(max_workers=1, thread_name_prefix="absurd-task")
        self.used = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        self.used = True
        return super().submit(fn, *args, **kwargs)


async def on_task_thread[T](run: Callable[[], Awaitable[T]]) -> T:
    """Await ``run()`` with its synchronous calls on a thread of its own, closing its connections after."""
    thread = _TaskThread()
    try:
        context = ThreadSensitiveContext(executor=thread) if _CONTEXT_TAKES_EXECUTOR else ThreadSensitiveContext()
        async with context as thread_context:
            try:
                with Agent.using_thread_executor(thread):
                    return await run()
            finally:
                if thread.used:
                    await asyncio.get_running_loop().run_in_executor(thread, connections.close_all)
                if not _CONTEXT_TAKES_EXECUTOR and thread_context in SyncToAsync.context_to_thread_executor:
                    await sync_to_async(connections.close_all)()
    finally:
        thread.shutdown(wait=False)
