"""Chat agents of the conversation tests, shared with the worker processes those tests start.

``counter`` answers with every user prompt it has seen so far, so an answer proves which history
its turn ran with. Model calls are logged to ``$CALL_LOG``; ``$CRASH_AT=chat:validated`` kills the
process after the model answered and before the turn is written back. A prompt listed in
``failing_prompts`` (or in ``$CHAT_FAIL``) makes the model raise. ``cashier`` asks for a refund that
a person must approve, so its turn ends waiting on the approval.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic_ai import Agent, DeferredToolRequests
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ThinkingPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel

from django_absurd_agents import AbsurdAgent, absurd
from django_absurd_agents.conversations import register_chat_agent
from tests.agents import log_call, maybe_crash

failing_prompts: set[str] = set()


def user_prompts(messages: list[ModelMessage]) -> list[str]:
    return [
        str(part.content)
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, UserPromptPart)
    ]


async def counting_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    prompts = user_prompts(messages)
    log_call(f"model:{prompts[-1]}")
    if prompts[-1] in failing_prompts or prompts[-1] in os.environ.get("CHAT_FAIL", "").split(","):
        raise RuntimeError(f"the model refuses {prompts[-1]!r}")
    return ModelResponse(parts=[TextPart(f"{len(prompts)}: {' | '.join(prompts)}")])


counter_inner = Agent(FunctionModel(counting_model), name="counter", instructions="Count the prompts.")


@counter_inner.output_validator
def after_model(output: str) -> str:
    log_call("validated")
    maybe_crash("chat:validated")
    return output


counter = register_chat_agent(AbsurdAgent(counter_inner, absurd), previous_turn_recheck=2)


async def tool_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    last = messages[-1]
    returned = [part for part in last.parts if isinstance(part, ToolReturnPart)]
    if not returned:
        return ModelResponse(parts=[ToolCallPart("lookup", {"city": "Lyon", "days": 2})])
    return ModelResponse(
        parts=[
            ThinkingPart("The tool said it will be sunny."),
            TextPart(f"Forecast: {returned[0].model_response_str()}"),
        ]
    )


tools_inner = Agent(FunctionModel(tool_model), name="forecaster")


@tools_inner.tool_plain
def lookup(city: str, days: int) -> dict[str, object]:
    """The weather of a city for the next days."""
    return {"city": city, "days": days, "sky": "sunny"}


forecaster = register_chat_agent(AbsurdAgent(tools_inner, absurd))


async def refund_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Asks for a refund (a tool that needs a person's approval), then reports what the tool said."""
    returned = [part for part in messages[-1].parts if isinstance(part, ToolReturnPart)]
    if returned:
        return ModelResponse(parts=[TextPart(f"Refund: {returned[0].model_response_str()}")])
    log_call("model:asks for a refund")
    return ModelResponse(parts=[ToolCallPart("refund", {"eur": 40}, tool_call_id="refund-1")])


cashier_inner = Agent(FunctionModel(refund_model), name="cashier", output_type=[str, DeferredToolRequests])


@cashier_inner.tool_plain(requires_approval=True)
def refund(eur: int) -> str:
    """Refund the customer; a person approves each refund first."""
    log_call(f"refund:{eur}")
    return f"{eur} EUR refunded"


cashier = register_chat_agent(AbsurdAgent(cashier_inner, absurd))


@absurd.register_task(name="chat_history")
async def chat_history(params: dict[str, Any], ctx: Any) -> Any:
    """The seeds' pattern: a task returns ``result.all_messages()``; the next one passes it back."""
    result = await counter.run(params["prompt"], message_history=params.get("history"))
    return result.all_messages() if params.get("messages") else {"output": result.output}
