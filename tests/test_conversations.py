"""Conversations: turns as durable tasks, history, ordering, failures, owner scoping, admin."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.contrib.auth.models import AnonymousUser, User
from django.db import connection, transaction
from django.urls import reverse
from pydantic_ai.messages import ModelRequest, ModelResponse, TextPart, UserPromptPart

from django_absurd_agents import absurd
from django_absurd_agents.conversations import TURN_TASK, TurnTimeout, register_chat_agent
from django_absurd_agents.models import Conversation, Turn
from tests import chat_agents

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _clean(clean_queues: None) -> Iterator[None]:
    chat_agents.failing_prompts.clear()
    yield
    chat_agents.failing_prompts.clear()


@pytest.fixture
def call_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "calls.log"
    monkeypatch.setenv("CALL_LOG", str(path))
    return path


@pytest.fixture
def one_attempt(settings: Any) -> None:
    """Turns fail on their first error, without backoff, so a failure test does not wait for retries."""
    settings.ABSURD_AGENTS = {**settings.ABSURD_AGENTS, "DEFAULT_MAX_ATTEMPTS": 1, "RETRY_STRATEGY": None}


def calls(log: Path) -> list[str]:
    return log.read_text().split("\n")[:-1] if log.exists() else []


def drive(until: Callable[[], bool], timeout: float = 30.0, newest_first: bool = False) -> None:
    """Run turn tasks in this process until ``until()`` holds, failing after ``timeout`` seconds.

    ``newest_first`` runs each claimed batch backwards, so later turns start before earlier ones.
    """

    async def work() -> None:
        deadline = time.monotonic() + timeout
        try:
            while not await sync_to_async(until)():
                if time.monotonic() > deadline:
                    raise AssertionError(f"not done after {timeout} s")
                claimed = await absurd.claim_tasks(batch_size=8, claim_timeout=10, worker_id="test")
                for task in reversed(claimed) if newest_first else claimed:
                    await absurd.run_claimed(task, 10)
        finally:
            await absurd.close()

    async_to_sync(work)()


def finished(*turns: Turn) -> Callable[[], bool]:
    return lambda: all(Turn.objects.get(pk=turn.pk).is_terminal for turn in turns)


def task_state(turn: Turn) -> str | None:
    snapshot = absurd.fetch_task_result_sync(turn.task_id, queue_name=turn.queue)
    return snapshot.state if snapshot else None


def checkpoint_names(turn: Turn) -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute(
            f"select checkpoint_name from absurd.c_{turn.queue} where task_id = %s order by updated_at",
            [turn.task_id],
        )
        return [row[0] for row in cursor.fetchall()]


def chat(agent: str = "counter", owner: User | None = None) -> Conversation:
    return Conversation.objects.create(agent=agent, owner=owner, title="test chat")


# --- history --------------------------------------------------------------------------------------


def test_three_turns_each_answer_with_the_history_before_them() -> None:
    conversation = chat()
    first = conversation.send("red")
    drive(finished(first))
    second = conversation.send("green")
    drive(finished(second))
    third = conversation.send("blue")
    drive(finished(third))

    outputs = [turn.output for turn in conversation.turns.order_by("sequence")]
    assert outputs == ["1: red", "2: red | green", "3: red | green | blue"]
    messages = conversation.messages()
    assert [type(message) for message in messages] == [ModelRequest, ModelResponse] * 3
    assert [part.content for m in messages for part in m.parts if isinstance(part, UserPromptPart)] == [
        "red",
        "green",
        "blue",
    ]
    assert isinstance(messages[-1].parts[0], TextPart)
    assert messages[-1].parts[0].content == "3: red | green | blue"
    third.refresh_from_db()
    assert third.state == Turn.State.COMPLETED
    assert third.usage["requests"] == 1
    assert third.started_at is not None and third.finished_at is not None
    assert task_state(third) == "completed"
    assert absurd.fetch_task_result_sync(third.task_id).result == {
        "turn_id": str(third.pk),
        "state": "completed",
        "output": "3: red | green | blue",
    }


def test_sends_in_a_row_queue_behind_the_pending_turn() -> None:
    conversation = chat()
    turns = [conversation.send(word) for word in ("one", "two", "three", "four")]
    assert [turn.sequence for turn in turns] == [1, 2, 3, 4]
    drive(finished(*turns))

    stored = list(conversation.turns.order_by("sequence"))
    assert [turn.output for turn in stored] == [
        "1: one",
        "2: one | two",
        "3: one | two | three",
        "4: one | two | three | four",
    ]
    for earlier, later in itertools.pairwise(stored):
        assert earlier.finished_at <= later.started_at


def test_a_later_turn_started_first_waits_for_the_earlier_ones() -> None:
    conversation = chat()
    turns = [conversation.send(word) for word in ("one", "two", "three")]
    drive(finished(*turns), newest_first=True)
    stored = list(conversation.turns.order_by("sequence"))
    assert [turn.output for turn in stored] == ["1: one", "2: one | two", "3: one | two | three"]
    names = checkpoint_names(stored[2])
    # It found turn 2 unfinished, waited for its event, then found nothing left to wait for.
    assert names[:2] == ["earlier_turn:1", "earlier_turn_done:1"]
    assert names[-3:] == ["load_conversation", "counter__model.request", "save_turn"]


def test_a_waiting_turn_rechecks_an_earlier_turn_that_never_reports() -> None:
    """The earlier task is cancelled behind the library's back while the later turn waits for its event."""
    conversation = chat()
    first = conversation.send("first")
    second = conversation.send("second")

    async def run_only_the_second() -> None:
        try:
            for task in await absurd.claim_tasks(batch_size=8, claim_timeout=30, worker_id="test"):
                if str(task["task_id"]) == str(second.task_id):
                    await absurd.run_claimed(task, 30)
        finally:
            await absurd.close()

    async_to_sync(run_only_the_second)()
    assert task_state(second) == "sleeping"
    # Every previous_turn_recheck (2 s) it looks again, finds the first turn's task still running, waits on.
    drive(lambda: "earlier_turn:3" in checkpoint_names(second))
    absurd.cancel_task_sync(first.task_id, queue_name=first.queue)
    drive(finished(second))
    assert Turn.objects.get(pk=first.pk).state == Turn.State.CANCELLED
    assert Turn.objects.get(pk=second.pk).output == "1: second"
    names = checkpoint_names(second)
    assert names[:3] == ["earlier_turn:1", "earlier_turn_timeout:1", "earlier_turn:2"]
    assert names[-3:] == ["load_conversation", "counter__model.request", "save_turn"]


