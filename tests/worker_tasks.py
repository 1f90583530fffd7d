"""Task handlers for the worker tests, imported by worker processes through ``TASK_MODULES``.

Handlers that the tests watch append a line to the file named by ``$WORKER_LOG``:
``<event> <task_id> <pid> <monotonic ns>``. Short appends to a file opened with O_APPEND do not
interleave, so two worker processes can share one log.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from django_absurd_agents import AbsurdAgent, absurd


def record(event: str, task_id: Any) -> None:
    path = os.environ.get("WORKER_LOG")
    if not path:
        return
    line = f"{event} {task_id} {os.getpid()} {time.monotonic_ns()}\n".encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@absurd.register_task(name="worker_noop")
async def noop(params: Any, ctx: Any) -> dict[str, Any]:
    return {"ok": True}


@absurd.register_task(name="worker_record")
async def record_run(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Log its start and end around an optional sleep (``params["sleep"]`` seconds)."""
    record("start", ctx.task_id)
    await asyncio.sleep(params.get("sleep", 0))
    record("end", ctx.task_id)
    return {"pid": os.getpid()}


@absurd.register_task(name="worker_other", queue="other")
async def other_queue(params: Any, ctx: Any) -> dict[str, Any]:
    record("start", ctx.task_id)
    record("end", ctx.task_id)
    return {"queue": "other"}


@absurd.register_task(name="worker_fail", default_max_attempts=1)
async def fail(params: Any, ctx: Any) -> None:
    raise ValueError("this task always fails")


def backend_pid() -> int:
    """The PostgreSQL backend of this thread's Django connection."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("select pg_backend_pid()")
        return int(cursor.fetchone()[0])


def pid_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Call the sync tool once, then answer with what it returned."""
    returns = [part for message in messages for part in message.parts if isinstance(part, ToolReturnPart)]
    if not returns:
        return ModelResponse(parts=[ToolCallPart("orm_backend_pid", {})])
    return ModelResponse(parts=[TextPart(str(returns[0].content))])


pid_agent_inner = Agent(FunctionModel(pid_model), name="pid_agent")


@pid_agent_inner.tool_plain
def orm_backend_pid() -> int:
    """A sync tool using the ORM, as Django projects write them."""
    from django.contrib.auth.models import User

    User.objects.count()
    return backend_pid()


pid_agent = AbsurdAgent(pid_agent_inner, absurd)


@absurd.register_task(name="worker_orm")
async def orm(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Use the ORM from a task: the async ORM, a sync_to_async block with a transaction, a sync agent tool."""
    from asgiref.sync import sync_to_async
    from django.contrib.auth.models import User
    from django.db import transaction

    user = await User.objects.acreate(username=params["username"])

    def rename() -> int:
        with transaction.atomic():
            User.objects.filter(pk=user.pk).update(first_name="from-task")
        return User.objects.filter(first_name="from-task").count()

    renamed = await sync_to_async(rename)()
    result = await pid_agent.run("Which backend?")
    return {
        "user_id": user.pk,
        "renamed": renamed,
        "pids": [await sync_to_async(backend_pid)(), int(result.output)],
    }


@absurd.register_task(name="worker_approval")
async def approval(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """One checkpointed step, then a durable wait for ``approval:<task id>``."""

    async def prepare() -> dict[str, str]:
        return {"draft": params.get("draft", "hello")}

    draft = await ctx.step("prepare", prepare)
    decision = await ctx.await_event(f"approval:{ctx.task_id}")
    return {"draft": draft, "decision": decision}


@absurd.register_task(name="worker_atomic")
async def atomic(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Checkpoint a step while the task's own Django transaction is open, then roll that transaction back."""
    from asgiref.sync import sync_to_async
    from django.contrib.auth.models import User
    from django.db import transaction

    block = transaction.atomic()
    await sync_to_async(block.__enter__)()  # every sync_to_async call of this task runs on its one thread
    await sync_to_async(User.objects.create)(username=params["username"])

    async def note() -> str:
        return "written while the user's transaction was open"

    await ctx.step("note", note)
    rollback = RuntimeError("roll back")
    await sync_to_async(block.__exit__)(RuntimeError, rollback, None)
    return {"done": True}


@absurd.register_task(name="worker_long_step")
async def long_step(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """One step longer than the claim timeout, then a second step: each logs when its body runs."""

    async def slow() -> str:
        record("slow-start", ctx.task_id)
        try:
            await asyncio.sleep(params["sleep"])
        except asyncio.CancelledError:
            record("slow-stopped", ctx.task_id)
            raise
        record("slow-end", ctx.task_id)
        return "slow done"

    async def after() -> str:
        record("after", ctx.task_id)
        return "after done"

    return {"slow": await ctx.step("slow", slow), "after": await ctx.step("after", after)}


def _terminate_own_backend() -> None:
    """Break this thread's Django connection for real: the server ends its session mid-query."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("select pg_terminate_backend(pg_backend_pid())")


@absurd.register_task(name="worker_flaky_connection", default_max_attempts=1)
async def flaky_connection(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Lose its own ORM connection: on every execution with ``always``, else on the first one only."""
    from asgiref.sync import sync_to_async

    record("run", ctx.task_id)
    flag = params["flag"]
    if params.get("always") or not os.path.exists(flag):
        with open(flag, "a"):
            pass
        await sync_to_async(_terminate_own_backend)()
    return {"pid": await sync_to_async(backend_pid)()}


@absurd.register_task(name="worker_swallows_sleep", default_max_attempts=1)
async def swallows_sleep(params: Any, ctx: Any) -> dict[str, Any]:
    """The mistake of wrapping a durable wait in a broad ``except Exception``."""
    try:
        await ctx.sleep_for("nap", 60)
    except Exception:
        record("swallowed", ctx.task_id)
    return {"done": True}


@absurd.register_task(name="worker_slow_sync_call")
async def slow_sync_call(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """A synchronous call (a sync tool, an ORM report) that outlives the shutdown grace period."""
    from asgiref.sync import sync_to_async

    def blocking() -> None:
        record("sync-start", ctx.task_id)
        time.sleep(params["sleep"])
        record("sync-end", ctx.task_id)

    await sync_to_async(blocking)()
    return {"done": True}


@absurd.register_task(name="worker_claim_timeout")
async def claim_timeout_seen(params: Any, ctx: Any) -> int:
    from django_absurd_agents import sdk

    return sdk.claim_timeout(ctx)
