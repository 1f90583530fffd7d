"""The complete set of step names of a representative durable agent, pinned.

Step names are compatibility data: a task that was checkpointed by one deploy is resumed by the next,
and a replay finds each recorded result by its name. Renaming a step (a new agent name, toolset id or
tool name, or a change in pydantic-ai's naming) strands every in-flight task. The agent here uses
every kind of durable unit the engine knows: model requests, function tools, an MCP server over stdio
(discovery, instructions, calls) and a dynamic toolset.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from fastmcp.client.transports import StdioTransport
from pydantic_ai import Agent
from pydantic_ai.mcp import MCPToolset
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.tools import RunContext
from pydantic_ai.toolsets import AbstractToolset, DynamicToolset, FunctionToolset

from django_absurd_agents import AbsurdAgent, absurd
from tests.test_durable_agent import checkpoint_names
from tests.test_engine_behaviour import drain

SERVER = Path(__file__).resolve().parent / "mcp_server.py"

PINNED_NAMES = [
    # Model request 1: discovery (the dynamic toolset per run step, the MCP server once per run, as
    # its tools are cached for the run) and the server's instructions, then the request.
    "concierge__dynamic_toolset__desk.get_tools",
    "concierge__mcp_server__calc.get_tools",
    "concierge__mcp_server__calc.get_instructions",
    "concierge__model.request",
    # Two MCP calls in one response: run one after another, numbered in that order.
    "concierge__mcp_server__calc.call_tool",
    "concierge__mcp_server__calc.call_tool#2",
    "concierge__dynamic_toolset__desk.get_tools#2",
    "concierge__mcp_server__calc.get_instructions#2",
    "concierge__model.request#2",
    "concierge__dynamic_toolset__desk.call_tool:ticket",
    "concierge__dynamic_toolset__desk.get_tools#3",
    "concierge__mcp_server__calc.get_instructions#3",
    "concierge__model.request#3",
    "concierge__function_toolset__<agent>.call_tool:quote",
    "concierge__dynamic_toolset__desk.get_tools#4",
    "concierge__mcp_server__calc.get_instructions#4",
    "concierge__model.request#4",
]
"""Every step of one run, in the order they are first written (the discovery steps of one request may
commit in either order: pydantic-ai lists the toolsets concurrently). Never update this list as part
of a refactoring: a change here means the tasks in flight at the deploy cannot resume."""


def returns(messages: list[ModelMessage]) -> list[ToolReturnPart]:
    return [part for message in messages for part in message.parts if isinstance(part, ToolReturnPart)]


async def concierge_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Call the MCP tool twice at once, then the dynamic tool, then the function tool, then answer."""
    done = [part.tool_name for part in returns(messages)]
    if "add" not in done:
        return ModelResponse(parts=[ToolCallPart("add", {"a": 2, "b": 3}), ToolCallPart("add", {"a": 4, "b": 5})])
    for tool, args in [("ticket", {"subject": "refund"}), ("quote", {"symbol": "ACME"})]:
        if tool not in done:
            return ModelResponse(parts=[ToolCallPart(tool, args)])
    summary = ", ".join(f"{part.tool_name}={part.model_response_str()}" for part in returns(messages))
    return ModelResponse(parts=[TextPart(f"{summary} | {info.instructions}")])


class Counter:
    """Counts the dynamic tool's calls (the MCP server counts its own in a file)."""

    def __init__(self) -> None:
        self.tickets = 0
        self.factory_calls = 0


def build_concierge(mcp_log: Path, counter: Counter) -> AbsurdAgent:
    """An agent with a function tool, an MCP server (``calc``) and a dynamic toolset (``desk``).

    ``keep_alive=False`` makes every MCP session a new server process, so the server's ``start``
    lines count sessions.
    """
    calc = MCPToolset(
        StdioTransport(
            command=sys.executable, args=[str(SERVER)], env={"MCP_CALL_LOG": str(mcp_log)}, keep_alive=False
        ),
        id="calc",
        include_instructions=True,
    )

    desk_tools: FunctionToolset[None] = FunctionToolset()

    @desk_tools.tool_plain
    def ticket(subject: str) -> str:
        """Open a support ticket."""
        counter.tickets += 1
        return f"ticket #{counter.tickets} about {subject}"

    def desk(ctx: RunContext[None]) -> AbstractToolset[None]:
        counter.factory_calls += 1
        return desk_tools

    inner: Agent[None, str] = Agent(
        FunctionModel(concierge_model),
        name="concierge",
        toolsets=[calc, DynamicToolset(desk, id="desk")],
    )

    @inner.tool_plain
    def quote(symbol: str) -> str:
        """Current price of a stock."""
        return f"{symbol} at 12.5"

    return AbsurdAgent(inner, absurd)


@pytest.fixture
def mcp_log(tmp_path: Path) -> Path:
    return tmp_path / "mcp.log"


def mcp_calls(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


async def test_every_unit_is_a_step_named_after_the_agent(project_absurd: Any, mcp_log: Path) -> None:
    counter = Counter()
    concierge = build_concierge(mcp_log, counter)
    outputs: list[str] = []

    @project_absurd.register_task(name="concierge_twice")
    async def concierge_twice(params: Any, ctx: Any) -> str:
        output = (await concierge.run("Add 2 and 3, open a ticket, quote ACME.")).output
        outputs.append(output)
        if ctx._task["attempt"] == 1:
            raise RuntimeError("fail after the run, so the second attempt replays it")
        return output

    spawned = await project_absurd.spawn("concierge_twice", {}, retry_strategy={"kind": "none"}, max_attempts=2)
    snapshot = await drain(project_absurd, spawned["task_id"])
    assert snapshot.state == "completed", snapshot

    names = await _names(spawned["task_id"])
    assert all(name.startswith("concierge__") for name in names)
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(PINNED_NAMES)

    # The second attempt replayed every step: the same output, and nothing ran twice. The MCP server
    # was started once, for the first run's one session, and never for the replay.
    assert outputs[0] == outputs[1]
    assert "add=5, add=9, ticket=ticket #1 about refund, quote=ACME at 12.5" in outputs[0]
    assert "Use `add` for any arithmetic" in outputs[0]  # the server's instructions reached the model
    assert mcp_calls(mcp_log) == ["start", "add:2+3", "add:4+5"]
    assert counter.tickets == 1
    # The factory of a `per_run_step` dynamic toolset runs inside the steps (discovery per model
    # request, and the call), never in the replay.
    assert counter.factory_calls == 5


async def _names(task_id: str) -> list[str]:
    from asgiref.sync import sync_to_async

    return await sync_to_async(checkpoint_names)(task_id)
