"""DjangoConversationStore: the same behaviour as pydantic-ai's InMemoryConversationStore, on Postgres.

The contract test runs one scenario (every public method, limits, scopes, conflicts, branches, forks,
deletes) against both stores and compares what each observed, with generated ids and revisions
replaced by the order they were first seen in. The rest is what only a database store has to get
right: two processes saving at once, the caller's transaction, owners, and deletes that keep what a
fork still shares.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth.models import User
from django.db import connection, transaction
from pydantic import TypeAdapter
from pydantic_ai.conversation import Conversation as Chat
from pydantic_ai.conversation_store import (
    ConversationConflict,
    ConversationEntry,
    ConversationRecord,
    ConversationStore,
    InMemoryConversationStore,
)
from pydantic_ai.exceptions import UserError
from pydantic_ai.messages import (
    BinaryContent,
    ModelMessage,
    ModelMessagesTypeAdapter,
    ModelRequest,
    ModelResponse,
    TextPart,
    ThinkingPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.tools import DeferredToolRequests
from pydantic_ai.usage import RunUsage

from django_absurd_agents import DjangoConversationStore
from django_absurd_agents.models import Conversation, Entry
from tests.conftest import database_url

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent
T = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
PDF = b"\x00\xffPDF"
USAGE: TypeAdapter[RunUsage] = TypeAdapter(RunUsage)
DEFERRED: TypeAdapter[DeferredToolRequests] = TypeAdapter(DeferredToolRequests)


def ask(text: str) -> ModelRequest:
    return ModelRequest(parts=[UserPromptPart(text, timestamp=T)], timestamp=T)


def say(text: str) -> ModelResponse:
    return ModelResponse(parts=[TextPart(text)], timestamp=T)


def rich_turn() -> list[ModelMessage]:
    """Messages whose JSON form is not trivial: bytes, a tool call with its result, thinking."""
    return [
        ModelRequest(
            parts=[
                UserPromptPart(["Read this", BinaryContent(b"\x00\xffPDF", media_type="application/pdf")], timestamp=T)
            ],
            timestamp=T,
        ),
        ModelResponse(
            parts=[ThinkingPart("The user wants a summary."), ToolCallPart("lookup", {"q": "pdf"}, tool_call_id="c1")],
            timestamp=T,
        ),
        ModelRequest(parts=[ToolReturnPart("lookup", {"pages": [1, 2]}, tool_call_id="c1", timestamp=T)], timestamp=T),
        say("It has two pages."),
    ]


class Names:
    """Generated ids and revisions, replaced by the order each was first seen in (the same for both stores)."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], str] = {}

    def __call__(self, kind: str, value: str | None) -> str | None:
        if value is None:
            return None
        if (kind, value) not in self.seen:
            self.seen[(kind, value)] = f"{kind}{sum(1 for seen_kind, _ in self.seen if seen_kind == kind) + 1}"
        return self.seen[(kind, value)]


def dump(messages: list[ModelMessage]) -> Any:
    return ModelMessagesTypeAdapter.dump_python(messages, mode="json")


def shape_chat(n: Names, chat: Chat | None) -> Any:
    if chat is None:
        return None
    return {
        "id": n("c", chat.conversation_id),
        "messages": dump(chat.messages),
        "usage": USAGE.dump_python(chat.usage, mode="json"),
        "deferred": None if chat.deferred_tool_requests is None else DEFERRED.dump_python(chat.deferred_tool_requests),
        "revision": n("r", chat.revision),
        "new_message_index": chat.new_message_index,
    }


def shape_entries(n: Names, entries: list[ConversationEntry] | None) -> Any:
    if entries is None:
        return None
    return [
        {"id": n("e", e.id), "parent": n("e", e.parent_id), "kind": e.kind, "message": dump([e.message])[0]}
        for e in entries
    ]


