"""``AbsurdDurability``: a pydantic-ai capability that makes an agent's runs durable on Absurd.

Built on pydantic-ai's public engine surface (``pydantic_ai.durable_exec``): the base class owns the
model, toolset, MCP and event-stream machinery; this module says how one durable unit runs, which is
one Absurd step (``ctx.begin_step``/``ctx.complete_step``) named by ``JournalOperationNamer``, so every
step name starts with the agent's name.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from absurd_sdk import AsyncTaskContext, StepHandle
from pydantic_ai.agent import AbstractAgent, EventStreamHandler
from pydantic_ai.capabilities import Instrumentation
from pydantic_ai.capabilities.abstract import AbstractCapability, CapabilityOrdering, WrapRunHandler
from pydantic_ai.durable_exec import (
    JSON_CODEC,
    BaseDurabilityCapability,
    DurabilityEngineSpec,
    DurableOperationBackend,
    DurableOperationId,
    JournalCallableOperationBackend,
    ModelCancelSuspendedResponseId,
    ModelRequestId,
    RoleBasedOperationConfig,
    ToolsetCallToolId,
    conversation_id_from_run_id,
    external_event_scope,
    record_durable_unit,
    replay_scope,
)
from pydantic_ai.exceptions import UserError
from pydantic_ai.messages import AgentStreamEvent
from pydantic_ai.models import Model
from pydantic_ai.run import AgentRunResult
from pydantic_ai.tools import AgentDepsT, RunContext
from pydantic_core import PydanticSerializationError

from django_absurd_agents import durable_sleep, sdk
from django_absurd_agents import event_log as log
from django_absurd_agents.event_log import current_task_context
from django_absurd_agents.exceptions import UnrecordableStepResult
from django_absurd_agents.external_events import AbsurdEventWaiter
from django_absurd_agents.jsonsafe import find_problem
from django_absurd_agents.lease import keep_lease, lease_kept
from django_absurd_agents.task_context import make_last_attempt

__all__ = ["AbsurdDurability", "AbsurdOperationBackend", "UnrecordableStepResult", "current_task_context"]

_run_counters: weakref.WeakKeyDictionary[AsyncTaskContext, dict[str, int]] = weakref.WeakKeyDictionary()
"""Agent runs started so far in each task attempt, per agent name: gives replay-stable run ids."""


def _require_context(what: str) -> AsyncTaskContext:
    ctx = current_task_context()
    if ctx is None:
        raise UserError(f"{what} needs to run inside an Absurd task handler (@absurd.register_task).")
    return ctx


def _unit(operation_id: DurableOperationId, name: str) -> str:
    """What a durable step is, for a person: "the tool 'lookup'", "a model request", ..."""
    if isinstance(operation_id, ToolsetCallToolId):
        tool = name.split(".call_tool:", 1)[1].split("#", 1)[0] if ".call_tool:" in name else None
        return f"the tool {tool!r}" if tool else f"a tool of the toolset {operation_id.toolset_id!r}"
    if isinstance(operation_id, ModelRequestId):
        return "a model request"
    return "the step"


async def _unrecordable(ctx: AsyncTaskContext, operation_id: DurableOperationId, name: str, problem: str) -> NoReturn:
    """Fail the task for good: the step's body ran (a paid model call, a tool's side effect); another
    attempt would run it again only to fail the same way."""
    await make_last_attempt(ctx)
    raise UnrecordableStepResult(
        f"The durable step {name!r} ({_unit(operation_id, name)}) returned a value that cannot be recorded as "
        f"JSON: {problem} Return data (str, numbers, dicts, lists, pydantic models, dataclasses, datetimes) from "
        "the tool or model. The step has run; the task fails now, without another attempt that would run it "
        "again. Fix the cause, then retry the task: it resumes after the last recorded step."
    )


class AbsurdOperationBackend(JournalCallableOperationBackend[None]):
    """Runs each durable operation as one Absurd step; a completed step returns its recorded JSON."""

    async def execute(
        self,
        *,
        operation_id: DurableOperationId,
        name: str,
        body: Callable[[], Awaitable[object]],
        cache_key: tuple[object, ...],
        config: None,
    ) -> object:
        ctx = _require_context(f"The durable step {name!r}")
        if isinstance(operation_id, ModelCancelSuspendedResponseId) and durable_sleep.suspending(ctx):
            return None  # the task sleeps until its next poll of this job: keep the job (durable_sleep.py)
        # absurd-sdk loaded the task's committed checkpoints when it was claimed, and adds each one this
        # run writes: a name missing from them is a new step, so skip the SDK's per-step SELECT.
        checkpoint_name = sdk.checkpoint_name(ctx, name)
        recorded = sdk.recorded_checkpoints(ctx)
        if checkpoint_name in recorded:
            record_durable_unit(executed=False)
            return recorded[checkpoint_name]
        handle = StepHandle(name=name, checkpoint_name=checkpoint_name, done=False)
        try:
            # The step's live model events carry its checkpoint name; a wait inside it is not durable.
            with log.in_step(checkpoint_name), durable_sleep.in_step_body():
                if lease_kept(ctx):
                    value = await body()
                else:  # a task run by a plain absurd_sdk client: keep its lease for the step ourselves
                    async with keep_lease(ctx):
                        value = await body()
        except PydanticSerializationError as exc:
            await _unrecordable(ctx, operation_id, name, f"{exc}.")
        # The body's value is JSON-shaped (JSON_CODEC), but may hold what Postgres's jsonb refuses: a NUL
        # character in text extracted from a PDF, a lone surrogate, a float NaN.
        problem = find_problem(value)
        if problem is not None:
            await _unrecordable(ctx, operation_id, name, f"{problem}. {problem.hint}")
        # Checked just now: the class's method skips the same check installed on a handler's context
        # (task_context.check_context), which would walk the value a second time. Events the run's log
        # still buffers are written in the same statement as the checkpoint.
        if not await log.complete_step(ctx, handle, value):
            await type(ctx).complete_step(ctx, handle, value)
        record_durable_unit(executed=True)
        return value


class AbsurdReplayScope(AbstractCapability[Any]):
    """Opens ``replay_scope()`` around the whole durable run, outside the run span of ``Instrumentation``.

    ``AbsurdDurability`` is innermost, ``Instrumentation`` outermost: a scope opened in the durability's
    own ``wrap_run`` starts after the run span, so a replay that ran no step would still export its
    run span, aggregated usage and all. This companion sits outside it.
    """

    def get_ordering(self) -> CapabilityOrdering:
        return CapabilityOrdering(position="outermost", wraps=(Instrumentation,))

    async def wrap_run(self, ctx: RunContext[Any], *, handler: WrapRunHandler) -> AgentRunResult[Any]:
        if current_task_context() is None:
            return await handler()
        with replay_scope():
            return await handler()


def _binding_fingerprint(agent: AbstractAgent[Any, Any]) -> tuple[object, ...]:
    """What a binding is made from: the agent's name, model, capabilities and toolsets."""
    return (agent.name, agent.model, agent.root_capability, *agent.toolsets)


