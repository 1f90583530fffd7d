"""The agents of the chaos run (``bench/chaos.py``) and the load bench (``bench/bench_load.py``).

Worker processes import this module through ``ABSURD_AGENTS['TASK_MODULES']`` (``tests.settings_chaos``).

``chaos_agent`` is an agent run of ``STEPS`` tool calls: its FunctionModel sleeps 0-300 ms at random per
request, then asks for the tool ``record_effect`` (a side effect, then 0-100 ms waiting for its
acknowledgement) with the step number; after the last step it answers with the effects it saw.

Every model request (start and end), every side effect and every execution of the task's code (start
and end) is appended as one JSON line to the file named by ``$CHAOS_LOG``, with the task id, the run
id, the process id and the time. Those lines are written outside any checkpoint, so neither a killed
worker nor a restarted database takes them back: the chaos script reads them afterwards to count
what ran twice.

``load_agent`` has the same shape with no latency and no log (one tool call), for measuring the
engine's own cost.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from typing import Any

from absurd_sdk import get_current_context
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from django_absurd_agents import AbsurdAgent, absurd

STEPS = 8
"""Tool calls per chaos task, so a task makes ``STEPS + 1`` model requests."""

MAX_LATENCY = float(os.environ.get("CHAOS_MAX_LATENCY", "0.3"))


def record(kind: str, **fields: Any) -> None:
    """Append one event to ``$CHAOS_LOG``: a single ``write`` on an O_APPEND file, so processes never interleave."""
    path = os.environ.get("CHAOS_LOG")
    if not path:
        return
    ctx = get_current_context()
    line = {
        "kind": kind,
        "task": str(ctx.task_id) if ctx is not None else None,
        "run": str(ctx._task["run_id"]) if ctx is not None else None,
        "pid": os.getpid(),
        "t": time.monotonic_ns(),
        **fields,
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def _returns(messages: list[ModelMessage]) -> list[ToolReturnPart]:
    return [part for message in messages for part in message.parts if isinstance(part, ToolReturnPart)]


def _next_response(returns: list[ToolReturnPart]) -> ModelResponse:
    if len(returns) < STEPS:
        return ModelResponse(parts=[ToolCallPart("record_effect", {"step": len(returns) + 1})])
    return ModelResponse(parts=[TextPart("effects: " + ",".join(str(part.content) for part in returns))])


async def chaos_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    returns = _returns(messages)
    call = len(returns) + 1
    record("model-start", call=call)
    await asyncio.sleep(random.uniform(0, MAX_LATENCY))
    record("model-end", call=call)
    return _next_response(returns)


chaos_inner = Agent(FunctionModel(chaos_model), name="chaos")


@chaos_inner.tool_plain
async def record_effect(step: int) -> str:
    """The side effect (an e-mail sent, a payment made) that must happen once per step.

    It happens first; the far end's acknowledgement takes 0-100 ms more, and a worker killed in
    between has made the side effect without recording it, so its replacement makes it again.
    """
    record("effect", step=step)
    await asyncio.sleep(random.uniform(0, MAX_LATENCY / 3))
    return f"effect-{step}"


chaos_agent = AbsurdAgent(chaos_inner, absurd)


@absurd.register_task(name="chaos_agent")
async def chaos_task(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    record("run-start", attempt=ctx._task["attempt"])
    try:
        result = await chaos_agent.run(f"chaos task {params['n']}")
    except BaseException as exc:
        record("run-end", outcome=type(exc).__name__)
        raise
    record("run-end", outcome="returned")
    return {"n": params["n"], "output": result.output}


def expected_output() -> str:
    return "effects: " + ",".join(f"effect-{step}" for step in range(1, STEPS + 1))


# --- the load bench: the same agent shape, at full speed ------------------------------------------


async def load_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    returns = _returns(messages)
    if returns:
        return ModelResponse(parts=[TextPart(f"done: {returns[0].content}")])
    return ModelResponse(parts=[ToolCallPart("lookup", {"key": "k"})])


load_inner = Agent(FunctionModel(load_model), name="load")


@load_inner.tool_plain
async def lookup(key: str) -> str:
    """An instant tool."""
    return f"value of {key}"


load_agent = AbsurdAgent(load_inner, absurd)


@absurd.register_task(name="load_agent")
async def load_task(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    result = await load_agent.run(f"load task {params['n']}")
    return {"n": params["n"], "output": result.output}