def shape_records(n: Names, records: list[ConversationRecord]) -> Any:
    return [
        {
            "id": n("c", r.conversation_id),
            "head": n("e", r.head_id),
            "usage": USAGE.dump_python(r.usage, mode="json"),
            "deferred": None if r.deferred_tool_requests is None else DEFERRED.dump_python(r.deferred_tool_requests),
            "scope": r.scope,
            "forked_from": n("c", r.forked_from),
            "forked_at": n("e", r.forked_at),
            "branches": [n("e", branch) for branch in r.branches],
            "revision": n("r", r.revision),
            "format_version": r.format_version,
        }
        for r in records
    ]


async def scenario(store: ConversationStore, alice: str, bob: str, stored: Callable[[], Awaitable[int]]) -> list[Any]:
    """Every public method of a store, in one story; what the store answered at each step."""
    n, out = Names(), []

    def see(label: str, value: Any) -> None:
        out.append((label, value))

    async def attempt(label: str, call: Callable[[], Awaitable[Any]], shape: Callable[[Any], Any]) -> Any:
        try:
            value = await call()
        except (UserError, ConversationConflict) as exc:
            see(label, ("raised", type(exc).__name__))
            return None
        see(label, shape(value))
        return value

    as_chat = lambda value: shape_chat(n, value)  # noqa: E731
    see("load missing", as_chat(await store.load("chat-1")))
    see("entries missing", await store.load_entries("chat-1"))

    chat = Chat(conversation_id="chat-1", messages=[ask("hello"), say("hi")], usage=RunUsage(requests=1))
    see("first save", shape_entries(n, await store.save(chat, scope=alice)))
    see("revision advanced", (n("r", chat.revision), chat.new_message_index))
    chat.messages.extend(rich_turn())
    chat.usage = RunUsage(requests=3, input_tokens=40, output_tokens=12, tool_calls=1, details={"reasoning": 7})
    see("second save", shape_entries(n, await store.save(chat)))
    see("nothing new", shape_entries(n, await store.save(chat)))

    loaded = await store.load("chat-1")
    see("load", as_chat(loaded))
    for limit in (0, 1, 3, 99):
        see(f"load limit {limit}", as_chat(await store.load("chat-1", limit=limit)))
    await attempt("load limit -1", lambda: store.load("chat-1", limit=-1), as_chat)
    see("load as alice", as_chat(await store.load("chat-1", scope=alice)))
    see("load as bob", as_chat(await store.load("chat-1", scope=bob)))
    see("entries as alice", shape_entries(n, await store.load_entries("chat-1", scope=alice)))
    see("entries limit 2", shape_entries(n, await store.load_entries("chat-1", limit=2)))
    see("entries as bob", await store.load_entries("chat-1", scope=bob))

    stale = await store.load("chat-1")
    assert loaded is not None and stale is not None
    loaded.messages.extend(
        [ask("refund me"), ModelResponse(parts=[ToolCallPart("refund", {"eur": 5}, "r1")], timestamp=T)]
    )
    loaded.deferred_tool_requests = DeferredToolRequests(
        approvals=[ToolCallPart("refund", {"eur": 5}, "r1")], metadata={"r1": {"why": "over the limit"}}
    )
    see("save with deferred requests", shape_entries(n, await store.save(loaded)))
    see("deferred round trip", as_chat(await store.load("chat-1")))
    stale.messages.append(ask("lost"))
    await attempt("save stale copy", lambda: store.save(stale), lambda v: shape_entries(n, v))
    fresh = Chat(conversation_id="chat-1", messages=[ask("me too")])
    await attempt("save new over stored", lambda: store.save(fresh), lambda v: shape_entries(n, v))
    await attempt("save under other scope", lambda: store.save(loaded, scope=bob), lambda v: shape_entries(n, v))

    # A history rewritten (compared with the stored one, not loaded) leaves the old one as a branch.
    rewritten = Chat(conversation_id="chat-1", messages=[ask("hello"), say("hi"), ask("summarise")])
    rewritten.revision = loaded.revision
    see("rewrite", shape_entries(n, await store.save(rewritten)))
    (record,) = await store.list_conversations(scope=alice)
    see("record after rewrite", shape_records(n, [record]))

    current = await store.load("chat-1")
    assert current is not None
    back = await store.branch("chat-1", from_entry=record.branches[0], expected_revision=current.revision)
    see("branch back", as_chat(back))
    back.messages.append(ask("on the old branch"))
    see("save on branch", shape_entries(n, await store.save(back)))
    await attempt(
        "branch with stale revision",
        lambda: store.branch("chat-1", at=1, expected_revision=current.revision),
        as_chat,
    )
    latest = await store.load("chat-1")
    assert latest is not None
    for label, kwargs in {
        "branch at 99": {"at": 99},
        "branch from unknown entry": {"from_entry": "nope"},
        "branch without a point": {},
        "branch at and from": {"at": 1, "from_entry": record.branches[0]},
    }.items():
        await attempt(label, lambda kw=kwargs: store.branch("chat-1", expected_revision=latest.revision, **kw), as_chat)
    await attempt("branch missing", lambda: store.branch("nope", at=0, expected_revision=None), as_chat)
    branched = await store.branch("chat-1", at=2, expected_revision=latest.revision)
    see("branch at 2", as_chat(branched))
    first_entry = (await store.load_entries("chat-1"))[0].id  # type: ignore[index]

    see("fork at 1", as_chat(await store.fork("chat-1", at=1, new_conversation_id="fork-1")))
    to_bob = await store.fork("chat-1", from_entry=record.branches[0], scope=bob)
    see("fork a branch to bob", as_chat(to_bob))
    to_bob.messages.append(ask("bob's turn"))
    see("save fork", shape_entries(n, await store.save(to_bob)))
    await attempt("fork onto a taken id", lambda: store.fork("chat-1", new_conversation_id="fork-1"), as_chat)
    await attempt("fork from other scope", lambda: store.fork("chat-1", source_scope=bob), as_chat)
    fork_of_fork = await store.fork(to_bob.conversation_id, from_entry=first_entry, new_conversation_id="fork-3")
    see("fork of a fork", as_chat(fork_of_fork))

    empty = Chat(conversation_id="empty")
    see("save empty", shape_entries(n, await store.save(empty, scope=alice)))
    see("load empty", as_chat(await store.load("empty")))

    see("list", shape_records(n, list(await store.list_conversations())))
    see("list alice", shape_records(n, list(await store.list_conversations(scope=alice))))
    see("list bob", shape_records(n, list(await store.list_conversations(scope=bob, limit=1))))
    see("list 2", shape_records(n, list(await store.list_conversations(limit=2))))
    see("list 0", shape_records(n, list(await store.list_conversations(limit=0))))
    await attempt("list -1", lambda: store.list_conversations(limit=-1), lambda v: v)

    see("entries before deletes", await stored())
    await store.delete("chat-1", scope=bob)
    see("delete under other scope", (await store.load("chat-1")) is not None)
    await store.delete("chat-1")
    see("deleted", await store.load("chat-1"))
    see("forks keep what they share", [as_chat(await store.load(cid)) for cid in ("fork-1", to_bob.conversation_id)])
    see("entries after delete", await stored())
    await store.delete("nope")

    again = Chat(conversation_id="chat-1", messages=[ask("again")])
    see("create again", shape_entries(n, await store.save(again, scope=alice)))
    await attempt("save a copy from before the delete", lambda: store.save(latest), lambda v: shape_entries(n, v))
    for remaining in await store.list_conversations():
        await store.delete(remaining.conversation_id)
    see("all gone", (await store.list_conversations(), await stored()))
    return out