async def test_asend_and_await_result() -> None:
    conversation = await Conversation.objects.acreate(agent="counter")
    turn = await conversation.asend("hello")
    assert turn.state == Turn.State.PENDING
    try:
        await absurd.work_batch(worker_id="test", claim_timeout=10)
        done = await turn.await_result(timeout=10)
    finally:
        await absurd.close()
    assert done.output == "1: hello"
    assert len(await conversation.amessages()) == 2


def test_wait_returns_the_answer_and_times_out_with_a_hint() -> None:
    conversation = chat()
    turn = conversation.send("anyone there?")
    with pytest.raises(TurnTimeout, match="absurd_worker"):
        turn.wait(timeout=0.1)
    drive(finished(turn))
    assert turn.wait(timeout=5).output == "1: anyone there?"


def test_send_commits_or_rolls_back_with_the_callers_transaction() -> None:
    conversation = chat()
    with pytest.raises(RuntimeError), transaction.atomic():
        turn = conversation.send("never mind")
        raise RuntimeError("the view failed")
    assert not conversation.turns.exists()
    assert task_state(turn) is None
    assert conversation.send("again").sequence == 1


def test_send_refuses_an_empty_prompt_and_an_unsaved_conversation() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        chat().send("  ")
    with pytest.raises(ValueError, match="Save the conversation"):
        Conversation(agent="counter").send("hi")


# --- failures ----------------------------------------------------------------------------------------


@pytest.mark.usefixtures("one_attempt")
def test_failed_turn_records_its_error_and_the_next_send_goes_on_without_it() -> None:
    chat_agents.failing_prompts.add("boom")
    conversation = chat()
    failed = conversation.send("boom")
    after = conversation.send("calm")
    drive(finished(failed, after))

    failed.refresh_from_db()
    after.refresh_from_db()
    assert failed.state == Turn.State.FAILED
    assert failed.error == "RuntimeError: the model refuses 'boom'"
    assert not failed.entries.exists() and failed.model_messages() == []
    assert task_state(failed) == "failed"
    assert after.state == Turn.State.COMPLETED
    assert after.output == "1: calm"  # the failed turn's prompt is not in the history
    assert len(conversation.messages()) == 2

    following = conversation.send("still here")
    drive(finished(following))
    assert following.wait(timeout=1).output == "2: calm | still here"

    chat_agents.failing_prompts.clear()
    old_task = failed.task_id
    failed.retry()
    assert failed.state == Turn.State.PENDING and failed.task_id != old_task
    drive(finished(failed))
    failed.refresh_from_db()
    assert failed.state == Turn.State.COMPLETED
    # A retried turn answers on the conversation as it is stored now: its messages join the end of the log.
    assert failed.output == "3: calm | still here | boom"
    with pytest.raises(ValueError, match="only a failed or cancelled turn"):
        failed.retry()


