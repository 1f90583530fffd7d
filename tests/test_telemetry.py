"""Telemetry on replay: a resumed run does not report the work it replays a second time.

A new attempt of a task runs the agent loop again from the start, and every completed step returns
its recorded result. pydantic-ai's instrumentation runs again too; the engine wraps each durable run
in ``replay_scope()`` and reports each step with ``record_durable_unit(executed=...)``, so a span that
covered only replayed steps is never exported and a replayed model request records no token metrics.
"""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic_ai import Agent
from pydantic_ai.capabilities import Instrumentation
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.instrumented import InstrumentationSettings

from django_absurd_agents import AbsurdAgent, AbsurdDurability, absurd
from tests.test_engine_behaviour import drain

exporter = InMemorySpanExporter()
tracer_provider = TracerProvider()
tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
metric_reader = InMemoryMetricReader()
meter_provider = MeterProvider(metric_readers=[metric_reader])


def instrumentation() -> Instrumentation:
    return Instrumentation(
        settings=InstrumentationSettings(tracer_provider=tracer_provider, meter_provider=meter_provider)
    )


async def lookup_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Look ACME up, then answer."""
    if any(isinstance(part, ToolReturnPart) for message in messages for part in message.parts):
        return ModelResponse(parts=[TextPart("ACME is fine")])
    return ModelResponse(parts=[ToolCallPart("lookup", {"symbol": "ACME"})])


lookups: list[str] = []
crash_lookup = {"armed": False}
"""When armed, the next lookup fails the attempt (once), after the first model request was recorded."""


def lookup(symbol: str) -> str:
    """What the desk thinks of a stock."""
    if crash_lookup["armed"]:
        crash_lookup["armed"] = False
        raise RuntimeError("the worker dies inside the tool")
    lookups.append(symbol)
    return f"{symbol} is fine"


# The two ways to make an agent durable: the AbsurdAgent wrapper, and the capability on a plain Agent.
wrapped = AbsurdAgent(
    Agent(FunctionModel(lookup_model), name="observed", tools=[lookup], capabilities=[instrumentation()]), absurd
)
capable: Agent[None, str] = Agent(
    FunctionModel(lookup_model),
    name="observed_capability",
    tools=[lookup],
    capabilities=[instrumentation(), AbsurdDurability()],
)
AGENTS: dict[str, Any] = {"wrapper": wrapped, "capability": capable}


def token_measurements() -> int:
    """How many token-usage measurements the meter has received so far (cumulative)."""
    data = metric_reader.get_metrics_data()
    count = 0
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == "gen_ai.client.token.usage":
                    count += sum(int(getattr(point, "count", 0)) for point in metric.data.data_points)
    return count


attempts: list[dict[str, Any]] = []


@absurd.register_task(name="observed_then_fail_once")
async def observed_then_fail_once(params: Any, ctx: Any) -> str:
    """Run the agent, noting what telemetry this attempt emitted; fail once so attempt 2 replays."""
    exporter.clear()
    tokens_before = token_measurements()
    output = (await AGENTS[params["agent"]].run("How is ACME?")).output
    attempts.append(
        {
            "spans": sorted(span.name.split(" ")[0] for span in exporter.get_finished_spans()),
            "token_measurements": token_measurements() - tokens_before,
            "output": output,
        }
    )
    if ctx._task["attempt"] == 1:
        raise RuntimeError("fail after the run, so the second attempt replays it")
    return output


async def run_twice(client: Any, agent: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the task to completion: attempt 1 runs the agent, attempt 2 replays every step of it."""
    attempts.clear()
    lookups.clear()
    spawned = await client.spawn(
        "observed_then_fail_once", {"agent": agent}, retry_strategy={"kind": "none"}, max_attempts=2
    )
    snapshot = await drain(client, spawned["task_id"])
    assert snapshot.state == "completed", snapshot
    first, replay = attempts
    assert lookups == ["ACME"]
    assert first["output"] == replay["output"] == "ACME is fine"
    return first, replay


@pytest.mark.parametrize("agent", ["wrapper", "capability"])
async def test_replayed_steps_emit_no_spans_and_no_token_metrics(project_absurd: Any, agent: str) -> None:
    first, replay = await run_twice(project_absurd, agent)
    # The first attempt did the work and reported it: two model requests, one tool call, the run.
    assert first["spans"] == ["chat", "chat", "execute_tool", "invoke_agent"]
    assert first["token_measurements"] == 4  # input and output tokens of each request
    # The replay ran no step, so it reports no model request, no tool call and no tokens.
    assert "chat" not in replay["spans"] and "execute_tool" not in replay["spans"]
    assert replay["token_measurements"] == 0


@pytest.mark.parametrize("agent", ["wrapper", "capability"])
async def test_a_fully_replayed_run_emits_no_run_span(project_absurd: Any, agent: str) -> None:
    """The run span of a replay covers only replayed steps, and carries the run's aggregated usage:
    exported again, it would count the run's tokens twice in any backend that sums run spans."""
    _, replay = await run_twice(project_absurd, agent)
    assert replay["spans"] == []


@pytest.mark.parametrize("agent", ["wrapper", "capability"])
async def test_a_resumed_run_reports_only_the_steps_it_ran(project_absurd: Any, agent: str) -> None:
    """Attempt 1 dies in the tool; attempt 2 replays model request 1 and runs the rest."""
    attempts.clear()
    lookups.clear()
    crash_lookup["armed"] = True
    spawned = await project_absurd.spawn(
        "observed_then_fail_once", {"agent": agent}, retry_strategy={"kind": "none"}, max_attempts=2
    )
    snapshot = await drain(project_absurd, spawned["task_id"])
    assert snapshot.state == "completed", snapshot
    [resumed] = attempts  # attempt 1 never got past the tool
    assert lookups == ["ACME"]
    # Model request 1 was replayed: one chat span (request 2), the tool, and the run that did work.
    assert resumed["spans"] == ["chat", "execute_tool", "invoke_agent"]
    assert resumed["token_measurements"] == 2