async def test_the_store_behaves_like_pydantic_ais_in_memory_store() -> None:
    alice, bob = [str((await User.objects.acreate(username=name)).pk) for name in ("alice", "bob")]
    memory = InMemoryConversationStore()
    django_store = DjangoConversationStore()

    async def in_memory() -> int:
        return len(memory._entries)

    async def in_postgres() -> int:
        return await Entry.objects.acount()

    expected = await scenario(memory, alice, bob, in_memory)
    observed = await scenario(django_store, alice, bob, in_postgres)
    assert [label for label, _ in observed] == [label for label, _ in expected]
    for (label, want), (_, got) in zip(expected, observed, strict=True):
        assert got == want, label
    assert len(expected) == 55


async def test_entries_keep_their_ids_and_messages_round_trip_exactly() -> None:
    store = DjangoConversationStore()
    chat = Chat(conversation_id="ids", messages=[ask("hi"), *rich_turn()])
    saved = await store.save(chat)
    loaded = await store.load_entries("ids")
    assert loaded is not None
    assert [entry.id for entry in loaded] == [entry.id for entry in saved]
    assert [entry.message for entry in loaded] == chat.messages
    assert await store.read_entry(saved[2].id) == saved[2]
    row = await Entry.objects.aget(pk=saved[2].id)
    assert str(row.parent_id) == saved[1].id
    with pytest.raises(KeyError):
        await store.read_entry("not-a-uuid")


