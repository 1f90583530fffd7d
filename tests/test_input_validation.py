"""Input Postgres would refuse is refused first, with an error that names it (issue 12, items 6, 15-21,
25, 26).

Refused before any SQL means the caller's ``transaction.atomic()`` goes on: each client test runs a
query in the same atomic block after the refusal. Values a task's own code produces (step values,
tool and model results, the task's result) fail the task with an error naming the step (and tool)
or the task, and a step whose body ran is not run again by another attempt.

Everything runs on the real database; tasks are claimed and executed in this process.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.db import DataError, connection, transaction
from django.test.utils import CaptureQueriesContext
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.test import TestModel

from django_absurd_agents import (
    AbsurdAgent,
    InvalidParams,
    TaskNotFound,
    UnrecordableStepResult,
    absurd,
    jsonsafe,
)
from django_absurd_agents.client import ProjectAbsurd
from django_absurd_agents.task_context import is_plain_function

pytestmark = pytest.mark.django_db(transaction=True)

TERMINAL = ("completed", "failed", "cancelled")
effects: list[str] = []


def nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value]
    return value


BAD_VALUES = {
    "nul": {"text": "page one\x00page two"},
    "nul-in-key": {"bad\x00key": 1},
    "lone-surrogate": {"text": "broken \ud800 text"},
    "low-surrogate": ["\udc00"],
    "nan": {"ratio": float("nan")},
    "infinity": {"ratio": float("inf")},
    "deep": nested(3000),
}


# --- tasks ---------------------------------------------------------------------------------------


@absurd.register_task(name="iv_echo")
async def echo(params: Any, ctx: Any) -> Any:
    return params


@absurd.register_task(name="iv_routed", queue="other")
async def routed(params: Any, ctx: Any) -> Any:
    if params.get("fail"):
        raise RuntimeError("failing on purpose")
    return params


def _tool_returns(messages: list[ModelMessage]) -> list[ToolReturnPart]:
    return [part for message in messages for part in message.parts if isinstance(part, ToolReturnPart)]


async def call_extract_once(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    if _tool_returns(messages):
        return ModelResponse(parts=[TextPart("done")])
    return ModelResponse(parts=[ToolCallPart("extract_pdf", {})])


reader_inner = Agent(FunctionModel(call_extract_once), name="iv_reader")


@reader_inner.tool_plain
def extract_pdf() -> str:
    """Text extracted from a PDF, NUL characters and all."""
    effects.append("extract_pdf")
    return "Invoice\x00 42"


reader = AbsurdAgent(reader_inner, absurd)


@absurd.register_task(name="iv_nul_tool")
async def nul_tool(params: Any, ctx: Any) -> str:
    return (await reader.run("read the invoice")).output


async def nul_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    effects.append("model")
    return ModelResponse(parts=[TextPart("scraped\x00text")])


scraper = AbsurdAgent(Agent(FunctionModel(nul_model), name="iv_scraper"), absurd)


@absurd.register_task(name="iv_nul_model")
async def nul_model_task(params: Any, ctx: Any) -> str:
    return (await scraper.run("scrape")).output


@absurd.register_task(name="iv_nan_step")
async def nan_step(params: Any, ctx: Any) -> Any:
    async def measure() -> dict[str, float]:
        effects.append("measure")
        return {"ratio": float("nan")}

    return await ctx.step("measure", measure)


@absurd.register_task(name="iv_nan_result")
async def nan_result(params: Any, ctx: Any) -> Any:
    return {"score": float("nan")}


def send_email() -> str:
    effects.append("send_email")
    return "sent"


@absurd.register_task(name="iv_sync_step")
async def sync_step(params: Any, ctx: Any) -> Any:
    return await ctx.step("notify", send_email)


@absurd.register_task(name="iv_sync_lambda_step")
async def sync_lambda_step(params: Any, ctx: Any) -> Any:
    return await ctx.step("notify", lambda: send_email())


@absurd.register_task(name="iv_threaded_step")
async def threaded_step(params: Any, ctx: Any) -> Any:
    return await ctx.step("notify", sync_to_async(send_email))


@absurd.register_task(name="iv_emit_bad")
async def emit_bad(params: Any, ctx: Any) -> Any:
    try:
        await ctx.emit_event("iv-nul", {"text": "a\x00b"})
    except InvalidParams as exc:
        return {"refused": str(exc)}
    return {"refused": None}


sync_runner = AbsurdAgent(Agent(TestModel(custom_output_text="plain"), name="iv_sync_runner"), absurd)


@absurd.register_task(name="iv_run_sync_inside")
async def run_sync_inside(params: Any, ctx: Any) -> Any:
    return sync_runner.run_sync("hi").output


# --- helpers -------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _clean(clean_queues: None) -> Iterator[None]:
    effects.clear()
    yield


def rows(sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(sql, params or [])
        return list(cursor.fetchall())


def task_count(queue: str = "agents") -> int:
    return int(rows(f"select count(*) from absurd.t_{queue}")[0][0])


def state(task_id: str) -> str | None:
    found = rows("select state from absurd.t_agents where task_id = %s", [task_id])
    return found[0][0] if found else None


def failures(task_id: str) -> list[dict[str, Any]]:
    found = rows(
        "select failure_reason from absurd.r_agents where task_id = %s and failure_reason is not null order by attempt",
        [task_id],
    )
    return [json.loads(row[0]) if isinstance(row[0], str) else row[0] for row in found]


def checkpoints(task_id: str) -> list[str]:
    found = rows("select checkpoint_name from absurd.c_agents where task_id = %s order by updated_at", [task_id])
    return [row[0] for row in found]


def work_until(done: Callable[[], bool], client: ProjectAbsurd = absurd, timeout: float = 20.0) -> None:
    """Claim and run tasks of ``client``'s queue in this process until ``done()`` holds."""

    async def loop() -> None:
        deadline = time.monotonic() + timeout
        try:
            while not await sync_to_async(done)():
                if time.monotonic() > deadline:
                    raise AssertionError(f"not done after {timeout}s")
                claimed = await client.claim_tasks(batch_size=4, claim_timeout=10, worker_id="input-validation")
                for task in claimed:
                    await client.run_claimed(task, 10)
                if not claimed:
                    await asyncio.sleep(0.02)
        finally:
            await client.close()

    async_to_sync(loop)()