def test_a_turn_behind_one_whose_task_died_unreported_goes_on() -> None:
    """A task cancelled behind the library's back (the admin) never emits; the next turn must not hang."""
    conversation = chat()
    stuck = conversation.send("first")
    behind = conversation.send("second")
    absurd.cancel_task_sync(stuck.task_id, queue_name=stuck.queue)
    drive(finished(behind))
    stuck.refresh_from_db()
    assert stuck.state == Turn.State.CANCELLED
    assert Turn.objects.get(pk=behind.pk).output == "1: second"


def test_cancel_turn_releases_the_turn_behind_it() -> None:
    conversation = chat()
    first = conversation.send("first")
    second = conversation.send("second")
    first.cancel()
    assert first.state == Turn.State.CANCELLED
    assert task_state(first) == "cancelled"
    drive(finished(second))
    assert Turn.objects.get(pk=second.pk).output == "1: second"
    with pytest.raises(ValueError, match="already cancelled"):
        first.cancel()
    first.retry()
    drive(finished(first))
    assert Turn.objects.get(pk=first.pk).output == "2: second | first"


@pytest.mark.usefixtures("one_attempt")
def test_unknown_agent_fails_the_turn_with_the_fix() -> None:
    conversation = chat(agent="nobody")
    turn = conversation.send("hi")
    drive(finished(turn))
    turn.refresh_from_db()
    assert turn.state == Turn.State.FAILED
    assert "No chat agent named 'nobody'" in turn.error
    assert "register_chat_agent" in turn.error


def test_register_chat_agent_refuses_a_plain_agent_and_a_second_agent_of_a_name() -> None:
    from django.core.exceptions import ImproperlyConfigured
    from pydantic_ai import Agent
    from pydantic_ai.models.test import TestModel

    from django_absurd_agents import AbsurdAgent

    with pytest.raises(ImproperlyConfigured, match="AbsurdAgent"):
        register_chat_agent(Agent(TestModel(), name="plain"))  # type: ignore[arg-type]
    twin = AbsurdAgent(Agent(TestModel(), name="counter"), absurd)
    with pytest.raises(ImproperlyConfigured, match="already registered as 'counter'"):
        register_chat_agent(twin)
    assert register_chat_agent(chat_agents.counter, previous_turn_recheck=2) is chat_agents.counter
    assert TURN_TASK in absurd.registry


# --- owners and deletion ------------------------------------------------------------------------


def test_for_user_reaches_only_own_conversations() -> None:
    alice = User.objects.create_user("alice")
    bob = User.objects.create_user("bob")
    mine = chat(owner=alice)
    chat(owner=bob)
    chat(owner=None)
    assert list(Conversation.objects.for_user(alice)) == [mine]
    assert list(Conversation.objects.for_user(AnonymousUser())) == []
    assert list(Conversation.objects.for_user(None)) == []
    with pytest.raises(Conversation.DoesNotExist):
        Conversation.objects.for_user(bob).get(pk=mine.pk)