def _same(one: tuple[object, ...], other: tuple[object, ...]) -> bool:
    return len(one) == len(other) and all(a is b for a, b in zip(one, other, strict=True))


@dataclass(init=False, kw_only=True)
class AbsurdDurability(BaseDurabilityCapability[AgentDepsT]):
    """Make an agent durable on Absurd: ``Agent(model, name="analyst", capabilities=[AbsurdDurability()])``.

    Inside an Absurd task handler every model request, function tool call, MCP call and dynamic tool
    call is one checkpointed step named ``{agent name}__...``; a new attempt of the task replays the
    completed steps from their recorded results and runs only what is left. Outside a task the
    capability is transparent and the run is an ordinary agent run.
    """

    engine_spec = DurabilityEngineSpec(
        engine_name="Absurd",
        durable_unit_noun="step",
        durable_unit_plural="steps",
        durable_container_noun="task",
        codec=JSON_CODEC,
        unsupported_runtime_toolset_kinds=frozenset({"function", "mcp", "dynamic"}),
        wrapped_toolset_kinds=frozenset({"function", "mcp", "dynamic"}),
        toolset_lifecycles={"function": "enter-always", "mcp": "enter-in-durable-unit", "dynamic": "enter-never"},
        tool_call_result_upgrade_lenient=False,
        journal_discovery=True,
        # Absurd numbers repeated step names in the order they are reached, so tool calls must run
        # one after another for a replay to see the same numbering.
        sequential_tools_in_durable_context=True,
        tool_config_key="absurd",
    )

    def __init__(
        self,
        *,
        models: Mapping[str, Model] | None = None,
        event_stream_handler: EventStreamHandler[AgentDepsT] | None = None,
        name: str | None = None,
        event_log: bool = False,
    ) -> None:
        """Create the capability.

        Args:
            models: Extra models by id, selectable at run time with ``agent.run(..., model="id")``. The
                agent's own model is always registered as ``"default"``.
            event_stream_handler: Receives the run's model and tool events; inside a task, model events
                arrive live within the model step and tool events in steps of their own.
            name: Prefix of every step name; defaults to the agent's ``name``.
            event_log: Inside a task, append every event of the run to the task's event log as it
                happens, for ``absurd.stream_events()`` and the Server-Sent Events view (``event_log.py``).
                Model requests are then streamed: their steps are named ``...__model.request_stream``.
        """
        super().__init__(models=models, event_stream_handler=event_stream_handler, name=name)
        self.event_log = event_log
        self._bound: tuple[weakref.ref[Any], tuple[object, ...], AbstractCapability[AgentDepsT]] | None = None

    def for_agent(self, agent: AbstractAgent[AgentDepsT, Any]) -> AbstractCapability[AgentDepsT]:
        """The capability bound to ``agent``, bound once and reused by its runs while the agent is unchanged.

        pydantic-ai binds a run's capabilities on every run (a copy, its models, its wrapped toolsets, its
        capability operations); an ``AbsurdAgent`` passes the same capability to every run of the same
        agent, so the binding of the previous run is still the right one.
        """
        fingerprint = _binding_fingerprint(agent)
        if self._bound is not None:
            ref, previous, bound = self._bound
            if ref() is agent and _same(previous, fingerprint):
                return bound
        bound = super().for_agent(agent)
        self._bound = (weakref.ref(agent), fingerprint, bound)
        return bound

    @property
    def has_wrap_run_event_stream(self) -> bool:
        # Logging is a reason to stream, inside a task only (as Temporal's event_stream_topic).
        return super().has_wrap_run_event_stream or (self.event_log and self.in_durable_context)

    def _model_stream_event_handler(self) -> EventStreamHandler[AgentDepsT] | None:
        handler = super()._model_stream_event_handler()
        return log.model_step_handler(handler) if self.event_log else handler

    async def wrap_run_event_stream(
        self, ctx: RunContext[AgentDepsT], *, stream: AsyncIterable[AgentStreamEvent]
    ) -> AsyncIterable[AgentStreamEvent]:
        events = super().wrap_run_event_stream(ctx, stream=stream)
        task = current_task_context()
        if self.event_log and task is not None:
            events = log.log_run_events(task, events)
        async for event in events:
            yield event

    @property
    def in_durable_context(self) -> bool:
        return current_task_context() is not None

    def get_default_run_id(self) -> str | None:
        ctx = current_task_context()
        if ctx is None:
            return None
        counters = _run_counters.setdefault(ctx, {})
        index = counters.get(self.name, 0)
        counters[self.name] = index + 1
        return f"{ctx.task_id}:{self.name}:{index}"

    def get_default_conversation_id(self, run_id: str) -> str | None:
        return conversation_id_from_run_id(run_id) if self.in_durable_context else None

    def get_durable_operation_backend(self) -> DurableOperationBackend[Any]:
        return AbsurdOperationBackend(
            agent_name=self.name,
            default_model_id=self.default_model_id,
            config=RoleBasedOperationConfig(model=None, event=None, capability=None, tool=None),
        )

    def _companion_capabilities(self) -> list[AbstractCapability[AgentDepsT]]:
        return [AbsurdReplayScope(), *super()._companion_capabilities()]

    async def wrap_run(self, ctx: RunContext[AgentDepsT], *, handler: WrapRunHandler) -> AgentRunResult[Any]:
        task = current_task_context()
        if task is None:
            return await super().wrap_run(ctx, handler=handler)
        # replay_scope() is opened by AbsurdReplayScope, outside the run span: a second scope here
        # would start a fresh tally that the run span never hears from.
        # Waits between polls of a background model job are durable sleeps: the task frees its slot.
        with (
            external_event_scope(AbsurdEventWaiter(task, self.name)),
            AbstractAgent.using_sleep(durable_sleep.durable_sleep(task, self.name)),
        ):
            if self.event_log:
                return await log.logged_run(task, functools.partial(super().wrap_run, ctx, handler=handler))
            return await super().wrap_run(ctx, handler=handler)
