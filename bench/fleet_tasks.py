"""The tasks of the fleet benchmark (``bench/bench_fleet.py``), imported by its workers through ``TASK_MODULES``.

* ``fleet_agent``: an ``AbsurdAgent`` run whose FunctionModel sleeps as long as the prompt says (the
  bench draws 1-5 s per run from a seed, so it knows the mean), then answers: one checkpointed model
  request per run.
* ``fleet_event``: waits durably for the event the bench emits later (``ctx.await_event``), holding no
  worker slot while it waits, and returns the payload.
* ``fleet_sleep``: records when it is due in a step, sleeps durably until then (``ctx.sleep_until``),
  and returns that time, so the bench can tell how late the worker picked it up again.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelRequest, ModelResponse, TextPart, UserPromptPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from django_absurd_agents import AbsurdAgent, absurd

QUEUE = "fleet"


def _prompt(messages: list[ModelMessage]) -> str:
    for message in messages:
        if isinstance(message, ModelRequest):
            for part in message.parts:
                if isinstance(part, UserPromptPart) and isinstance(part.content, str):
                    return part.content
    raise ValueError("the fleet agent is run with its latency as the prompt")


async def _slow_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    await asyncio.sleep(float(_prompt(messages)))
    return ModelResponse(parts=[TextPart("done")])


fleet_agent = AbsurdAgent(Agent(FunctionModel(_slow_model), name="fleet_agent"), absurd)


@absurd.register_task(name="fleet_agent", queue=QUEUE)
async def run_agent(params: Any, ctx: Any) -> str:
    result = await fleet_agent.run(str(params["latency"]))
    return str(result.output)


@absurd.register_task(name="fleet_event", queue=QUEUE)
async def wait_for_event(params: Any, ctx: Any) -> Any:
    return await ctx.await_event(params["event"], timeout=3600)


@absurd.register_task(name="fleet_sleep", queue=QUEUE)
async def sleep_durably(params: Any, ctx: Any) -> float:
    async def due() -> float:
        return time.time() + float(params["seconds"])

    wake_at = float(await ctx.step("due", due))
    await ctx.sleep_until("nap", wake_at)
    return wake_at