def run_to_end(task_name: str, params: Any = None, max_attempts: int = 3) -> str:
    """Spawn, then work until the task has finished; retries without backoff."""
    task_id = absurd.spawn_sync(task_name, params or {}, max_attempts=max_attempts, retry_strategy={"kind": "none"})[
        "task_id"
    ]
    work_until(lambda: state(task_id) in TERMINAL)
    return task_id


def run_async(coro_fn: Callable[[ProjectAbsurd], Any]) -> Any:
    client = ProjectAbsurd()

    async def call() -> Any:
        try:
            return await coro_fn(client)
        finally:
            await client.close()

    return async_to_sync(call)()


def refused_before_sql(call: Callable[[], Any], error: type[BaseException], match: str) -> BaseException:
    """``call()`` raises ``error`` without a query, inside an atomic block that goes on afterwards."""
    with transaction.atomic():
        with CaptureQueriesContext(connection) as queries, pytest.raises(error, match=match) as raised:
            call()
        assert [q["sql"] for q in queries.captured_queries] == []
        # The transaction is intact: the next statement in it works, and what it writes commits.
        kept = absurd.spawn_sync("iv_echo", {"kept": True})
    assert state(kept["task_id"]) == "pending"
    return raised.value


# --- item 6: NUL, surrogates, NaN/Infinity, nesting in params and event payloads -------------------


