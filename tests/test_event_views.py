"""The HTTP side of the event log: Server-Sent Events of a task, and the ``useChat`` endpoint of a conversation.

Both views are async. Django's sync test ``Client`` serves them the way WSGI ``runserver`` does (a
sync iterator in an event loop of its own), ``AsyncClient`` the way an ASGI server does.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterable
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth.models import Permission, User
from django.db import connection
from django.test import AsyncClient, Client
from django.test.utils import CaptureQueriesContext

from django_absurd_agents import absurd, tables
from django_absurd_agents.event_stream import assemble, events_sync
from django_absurd_agents.models import AgentEvent, Conversation, Turn
from django_absurd_agents.sse import sse_lines
from tests import event_tasks  # noqa: F401  (registers event_story and the narrator chat agent)
from tests.test_admin import run_worker
from tests.test_event_log import streamed_text

pytestmark = pytest.mark.django_db(transaction=True)


def parse_sse(text: str) -> list[dict[str, str]]:
    """SSE messages as dicts of their fields; comments as {"comment": ...}."""
    messages = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            fields[name or "comment"] = value.removeprefix(" ")
        messages.append(fields)
    return messages


def sync_body(response: Any) -> str:
    return b"".join(response.streaming_content).decode()


async def async_body(response: Any) -> str:
    return "".join([chunk.decode() async for chunk in response.streaming_content])


@pytest.fixture
def people(clean_queues: None) -> dict[str, User]:
    viewer = User.objects.create_user("viewer")
    viewer.user_permissions.add(Permission.objects.get(codename="view_absurdtask"))
    return {
        "owner": User.objects.create_user("owner"),
        "stranger": User.objects.create_user("stranger"),
        "viewer": viewer,
    }


@pytest.fixture
def answered(people: dict[str, User]) -> Turn:
    """A conversation of ``owner`` with one turn, answered by the narrator (the event log on)."""
    conversation = Conversation.objects.create(agent="narrator", owner=people["owner"])
    turn = conversation.send("Tell me a story.")
    run_worker(batches=1)
    turn.refresh_from_db()
    assert turn.state == "completed", turn.error
    return turn


def client_for(user: User | None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


def events_url(task_id: Any) -> str:
    return f"/agents/tasks/{task_id}/events"


def test_the_owner_and_a_viewer_read_the_events_as_sse(answered: Turn, people: dict[str, User]) -> None:
    logged = events_sync(answered.task_id)
    for who in ("owner", "viewer"):
        response = client_for(people[who]).get(events_url(answered.task_id))
        assert response.status_code == 200 and response["Content-Type"] == "text/event-stream"
        assert response["Cache-Control"] == "no-cache"
        messages = parse_sse(sync_body(response))
        assert messages[0] == {"retry": "1000"}
        events = messages[1:]
        assert [m["event"] for m in events] == [e.kind for e in logged]
        assert [m.get("id") for m in events[:-1]] == [str(e.offset) for e in logged[:-1]]
        assert "id" not in events[-1] and json.loads(events[-1]["data"]) == {"state": "completed"}
        assert [json.loads(m["data"]) for m in events] == [e.data for e in logged]
    assert {"function_tool_call", "function_tool_result", "part_delta", "final_result", "agent_run_result"} <= {
        e.kind for e in logged
    }


def test_last_event_id_and_after_resume_after_that_offset(answered: Turn, people: dict[str, User]) -> None:
    logged = events_sync(answered.task_id)[:-1]
    middle = logged[len(logged) // 2].offset
    client = client_for(people["owner"])
    for response in (
        client.get(events_url(answered.task_id), headers={"Last-Event-ID": str(middle)}),
        client.get(events_url(answered.task_id) + f"?after={middle}"),
        client.get(events_url(answered.task_id) + "?after=0", headers={"Last-Event-ID": str(middle)}),
    ):
        ids = [int(m["id"]) for m in parse_sse(sync_body(response)) if "id" in m]
        assert ids == [e.offset for e in logged if e.offset > middle]
    assert client.get(events_url(answered.task_id), headers={"Last-Event-ID": "12abc"}).status_code == 400
    assert client.get(events_url(answered.task_id) + "?after=-3").status_code == 400


def test_a_stranger_gets_403_before_the_task_or_its_log_is_read(answered: Turn, people: dict[str, User]) -> None:
    for user in (None, people["stranger"]):
        with CaptureQueriesContext(connection) as queries:
            response = client_for(user).get(events_url(answered.task_id))
        assert response.status_code == 403
        read = [q["sql"] for q in queries]
        assert not [sql for sql in read if AgentEvent._meta.db_table in sql or '"absurd".' in sql or "absurd." in sql]


def test_one_request_locates_the_task_once_under_wsgi_and_asgi(
    answered: Turn, people: dict[str, User], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The view locates the task (for its 404) and hands the queue to the stream, which does not look again."""
    real = tables.locate
    located: list[uuid.UUID] = []

    async def counted(conn: Any, task_id: uuid.UUID, queue: str | None) -> tuple[str, str] | None:
        located.append(task_id)
        return await real(conn, task_id, queue)

    monkeypatch.setattr(tables, "locate", counted)
    response = client_for(people["owner"]).get(events_url(answered.task_id))
    assert parse_sse(sync_body(response))[-1]["event"] == "end"
    assert located == [uuid.UUID(str(answered.task_id))]

    async def over_asgi() -> str:
        client = AsyncClient()
        await client.aforce_login(people["owner"])
        try:
            return await async_body(await client.get(events_url(answered.task_id)))
        finally:
            await absurd.close()

    located.clear()
    assert parse_sse(async_to_sync(over_asgi)())[-1]["event"] == "end"
    assert located == [uuid.UUID(str(answered.task_id))]