def test_for_user_lists_newest_activity_first_using_the_owner_index() -> None:
    alice = User.objects.create_user("alice")
    older, newer = chat(owner=alice), chat(owner=alice)
    older.send("bump")
    assert list(Conversation.objects.for_user(alice)) == [older, newer]
    with connection.cursor() as cursor:
        cursor.execute("set enable_seqscan = off")
        sql, params = Conversation.objects.for_user(alice).query.sql_with_params()
        cursor.execute("explain " + sql, params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
        cursor.execute("reset enable_seqscan")
    assert "absurd_conv_owner_recent" in plan


def test_deleting_a_conversation_deletes_its_turns_and_cancels_the_pending_task() -> None:
    conversation = chat()
    done = conversation.send("done")
    drive(finished(done))
    pending = conversation.send("pending")
    conversation.delete()
    assert not Turn.objects.exists()
    assert task_state(pending) == "cancelled"
    assert task_state(done) == "completed"


def test_deleting_through_a_queryset_cancels_too_even_with_the_task_gone() -> None:
    alice = User.objects.create_user("alice")
    conversation = chat(owner=alice)
    pending = conversation.send("pending")
    gone = conversation.send("gone")
    with connection.cursor() as cursor:
        cursor.execute(f"delete from absurd.t_{gone.queue} where task_id = %s", [gone.task_id])
    Conversation.objects.for_user(alice).delete()
    assert not Turn.objects.exists()
    assert task_state(pending) == "cancelled"


def test_deleting_an_unfinished_turn_lets_the_turn_behind_it_go_on() -> None:
    conversation = chat()
    first = conversation.send("first")
    second = conversation.send("second")
    Turn.objects.filter(pk=first.pk).delete()
    assert task_state(first) == "cancelled"
    drive(finished(second))
    assert Turn.objects.get(pk=second.pk).output == "1: second"


def test_deleting_the_owner_deletes_the_conversations_and_cancels_their_tasks() -> None:
    alice = User.objects.create_user("alice")
    pending = chat(owner=alice).send("pending")
    alice.delete()
    assert not Conversation.objects.exists()
    assert task_state(pending) == "cancelled"


# --- worker processes ---------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not ready after {timeout} s"
        time.sleep(0.05)


def start_worker(env: dict[str, str], stop_file: Path, **extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.chat_worker"],
        cwd=ROOT,
        env={**env, "WORKER_STOP_FILE": str(stop_file), "WORKER_CLAIM_TIMEOUT": "3", **extra},
    )


@pytest.fixture
def workers(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    stop_file = tmp_path / "stop"

    def start(**extra: str) -> subprocess.Popen[bytes]:
        process = start_worker(worker_env, stop_file, **extra)
        started.append(process)
        return process

    yield start
    stop_file.touch()
    for process in started:
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_worker_killed_between_answer_and_write_back_stores_one_answer(
    workers: Callable[..., subprocess.Popen[bytes]], call_log: Path
) -> None:
    conversation = chat()
    first = conversation.send("warm up")
    second = conversation.send("remember me")
    crashing = workers(CALL_LOG=str(call_log), CRASH_AT="chat:validated")
    assert crashing.wait(timeout=60) == 137
    assert calls(call_log) == ["model:warm up", "validated"]
    assert Turn.objects.get(pk=first.pk).state == Turn.State.RUNNING

    workers(CALL_LOG=str(call_log))
    second.wait(timeout=60)
    # The model's answer was a checkpoint: the surviving worker replayed it instead of asking the
    # model again, and the turn was written back once.
    log = calls(call_log)
    assert log == ["model:warm up", "validated", "validated", "model:remember me", "validated"]
    turns = list(conversation.turns.order_by("sequence"))
    assert [turn.state for turn in turns] == [Turn.State.COMPLETED, Turn.State.COMPLETED]
    assert turns[0].output == "1: warm up"
    responses = [message for message in turns[0].model_messages() if isinstance(message, ModelResponse)]
    assert len(responses) == 1
    assert turns[1].output == "2: warm up | remember me"


@pytest.mark.slow
def test_two_workers_keep_turns_of_a_conversation_in_order(
    workers: Callable[..., subprocess.Popen[bytes]], call_log: Path, tmp_path: Path
) -> None:
    ready = [tmp_path / "ready-1", tmp_path / "ready-2"]
    for path in ready:
        workers(CALL_LOG=str(call_log), WORKER_READY_FILE=str(path))
    wait_until(lambda: all(path.exists() for path in ready), timeout=60)
    conversation = chat()
    other = chat()
    words = ["a", "b", "c", "d", "e", "f"]
    turns = []
    for word in words:
        turns.append(conversation.send(word))
        other.send(word.upper())
    turns[-1].wait(timeout=90)
    other.turns.order_by("-sequence").first().wait(timeout=90)  # type: ignore[union-attr]

    stored = list(conversation.turns.order_by("sequence"))
    assert [turn.state for turn in stored] == [Turn.State.COMPLETED] * len(words)
    assert [turn.output for turn in stored] == [f"{n}: {' | '.join(words[:n])}" for n in range(1, len(words) + 1)]
    for earlier, later in itertools.pairwise(stored):
        assert earlier.finished_at <= later.started_at
    assert [turn.output for turn in other.turns.order_by("sequence")][-1] == "6: A | B | C | D | E | F"
    assert sorted(line for line in calls(call_log) if line.startswith("model:")) == sorted(
        [f"model:{w}" for w in words] + [f"model:{w.upper()}" for w in words]
    )
    with connection.cursor() as cursor:
        cursor.execute(f"select distinct claimed_by from absurd.r_{turns[0].queue} where claimed_by is not null")
        assert len(cursor.fetchall()) == 2  # both workers ran turns


# --- admin ---------------------------------------------------------------------------------------------


@pytest.fixture
def admin_client_logged_in(client: Any) -> Any:
    user = User.objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(user)
    return client


def test_admin_lists_conversations_and_searches_by_title_and_owner(admin_client_logged_in: Any) -> None:
    alice = User.objects.create_user("alice")
    conversation = Conversation.objects.create(agent="counter", owner=alice, title="Trip to Lyon")
    Conversation.objects.create(agent="counter", title="Other")
    conversation.send("hi")
    conversation.send("again")
    url = reverse("admin:absurd_agents_conversation_changelist")
    page = admin_client_logged_in.get(url).content.decode()
    assert "Trip to Lyon" in page and "Other" in page
    assert "alice" in page
    found = admin_client_logged_in.get(url, {"q": "alice"}).content.decode()
    assert "Trip to Lyon" in found and "Other" not in found
    found = admin_client_logged_in.get(url, {"q": "lyon"}).content.decode()
    assert "Trip to Lyon" in found and "Other" not in found


def test_admin_shows_the_transcript(admin_client_logged_in: Any) -> None:
    chat_agents.failing_prompts.add("boom")
    conversation = Conversation.objects.create(agent="forecaster", title="Weather")
    turn = conversation.send("Weather in Lyon?")
    drive(finished(turn))
    page = admin_client_logged_in.get(
        reverse("admin:absurd_agents_conversation_change", args=[conversation.pk])
    ).content.decode()
    assert "Weather in Lyon?" in page
    assert "lookup" in page
    assert "&quot;city&quot;: &quot;Lyon&quot;" in page  # the call's arguments
    assert "sunny" in page  # the tool's result
    assert "<details" in page and "The tool said it will be sunny." in page
    assert "Forecast:" in page
    assert reverse("admin:absurd_agents_absurdtask_detail", args=(turn.queue, str(turn.task_id))) in page
    Path(os.environ.get("TRANSCRIPT_DUMP", "/dev/null")).write_text(page)


@pytest.mark.usefixtures("one_attempt")
def test_admin_transcript_shows_a_failed_turn_and_works_without_the_task_admin(
    admin_client_logged_in: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.urls import NoReverseMatch

    from django_absurd_agents import admin_conversations

    chat_agents.failing_prompts.add("boom")
    conversation = chat()
    failed = conversation.send("boom")
    drive(finished(failed))
    waiting = conversation.send("<b>later</b>")

    def no_task_admin(name: str, *args: Any, **kwargs: Any) -> str:
        if name == "admin:absurd_agents_absurdtask_detail":
            raise NoReverseMatch(name)
        return reverse(name, *args, **kwargs)

    monkeypatch.setattr(admin_conversations, "reverse", no_task_admin)
    page = admin_client_logged_in.get(
        reverse("admin:absurd_agents_conversation_change", args=[conversation.pk])
    ).content.decode()
    assert "RuntimeError: the model refuses &#x27;boom&#x27;" in page
    assert "&lt;b&gt;later&lt;/b&gt;" in page and "<b>later</b>" not in page
    assert f"task {waiting.task_id}" in page


@pytest.mark.usefixtures("one_attempt")
def test_admin_retries_failed_turns(admin_client_logged_in: Any) -> None:
    chat_agents.failing_prompts.add("boom")
    conversation = chat()
    failed = conversation.send("boom")
    drive(finished(failed))
    chat_agents.failing_prompts.clear()
    response = admin_client_logged_in.post(
        reverse("admin:absurd_agents_turn_changelist"),
        {"action": "retry_turns", "_selected_action": [str(failed.pk)]},
        follow=True,
    )
    assert "1 turn(s) queued again." in response.content.decode()
    drive(finished(failed))
    assert Turn.objects.get(pk=failed.pk).output == "1: boom"