@pytest.mark.parametrize("value", list(BAD_VALUES.values()), ids=list(BAD_VALUES))
def test_params_postgres_would_refuse_are_refused_before_sql(value: Any) -> None:
    error = refused_before_sql(lambda: absurd.spawn_sync("iv_echo", value), InvalidParams, r"Task params must be JSON")
    assert " at $" in str(error)  # where in the params
    with pytest.raises(InvalidParams, match="Task params must be JSON"):
        run_async(lambda client: client.spawn("iv_echo", value))
    assert task_count() == 1  # only the one committed after the refusal


@pytest.mark.parametrize("value", list(BAD_VALUES.values()), ids=list(BAD_VALUES))
def test_event_payloads_postgres_would_refuse_are_refused_before_sql(value: Any) -> None:
    refused_before_sql(lambda: absurd.emit_event_sync("iv-event", value), InvalidParams, "Event payload must be JSON")
    with pytest.raises(InvalidParams, match="Event payload must be JSON"):
        run_async(lambda client: client.emit_event("iv-event", value))
    assert rows("select count(*) from absurd.e_agents")[0][0] == 0


def test_the_messages_say_what_and_where() -> None:
    with pytest.raises(InvalidParams) as nul:
        absurd.spawn_sync("iv_echo", {"pages": [{"text": "ok"}, {"text": "a\x00b"}]})
    assert "NUL character (\\u0000) at position 1 of the string at $.pages[1].text" in str(nul.value)
    assert 'text.replace("\\x00", "")' in str(nul.value)
    with pytest.raises(InvalidParams) as nan:
        absurd.spawn_sync("iv_echo", {"ratio": float("nan")})
    assert "the number nan at $.ratio" in str(nan.value) and "primary key" in str(nan.value)
    with pytest.raises(InvalidParams) as deep:
        absurd.spawn_sync("iv_echo", nested(3000))
    assert "nesting deeper than 200 levels" in str(deep.value)


def test_the_validator_accepts_what_postgres_stores() -> None:
    """A surrogate pair is one character to Postgres; deep but bounded nesting and big values pass."""
    assert jsonsafe.find_problem({"emoji": "\ud83d\ude00", "ok": "é\u2028", "n": [1.5, -0.0, 10**30]}) is None
    assert jsonsafe.find_problem(nested(200)) is None
    assert jsonsafe.find_problem(nested(201)) is not None
    looped: list[Any] = []
    looped.append(looped)
    problem = jsonsafe.find_problem(looped)
    assert problem is not None and problem.kind == "depth"  # no RecursionError on a cycle either
    spawned = absurd.spawn_sync("iv_echo", {"emoji": "\ud83d\ude00", "deep": nested(150)})
    work_until(lambda: state(spawned["task_id"]) == "completed")
    stored = rows("select completed_payload from absurd.t_agents where task_id = %s", [spawned["task_id"]])[0][0]
    assert json.loads(stored)["emoji"] == "\U0001f600"


def test_postgres_itself_refuses_what_the_validator_refuses() -> None:
    """The reason for the checks, pinned: jsonb refuses these (and the transaction is then aborted)."""
    for text in ('"a\\u0000b"', '"\\ud800"', "NaN"):
        with pytest.raises(DataError), transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("select %s::jsonb", [text])


# --- item 6: step values, tool and model results, task results --------------------------------------


def test_a_tool_result_with_nul_fails_the_task_once_naming_step_and_tool() -> None:
    task_id = run_to_end("iv_nul_tool", max_attempts=3)
    assert state(task_id) == "failed"
    [failure] = failures(task_id)  # one attempt: the others would run the tool again for nothing
    assert failure["name"] == UnrecordableStepResult.__name__
    message = failure["message"]
    assert "'iv_reader__function_toolset__<agent>.call_tool:extract_pdf'" in message
    assert "the tool 'extract_pdf'" in message and "NUL character" in message
    assert "retry the task" in message
    assert effects == ["extract_pdf"]
    # Nothing was written for the tool's step; the model request before it is recorded.
    assert checkpoints(task_id) == ["iv_reader__model.request"]
    assert rows("select max_attempts from absurd.t_agents where task_id = %s", [task_id])[0][0] == 1


