"""``AbsurdDurability.for_agent`` binds once per agent and reuses the binding while the agent is unchanged."""

from __future__ import annotations

from pydantic_ai import Agent
from pydantic_ai.models.test import TestModel

from django_absurd_agents import AbsurdAgent, absurd


def test_the_binding_is_reused_until_the_agent_changes() -> None:
    inner = Agent(TestModel(custom_output_text="ok"), name="bound")
    durability = AbsurdAgent(inner, absurd).durability
    first = durability.for_agent(inner)
    assert durability.for_agent(inner) is first

    inner.model = TestModel(custom_output_text="other")  # another model: bound again
    second = durability.for_agent(inner)
    assert second is not first
    assert durability.for_agent(inner) is second

    other = Agent(TestModel(), name="bound")  # another agent: bound to it
    assert durability.for_agent(other) is not second


def test_runs_that_reuse_the_binding_are_ordinary_runs() -> None:
    inner = Agent(TestModel(custom_output_text="ok"), name="reused")

    @inner.tool_plain
    def lookup(symbol: str) -> str:
        """A quote."""
        return f"{symbol}=1"

    agent = AbsurdAgent(inner, absurd)
    outputs = [agent.run_sync("go").output for _ in range(3)]
    assert outputs == ["ok", "ok", "ok"]
