"""Bad input, one test each: a clear error or a documented behaviour, nothing half-written, and the
tasks around it unaffected (docs/reliability.md lists what each case does).

The tasks run in this process (claimed and executed on the project's client), on the real database.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.db import connection, transaction
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from django_absurd_agents import AbsurdAgent, absurd
from django_absurd_agents.client import InvalidParams
from django_absurd_agents.conversations import register_chat_agent
from django_absurd_agents.models import Conversation, Entry, Turn

pytestmark = pytest.mark.django_db(transaction=True)

TERMINAL = ("completed", "failed", "cancelled")


# --- the tasks -----------------------------------------------------------------------------------


@absurd.register_task(name="bad_echo")
async def echo(params: Any, ctx: Any) -> Any:
    return params


@absurd.register_task(name="bad_raise")
async def raising(params: dict[str, Any], ctx: Any) -> None:
    async def prepare() -> str:
        return "prepared"

    await ctx.step("prepare", prepare)
    raise ValueError(f"cannot handle order {params['order']}")


class Unserialisable:
    """What a careless tool returns: an object nothing knows how to write as JSON."""

    def __repr__(self) -> str:
        return "<Unserialisable>"


def _tool_returns(messages: list[ModelMessage]) -> list[ToolReturnPart]:
    return [part for message in messages for part in message.parts if isinstance(part, ToolReturnPart)]


async def call_the_tool_once(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    if _tool_returns(messages):
        return ModelResponse(parts=[TextPart("done")])
    return ModelResponse(parts=[ToolCallPart(info.function_tools[0].name, {})])


careless_inner = Agent(FunctionModel(call_the_tool_once), name="careless")


socket_calls: list[str] = []


@careless_inner.tool_plain
def open_socket() -> Any:
    """Returns a live object instead of data."""
    socket_calls.append("open_socket")
    return Unserialisable()


careless = AbsurdAgent(careless_inner, absurd)


@absurd.register_task(name="bad_tool")
async def bad_tool(params: Any, ctx: Any) -> str:
    return (await careless.run("go")).output


model_calls: list[str] = []
model_started = threading.Event()


async def endless_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    model_calls.append("start")
    model_started.set()
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        model_calls.append("cancelled")
        raise
    model_calls.append("end")
    return ModelResponse(parts=[TextPart("too late")])


ponderer = AbsurdAgent(Agent(FunctionModel(endless_model), name="ponderer"), absurd)


@absurd.register_task(name="bad_slow_model")
async def slow_model_task(params: Any, ctx: Any) -> str:
    return (await ponderer.run("think hard")).output


@absurd.register_task(name="bad_wait_event")
async def wait_event(params: Any, ctx: Any) -> Any:
    return await ctx.await_event(f"bad-approval:{ctx.task_id}")


async def history_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(parts=[TextPart(f"seen {len(messages)} message(s)")])


historian = register_chat_agent(AbsurdAgent(Agent(FunctionModel(history_model), name="historian"), absurd))


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _clean(clean_queues: None) -> Iterator[None]:
    yield


def work_until(done: Callable[[], bool], timeout: float = 20.0, claim_timeout: int = 10) -> None:
    """Claim and run tasks in this process until ``done()`` holds; fail after ``timeout`` seconds."""

    async def loop() -> None:
        deadline = time.monotonic() + timeout
        try:
            while not await sync_to_async(done)():
                if time.monotonic() > deadline:
                    raise AssertionError(f"not done after {timeout}s")
                claimed = await absurd.claim_tasks(batch_size=8, claim_timeout=claim_timeout, worker_id="bad-input")
                for task in claimed:
                    await absurd.run_claimed(task, claim_timeout)
                if not claimed:
                    await asyncio.sleep(0.02)
        finally:
            await absurd.close()

    async_to_sync(loop)()


def result_of(task_id: Any) -> Any:
    """The task's result snapshot (typed loosely: tests index into its JSON)."""
    snapshot = absurd.fetch_task_result_sync(task_id)
    assert snapshot is not None, f"task {task_id} not found"
    return snapshot


def state(task_id: str) -> str | None:
    snapshot = absurd.fetch_task_result_sync(task_id)
    return snapshot.state if snapshot else None


def finished(*task_ids: str) -> Callable[[], bool]:
    return lambda: all(state(task_id) in TERMINAL for task_id in task_ids)


def rows(sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params or [])
        return list(cursor.fetchall())


def task_count() -> int:
    return int(rows("select count(*) from absurd.t_agents")[0][0])


