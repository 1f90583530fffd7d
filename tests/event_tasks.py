"""Agents and tasks of the event log tests, shared with the worker processes those tests start.

``storyteller`` asks for one tool call (``chapter``), then streams its answer a word at a time, like a
model does (``$STORY_WORD_DELAY`` seconds a word). Every streamed answer starts with ``take<n>``, the
number of answers streamed so far in this test, so the answer of a second attempt differs from the
first one's: a reader that kept both would show it.

``$EVENT_CRASH`` makes the first attempt misbehave, once per test (a file in ``$EVENT_GATE_DIR``
remembers it happened): ``stall`` stops the answer after ``STALL_AFTER`` words until the worker is
killed; ``kill-before-answer`` kills the worker (SIGKILL) when the answer's model step starts,
after the tool's step was recorded.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel

from django_absurd_agents import AbsurdAgent, absurd
from django_absurd_agents.conversations import register_chat_agent

STORY = (
    "Once upon a time a durable agent told a story one word at a time and a worker died in the middle "
    "of it but the reader never saw a word twice and the story ended exactly as it was stored"
)
STALL_AFTER = 6


def _gate_dir() -> Path | None:
    directory = os.environ.get("EVENT_GATE_DIR")
    return Path(directory) if directory else None


def first_time(name: str) -> bool:
    """True the first time ``name`` is asked for in this test (across processes); False without a gate dir."""
    directory = _gate_dir()
    if directory is None:
        return False
    try:
        os.close(os.open(directory / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def take_number() -> int:
    """How many answers have been started in this test, this one included."""
    directory = _gate_dir()
    if directory is None:
        return 1
    fd = os.open(directory / "takes", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, b".")
    finally:
        os.close(fd)
    return len((directory / "takes").read_bytes())


def story(take: int) -> list[str]:
    return [f"take{take} ", *(word + " " for word in STORY.split(" "))]


async def storyteller_stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
    returned = [part for message in messages for part in message.parts if isinstance(part, ToolReturnPart)]
    if not returned:
        yield {0: DeltaToolCall(name="chapter", json_args='{"number": 1}', tool_call_id="call-chapter-1")}
        return
    crash = os.environ.get("EVENT_CRASH", "")
    if crash == "kill-before-answer" and first_time("killed"):
        os.kill(os.getpid(), signal.SIGKILL)
    delay = float(os.environ.get("STORY_WORD_DELAY", "0.01"))
    for index, word in enumerate(story(take_number())):
        if crash == "stall" and index == STALL_AFTER and first_time("stalled"):
            await asyncio.Event().wait()  # the worker is killed while the answer hangs here
        await asyncio.sleep(delay)  # a model's pace, not a synchronisation
        yield word


storyteller_inner = Agent(FunctionModel(stream_function=storyteller_stream), name="storyteller")


@storyteller_inner.tool_plain
def chapter(number: int) -> str:
    """The title of a chapter."""
    return f"Chapter {number}: the crash"


storyteller = AbsurdAgent(storyteller_inner, absurd, event_log=True)
quiet_storyteller = AbsurdAgent(
    Agent(FunctionModel(stream_function=storyteller_stream), name="quiet_storyteller", tools=[chapter]), absurd
)


@absurd.register_task(name="event_story")
async def event_story(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    result = await storyteller.run(params.get("prompt", "Tell me a story."))
    if params.get("fail_once_after") and first_time("failed-after-run"):
        raise RuntimeError("failing once after the run, so that the next attempt replays it")
    return {"output": result.output}


narrator = register_chat_agent(
    AbsurdAgent(
        Agent(FunctionModel(stream_function=storyteller_stream), name="narrator", tools=[chapter]),
        absurd,
        event_log=True,
    )
)
