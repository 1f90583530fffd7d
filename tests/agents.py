"""Agents and tasks shared by the engine tests and the crash-test worker processes.

Model and tool calls are counted in a file named by ``$CALL_LOG`` (one line a call), so a test can
count them across worker processes; ``$CRASH_AT`` makes a worker process exit hard at a named point.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Any

from pydantic import BaseModel
from pydantic_ai import Agent, ModelRetry
from pydantic_ai.messages import (
    ModelMessage,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel

from django_absurd_agents import AbsurdAgent, absurd


def log_call(what: str) -> None:
    path = os.environ.get("CALL_LOG")
    if path:
        with open(path, "a") as f:
            f.write(what + "\n")
            f.flush()
            os.fsync(f.fileno())


def maybe_crash(point: str) -> None:
    if os.environ.get("CRASH_AT") == point:
        os._exit(137)


class Quote(BaseModel):
    symbol: str
    price: float


@dataclasses.dataclass
class Stamp:
    at: datetime.datetime
    pair: tuple[int, int]


def tool_returns(messages: list[ModelMessage]) -> list[ToolReturnPart]:
    return [part for message in messages for part in message.parts if isinstance(part, ToolReturnPart)]


async def scripted_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Call each tool once, in order, then answer with what the tools returned."""
    returns = tool_returns(messages)
    call_number = len(returns) + 1
    log_call(f"model:{call_number}")
    maybe_crash(f"model:{call_number}")
    done = {part.tool_name for part in returns}
    for tool in info.function_tools:
        if tool.name not in done:
            args: dict[str, Any] = {"symbol": "ACME"} if tool.name == "quote" else {}
            return ModelResponse(parts=[ToolCallPart(tool.name, args)])
    summary = "; ".join(f"{part.tool_name}={part.model_response_str()}" for part in returns)
    return ModelResponse(parts=[TextPart(f"done: {summary}")])


inner = Agent(FunctionModel(scripted_model), name="analyst")


@inner.tool_plain
def quote(symbol: str) -> Quote:
    """Current price of a stock."""
    log_call("tool:quote")
    maybe_crash("tool:quote")
    return Quote(symbol=symbol, price=12.5)


@inner.tool_plain
def stamp() -> Stamp:
    """A timestamp and a pair."""
    log_call("tool:stamp")
    return Stamp(at=datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC), pair=(1, 2))


analyst = AbsurdAgent(inner, absurd)


@absurd.register_task(name="analyse")
async def analyse(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    result = await analyst.run(params["prompt"])
    return {"output": result.output}


async def retry_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Call ``flaky`` until it returns, then answer with its result and the retries it took."""
    log_call("retry_model")
    returns = tool_returns(messages)
    if returns and returns[-1].content == "ok":
        retries = sum(part.content == "try again" for part in returns)
        return ModelResponse(parts=[TextPart(f"flaky ok after {retries} retry prompt(s)")])
    return ModelResponse(parts=[ToolCallPart("flaky", {})])


retrying_inner = Agent(FunctionModel(retry_model), name="retrier")
_retry_state = {"raised": 0}


@retrying_inner.tool_plain
def flaky() -> str:
    """Asks the model to retry once."""
    log_call("tool:flaky")
    if _retry_state["raised"] == 0:
        _retry_state["raised"] += 1
        raise ModelRetry("try again")
    return "ok"


retrier = AbsurdAgent(retrying_inner, absurd)


# --- a task that fails after its agent run on the first attempt, so the second attempt replays it ---

outputs: list[str] = []


@absurd.register_task(name="analyse_then_fail_once")
async def analyse_then_fail_once(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    agent = retrier if params.get("agent") == "retrier" else analyst
    result = await agent.run("How is ACME?")
    outputs.append(result.output)
    if ctx._task["attempt"] == 1:
        raise RuntimeError("fail after the run, to force a replay")
    return {"output": result.output}


# --- a slow model, for lease extension -------------------------------------------------------------


async def slow_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    import asyncio

    log_call("slow:start")
    await asyncio.sleep(float(os.environ.get("SLOW_MODEL_SECONDS", "0")))
    log_call("slow:end")
    return ModelResponse(parts=[TextPart("slow answer")])


slowpoke = AbsurdAgent(Agent(FunctionModel(slow_model), name="slowpoke"), absurd)


@absurd.register_task(name="slow_analyse")
async def slow_analyse(params: dict[str, Any], ctx: Any) -> str:
    return (await slowpoke.run("take your time")).output


# --- human approval through RequestInput ----------------------------------------------------------


def _record_ask(ctx: Any, requests: Any, token: str) -> None:
    import json

    path = os.environ.get("ASK_LOG")
    log_call("ask")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"token": token, "calls": [c.tool_call_id for c in requests.approvals]}) + "\n")
    return None


def approval_agent(timeout: datetime.timedelta | None = None) -> AbsurdAgent:
    from pydantic_ai.capabilities import RequestInput

    agent = Agent(
        FunctionModel(scripted_model),
        name="approver",
        capabilities=[RequestInput(_record_ask, timeout=timeout, name="refund")],
    )

    @agent.tool_plain(requires_approval=True)
    def refund(amount: int = 10) -> str:
        """Refund the customer."""
        log_call("tool:refund")
        return "refunded"

    return AbsurdAgent(agent, absurd)


approver = approval_agent()
impatient_approver = approval_agent(timeout=datetime.timedelta(seconds=1))


@absurd.register_task(name="refund")
async def refund_task(params: dict[str, Any], ctx: Any) -> str:
    agent = impatient_approver if params.get("impatient") else approver
    return (await agent.run("refund please")).output