def test_sync_code_saves_inside_its_own_transaction() -> None:
    """From a sync view, async_to_sync(store.save) writes on the view's connection: a rollback undoes it."""
    store = DjangoConversationStore()
    with pytest.raises(RuntimeError), transaction.atomic():
        async_to_sync(store.save)(Chat(conversation_id="rolled-back", messages=[ask("hi")]))
        assert Conversation.objects.filter(key="rolled-back").exists()
        raise RuntimeError("the view failed")
    assert not Conversation.objects.filter(key="rolled-back").exists()
    assert not Entry.objects.exists()
    async_to_sync(store.save)(Chat(conversation_id="kept", messages=[ask("hi")]))
    assert async_to_sync(store.load)("kept").messages == [ask("hi")]  # type: ignore[union-attr]


def test_scope_is_the_owner_and_django_conversations_are_in_the_store() -> None:
    alice = User.objects.create_user("alice")
    store = DjangoConversationStore(agent="counter")
    async_to_sync(store.save)(Chat(conversation_id="chat", messages=[ask("hi")]), scope=str(alice.pk))
    row = Conversation.objects.get(key="chat")
    assert row.owner == alice and row.agent == "counter"
    assert list(Conversation.objects.for_user(alice)) == [row]

    made_here = Conversation.objects.create(agent="counter", owner=alice, title="from a view")
    assert made_here.key == str(made_here.pk)
    listed = async_to_sync(store.list_conversations)(scope=str(alice.pk))
    assert {record.conversation_id for record in listed} == {"chat", made_here.key}
    empty = async_to_sync(store.load)(made_here.key, scope=str(alice.pk))
    assert empty is not None and empty.messages == [] and empty.revision == made_here.revision
    empty.messages.append(ask("first"))
    async_to_sync(store.save)(empty)
    assert made_here.messages() == [ask("first")]

    assert async_to_sync(store.load)("chat", scope="not-a-user-id") is None
    assert async_to_sync(store.list_conversations)(scope="0" + str(alice.pk)) == []
    with pytest.raises(UserError, match="not a user id"):
        async_to_sync(store.save)(Chat(conversation_id="x", messages=[ask("hi")]), scope="someone")
    with pytest.raises(UserError, match="names no user"):
        async_to_sync(store.save)(Chat(conversation_id="x", messages=[ask("hi")]), scope="987654")
    assert not Conversation.objects.filter(key="x").exists()