def checkpoints(task_id: str) -> list[str]:
    found = rows("select checkpoint_name from absurd.c_agents where task_id = %s order by updated_at", [task_id])
    return [row[0] for row in found]


def failures(task_id: str) -> list[dict[str, Any]]:
    found = rows(
        "select failure_reason from absurd.r_agents where task_id = %s and failure_reason is not null order by attempt",
        [task_id],
    )
    return [json.loads(row[0]) if isinstance(row[0], str) else row[0] for row in found]


def spawn_bystander(n: int = 1) -> str:
    return absurd.spawn_sync("bad_echo", {"bystander": n})["task_id"]


def assert_bystanders_complete(*task_ids: str) -> None:
    work_until(finished(*task_ids))
    for task_id in task_ids:
        snapshot = result_of(task_id)
        assert snapshot is not None and snapshot.state == "completed", snapshot
        assert "bystander" in snapshot.result


# --- params that are not JSON ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [object(), {"tags": {"a", "b"}}, {"ratio": float("nan")}, {"raw": b"\x00bytes"}, {1j: "complex key"}],
    ids=["object", "set", "nan", "bytes", "complex-key"],
)
def test_non_json_params_are_refused_before_anything_is_written(params: Any) -> None:
    before = spawn_bystander(1)
    with transaction.atomic():
        kept = spawn_bystander(2)
        with pytest.raises(
            InvalidParams, match=r"Task params must be JSON: .*pass a model instance by its primary key"
        ):
            absurd.spawn_sync("bad_echo", params)
        # Refused before any SQL: the caller's transaction is intact and goes on.
        after = spawn_bystander(3)
    assert task_count() == 3

    async def spawn_async() -> None:
        try:
            await absurd.spawn("bad_echo", params)
        finally:
            await absurd.close()

    with pytest.raises(InvalidParams, match="must be JSON"):
        async_to_sync(spawn_async)()
    assert task_count() == 3
    assert_bystanders_complete(before, kept, after)


def test_django_values_in_params_are_encoded_not_refused() -> None:
    """UUIDs, datetimes and Decimals are what views have at hand: they go in as their JSON strings."""
    import datetime
    import decimal
    import uuid

    value = uuid.UUID("12345678-1234-5678-1234-567812345678")
    task_id = absurd.spawn_sync(
        "bad_echo", {"id": value, "at": datetime.date(2026, 1, 2), "amount": decimal.Decimal("9.90")}
    )["task_id"]
    work_until(finished(task_id))
    assert result_of(task_id).result == {
        "id": str(value),
        "at": "2026-01-02",
        "amount": "9.90",
    }


# --- an unknown task name -------------------------------------------------------------------------


def test_unknown_task_is_put_back_without_an_attempt_then_failed_with_where_to_register_it(settings: Any) -> None:
    """A web process may spawn any name; a worker that claims one it does not know puts it back without
    using an attempt (a rolling deploy: the new workers know it), with the reason and the fix recorded,
    and fails it for good once ABSURD_AGENTS['UNKNOWN_TASK_GRACE'] is over."""
    bystander = spawn_bystander()
    waiting = absurd.spawn_sync("bad_never_registered", {"x": 1}, max_attempts=1)["task_id"]
    work_until(lambda: state(waiting) == "sleeping" and state(bystander) == "completed")
    assert failures(waiting) == []  # no attempt used
    assert checkpoints(waiting) == ["$unknown_task"]
    [(reason,)] = rows("select state from absurd.c_agents where task_id = %s", [waiting])
    reason = json.loads(reason) if isinstance(reason, str) else reason
    assert "@absurd.register_task(name='bad_never_registered')" in reason["reason"]

    settings.ABSURD_AGENTS = {**settings.ABSURD_AGENTS, "UNKNOWN_TASK_GRACE": 0}
    once = absurd.spawn_sync("bad_never_registered", {"x": 2}, max_attempts=5)["task_id"]
    work_until(lambda: state(once) == "failed")
    [failure] = failures(once)  # failed for good, despite 5 attempts
    assert failure["name"] == "UnknownTask"
    assert "@absurd.register_task(name='bad_never_registered')" in failure["message"]
    assert "ABSURD_AGENTS['TASK_MODULES']" in failure["message"]
    assert result_of(bystander).state == "completed"


# --- a queue that does not exist ------------------------------------------------------------------