def test_an_unknown_task_is_404_for_someone_who_may_view_tasks(people: dict[str, User]) -> None:
    response = client_for(people["viewer"]).get(events_url("01900000-0000-7000-8000-0000000000aa"))
    assert response.status_code == 404


def allow_everyone(request: Any, task_id: str) -> bool:
    return True


def test_a_setting_replaces_the_access_rule(answered: Turn, people: dict[str, User], settings: Any) -> None:
    settings.ABSURD_AGENTS = {**settings.ABSURD_AGENTS, "EVENTS_ACCESS": "tests.test_event_views.allow_everyone"}
    assert client_for(None).get(events_url(answered.task_id)).status_code == 200
    settings.ABSURD_AGENTS = {**settings.ABSURD_AGENTS, "EVENTS_ACCESS": lambda request, task_id: False}
    assert client_for(people["viewer"]).get(events_url(answered.task_id)).status_code == 403


async def test_under_asgi_the_stream_is_an_async_iterator(answered: Turn, people: dict[str, User]) -> None:
    client = AsyncClient()
    await client.aforce_login(people["owner"])
    response = await client.get(events_url(answered.task_id), headers={"Last-Event-ID": "1"})
    assert response.status_code == 200 and response.is_async
    messages = parse_sse(await async_body(response))
    assert messages[-1]["event"] == "end"
    await absurd.close()


async def test_an_idle_stream_sends_keepalive_comments(project_absurd: Any) -> None:
    task_id = (await project_absurd.spawn("event_story", {}))["task_id"]  # no worker: nothing happens
    lines = sse_lines(task_id, None, keepalive=0.3)
    assert await anext(lines) == "retry: 1000\n\n"
    assert await asyncio.wait_for(anext(lines), 10) == ": keep-alive\n\n"
    await lines.aclose()


# --- the useChat endpoint ------------------------------------------------------------------------------


def use_chat_body(text: str) -> dict[str, Any]:
    return {
        "trigger": "submit-message",
        "id": "chat-1",
        "messages": [{"id": "m1", "role": "user", "parts": [{"type": "text", "text": text}]}],
    }


def chunks(body: str) -> list[Any]:
    data = [m["data"] for m in parse_sse(body) if "data" in m]
    assert data[-1] == "[DONE]"
    return [json.loads(item) for item in data[:-1]]


def chunk_text(items: Iterable[dict[str, Any]]) -> str:
    return "".join(item["delta"] for item in items if item["type"] == "text-delta")


async def test_use_chat_posts_a_turn_and_streams_it_as_the_worker_answers(people: dict[str, User]) -> None:
    conversation = await Conversation.objects.acreate(agent="narrator", owner=people["owner"])
    client = AsyncClient()
    await client.aforce_login(people["owner"])
    url = f"/agents/conversations/{conversation.pk}/chat"
    response = await client.post(url, use_chat_body("Tell me a story."), content_type="application/json")
    assert response.status_code == 200, response.content
    assert response["x-vercel-ai-ui-message-stream"] == "v1"
    turn = await Turn.objects.aget(pk=response["X-Absurd-Turn-Id"])
    assert turn.prompt == "Tell me a story." and str(turn.task_id) == response["X-Absurd-Task-Id"]

    worker = asyncio.create_task(_work_until_done(str(turn.task_id)))
    items = chunks(await async_body(response))
    await worker
    await turn.arefresh_from_db()
    assert turn.state == "completed"
    types = [item["type"] for item in items]
    assert types[0] == "start" and items[0]["messageId"] == str(turn.pk)
    for expected in ("tool-input-available", "tool-output-available", "text-start", "text-delta", "text-end", "finish"):
        assert expected in types, (expected, types)
    assert chunk_text(items) == turn.output

    # GET with the turn replays it (the AI SDK's resumeStream); without one, nothing is in flight: 204.
    replay = await client.get(f"/agents/conversations/{conversation.pk}/chat?turn={turn.pk}")
    assert chunk_text(chunks(await async_body(replay))) == turn.output
    assert (await client.get(f"/agents/conversations/{conversation.pk}/chat")).status_code == 204
    await absurd.close()


