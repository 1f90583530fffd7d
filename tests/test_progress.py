"""The progress API (``absurd.task_progress`` / ``task_progress_sync``) and the decoder under it, on real tasks.

Tasks run in this process through ``work_batch`` on the client's own connection (as in the admin's
tests), and their progress is read back through Django's connection, the way a status page reads it.
"""

from __future__ import annotations

import datetime
import uuid
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.db import connection
from django.test.utils import CaptureQueriesContext
from pydantic_ai.messages import (
    ImageUrl,
    ModelMessagesTypeAdapter,
    ModelRequest,
    ModelResponse,
    RetryFeedbackPart,
    RetryInfo,
    SystemPromptPart,
    TextPart,
    ThinkingPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)

from django_absurd_agents import UnknownQueue, absurd
from django_absurd_agents.steps import StepName, parse_step_name, transcript_entries
from tests import agents  # noqa: F401  (registers "analyse")
from tests.test_admin import run_worker


@absurd.register_task(name="progress_fails")
async def progress_fails(params: dict[str, Any], ctx: Any) -> None:
    await ctx.step("prepare", lambda: _value({"prepared": True}))
    raise ValueError(f"cannot finish {params['n']}")


@absurd.register_task(name="progress_waits")
async def progress_waits(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    answer = await ctx.await_event(f"answer:{ctx.task_id}", step_name="ask the operator")
    return {"answer": answer}


@absurd.register_task(name="progress_sleeps")
async def progress_sleeps(params: dict[str, Any], ctx: Any) -> str:
    await ctx.sleep_for("nap", 3600)
    return "rested"


async def _value(value: Any) -> Any:
    return value


@pytest.mark.django_db(transaction=True)
def test_an_agent_task_reports_its_steps_attempts_and_result(clean_queues: None) -> None:
    task_id = absurd.spawn_sync("analyse", {"prompt": "How is ACME?"})["task_id"]
    before = absurd.task_progress_sync(task_id)
    assert before is not None
    assert (before.state, before.attempt, before.steps, before.done, before.waiting) == ("pending", 1, [], False, None)
    assert (before.queue, before.task_name, before.task_id) == ("agents", "analyse", task_id)

    run_worker()
    progress = absurd.task_progress_sync(task_id)
    assert progress is not None and progress.state == "completed" and progress.done
    assert [(step.kind, step.number, step.tool, step.attempt) for step in progress.steps] == [
        ("model", 1, None, 1),
        ("tool", 1, "quote", 1),
        ("model", 2, None, 1),
        ("tool", 1, "stamp", 1),
        ("model", 3, None, 1),
    ]
    first, quote = progress.steps[0], progress.steps[1]
    assert first.name == "analyst__model.request" and first.agent == "analyst"
    assert [call.tool_name for call in first.decoded.tool_calls] == ["quote"]
    assert quote.decoded.call is not None and quote.decoded.call.args == {"symbol": "ACME"}
    assert quote.decoded.result == {"symbol": "ACME", "price": 12.5} and quote.value["kind"] == "tool_return"
    assert progress.steps[-1].decoded.texts[0].startswith("done: quote=")
    assert progress.result == {"output": progress.steps[-1].decoded.texts[0]}
    assert progress.failure is None and progress.waiting is None
    [attempt] = progress.attempts
    assert (attempt.number, attempt.state, attempt.worker, attempt.failure) == (
        1,
        "completed",
        "admin-test-worker",
        None,
    )
    assert attempt.started_at is not None and attempt.finished_at is not None
    # The same from async code, and by UUID as well as by text.
    assert async_to_sync(absurd.task_progress)(uuid.UUID(task_id)) == progress


@pytest.mark.django_db(transaction=True)
def test_a_failed_task_reports_why_on_each_attempt(clean_queues: None) -> None:
    task_id = absurd.spawn_sync("progress_fails", {"n": 3}, max_attempts=2, retry_strategy={"kind": "none"})["task_id"]
    run_worker()
    between = absurd.task_progress_sync(task_id)
    assert between is not None and between.state == "pending" and between.failure is None
    assert [step.name for step in between.steps] == ["prepare"] and between.steps[0].kind == "step"
    run_worker()

    progress = absurd.task_progress_sync(task_id)
    assert progress is not None and progress.state == "failed" and progress.done and progress.attempt == 2
    assert progress.failure is not None
    assert (progress.failure.name, progress.failure.message) == ("ValueError", "cannot finish 3")
    assert "Traceback" in (progress.failure.traceback or "")
    assert [(a.number, a.state) for a in progress.attempts] == [(1, "failed"), (2, "failed")]
    assert all(a.failure is not None and a.failure.name == "ValueError" for a in progress.attempts)
    # The step recorded by attempt 1 was replayed, not recorded again, by attempt 2.
    assert [(step.name, step.attempt, step.value) for step in progress.steps] == [("prepare", 1, {"prepared": True})]
    assert progress.result is None


@pytest.mark.django_db(transaction=True)
def test_a_waiting_task_says_what_it_waits_for_until_the_event_comes(clean_queues: None) -> None:
    task_id = absurd.spawn_sync("progress_waits", {})["task_id"]
    run_worker()
    progress = absurd.task_progress_sync(task_id)
    assert progress is not None and progress.state == "sleeping" and not progress.done
    assert progress.waiting is not None
    assert (progress.waiting.event_name, progress.waiting.step_name) == (f"answer:{task_id}", "ask the operator")
    assert progress.waiting.until is None and progress.waiting.since is not None

    absurd.emit_event_sync(f"answer:{task_id}", {"ok": True})
    assert absurd.task_progress_sync(task_id).waiting is None  # type: ignore[union-attr]
    run_worker()
    done = absurd.task_progress_sync(task_id)
    assert done is not None and done.result == {"answer": {"ok": True}}
    assert [step.name for step in done.steps] == ["ask the operator"]


@pytest.mark.django_db(transaction=True)
def test_a_sleeping_task_says_until_when(clean_queues: None) -> None:
    task_id = absurd.spawn_sync("progress_sleeps", {})["task_id"]
    run_worker()
    progress = absurd.task_progress_sync(task_id)
    assert progress is not None and progress.state == "sleeping" and progress.waiting is not None
    assert progress.waiting.event_name is None
    now = datetime.datetime.now(datetime.UTC)
    assert progress.waiting.until is not None
    assert now + datetime.timedelta(minutes=59) < progress.waiting.until < now + datetime.timedelta(minutes=61)


@pytest.mark.django_db
def test_unknown_tasks_are_none_and_bad_arguments_are_refused_before_any_sql() -> None:
    task_id = absurd.spawn_sync("analyse", {"prompt": "x"})["task_id"]
    assert absurd.task_progress_sync(str(uuid.uuid4())) is None
    assert absurd.task_progress_sync(task_id, queue_name="other") is None  # ids are looked up where asked
    assert absurd.task_progress_sync(task_id, queue_name="agents") is not None
    with pytest.raises(UnknownQueue):
        absurd.task_progress_sync(task_id, queue_name="nowhere")
    with CaptureQueriesContext(connection) as seen:
        with pytest.raises(ValueError, match="is not a task id"):
            absurd.task_progress_sync("42")
        with pytest.raises(ValueError, match="lowercase letters"):
            absurd.task_progress_sync(task_id, queue_name='agents"; drop schema absurd; --')
    assert seen.captured_queries == []


def test_step_names_say_what_ran() -> None:
    assert parse_step_name("analyst__model.request") == StepName("model", "analyst", 1)
    assert parse_step_name("analyst__model.request_stream#3") == StepName("model", "analyst", 3, streamed=True)
    assert parse_step_name("analyst__function_toolset__<agent>.call_tool:quote#2") == StepName(
        "tool", "analyst", 2, tool="quote"
    )
    assert parse_step_name("bot__mcp_server__srv.call_tool") == StepName("tool", "bot", 1)
    assert parse_step_name("bot__external_event.approval.ask") == StepName(
        "event", "bot", wait="approval", wait_part="ask"
    )
    assert parse_step_name("load_history") == StepName("step")


def test_stored_messages_read_back_as_a_transcript() -> None:
    """Messages as pydantic-ai stores them (its own JSON), decoded without pydantic-ai types."""
    messages = [
        ModelRequest(
            parts=[
                SystemPromptPart("Be brief."),
                UserPromptPart(["Look at this", ImageUrl("https://example.org/chart.png")]),
            ]
        ),
        ModelResponse(
            parts=[
                ThinkingPart("The chart first."),
                ToolCallPart("quote", '{"symbol": "ACME"}', tool_call_id="c1"),
                ToolCallPart("stamp", {}, tool_call_id="c2"),
            ]
        ),
        ModelRequest(
            parts=[
                ToolReturnPart("quote", {"price": 12.5}, tool_call_id="c1"),
                ToolReturnPart("stamp", "try again", tool_call_id="c2", outcome="retried"),
                ToolReturnPart("lost", "orphan", tool_call_id="c9"),
            ]
        ),
        ModelResponse(parts=[ToolCallPart("quote", {"symbol": "?"}, tool_call_id="c3")]),
        ModelRequest(parts=[RetryFeedbackPart("Unknown symbol.", retry=RetryInfo(cause="validation_error"))]),
        ModelResponse(parts=[TextPart("ACME is at 12.5.")]),
    ]
    stored = ModelMessagesTypeAdapter.dump_python(messages, mode="json")
    entries = transcript_entries([*stored, "corrupted", {"parts": ["also corrupted"]}])
    assert [(entry.kind, entry.name) for entry in entries] == [
        ("instructions", ""),
        ("user", ""),
        ("thinking", ""),
        ("tool", "quote"),
        ("tool", "stamp"),
        ("tool", "lost"),
        ("tool", "quote"),
        ("retry", ""),
        ("assistant", ""),
    ]
    instructions, user, _, quote, stamp, orphan, _, retry, answer = entries
    assert instructions.text == "Be brief." and answer.text == "ACME is at 12.5."
    assert user.text == "Look at this\n[image/png https://example.org/chart.png]"
    assert quote.args == {"symbol": "ACME"} and quote.result == {"price": 12.5} and quote.has_result
    assert not quote.failed and stamp.args == {} and stamp.result == "try again" and stamp.failed
    assert retry.text == "Unknown symbol."
    assert not orphan.has_call and orphan.result == "orphan"
    assert transcript_entries(None) == [] and transcript_entries({"not": "a list"}) == []
