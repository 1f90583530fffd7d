"""Migration 0005 on a database holding conversations of the schema before it (0004).

A database of its own, migrated with Django's ``MigrationExecutor`` to 0004, filled through the
historical models the way the old code wrote turns, then migrated forward: every message must be in
the store, in order, linked to its turn, readable by ``DjangoConversationStore``; and back again.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from asgiref.sync import async_to_sync
from django.db import connection, connections
from django.db.migrations.executor import MigrationExecutor
from django.db.utils import load_backend
from psycopg import sql
from pydantic_ai.messages import ModelMessage, ModelMessagesTypeAdapter, ModelRequest, ModelResponse
from pydantic_ai.usage import RunUsage

from django_absurd_agents import DjangoConversationStore
from django_absurd_agents.conversation_entries import entry_chain
from tests.conftest import database_url
from tests.test_conversation_store import ask, rich_turn, say

pytestmark = pytest.mark.django_db(transaction=True)

ALIAS = "before_0005"
BEFORE = [("absurd_agents", "0004_absurd_overview")]
AFTER = [("absurd_agents", "0005_conversation_store")]


def admin_url() -> str:
    return psycopg.conninfo.make_conninfo(database_url(), dbname="postgres")


@pytest.fixture
def old_database(transactional_db: Any) -> Iterator[str]:
    """A scratch database behind the alias ``before_0005``, dropped afterwards.

    Its connection is registered for this thread only, not in settings: Django's test case refuses
    connections to configured aliases a test did not declare, and this one did not exist at setup.
    """
    name = f"absurd_agents_upgrade_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url(), autocommit=True) as admin:
        admin.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    settings_dict = {**connection.settings_dict, "NAME": name}
    wrapper = load_backend(settings_dict["ENGINE"]).DatabaseWrapper(settings_dict, alias=ALIAS)
    connections[ALIAS] = wrapper
    try:
        yield ALIAS
    finally:
        wrapper.close()
        del connections[ALIAS]
        with psycopg.connect(admin_url(), autocommit=True) as admin:
            admin.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def migrate(alias: str, targets: list[tuple[str, str]]) -> Any:
    """Migrate ``alias`` to ``targets``; the historical models there."""
    executor = MigrationExecutor(connections[alias])
    executor.migrate(targets)
    executor.loader.build_graph()
    return executor.loader.project_state(targets).apps


def as_json(messages: list[ModelMessage]) -> Any:
    return ModelMessagesTypeAdapter.dump_python(messages, mode="json")


def test_conversations_of_the_old_schema_move_into_the_store_and_back(old_database: str) -> None:
    apps = migrate(old_database, BEFORE)
    User = apps.get_model("auth", "User")
    OldConversation = apps.get_model("absurd_agents", "Conversation")
    OldTurn = apps.get_model("absurd_agents", "Turn")
    db = OldConversation.objects.using(old_database)
    turns = OldTurn.objects.using(old_database)
    alice = User.objects.using(old_database).create(username="alice")

    chat = db.create(agent="counter", owner=alice, title="Trip")
    answered = [[ask("first"), say("one")], rich_turn(), [ask("third"), say("three")]]
    usage = [RunUsage(requests=1, input_tokens=10, output_tokens=2), RunUsage(requests=2, details={"reasoning": 5})]
    rows = [
        turns.create(conversation=chat, sequence=1, prompt="first", state="completed", queue="agents",
                     task_id=uuid.uuid4(), new_messages=as_json(answered[0]), output="one",
                     usage={"requests": 1, "input_tokens": 10, "output_tokens": 2}),
        turns.create(conversation=chat, sequence=2, prompt="boom", state="failed", queue="agents",
                     task_id=uuid.uuid4(), error="RuntimeError: no"),
        turns.create(conversation=chat, sequence=3, prompt="Read this", state="completed", queue="agents",
                     task_id=uuid.uuid4(), new_messages=as_json(answered[1]), output="It has two pages.",
                     usage={"requests": 2, "details": {"reasoning": 5}}),
        turns.create(conversation=chat, sequence=4, prompt="third", state="completed", queue="agents",
                     task_id=uuid.uuid4(), new_messages=as_json(answered[2]), output="three"),
        turns.create(conversation=chat, sequence=5, prompt="pending", state="pending", queue="agents",
                     task_id=uuid.uuid4()),
    ]  # fmt: skip
    # A turn holding messages without being completed (only ever by hand) keeps them as a branch.
    edited = db.create(agent="counter")
    stray = turns.create(
        conversation=edited, sequence=1, prompt="odd", state="running", queue="agents", task_id=uuid.uuid4(),
        new_messages=as_json([ask("odd"), say("half")]),
    )  # fmt: skip
    empty = db.create(agent="counter", title="nothing yet")

    apps = migrate(old_database, AFTER)
    Conversation = apps.get_model("absurd_agents", "Conversation")
    Turn = apps.get_model("absurd_agents", "Turn")
    migrated = Conversation.objects.using(old_database).get(pk=chat.pk)
    assert migrated.key == str(chat.pk) and migrated.owner_id == alice.pk and migrated.title == "Trip"
    assert migrated.usage == {"requests": 3, "input_tokens": 10, "output_tokens": 2, "details": {"reasoning": 5}}
    assert len({row.revision for row in Conversation.objects.using(old_database).all()}) == 3
    assert not hasattr(Turn(), "new_messages")

    store = DjangoConversationStore(using=old_database)
    loaded = async_to_sync(store.load)(str(chat.pk), scope=str(alice.pk))
    assert loaded is not None
    assert loaded.messages == [message for turn in answered for message in turn]
    assert loaded.usage == usage[0] + usage[1]
    chain = entry_chain(migrated.head_id, using=old_database)
    by_turn = [row.turn_id for row in chain]
    assert by_turn == [rows[0].pk] * 2 + [rows[2].pk] * 4 + [rows[3].pk] * 2
    assert Turn.objects.using(old_database).get(pk=rows[1].pk).state == "failed"

    odd = Conversation.objects.using(old_database).get(pk=edited.pk)
    assert odd.head_id is None and len(odd.branches) == 1
    kept = entry_chain(odd.branches[0], using=old_database)
    assert [row.turn_id for row in kept] == [stray.pk, stray.pk]
    assert async_to_sync(store.load)(str(empty.pk)).messages == []  # type: ignore[union-attr]

    # The migrated conversation goes on like any other.
    loaded.messages.extend([ask("after the upgrade"), say("fine")])
    async_to_sync(store.save)(loaded)

    apps = migrate(old_database, BEFORE)  # and back: each turn gets its messages again
    back = {turn.pk: turn.new_messages for turn in apps.get_model("absurd_agents", "Turn").objects.using(old_database)}
    assert back[rows[0].pk] == as_json(answered[0])
    assert back[rows[2].pk] == as_json(answered[1])
    assert back[rows[3].pk] == as_json(answered[2])
    assert back[rows[1].pk] is None and back[rows[4].pk] is None
    assert back[stray.pk] == as_json([ask("odd"), say("half")])
    assert isinstance(ModelMessagesTypeAdapter.validate_python(back[rows[2].pk])[0], ModelRequest)
    assert not isinstance(ModelMessagesTypeAdapter.validate_python(back[rows[2].pk])[1], ModelRequest)
    assert isinstance(ModelMessagesTypeAdapter.validate_python(back[rows[2].pk])[1], ModelResponse)
