"""``GET /agents/conversations/<id>/chat?turn=...`` follows the event log's one access rule (``event_access``).

The built-in rule lets the conversation's owner and a user who may view tasks follow a turn; a project's
``ABSURD_AGENTS["EVENTS_ACCESS"]`` replaces it here exactly as it does on ``GET /agents/tasks/<id>/events``.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test.utils import CaptureQueriesContext

from django_absurd_agents.models import AgentEvent, Conversation, Turn
from tests.test_event_views import answered, chunk_text, chunks, client_for, people, sync_body  # noqa: F401

pytestmark = pytest.mark.django_db(transaction=True)

ASKED: list[tuple[Any, str]] = []


def only_the_stranger(request: Any, task_id: str) -> bool:
    """A project's rule: the stranger may follow, nobody else (not even the owner)."""
    ASKED.append((request, task_id))
    return bool(request.user.is_authenticated and request.user.username == "stranger")


def chat_url(turn: Turn, turn_id: Any = None) -> str:
    return f"/agents/conversations/{turn.conversation_id}/chat?turn={turn_id or turn.pk}"


def test_the_built_in_rule_lets_the_owner_and_a_viewer_follow_a_turn(
    answered: Turn,  # noqa: F811
    people: dict[str, User],  # noqa: F811
) -> None:
    for who in ("owner", "viewer"):
        response = client_for(people[who]).get(chat_url(answered))
        assert response.status_code == 200, who
        assert chunk_text(chunks(sync_body(response))) == answered.output
    for user in (None, people["stranger"]):
        with CaptureQueriesContext(connection) as queries:
            assert client_for(user).get(chat_url(answered)).status_code == 403
        read = [query["sql"] for query in queries.captured_queries]
        assert not [sql for sql in read if AgentEvent._meta.db_table in sql or "absurd." in sql]


def test_a_custom_events_access_rule_is_honoured_on_a_turns_get(
    answered: Turn,  # noqa: F811
    people: dict[str, User],  # noqa: F811
    settings: Any,
) -> None:
    settings.ABSURD_AGENTS = {**settings.ABSURD_AGENTS, "EVENTS_ACCESS": "tests.test_chat_access.only_the_stranger"}
    ASKED.clear()
    response = client_for(people["stranger"]).get(chat_url(answered))
    assert response.status_code == 200
    assert chunk_text(chunks(sync_body(response))) == answered.output
    assert [task_id for _, task_id in ASKED] == [str(answered.task_id)]  # asked about the turn's task
    for who in ("owner", "viewer"):  # the built-in rule would let both in; the project's rule does not
        with CaptureQueriesContext(connection) as queries:
            assert client_for(people[who]).get(chat_url(answered)).status_code == 403, who
        read = [query["sql"] for query in queries.captured_queries]
        assert not [sql for sql in read if AgentEvent._meta.db_table in sql or "absurd." in sql]


def test_whether_a_turn_exists_is_told_only_to_the_owner(
    answered: Turn,  # noqa: F811
    people: dict[str, User],  # noqa: F811
) -> None:
    missing = uuid.uuid4()
    assert client_for(people["owner"]).get(chat_url(answered, missing)).status_code == 404
    for who in ("viewer", "stranger"):
        assert client_for(people[who]).get(chat_url(answered, missing)).status_code == 403, who


def test_resuming_the_unfinished_turn_needs_the_owner_and_the_rule(
    people: dict[str, User],  # noqa: F811
    settings: Any,
) -> None:
    conversation = Conversation.objects.create(agent="narrator", owner=people["owner"])
    conversation.send("Tell me a story.")  # no worker: the turn stays pending
    resume = f"/agents/conversations/{conversation.pk}/chat"
    assert client_for(people["viewer"]).get(resume).status_code == 403  # not the owner's conversation
    settings.ABSURD_AGENTS = {**settings.ABSURD_AGENTS, "EVENTS_ACCESS": lambda request, task_id: False}
    assert client_for(people["owner"]).get(resume).status_code == 403  # the owner, but the project's rule says no
    assert client_for(people["stranger"]).get(resume).status_code == 403