def test_nul_in_model_text_is_refused_naming_the_model_step() -> None:
    task_id = run_to_end("iv_nul_model", max_attempts=3)
    [failure] = failures(task_id)
    assert failure["name"] == "UnrecordableStepResult"
    assert "'iv_scraper__model.request' (a model request)" in failure["message"]
    assert "NUL character" in failure["message"]
    assert effects == ["model"]  # the model was asked (and paid) once
    assert checkpoints(task_id) == []


def test_a_step_value_postgres_would_refuse_fails_the_task_once_naming_the_step() -> None:
    task_id = run_to_end("iv_nan_step", max_attempts=3)
    [failure] = failures(task_id)
    assert failure["name"] == "UnrecordableStepResult"
    assert "The step 'measure'" in failure["message"] and "the number nan at $.ratio" in failure["message"]
    assert effects == ["measure"]
    assert checkpoints(task_id) == []


def test_a_task_result_with_nan_fails_naming_the_task() -> None:
    task_id = run_to_end("iv_nan_result", max_attempts=1)
    [failure] = failures(task_id)
    assert "'iv_nan_result'" in failure["message"]
    assert "the number nan at $.score" in failure["message"]


def test_a_retry_after_the_fix_runs_the_step_again() -> None:
    """The cap on attempts is lifted by an explicit retry, as after any final failure."""
    task_id = run_to_end("iv_nan_step", max_attempts=3)
    absurd.retry_task_sync(task_id)
    work_until(lambda: state(task_id) in TERMINAL)
    assert effects == ["measure", "measure"]


def test_ctx_emit_event_checks_its_payload() -> None:
    task_id = run_to_end("iv_emit_bad")
    result = rows("select completed_payload from absurd.t_agents where task_id = %s", [task_id])[0][0]
    assert "NUL character" in json.loads(result)["refused"]


# --- item 26: a plain function given to ctx.step ---------------------------------------------------


def test_a_plain_function_step_is_refused_before_it_runs() -> None:
    task_id = run_to_end("iv_sync_step", max_attempts=2)
    assert state(task_id) == "failed"
    message = failures(task_id)[-1]["message"]
    assert "send_email is a plain function, refused before it ran" in message
    assert "async def send_email()" in message and "sync_to_async(send_email)" in message
    assert effects == []


def test_a_lambda_that_runs_synchronously_runs_once_and_fails_the_task() -> None:
    """A lambda usually wraps an async call, so it is called; when it returned a plain value, its effect
    is done: the task fails without another attempt that would repeat it."""
    task_id = run_to_end("iv_sync_lambda_step", max_attempts=3)
    [failure] = failures(task_id)
    assert "not an awaitable" in failure["message"] and "async def" in failure["message"]
    assert effects == ["send_email"]


def test_sync_to_async_steps_work() -> None:
    task_id = run_to_end("iv_threaded_step")
    assert state(task_id) == "completed"
    assert effects == ["send_email"]


def test_what_counts_as_a_plain_function() -> None:
    import functools

    async def coro() -> None: ...

    class AsyncCallable:
        async def __call__(self) -> None: ...

    class SyncCallable:
        def __call__(self) -> None: ...

    assert is_plain_function(send_email) and is_plain_function(time.time) and is_plain_function(SyncCallable())
    assert is_plain_function(functools.partial(send_email))
    for fine in (coro, functools.partial(coro), sync_to_async(send_email), AsyncCallable(), lambda: coro()):
        assert not is_plain_function(fine)


# --- item 25: run_sync --------------------------------------------------------------------------------


def test_run_sync_outside_a_task_runs_the_plain_agent() -> None:
    assert sync_runner.run_sync("hi").output == "plain"
    assert task_count() == 0 and rows("select count(*) from absurd.c_agents")[0][0] == 0


