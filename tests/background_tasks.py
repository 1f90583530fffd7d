"""A model whose answers come from background jobs, and a task that waits for one (``test_background_models``).

``BackgroundJobModel`` behaves like OpenAI's background mode: the first request submits a job and
returns a suspended response (``state='suspended'``, ``provider_details={'background': True}``), each
poll (a request that echoes the suspended response back) returns it still suspended, and the answer
comes once the job is released. The "provider" is a directory (``$BACKGROUND_JOBS``) shared by the
test and the worker processes: the model appends ``submit|poll|cancel <job> <poll number> <pid>``
lines to its ``jobs.log``; the test releases every job by creating ``release``, and makes polls hang
(a slow provider, so that a cancellation reaches a poll in flight) by creating ``hang``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, ModelResponseStreamEvent, TextPart, ToolCallPart
from pydantic_ai.models import Model, ModelRequestParameters, StreamedResponse
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.settings import ModelSettings

from django_absurd_agents import AbsurdAgent, absurd

POLL_INTERVAL = 0.5


def jobs_dir() -> Path:
    return Path(os.environ["BACKGROUND_JOBS"])


def provider_log(event: str, job: str, poll: int) -> None:
    fd = os.open(jobs_dir() / "jobs.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{event} {job} {poll} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


class BackgroundJobModel(Model):
    @property
    def model_name(self) -> str:
        return "background-job"

    @property
    def system(self) -> str:
        return "test"

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        return await self._answer(messages)

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: Any = None,
    ) -> AsyncIterator[StreamedResponse]:
        answer = await self._answer(messages)
        yield _Streamed(model_request_parameters=model_request_parameters, answer=answer)

    async def _answer(self, messages: list[ModelMessage]) -> ModelResponse:
        last = messages[-1]
        if isinstance(last, ModelResponse) and last.state == "suspended":
            job = str(last.provider_response_id)
            poll = int((last.provider_details or {})["poll"]) + 1
            provider_log("poll", job, poll)
            if (jobs_dir() / "hang").exists():
                await anyio.sleep(120)  # a poll in flight, until the task is cancelled
        else:
            job, poll = f"job-{uuid.uuid4().hex[:8]}", 0
            provider_log("submit", job, poll)
        if poll > 0 and (jobs_dir() / "release").exists():
            return ModelResponse(
                parts=[TextPart(f"report of {job}, ready after {poll} polls")],
                model_name=self.model_name,
                provider_name=self.system,
                provider_response_id=job,
                provider_details={"background": True, "poll": poll},
            )
        return ModelResponse(
            parts=[],
            model_name=self.model_name,
            provider_name=self.system,
            provider_response_id=job,
            provider_details={"background": True, "poll": poll},
            state="suspended",
        )

    def continuation_delay(self, response: ModelResponse) -> float | None:
        if response.state == "suspended" and (response.provider_details or {}).get("background"):
            return POLL_INTERVAL
        return None

    async def cancel_suspended_response(self, response: ModelResponse) -> None:
        provider_log("cancel", str(response.provider_response_id), int((response.provider_details or {})["poll"]))


@dataclass
class _Streamed(StreamedResponse):
    """The answer of ``_answer`` as a stream: its text as one delta, its job and state as the provider's."""

    answer: ModelResponse = field(kw_only=True)

    async def _get_event_iterator(self) -> AsyncIterator[ModelResponseStreamEvent]:
        self.provider_response_id = self.answer.provider_response_id
        self.provider_details = self.answer.provider_details
        self.state = self.answer.state
        for part in self.answer.parts:
            if isinstance(part, TextPart):
                for event in self._parts_manager.handle_text_delta(vendor_part_id="text", content=part.content):
                    yield event

    @property
    def model_name(self) -> str:
        return "background-job"

    @property
    def provider_name(self) -> str:
        return "test"

    @property
    def provider_url(self) -> None:
        return None

    @property
    def timestamp(self) -> datetime:
        return self.answer.timestamp


researcher = AbsurdAgent(Agent(BackgroundJobModel(), name="researcher"), absurd)
# Its model requests are streamed (into the task's event log): the same waits, through pydantic-ai's stream.
live_researcher = AbsurdAgent(Agent(BackgroundJobModel(), name="live_researcher"), absurd, event_log=True)


@absurd.register_task(name="background_report")
async def background_report(params: Any, ctx: Any) -> dict[str, Any]:
    from tests.worker_tasks import record

    record("start", ctx.task_id)  # once per claim: a wake-up after a durable sleep is a new claim
    agent = live_researcher if params.get("stream") else researcher
    result = await agent.run("Write the quarterly report.")
    record("end", ctx.task_id)
    return {"output": result.output}


# A plain agent with a background model, run by a tool of a durable agent: its waits are inside the tool's step.
plain_researcher = Agent(BackgroundJobModel(), name="plain_researcher")


def _delegate(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    if len(messages) == 1:
        return ModelResponse(parts=[ToolCallPart("research", {"topic": "revenue"})])
    return ModelResponse(parts=[TextPart("delegated")])


editor_inner = Agent(FunctionModel(_delegate), name="editor")


@editor_inner.tool_plain
async def research(topic: str) -> str:
    """Research a topic."""
    return (await plain_researcher.run(f"Research {topic}.")).output


editor = AbsurdAgent(editor_inner, absurd)


@absurd.register_task(name="background_in_tool")
async def background_in_tool(params: Any, ctx: Any) -> dict[str, Any]:
    result = await editor.run("Write it up.")
    return {"output": result.output}