async def _work_until_done(task_id: str) -> None:
    while (await absurd.fetch_task_result(task_id)).state not in ("completed", "failed", "cancelled"):
        await absurd.work_batch(worker_id="chat-test", claim_timeout=10)


async def test_use_chat_is_403_for_a_stranger_and_creates_nothing(people: dict[str, User]) -> None:
    conversation = await Conversation.objects.acreate(agent="narrator", owner=people["owner"])
    client = AsyncClient()
    await client.aforce_login(people["stranger"])
    url = f"/agents/conversations/{conversation.pk}/chat"
    response = await client.post(url, use_chat_body("hi"), content_type="application/json")
    assert response.status_code == 403
    assert (await client.get(url)).status_code == 403
    assert not await Turn.objects.filter(conversation=conversation).aexists()


def test_use_chat_refuses_a_body_that_is_not_a_use_chat_request(people: dict[str, User]) -> None:
    conversation = Conversation.objects.create(agent="narrator", owner=people["owner"])
    client = client_for(people["owner"])
    url = f"/agents/conversations/{conversation.pk}/chat"
    assert client.post(url, {"messages": "nope"}, content_type="application/json").status_code == 400
    assert client.post(url, use_chat_body("  "), content_type="application/json").status_code == 400
    assert not Turn.objects.filter(conversation=conversation).exists()


def test_the_assembled_log_of_a_turn_is_its_stored_answer(answered: Turn) -> None:
    assert streamed_text(assemble(events_sync(answered.task_id))) == answered.output


async def test_use_chat_closes_what_a_dead_attempt_left_and_says_so(project_absurd: Any) -> None:
    """A log where attempt 1 died mid-answer: its open text part is closed, then a data-absurd-attempt part."""
    from pydantic_ai.ui.vercel_ai import VercelAIEventStream

    from django_absurd_agents.turn_stream import native_events

    task_id = (await project_absurd.spawn("event_story", {}))["task_id"]
    rows = [
        (1, "part_start", {"index": 0, "part": {"content": "Once", "part_kind": "text"}, "event_kind": "part_start"}),
        (1, "part_delta", _text_delta(" upon")),
    ]
    for attempt, kind, payload in rows:
        await AgentEvent.objects.acreate(task_id=task_id, attempt=attempt, kind=kind, payload=payload)
    first = await AgentEvent.objects.filter(task_id=task_id).order_by("offset").afirst()
    assert first is not None
    await AgentEvent.objects.acreate(
        task_id=task_id, attempt=2, kind="attempt", payload={"attempt": 2, "discard_after": first.offset - 1}
    )
    for kind, payload in [
        ("part_start", {"index": 0, "part": {"content": "Twice", "part_kind": "text"}, "event_kind": "part_start"}),
        ("part_delta", _text_delta(" more")),
        ("part_end", {"index": 0, "part": {"content": "Twice more", "part_kind": "text"}, "event_kind": "part_end"}),
    ]:
        await AgentEvent.objects.acreate(task_id=task_id, attempt=2, kind=kind, payload=payload)
    await project_absurd.cancel_task(task_id)

    encoder = VercelAIEventStream(None)
    chunks_out = encoder.transform_stream(native_events(task_id, None, None))
    items = chunks("".join([encoder.encode_event(chunk) async for chunk in chunks_out]))
    types = [item["type"] for item in items]
    attempt_at = types.index("data-absurd-attempt")
    assert items[attempt_at]["data"] == {"attempt": 2, "discardAfter": first.offset - 1}
    assert types[attempt_at - 1] == "text-end"  # the dead attempt's text is closed before the marker
    assert chunk_text(items[:attempt_at]) == "Once upon" and chunk_text(items[attempt_at:]) == "Twice more"
    assert "error" in types  # the turn's task was cancelled: the stream says so


def _text_delta(text: str) -> dict[str, Any]:
    return {"index": 0, "delta": {"content_delta": text, "part_delta_kind": "text"}, "event_kind": "part_delta"}