def test_spawn_to_a_queue_that_does_not_exist_names_the_fix() -> None:
    bystander = spawn_bystander()
    with pytest.raises(ValueError, match=r"'nowhere'.*ABSURD_AGENTS\['QUEUES'\].*migrate"):
        absurd.spawn_sync("bad_unrouted", {}, queue="nowhere")

    async def spawn_async() -> None:
        try:
            await absurd.spawn("bad_unrouted", {}, queue="nowhere")
        finally:
            await absurd.close()

    with pytest.raises(ValueError, match=r"'nowhere'.*ABSURD_AGENTS\['QUEUES'\].*migrate"):
        async_to_sync(spawn_async)()
    assert not rows("select 1 from pg_tables where schemaname = 'absurd' and tablename = 't_nowhere'")
    assert task_count() == 1
    assert_bystanders_complete(bystander)


# --- oversized params -----------------------------------------------------------------------------


def test_oversized_params_are_refused_with_the_setting_that_allows_them() -> None:
    bystander = spawn_bystander()
    # The default limit is 1,000,000 bytes of JSON.
    with pytest.raises(InvalidParams, match=r"1000012 bytes of JSON, over the limit of 1000000.*MAX_PARAMS_BYTES"):
        absurd.spawn_sync("bad_echo", {"blob": "x" * 1_000_000})
    fits = absurd.spawn_sync("bad_echo", {"blob": "x" * 999_980})["task_id"]
    assert task_count() == 2
    assert_bystanders_complete(bystander)
    work_until(finished(fits))
    assert len(result_of(fits).result["blob"]) == 999_980


def test_the_params_limit_is_a_setting(settings: Any) -> None:
    settings.ABSURD_AGENTS = {**settings.ABSURD_AGENTS, "MAX_PARAMS_BYTES": 100}
    absurd.spawn_sync("bad_echo", {"note": "n" * 80})
    with pytest.raises(InvalidParams, match=r"over the limit of 100 .*Store large inputs in your own table"):
        absurd.spawn_sync("bad_echo", {"note": "n" * 90})
    assert task_count() == 1


# --- a tool returning something that is not JSON --------------------------------------------------


def test_tool_returning_an_unserialisable_object_fails_its_task_naming_the_tool() -> None:
    bystander = spawn_bystander()
    socket_calls.clear()
    task_id = absurd.spawn_sync("bad_tool", {}, max_attempts=2, retry_strategy={"kind": "none"})["task_id"]
    work_until(finished(task_id, bystander))

    snapshot = result_of(task_id)
    assert snapshot.state == "failed", snapshot
    text = json.dumps(snapshot.failure)
    assert "open_socket" in text, snapshot.failure
    assert "Unserialisable" in text, snapshot.failure
    # The model request before it committed; the tool's step did not.
    assert checkpoints(task_id) == ["careless__model.request"]
    # The tool ran (its effect is done) and its result cannot be recorded: the task fails at once,
    # without a second attempt that would run the tool again for the same failure.
    assert len(failures(task_id)) == 1 and socket_calls == ["open_socket"]
    assert "without another attempt" in text
    assert result_of(bystander).state == "completed"


# --- a handler that raises ------------------------------------------------------------------------


def test_a_raising_handler_fails_after_its_attempts_with_the_error_recorded() -> None:
    bystander = spawn_bystander()
    task_id = absurd.spawn_sync("bad_raise", {"order": 42}, max_attempts=2, retry_strategy={"kind": "none"})["task_id"]
    work_until(finished(task_id, bystander))

    snapshot = result_of(task_id)
    assert snapshot.state == "failed"
    assert snapshot.failure["name"] == "ValueError"
    assert snapshot.failure["message"] == "cannot handle order 42"
    assert "traceback" in snapshot.failure
    assert [f["message"] for f in failures(task_id)] == ["cannot handle order 42"] * 2
    # The step before the error committed once and was replayed by the second attempt.
    assert checkpoints(task_id) == ["prepare"]
    assert result_of(bystander).state == "completed"


# --- cancelling while a model call is in flight ---------------------------------------------------


