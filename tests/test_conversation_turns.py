"""Turns on the store: approvals across turns, a save killed before its checkpoint, histories as JSON.

The worker side of ``test_conversations`` with what the store adds: a turn stores its messages
through ``DjangoConversationStore`` exactly once, even when its worker is SIGKILLed after the commit
and before the step's checkpoint; a turn that ends on an approval leaves the requests on the
conversation, and the next turn answers them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth.models import User
from django.urls import reverse
from pydantic_ai.messages import ModelMessagesTypeAdapter, ToolCallPart, ToolReturnPart

from django_absurd_agents import DjangoConversationStore, absurd
from django_absurd_agents.client import encode_json
from django_absurd_agents.models import Conversation, Entry, Turn
from tests import chat_agents
from tests.conftest import database_url
from tests.test_conversation_store import ask, lock_waiters, say, wait_for
from tests.test_conversations import calls, chat, checkpoint_names, drive, finished, start_worker, task_state

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _clean(clean_queues: None) -> None:
    """Empty the queues after each test (turn tasks commit on the client's own connection)."""


@pytest.fixture
def call_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "calls.log"
    monkeypatch.setenv("CALL_LOG", str(path))
    return path


@pytest.fixture
def workers(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Chat worker processes (``tests.chat_worker``), stopped (or killed) after the test."""
    started: list[subprocess.Popen[bytes]] = []

    def start(**extra: str) -> subprocess.Popen[bytes]:
        started.append(start_worker(worker_env, tmp_path / "stop", **extra))
        return started[-1]

    yield start
    (tmp_path / "stop").touch()
    for process in started:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_a_turn_waiting_on_an_approval_stores_the_requests_and_the_next_turn_answers_them(call_log: Path) -> None:
    conversation = chat(agent="cashier")
    asked = conversation.send("Refund my order, please")
    drive(finished(asked))
    asked.refresh_from_db()
    assert asked.state == Turn.State.COMPLETED
    assert [call["tool_name"] for call in asked.output["approvals"]] == ["refund"]

    conversation.refresh_from_db()
    requests = conversation.pending_tool_requests()
    assert requests is not None and [call.tool_call_id for call in requests.approvals] == ["refund-1"]
    stored = async_to_sync(DjangoConversationStore().load)(conversation.key)
    assert stored is not None and stored.deferred_tool_requests == requests
    assert calls(call_log) == ["model:asks for a refund"]  # the tool waits for a person

    approved = conversation.send(deferred_tool_results=requests.build_results(approvals={"refund-1": True}))
    assert approved.prompt == "" and approved.deferred_tool_results == {
        "calls": {},
        "approvals": {"refund-1": True},
        "metadata": {},
        "answered_by": {},
    }
    drive(finished(approved))
    approved.refresh_from_db()
    assert approved.state == Turn.State.COMPLETED and approved.output == "Refund: 40 EUR refunded"
    assert calls(call_log) == ["model:asks for a refund", "refund:40"]
    conversation.refresh_from_db()
    assert conversation.pending_tool_requests() is None
    history = conversation.messages()
    assert [type(part) for message in history for part in message.parts if isinstance(part, ToolCallPart)] == [
        ToolCallPart
    ]
    (returned,) = [part for message in history for part in message.parts if isinstance(part, ToolReturnPart)]
    assert returned.content == "40 EUR refunded"
    assert [entry.turn_id for entry in Entry.objects.all()].count(approved.pk) == 2  # its request and the answer


def test_send_refuses_results_that_are_not_deferred_tool_results_and_a_conversation_without_agent() -> None:
    with pytest.raises(ValueError, match="DeferredToolResults"):
        chat(agent="cashier").send(deferred_tool_results={"approvals": {"x": True}})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="names no agent"):
        Conversation.objects.create().send("hello")


def test_a_conversation_saved_outside_its_turns_meanwhile_fails_the_turn_with_the_fix() -> None:
    """A save through the store between a turn's load and its save is a revision the turn did not load:
    the turn refuses to overwrite it, stores nothing, and says how to go on."""
    from django_absurd_agents import conversations

    conversation = chat()
    turn = conversation.send("hello")
    checkpointed = conversations._start(turn)  # what the step load_conversation records
    store = DjangoConversationStore()
    elsewhere = async_to_sync(store.load)(conversation.key)
    assert elsewhere is not None
    elsewhere.messages.append(ask("written by the web process"))
    async_to_sync(store.save)(elsewhere)

    async def answer() -> Any:
        continued = await conversations._continued(turn, checkpointed)
        result = await chat_agents.counter.run("hello", conversation=continued)
        return await conversations._store_answer(turn, result, {"output": "x", "usage": {}})

    with pytest.raises(conversations.StaleConversation, match=r"turn.retry\(\)"):
        async_to_sync(answer)()
    assert conversation.messages() == [ask("written by the web process")]
    assert Turn.objects.get(pk=turn.pk).state == Turn.State.RUNNING


def test_an_answer_is_stored_once_per_task() -> None:
    """The save step run again (its worker killed after the commit) finds its turn completed; a save that
    slips past that check (two workers on one task) is rolled back by the turn's guarded update."""
    from django_absurd_agents.conversations import _AlreadyStored, _store_answer, _TurnStore

    conversation = chat()
    turn = conversation.send("hi")
    store = DjangoConversationStore()

    async def answer() -> Any:
        loaded = await store.load(conversation.key)
        return await chat_agents.counter.run("hi", conversation=loaded)

    result = async_to_sync(answer)()
    values = {"output": "first", "usage": {}}
    assert async_to_sync(_store_answer)(turn, result, values) is True
    assert async_to_sync(_store_answer)(turn, result, {**values, "output": "second"}) is False
    again = async_to_sync(answer)()
    with pytest.raises(_AlreadyStored):
        async_to_sync(_TurnStore(turn, values).save)(again)
    turn.refresh_from_db()
    assert turn.output == "first" and turn.state == Turn.State.COMPLETED
    assert len(conversation.messages()) == 2
    assert [len(turn.model_messages())] == [2]
    assert Entry.objects.count() == 2


# --- a worker killed between the store's commit and the step's checkpoint ----------------------------


DOOMED = "absurd-agents-doomed-worker"
"""The application_name (libpq's PGAPPNAME) of the worker that is killed: only its sessions are ended."""


def backends(conn: psycopg.Connection[Any]) -> list[int]:
    """The server sessions of the doomed worker on the test database."""
    rows = conn.execute(
        "select pid from pg_stat_activity where datname = current_database() and application_name = %s", [DOOMED]
    ).fetchall()
    return [pid for (pid,) in rows]


@pytest.mark.slow
def test_a_worker_killed_after_storing_the_answer_and_before_the_checkpoint_stores_it_once(
    workers: Callable[..., subprocess.Popen[bytes]], call_log: Path
) -> None:
    """The store's write commits; the step's checkpoint cannot (its table is locked); SIGKILL. The next
    worker finds the turn completed by this task (the messages and the turn's state commit together),
    and appends nothing; a save step run twice is refused the same way (test_an_answer_is_stored_once...)."""
    conversation = chat()
    turn = conversation.send("remember me")
    with (
        psycopg.connect(database_url()) as row_lock,
        psycopg.connect(database_url()) as table_lock,
        psycopg.connect(database_url(), autocommit=True) as watcher,
    ):
        # 1. The worker will block in the store's UPDATE of the conversation, after the model answered.
        row_lock.execute("select 1 from absurd_agents_conversation where id = %s for update", [conversation.pk])
        worker = workers(CALL_LOG=str(call_log), PGAPPNAME=DOOMED)
        wait_for(lambda: lock_waiters(watcher) == 1, "the worker waiting to store the answer")
        assert Turn.objects.get(pk=turn.pk).state == Turn.State.RUNNING
        # 2. Its checkpoint write will block on the checkpoint table; let the store's write go.
        table_lock.execute(f"lock table absurd.c_{turn.queue} in exclusive mode")
        row_lock.commit()
        wait_for(
            lambda: Turn.objects.get(pk=turn.pk).state == Turn.State.COMPLETED and lock_waiters(watcher) == 1,
            "the answer committed and the checkpoint waiting",
        )
        # 3. SIGKILL, and end its server sessions too, so that the blocked checkpoint can never land.
        os.kill(worker.pid, signal.SIGKILL)
        assert worker.wait(timeout=60) == -signal.SIGKILL
        assert backends(watcher), "the worker's sessions carry its application_name"
        for pid in backends(watcher):
            watcher.execute("select pg_terminate_backend(%s)", [pid])
        wait_for(lambda: not backends(watcher), "the killed worker's sessions to end")
        table_lock.rollback()

    assert "save_turn" not in checkpoint_names(turn)
    assert [e.turn_id for e in Entry.objects.all()] == [turn.pk, turn.pk]
    workers(CALL_LOG=str(call_log))
    wait_for(lambda: task_state(turn) == "completed", "the turn's task to complete in the second worker")

    assert [message.parts[0].content for message in conversation.messages()] == ["remember me", "1: remember me"]
    assert Entry.objects.count() == 2
    assert [line for line in calls(call_log) if line.startswith("model:")] == ["model:remember me"]
    # The second worker found the turn answered by this very task and completed it as it was.
    assert "save_turn" not in checkpoint_names(turn)
    assert absurd.fetch_task_result_sync(turn.task_id).result == {  # type: ignore[union-attr]
        "turn_id": str(turn.pk),
        "state": "completed",
        "output": "1: remember me",
    }


# --- histories as JSON: a task's result, and message_history= --------------------------------------


def test_message_history_may_be_the_json_form_of_the_messages() -> None:
    first = async_to_sync(chat_agents.counter.run)("one")
    as_json = json.loads(first.all_messages_json())
    again = async_to_sync(chat_agents.counter.run)("two", message_history=as_json)
    assert again.output == "2: one | two"
    assert async_to_sync(chat_agents.counter.run)("two", message_history=first.all_messages_json()).output == (
        "2: one | two"
    )
    conversation = json.loads(encode_json(first.conversation, what="A conversation"))
    assert async_to_sync(chat_agents.counter.run)("two", conversation=conversation).output == "2: one | two"


def test_encode_json_writes_pydantic_ai_messages_in_their_adapter_form() -> None:
    result = async_to_sync(chat_agents.counter.run)("one")
    encoded = json.loads(encode_json(result.all_messages(), what="A task's result"))
    assert encoded == json.loads(result.all_messages_json())
    assert ModelMessagesTypeAdapter.validate_python(encoded) == result.all_messages()
    with pytest.raises(ValueError, match=r"NUL character .* of a ModelRequest"):
        encode_json([ask("a \x00 b")])


def test_a_task_passes_its_history_to_the_next_as_json() -> None:
    first = absurd.spawn_sync("chat_history", {"prompt": "one"})
    drive(lambda: task_state_of(first["task_id"]) == "completed")
    history = json.loads(async_to_sync(chat_agents.counter.run)("one").all_messages_json())
    second = absurd.spawn_sync("chat_history", {"prompt": "two", "history": history})
    drive(lambda: task_state_of(second["task_id"]) == "completed")
    assert absurd.fetch_task_result_sync(second["task_id"]).result == {"output": "2: one | two"}  # type: ignore[union-attr]


def test_a_task_may_return_all_messages() -> None:
    spawned = absurd.spawn_sync("chat_history", {"prompt": "one", "messages": True})
    drive(lambda: task_state_of(spawned["task_id"]) in ("completed", "failed"), timeout=60)
    result = absurd.fetch_task_result_sync(spawned["task_id"])
    assert result is not None and result.state == "completed"
    returned = async_to_sync(chat_agents.counter.run)("two", message_history=result.result)
    assert returned.output == "2: one | two"


def task_state_of(task_id: str) -> str | None:
    snapshot = absurd.fetch_task_result_sync(task_id)
    return snapshot.state if snapshot else None


# --- the admin ----------------------------------------------------------------------------------------


def test_the_admin_transcript_shows_what_turns_and_the_store_saved_in_log_order(client: Any) -> None:
    client.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))
    owner = User.objects.create_user("alice")
    conversation = chat(owner=owner)
    first = conversation.send("first")
    drive(finished(first))
    store = DjangoConversationStore()
    loaded = async_to_sync(store.load)(conversation.key)
    assert loaded is not None
    loaded.messages.extend([ask("saved by the web process"), say("without a turn")])
    async_to_sync(store.save)(loaded)
    pending = conversation.send("<i>pending</i>")
    page = client.get(reverse("admin:absurd_agents_conversation_change", args=[conversation.pk])).content.decode()
    order = ["first", "1: first", "Saved through the conversation store", "saved by the web process", "&lt;i&gt;"]
    positions = [page.index(text) for text in order]
    assert positions == sorted(positions), positions
    assert str(pending.task_id) in page and "Pending…" in page
    assert conversation.messages()[-2:] == [ask("saved by the web process"), say("without a turn")]