def test_run_sync_inside_a_task_is_refused_with_the_fix() -> None:
    task_id = run_to_end("iv_run_sync_inside", max_attempts=1)
    message = failures(task_id)[0]["message"]
    assert "`await agent.run(...)`" in message and "'iv_sync_runner'" in message
    assert "iv_sync_runner.run" not in message


# --- item 15: ids checked first, "not found" is ours ------------------------------------------------


BY_ID_SYNC = {
    "fetch_task_result_sync": lambda task_id: absurd.fetch_task_result_sync(task_id),
    "cancel_task_sync": lambda task_id: absurd.cancel_task_sync(task_id),
    "retry_task_sync": lambda task_id: absurd.retry_task_sync(task_id),
}
BY_ID_ASYNC = {
    "fetch_task_result": lambda c, task_id: c.fetch_task_result(task_id),
    "cancel_task": lambda c, task_id: c.cancel_task(task_id),
    "retry_task": lambda c, task_id: c.retry_task(task_id),
    "await_task_result": lambda c, task_id: c.await_task_result(task_id, timeout=0.1),
}


@pytest.mark.parametrize("method", list(BY_ID_SYNC))
@pytest.mark.parametrize("bad_id", ["not-a-uuid", "", "1234", 42, None])
def test_malformed_ids_are_refused_before_sql(method: str, bad_id: Any) -> None:
    error = refused_before_sql(lambda: BY_ID_SYNC[method](bad_id), ValueError, "is not a task id")
    assert isinstance(error, InvalidParams) and repr(bad_id) in str(error)


@pytest.mark.parametrize("method", list(BY_ID_ASYNC))
def test_malformed_ids_are_refused_by_the_async_calls(method: str) -> None:
    with pytest.raises(InvalidParams, match="'nope' is not a task id"):
        run_async(lambda client: BY_ID_ASYNC[method](client, "nope"))


@pytest.mark.parametrize("method", ["cancel_task_sync", "retry_task_sync"])
def test_unknown_ids_raise_task_not_found_and_the_transaction_goes_on(method: str) -> None:
    missing = uuid.uuid4()
    with transaction.atomic():
        with pytest.raises(TaskNotFound, match=rf"Task {missing} was not found in any queue"):
            BY_ID_SYNC[method](missing)
        kept = absurd.spawn_sync("iv_echo", {"kept": True})
    assert state(kept["task_id"]) == "pending"
    with pytest.raises(TaskNotFound, match="not found in queue 'other'"):
        getattr(absurd, method)(missing, queue_name="other")


def test_fetching_an_unknown_id_returns_none_as_documented() -> None:
    assert absurd.fetch_task_result_sync(uuid.uuid4()) is None
    assert absurd.fetch_task_result_sync(str(uuid.uuid4()), queue_name="other") is None
    assert run_async(lambda client: client.fetch_task_result(uuid.uuid4())) is None


@pytest.mark.parametrize("method", ["cancel_task", "retry_task", "await_task_result"])
def test_unknown_ids_raise_task_not_found_in_the_async_calls(method: str) -> None:
    with pytest.raises(TaskNotFound):
        run_async(lambda client: BY_ID_ASYNC[method](client, uuid.uuid4()))


def test_a_queue_that_does_not_exist_is_named() -> None:
    with transaction.atomic():
        with pytest.raises(ValueError, match=r"'nowhere' does not exist.*migrate"):
            absurd.cancel_task_sync(uuid.uuid4(), queue_name="nowhere")
        assert task_count() == 0


# --- item 16: task names --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["", "   ", None, 42, b"iv_echo", "iv\x00echo", "\ud800"])
def test_task_names_that_are_not_text_are_refused_before_sql(name: Any) -> None:
    refused_before_sql(lambda: absurd.spawn_sync(name, {}), InvalidParams, "The task name")
    with pytest.raises(InvalidParams, match="The task name"):
        run_async(lambda client: client.spawn(name, {}))


