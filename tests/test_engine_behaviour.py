"""The durable engine's promises, in process: replay equality, recorded exceptions, refusals, names."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic_ai import Agent
from pydantic_ai.exceptions import UserError
from pydantic_ai.models.test import TestModel

from django_absurd_agents import AbsurdAgent, AbsurdDurability, absurd
from tests import agents
from tests.test_durable_agent import calls, checkpoint_names

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def call_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "calls.log"
    monkeypatch.setenv("CALL_LOG", str(path))
    return path


async def drain(client: Any, task_id: str, deadline: float = 20) -> Any:
    """Work the queue until the task is finished or suspended with nothing left to claim."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        await client.work_batch(claim_timeout=10)
        snapshot = await client.fetch_task_result(task_id)
        if snapshot.state in ("completed", "failed", "cancelled"):
            return snapshot
        await _pause()
    return await client.fetch_task_result(task_id)


async def _pause() -> None:
    import asyncio

    await asyncio.sleep(0.05)


@pytest.mark.parametrize("agent", ["analyst", "retrier"])
async def test_replay_sees_the_values_of_the_first_run(project_absurd: Any, call_log: Path, agent: str) -> None:
    agents.outputs.clear()
    agents._retry_state["raised"] = 0
    spawned = await project_absurd.spawn(
        "analyse_then_fail_once", {"agent": agent}, retry_strategy={"kind": "none"}, max_attempts=2
    )
    snapshot = await drain(project_absurd, spawned["task_id"])
    assert snapshot.state == "completed", snapshot
    first, replayed = agents.outputs
    assert first == replayed
    log = calls(call_log)
    if agent == "analyst":
        # A pydantic model, a dataclass with a datetime and a tuple, as the model saw them both times.
        assert 'quote={"symbol":"ACME","price":12.5}' in first
        assert '"pair":[1,2]' in first and "2026-01-02T03:04:05Z" in first
        assert log.count("model:1") == 1 and log.count("tool:quote") == 1 and log.count("tool:stamp") == 1
    else:
        # ModelRetry was recorded: the replay follows the same path without calling the tool again.
        assert first == "flaky ok after 1 retry prompt(s)"
        assert log.count("tool:flaky") == 2 and log.count("retry_model") == 3
        assert agents._retry_state["raised"] == 1


def test_construction_refusals() -> None:
    with pytest.raises(UserError, match=r'AbsurdAgent\(inner, absurd, name="analyst"\)'):
        AbsurdAgent(Agent(TestModel()), absurd)
    with pytest.raises(UserError, match="has no model"):
        AbsurdAgent(Agent(name="nomodel"), absurd)
    with pytest.raises(UserError, match="unique `name`"):
        Agent(TestModel(), capabilities=[AbsurdDurability()])


async def test_run_sync_and_unregistered_model_are_refused() -> None:
    fast = TestModel(custom_output_text="fast")
    agent = AbsurdAgent(Agent(TestModel(), name="picky"), absurd, models={"fast": fast})
    # run_sync: refused inside a task only (tests/test_input_validation.py).
    with pytest.raises(UserError, match=r"was not registered.*models="):
        await agent.run("hi", model="openai:gpt-4o")
    with pytest.raises(UserError, match="was not registered"):
        await agent.run("hi", model=TestModel())
    # Registered ids and instances are fine, and outside a task the run is an ordinary one.
    assert (await agent.run("hi", model="fast")).output == "fast"
    assert (await agent.run("hi", model=fast)).output == "fast"


streamer = AbsurdAgent(Agent(TestModel(), name="streamer"), absurd)


@absurd.register_task(name="stream_inside")
async def stream_inside(params: Any, ctx: Any) -> str:
    try:
        async with streamer.run_stream("hi"):
            pass
    except UserError as exc:
        return str(exc)
    return "not refused"


async def test_streaming_is_refused_inside_a_task_and_allowed_outside(project_absurd: Any) -> None:
    async with streamer.run_stream("hi") as stream:
        assert await stream.get_output()
    spawned = await project_absurd.spawn("stream_inside", {})
    snapshot = await drain(project_absurd, spawned["task_id"])
    assert "cannot be used inside an Absurd task" in snapshot.result
    assert "event_stream_handler" in snapshot.result


first_twin = AbsurdAgent(Agent(TestModel(custom_output_text="one"), name="twin"), absurd)
second_twin = AbsurdAgent(Agent(TestModel(custom_output_text="two"), name="twin"), absurd)
other = AbsurdAgent(Agent(TestModel(custom_output_text="three"), name="other_agent"), absurd)
twin_outputs: list[list[str]] = []


@absurd.register_task(name="two_agents")
async def two_agents(params: Any, ctx: Any) -> list[str]:
    out = [(await first_twin.run("a")).output, (await second_twin.run("b")).output, (await other.run("c")).output]
    twin_outputs.append(out)
    if ctx._task["attempt"] == 1:
        raise RuntimeError("replay please")
    return out


async def test_agents_in_one_task_keep_their_own_checkpoints(project_absurd: Any) -> None:
    twin_outputs.clear()
    spawned = await project_absurd.spawn("two_agents", {}, retry_strategy={"kind": "none"}, max_attempts=2)
    snapshot = await drain(project_absurd, spawned["task_id"])
    assert snapshot.result == ["one", "two", "three"]
    assert twin_outputs == [["one", "two", "three"]] * 2
    names = await _names(spawned["task_id"])
    assert names == ["twin__model.request", "twin__model.request#2", "other_agent__model.request"]