async def test_cancel_during_a_model_call_stops_it_and_records_no_checkpoint(project_absurd: Any) -> None:
    """The lease keeper notices the cancellation at its next heartbeat (a third of the claim timeout)
    and cancels the task's code there and then, instead of after the model answers."""
    model_calls.clear()
    model_started.clear()
    spawned = await project_absurd.spawn("bad_slow_model", {})
    bystander = await project_absurd.spawn("bad_echo", {"bystander": 1})
    claimed = await project_absurd.claim_tasks(batch_size=1, claim_timeout=1, worker_id="bad-input")
    assert [task["task_name"] for task in claimed] == ["bad_slow_model"]
    execution = asyncio.create_task(project_absurd.run_claimed(claimed[0], 1))
    deadline = time.monotonic() + 10
    while not model_started.is_set():
        assert time.monotonic() < deadline, "the model call did not start"
        await asyncio.sleep(0.01)

    canceller = project_absurd.for_queue("agents")  # a connection of its own, like the admin's
    try:
        await canceller.cancel_task(spawned["task_id"])
    finally:
        await canceller.close()
    await asyncio.wait_for(execution, timeout=10)  # well before the model's 60 s

    snapshot = await project_absurd.fetch_task_result(spawned["task_id"])
    assert snapshot.state == "cancelled"
    assert model_calls == ["start", "cancelled"]
    assert await sync_to_async(checkpoints)(spawned["task_id"]) == []
    await project_absurd.work_batch(claim_timeout=10)
    assert (await project_absurd.fetch_task_result(bystander["task_id"])).state == "completed"


# --- an event emitted twice -----------------------------------------------------------------------


def test_an_event_emitted_twice_delivers_the_first_payload() -> None:
    waiting = absurd.spawn_sync("bad_wait_event", {})["task_id"]
    early = absurd.spawn_sync("bad_wait_event", {})["task_id"]
    work_until(lambda: state(waiting) == "sleeping" and state(early) == "sleeping")

    absurd.emit_event_sync(f"bad-approval:{waiting}", {"approved": True, "by": "first"})
    absurd.emit_event_sync(f"bad-approval:{waiting}", {"approved": False, "by": "second"})
    work_until(finished(waiting))
    assert result_of(waiting).result == {"approved": True, "by": "first"}
    stored = rows("select payload from absurd.e_agents where event_name = %s", [f"bad-approval:{waiting}"])
    assert [json.loads(row[0]) for row in stored] == [{"approved": True, "by": "first"}]

    async def emit_twice() -> None:
        try:
            await absurd.emit_event(f"bad-approval:{early}", {"by": "first"})
            await absurd.emit_event(f"bad-approval:{early}", {"by": "second"})
        finally:
            await absurd.close()

    async_to_sync(emit_twice)()
    work_until(finished(early))
    assert result_of(early).result == {"by": "first"}


# --- a malformed message history ------------------------------------------------------------------


def test_a_corrupted_stored_history_fails_the_next_turn_clearly(settings: Any) -> None:
    settings.ABSURD_AGENTS = {**settings.ABSURD_AGENTS, "DEFAULT_MAX_ATTEMPTS": 1, "RETRY_STRATEGY": None}
    conversation = Conversation.objects.create(agent="historian")
    first = conversation.send("hello")
    work_until(lambda: Turn.objects.get(pk=first.pk).is_terminal)
    first.refresh_from_db()
    assert first.state == Turn.State.COMPLETED and first.output == "seen 1 message(s)"
    other = Conversation.objects.create(agent="historian")

    # Someone edits the stored history by hand (or a migration goes wrong).
    Entry.objects.filter(turn=first).update(message={"kind": "not-a-message", "parts": "oops"})
    second = conversation.send("are you there?")
    elsewhere = other.send("hello")
    work_until(lambda: Turn.objects.get(pk=second.pk).is_terminal and Turn.objects.get(pk=elsewhere.pk).is_terminal)

    second.refresh_from_db()
    assert second.state == Turn.State.FAILED
    assert re.search(rf"\bturn {first.sequence}\b", second.error, re.IGNORECASE), second.error
    assert str(conversation.pk) in second.error, second.error
    assert not second.entries.exists() and second.output is None
    assert result_of(second.task_id).state == "failed"
    # Nothing else was touched: the corrupted turn is as it was, and other conversations go on.
    first.refresh_from_db()
    assert [e.message for e in first.entries.all()] == [{"kind": "not-a-message", "parts": "oops"}] * 2
    elsewhere.refresh_from_db()
    assert elsewhere.state == Turn.State.COMPLETED and elsewhere.output == "seen 1 message(s)"


def test_the_admin_transcript_still_shows_a_conversation_with_a_corrupted_turn() -> None:
    """The operator repairing the damage must be able to look at it: the transcript skips what it
    cannot read instead of failing the page."""
    from django_absurd_agents.admin_conversations import render_transcript

    conversation = Conversation.objects.create(agent="historian")
    turn = conversation.send("hello")
    work_until(lambda: Turn.objects.get(pk=turn.pk).is_terminal)
    one, other = turn.entries.all()
    Entry.objects.filter(pk=one.pk).update(message={"kind": "response", "parts": [7]})
    Entry.objects.filter(pk=other.pk).update(message="not a message")
    html = render_transcript(conversation)
    assert "hello" in html