def test_register_task_refuses_a_blank_name_and_zero_attempts() -> None:
    app = ProjectAbsurd()
    with pytest.raises(InvalidParams, match="The task name must not be blank"):
        app.register_task("  ")
    with pytest.raises(InvalidParams, match="default_max_attempts must be at least 1"):
        app.register_task("iv_zero", default_max_attempts=0)
    assert app.registry == {}


@pytest.mark.parametrize("name", ["", None])
def test_event_names_are_checked_before_sql(name: Any) -> None:
    refused_before_sql(lambda: absurd.emit_event_sync(name, {}), InvalidParams, "The event name")


def test_idempotency_keys_are_checked_before_sql() -> None:
    refused_before_sql(lambda: absurd.spawn_sync("iv_echo", {}, idempotency_key="k\x00"), InvalidParams, "key")


# --- item 17: deep params ---------------------------------------------------------------------------


def test_params_nested_3000_deep_raise_invalid_params_not_recursion_error() -> None:
    refused_before_sql(lambda: absurd.spawn_sync("iv_echo", {"tree": nested(3000)}), InvalidParams, "nesting")
    deep_dict: Any = {}
    for _ in range(3000):
        deep_dict = {"child": deep_dict}
    with pytest.raises(InvalidParams, match=r"nesting deeper than 200 levels at \$\.child\.child"):
        run_async(lambda client: client.spawn("iv_echo", deep_dict))


# --- item 18: max_attempts -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, 1.5, "3", True])
def test_max_attempts_must_be_a_positive_whole_number(value: Any) -> None:
    refused_before_sql(lambda: absurd.spawn_sync("iv_echo", {}, max_attempts=value), InvalidParams, "max_attempts")
    with pytest.raises(InvalidParams, match="max_attempts"):
        run_async(lambda client: client.spawn("iv_echo", {}, max_attempts=value))
    refused_before_sql(lambda: absurd.retry_task_sync(uuid.uuid4(), max_attempts=value), InvalidParams, "max_attempts")


def test_max_attempts_one_is_kept_and_none_means_the_default() -> None:
    one = absurd.spawn_sync("iv_echo", {}, max_attempts=1)["task_id"]
    default = absurd.spawn_sync("iv_echo", {})["task_id"]
    stored = dict(rows("select task_id::text, max_attempts from absurd.t_agents"))
    assert stored == {one: 1, default: 5}


def test_a_zero_default_in_settings_is_named(settings: Any) -> None:
    settings.ABSURD_AGENTS = {**settings.ABSURD_AGENTS, "DEFAULT_MAX_ATTEMPTS": 0}
    with (
        CaptureQueriesContext(connection) as queries,
        pytest.raises(InvalidParams, match=r"DEFAULT_MAX_ATTEMPTS'\] must"),
    ):
        absurd.spawn_sync("iv_echo", {})
    assert not queries.captured_queries


# --- item 19: idempotency keys say whether the task was created ------------------------------------------


def test_spawn_says_whether_the_idempotency_key_created_the_task() -> None:
    first = absurd.spawn_sync("iv_echo", {"n": 1}, idempotency_key="order-7")
    again = absurd.spawn_sync("iv_echo", {"n": 2}, idempotency_key="order-7")
    assert first["created"] is True and again["created"] is False
    assert again["task_id"] == first["task_id"] and again["run_id"] == first["run_id"]
    assert set(first) == {"task_id", "run_id", "attempt", "created"}
    assert json.loads(rows("select params from absurd.t_agents")[0][0]) == {"n": 1}  # the second params: unused
    later = run_async(lambda client: client.spawn("iv_echo", {"n": 3}, idempotency_key="order-7"))
    assert later["created"] is False and later["task_id"] == first["task_id"]
    assert absurd.spawn_sync("iv_echo", {})["created"] is True


