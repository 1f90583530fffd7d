"""Chat agents of the conversation tests, shared with the worker processes those tests start.

``counter`` answers with every user prompt it has seen so far, so an answer proves which history
its turn ran with. Model calls are logged to ``$CALL_LOG``; ``$CRASH_AT=chat:validated`` kills the
process after the model answered and before the turn is written back. A prompt listed in
``failing_prompts`` (or in ``$CHAT_FAIL``) makes the model raise.
"""

from __future__ import annotations

import os

from pydantic_ai import Agent
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