def test_a_conversation_saved_by_a_form_keeps_what_the_store_wrote_meanwhile() -> None:
    """An admin form loaded before a worker stored a turn must not write the old head and revision back."""
    store = DjangoConversationStore()
    edited = Conversation.objects.create(agent="counter")
    chat = async_to_sync(store.load)(edited.key)
    assert chat is not None
    chat.messages.append(ask("stored meanwhile"))
    async_to_sync(store.save)(chat)
    edited.title = "Renamed"
    edited.save()
    fresh = Conversation.objects.get(pk=edited.pk)
    assert fresh.title == "Renamed" and fresh.revision == chat.revision
    assert fresh.messages() == [ask("stored meanwhile")]


def test_unstorable_text_is_refused_before_anything_is_written() -> None:
    store = DjangoConversationStore()
    with pytest.raises(ValueError, match=r"NUL character .* cannot|cannot be stored: a NUL"):
        async_to_sync(store.save)(Chat(conversation_id="nul", messages=[ask("pdf text \x00 here")]))
    assert not Conversation.objects.filter(key="nul").exists() and not Entry.objects.exists()


def test_deleting_the_django_way_removes_entries_nothing_else_reaches() -> None:
    alice, bob = User.objects.create_user("alice"), User.objects.create_user("bob")
    store = DjangoConversationStore()
    source = Chat(conversation_id="source", messages=[ask("a"), say("b"), ask("c"), say("d")])
    async_to_sync(store.save)(source, scope=str(alice.pk))
    fork = async_to_sync(store.fork)("source", at=2, new_conversation_id="fork", scope=str(bob.pk))
    fork.messages.append(ask("fork's own"))
    async_to_sync(store.save)(fork)
    assert Entry.objects.count() == 5

    Conversation.objects.for_user(alice).delete()  # a queryset delete, as the admin does
    assert Entry.objects.count() == 3  # the fork's history: two shared entries and its own
    assert async_to_sync(store.load)("fork").messages == [ask("a"), say("b"), ask("fork's own")]  # type: ignore[union-attr]
    Conversation.objects.get(key="fork").delete()
    assert not Entry.objects.exists()

    async_to_sync(store.save)(Chat(conversation_id="owned", messages=[ask("x")]), scope=str(alice.pk))
    alice.delete()  # the owner goes: their conversations and their messages too
    assert not Conversation.objects.exists() and not Entry.objects.exists()


# --- two processes saving one conversation at once ----------------------------------------------------


def lock_waiters(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "select count(*) from pg_stat_activity where datname = current_database() and wait_event_type = 'Lock'"
    ).fetchone()
    return int(row[0]) if row else 0


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    """Poll a condition of the database (not a sleep standing in for one), failing after ``timeout``."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.02)


@pytest.mark.slow
def test_two_processes_saving_at_once_one_wins_the_other_conflicts(worker_env: dict[str, str]) -> None:
    store = DjangoConversationStore()
    async_to_sync(store.save)(Chat(conversation_id="contested", messages=[ask("base"), say("ok")]))
    with psycopg.connect(database_url()) as locker:
        # Hold the conversation's row so that both writers load, then block inside their save.
        locker.execute("select 1 from absurd_agents_conversation where key = 'contested' for update")
        writers = [
            subprocess.Popen(
                [sys.executable, "-m", "tests.store_writer", "contested", name],
                cwd=ROOT,
                env=worker_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for name in ("first", "second")
        ]
        with psycopg.connect(database_url(), autocommit=True) as watcher:
            wait_for(lambda: lock_waiters(watcher) == 2, "two writers waiting on the conversation's row")
        locker.commit()
    outcomes = []
    for writer in writers:
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
        outcomes.append(out.strip())
    assert sorted(outcomes) == ["conflict", "saved"]
    winner = ["first", "second"][outcomes.index("saved")]
    history = Conversation.objects.get(key="contested").messages()
    assert history == [ask("base"), say("ok"), ask(winner), say(winner)]
    assert Entry.objects.count() == 4  # nothing of the loser was written
    with connection.cursor() as cursor:
        cursor.execute("select count(*) from absurd_agents_entry where parent_id is null")
        assert cursor.fetchone() == (1,)