async def test_event_stream_handler_receives_model_and_tool_events(project_absurd: Any) -> None:
    seen: list[str] = []

    async def handler(ctx: Any, events: Any) -> None:
        async for event in events:
            seen.append(type(event).__name__)

    # Streaming model requests deliver model events live: TestModel streams, FunctionModel would need
    # a stream_function.
    inner: Agent[None, str] = Agent(TestModel(), name="watched")

    @inner.tool_plain
    def lookup(symbol: str) -> str:
        return f"{symbol} is fine"

    watched = AbsurdAgent(inner, absurd, event_stream_handler=handler)

    @absurd.register_task(name="watched_run")
    async def watched_run(params: Any, ctx: Any) -> str:
        return (await watched.run("How is ACME?")).output

    spawned = await project_absurd.spawn("watched_run", {})
    snapshot = await drain(project_absurd, spawned["task_id"])
    assert snapshot.state == "completed"
    assert "FunctionToolCallEvent" in seen and "FunctionToolResultEvent" in seen
    names = await _names(spawned["task_id"])
    assert "watched__event_stream_handler" in names
    assert "PartStartEvent" in seen  # model events, streamed live inside the model step
    assert names[0] == "watched__model.request_stream"


async def _names(task_id: str) -> list[str]:
    from asgiref.sync import sync_to_async

    return await sync_to_async(checkpoint_names)(task_id)


# --- human approval ------------------------------------------------------------------------------


def asks(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def ask_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "asks.log"
    monkeypatch.setenv("ASK_LOG", str(path))
    return path


@pytest.mark.parametrize("approved", [True, False])
async def test_approval_suspends_then_resumes_once(
    project_absurd: Any, call_log: Path, ask_log: Path, approved: bool
) -> None:
    from django_absurd_agents import resolve_external_event

    spawned = await project_absurd.spawn("refund", {})
    snapshot = await drain(project_absurd, spawned["task_id"], deadline=2)
    assert snapshot.state == "sleeping"  # suspended, holding no worker
    [request] = asks(ask_log)
    await resolve_external_event(request["token"], {"approvals": {request["calls"][0]: approved}})
    snapshot = await drain(project_absurd, spawned["task_id"])
    assert snapshot.state == "completed"
    log = calls(call_log)
    assert log.count("ask") == 1
    assert log.count("tool:refund") == (1 if approved else 0)
    assert ("refunded" in snapshot.result) is approved


async def test_approval_timeout_denies_the_call(project_absurd: Any, call_log: Path, ask_log: Path) -> None:
    spawned = await project_absurd.spawn("refund", {"impatient": True})
    snapshot = await drain(project_absurd, spawned["task_id"], deadline=10)
    assert snapshot.state == "completed", snapshot
    assert "No decision on this tool call arrived" in snapshot.result
    assert calls(call_log).count("tool:refund") == 0


@pytest.mark.slow
def test_worker_killed_while_task_sleeps_then_approval_resumes(
    worker_env: dict[str, str], clean_queues: None, tmp_path: Path
) -> None:
    from django_absurd_agents import resolve_external_event_sync

    log, ask_path = tmp_path / "calls.log", tmp_path / "asks.log"
    env = {**worker_env, "CALL_LOG": str(log), "ASK_LOG": str(ask_path), "CLAIM_TIMEOUT": "2"}
    task_id = absurd.spawn_sync("refund", {})["task_id"]
    worker = subprocess.Popen([sys.executable, "-m", "tests.worker_process", task_id], env=env, cwd=ROOT)
    deadline = time.monotonic() + 30
    while absurd.fetch_task_result_sync(task_id).state != "sleeping":  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the task never suspended"
        time.sleep(0.05)
    worker.kill()
    worker.wait()
    [request] = asks(ask_path)
    resolve_external_event_sync(request["token"], {"approvals": {request["calls"][0]: True}})
    worker = subprocess.Popen([sys.executable, "-m", "tests.worker_process", task_id], env=env, cwd=ROOT)
    assert worker.wait(timeout=60) == 0
    assert absurd.fetch_task_result_sync(task_id).state == "completed"  # type: ignore[union-attr]
    assert calls(log).count("tool:refund") == 1
    assert calls(log).count("ask") == 1


@pytest.mark.slow
def test_model_call_longer_than_claim_timeout_runs_once_with_two_workers(
    worker_env: dict[str, str], clean_queues: None, tmp_path: Path
) -> None:
    log = tmp_path / "calls.log"
    env = {**worker_env, "CALL_LOG": str(log), "CLAIM_TIMEOUT": "1", "SLOW_MODEL_SECONDS": "4"}
    task_id = absurd.spawn_sync("slow_analyse", {})["task_id"]
    workers = [
        subprocess.Popen([sys.executable, "-m", "tests.worker_process", task_id], env=env, cwd=ROOT) for _ in range(2)
    ]
    assert [worker.wait(timeout=60) for worker in workers] == [0, 0]
    snapshot = absurd.fetch_task_result_sync(task_id)
    assert snapshot is not None and (snapshot.state, snapshot.result) == ("completed", "slow answer")
    assert calls(log) == ["slow:start", "slow:end"]