# --- item 20: one size limit for params and event payloads -------------------------------------------------


def test_event_payloads_share_the_params_limit(settings: Any) -> None:
    settings.ABSURD_AGENTS = {**settings.ABSURD_AGENTS, "MAX_PARAMS_BYTES": 100}
    absurd.emit_event_sync("iv-small", {"note": "n" * 80})
    error = refused_before_sql(
        lambda: absurd.emit_event_sync("iv-big", {"note": "n" * 90}), InvalidParams, r"over the limit of 100 "
    )
    assert "MAX_PARAMS_BYTES" in str(error) and "event payloads" in str(error)
    with pytest.raises(InvalidParams, match="MAX_PARAMS_BYTES"):
        run_async(lambda client: client.emit_event("iv-big", {"note": "n" * 90}))
    assert [row[0] for row in rows("select event_name from absurd.e_agents")] == ["iv-small"]


# --- item 21: calls by id find a routed task's queue ----------------------------------------------------------


@pytest.fixture
def routed_to_other(settings: Any) -> None:
    """A web process that never imported the task spawns it by name: TASK_ROUTES picks the queue."""
    settings.ABSURD_AGENTS = {**settings.ABSURD_AGENTS, "TASK_ROUTES": {"iv_report": "other"}}


def other_state(task_id: str) -> str | None:
    found = rows("select state from absurd.t_other where task_id = %s", [task_id])
    return found[0][0] if found else None


def test_calls_by_id_find_a_task_routed_to_another_queue(routed_to_other: None) -> None:
    waiting = absurd.spawn_sync("iv_report", {"n": 1})["task_id"]
    assert task_count("other") == 1 and task_count("agents") == 0
    snapshot = absurd.fetch_task_result_sync(waiting)
    assert snapshot is not None and snapshot.state == "pending"
    assert absurd.locate_task_sync(waiting) == ("other", "pending")
    absurd.cancel_task_sync(waiting)
    assert other_state(waiting) == "cancelled"

    # A failed task on the other queue (its handler is registered there) is retried by id alone.
    failing = absurd.spawn_sync("iv_routed", {"fail": True}, max_attempts=1)["task_id"]
    work_until(lambda: other_state(failing) == "failed", client=absurd.for_queue("other"))
    retried = absurd.retry_task_sync(failing)
    assert retried["task_id"] == failing and other_state(failing) == "pending"


def test_async_calls_by_id_find_a_task_routed_to_another_queue(routed_to_other: None) -> None:
    task_id = absurd.spawn_sync("iv_report", {"n": 1})["task_id"]

    async def calls(client: ProjectAbsurd) -> list[Any]:
        snapshot = await client.fetch_task_result(task_id)
        await client.cancel_task(task_id)
        finished = await client.await_task_result(task_id, timeout=5)
        return [snapshot.state if snapshot else None, finished.state]

    assert run_async(calls) == ["pending", "cancelled"]

    failing = absurd.spawn_sync("iv_routed", {"fail": True}, max_attempts=1)["task_id"]
    work_until(lambda: other_state(failing) == "failed", client=absurd.for_queue("other"))
    retried = run_async(lambda client: client.retry_task(failing))
    assert retried["task_id"] == failing and other_state(failing) == "pending"


@pytest.mark.parametrize(
    "text", ["urn:uuid:12345678-1234-1234-1234-123456789abc", "+1234567-1234-1234-1234-123456789abc", "not-a-uuid"]
)
def test_a_task_id_is_what_a_person_types_as_a_uuid(text: str) -> None:
    """The client takes the same task ids as the admin and the commands: ``uuid.UUID`` alone takes more."""
    from django_absurd_agents.validation import task_uuid

    with pytest.raises(InvalidParams, match="is not a task id"):
        task_uuid(text)
    assert task_uuid(" {12345678-1234-1234-1234-123456789ABC} ") == uuid.UUID("12345678-1234-1234-1234-123456789abc")
