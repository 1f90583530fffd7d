"""The AG-UI endpoint of a conversation: ``/agents/conversations/<id>/agui``, with real worker processes.

A ``RunAgentInput`` is posted through ``AsyncClient`` (the way an ASGI server serves the view), a
``absurd_worker`` process answers the turn with the narrator (``tests/event_tasks.py``: a tool call,
then a story a word at a time), and the test reads the AG-UI events as they arrive, each one checked
against ``ag-ui-protocol``'s own event models.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import pytest
from ag_ui.core import Event
from django.contrib.auth.models import User
from django.db import connection, transaction
from django.test import AsyncClient
from django.test.utils import CaptureQueriesContext
from pydantic import TypeAdapter

from django_absurd_agents import absurd
from django_absurd_agents.models import AgentEvent, Conversation, Turn
from tests import event_tasks
from tests.test_event_log import gates, start_worker, worker_env  # noqa: F401
from tests.test_event_views import answered, client_for, people, sync_body  # noqa: F401
from tests.test_worker import WorkerProcess

pytestmark = pytest.mark.django_db(transaction=True)

AG_UI_EVENT: TypeAdapter[Any] = TypeAdapter(Event)
ROOT = Path(__file__).resolve().parent.parent


def run_input(*messages: tuple[str, Any]) -> dict[str, Any]:
    """A ``RunAgentInput`` as an AG-UI client posts it (camelCase, the whole message list)."""
    return {
        "threadId": "thread-1",
        "runId": f"run-{uuid.uuid4()}",
        "state": {},
        "messages": [{"id": f"m{n}", "role": role, "content": content} for n, (role, content) in enumerate(messages)],
        "tools": [],
        "context": [],
        "forwardedProps": {},
    }


def agui_url(conversation: Any) -> str:
    return f"/agents/conversations/{conversation.pk}/agui"


def parse_events(body: str) -> list[dict[str, Any]]:
    """The AG-UI events of an SSE body (``data: <json>`` each), validated by ag-ui-protocol's models."""
    events = []
    for block in body.split("\n\n"):
        if block.strip():
            assert block.startswith("data: "), block
            event = json.loads(block.removeprefix("data: "))
            AG_UI_EVENT.validate_python(event)
            events.append(event)
    return events


class StreamReader:
    """Reads a streaming response's AG-UI events as they arrive, so the test can act mid-answer."""

    def __init__(self, response: Any) -> None:
        self.response = response
        self.events: list[dict[str, Any]] = []

    async def run(self) -> None:
        buffer = ""
        async for chunk in self.response.streaming_content:
            buffer += chunk.decode()
            complete, _, buffer = buffer.rpartition("\n\n")
            self.events.extend(parse_events(complete))
        assert not buffer.strip(), buffer

    def text(self) -> str:
        return text_of(self.events)


def text_of(events: list[dict[str, Any]], void: Collection[str] = ()) -> str:
    return "".join(e["delta"] for e in events if e["type"] == "TEXT_MESSAGE_CONTENT" and e["messageId"] not in void)


async def until(check: Callable[[], Any], what: str, timeout: float = 60.0) -> None:
    """Poll ``check`` on the event loop (the stream keeps being read meanwhile) until it holds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def owner_client(user: User) -> AsyncClient:
    client = AsyncClient()
    await client.aforce_login(user)
    return client


async def test_a_run_input_becomes_a_turn_streamed_live_as_ag_ui_events(
    people: dict[str, User],  # noqa: F811
    start_worker: Callable[..., WorkerProcess],  # noqa: F811
) -> None:
    conversation = await Conversation.objects.acreate(agent="narrator", owner=people["owner"])
    client = await owner_client(people["owner"])
    posted = run_input(("user", "Hello"), ("assistant", "Hi! What shall I tell?"), ("user", "Tell me a story."))
    response = await client.post(agui_url(conversation), posted, content_type="application/json")
    assert response.status_code == 200, response.content
    assert response["Content-Type"] == "text/event-stream" and response.is_async
    turn = await Turn.objects.aget(pk=response["X-Absurd-Turn-Id"])
    assert turn.prompt == "Tell me a story." and str(turn.task_id) == response["X-Absurd-Task-Id"]

    reader = StreamReader(response)
    reading = asyncio.create_task(reader.run())
    start_worker(STORY_WORD_DELAY="0.05")
    await until(lambda: reader.text(), "the first words of the answer")
    await turn.arefresh_from_db()
    assert turn.state != "completed"  # live: words arrive while the worker is still writing
    await asyncio.wait_for(reading, 90)
    await turn.arefresh_from_db()
    assert turn.state == "completed", turn.error

    events = reader.events
    types = [e["type"] for e in events]
    assert types[0] == "RUN_STARTED" and types[-1] == "RUN_FINISHED"
    for marker in (events[0], events[-1]):
        assert (marker["threadId"], marker["runId"]) == (posted["threadId"], posted["runId"])
    for expected in ("TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END", "TOOL_CALL_RESULT", "TEXT_MESSAGE_START"):
        assert expected in types, (expected, types)
    [call] = [e for e in events if e["type"] == "TOOL_CALL_START"]
    assert call["toolCallName"] == "chapter"
    last_end = len(types) - 1 - types[::-1].index("TEXT_MESSAGE_END")
    assert types.index("TOOL_CALL_RESULT") < types.index("TEXT_MESSAGE_CONTENT") < last_end
    assert types.count("TEXT_MESSAGE_CONTENT") > 10  # a word at a time, not the answer in one piece
    assert reader.text() == turn.output
    assert "CUSTOM" not in types and "RUN_ERROR" not in types

    # GET replays a turn from its start (a page reloaded mid-answer); nothing unfinished: 204.
    replay = await client.get(f"{agui_url(conversation)}?turn={turn.pk}")
    replayed = parse_events(b"".join([chunk async for chunk in replay.streaming_content]).decode())
    assert replayed[0]["type"] == "RUN_STARTED" and replayed[0]["runId"] == str(turn.pk)
    assert text_of(replayed) == turn.output and replayed[-1]["type"] == "RUN_FINISHED"
    assert (await client.get(agui_url(conversation))).status_code == 204
    await absurd.close()


@pytest.mark.slow
async def test_a_worker_killed_mid_answer_voids_its_message_and_the_new_attempt_follows(
    people: dict[str, User],  # noqa: F811
    start_worker: Callable[..., WorkerProcess],  # noqa: F811
) -> None:
    conversation = await Conversation.objects.acreate(agent="narrator", owner=people["owner"])
    client = await owner_client(people["owner"])
    response = await client.post(
        agui_url(conversation), run_input(("user", "Tell me a story.")), content_type="application/json"
    )
    assert response.status_code == 200, response.content
    turn = await Turn.objects.aget(pk=response["X-Absurd-Turn-Id"])
    reader = StreamReader(response)
    reading = asyncio.create_task(reader.run())

    first = start_worker(EVENT_CRASH="stall")  # the answer hangs after a few words, until the kill
    await until(lambda: len(reader.text().split()) >= event_tasks.STALL_AFTER, "the first words of the answer")
    first.process.send_signal(signal.SIGKILL)
    first.wait()
    partial = reader.text()
    start_worker()
    await asyncio.wait_for(reading, 90)
    await turn.arefresh_from_db()
    assert turn.state == "completed", turn.error
    assert partial.startswith("take1 ") and turn.output.startswith("take2 ")

    events = reader.events
    types = [e["type"] for e in events]
    [marker] = [e for e in events if e["type"] == "CUSTOM"]
    assert marker["name"] == "absurd-attempt"
    value = marker["value"]
    assert value["attempt"] == 2 and isinstance(value["discardAfter"], int)
    void = set(value["voidMessageIds"])
    at = events.index(marker)
    # The dead attempt's message was ended before the marker, and it is the one the marker voids.
    assert events[at - 1]["type"] == "TEXT_MESSAGE_END" and events[at - 1]["messageId"] in void
    assert text_of(events[:at]).startswith(partial)
    assert text_of(events[:at], void) == ""  # every word before the marker was the dead attempt's
    assert text_of(events, void) == turn.output  # what a client keeps is exactly the stored answer
    assert not void & {e.get("messageId") for e in events[at:]}  # the new attempt writes to new messages
    # The tool call completed in attempt 1: it was streamed once, and is not voided.
    assert types.count("TOOL_CALL_START") == 1 and types.count("TOOL_CALL_RESULT") == 1
    [call] = [e for e in events if e["type"] == "TOOL_CALL_START"]
    assert call["parentMessageId"] not in void
    assert types[0] == "RUN_STARTED" and types[-1] == "RUN_FINISHED"
    await absurd.close()


async def test_a_stranger_gets_403_and_nothing_is_created_or_read(people: dict[str, User]) -> None:  # noqa: F811
    conversation = await Conversation.objects.acreate(agent="narrator", owner=people["owner"])
    client = await owner_client(people["stranger"])
    url = agui_url(conversation)
    assert (await client.post(url, run_input(("user", "hi")), content_type="application/json")).status_code == 403
    assert (await client.get(url)).status_code == 403
    anonymous = AsyncClient()
    assert (await anonymous.post(url, run_input(("user", "hi")), content_type="application/json")).status_code == 403
    assert not await Turn.objects.filter(conversation=conversation).aexists()


def test_a_turn_is_followed_under_the_event_logs_rule_and_under_wsgi_too(
    answered: Turn,  # noqa: F811
    people: dict[str, User],  # noqa: F811
    settings: Any,
) -> None:
    url = f"/agents/conversations/{answered.conversation_id}/agui?turn={answered.pk}"
    for who in ("owner", "viewer"):  # the sync client serves the view as runserver does
        response = client_for(people[who]).get(url)
        assert response.status_code == 200, who
        events = parse_events(sync_body(response))
        assert events[0]["threadId"] == str(answered.conversation_id) and events[0]["runId"] == str(answered.pk)
        assert text_of(events) == answered.output and events[-1]["type"] == "RUN_FINISHED"
    assert client_for(people["stranger"]).get(url).status_code == 403
    assert client_for(people["viewer"]).get(f"{url[: url.index('?')]}?turn={uuid.uuid4()}").status_code == 403
    assert client_for(people["owner"]).get(f"{url[: url.index('?')]}?turn={uuid.uuid4()}").status_code == 404
    settings.ABSURD_AGENTS = {**settings.ABSURD_AGENTS, "EVENTS_ACCESS": lambda request, task_id: False}
    assert client_for(people["owner"]).get(url).status_code == 403  # the project's rule says no, even to the owner


def test_a_stranger_is_refused_before_the_event_log_or_absurd_is_queried(people: dict[str, User]) -> None:  # noqa: F811
    conversation = Conversation.objects.create(agent="narrator", owner=people["owner"])
    for user in (None, people["stranger"], people["viewer"]):  # a viewer of tasks may not post either
        client = client_for(user)
        with CaptureQueriesContext(connection) as queries:
            response = client.post(agui_url(conversation), run_input(("user", "hi")), content_type="application/json")
        assert response.status_code == 403
        read = [query["sql"] for query in queries.captured_queries]
        assert not [sql for sql in read if AgentEvent._meta.db_table in sql or "absurd." in sql or "INSERT" in sql]
        assert read or user is None, "the test must see the view's queries (the user's, the conversation's)"
    assert not Turn.objects.filter(conversation=conversation).exists()


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ("this is not json", "Not an AG-UI RunAgentInput."),
        ({"messages": [{"role": "user", "content": "hi"}]}, "Not an AG-UI RunAgentInput."),
        (run_input(("user", "   ")), "The last user message has no text."),
        (run_input(), "The input has no user message: send the user's new message in messages."),
        (run_input(("user", "hi"), ("assistant", "hello")), "send the user's new message last"),
    ],
)
def test_bad_input_is_a_400_naming_the_fix_before_any_query(
    people: dict[str, User],  # noqa: F811
    body: Any,
    says: str,
) -> None:
    conversation = Conversation.objects.create(agent="narrator", owner=people["owner"])
    client = client_for(people["owner"])
    with transaction.atomic():  # the caller's transaction: still usable after the refusal
        with CaptureQueriesContext(connection) as queries:
            response = client.post(agui_url(conversation), body, content_type="application/json")
        assert response.status_code == 400
        assert says in response.json()["error"]
        assert queries.captured_queries == []
        assert User.objects.filter(username="owner").exists()
    assert not Turn.objects.filter(conversation=conversation).exists()


def test_the_last_user_message_may_be_made_of_text_parts(people: dict[str, User]) -> None:  # noqa: F811
    conversation = Conversation.objects.create(agent="narrator", owner=people["owner"])
    parts = [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a story."}]
    body = run_input(("system", "Be brief."), ("user", parts), ("developer", "Context the client adds."))
    # No worker, and the stream is not read: the turn stays pending.
    response = client_for(people["owner"]).post(agui_url(conversation), body, content_type="application/json")
    assert response.status_code == 200
    assert Turn.objects.get(conversation=conversation).prompt == "Tell me a story."


@pytest.fixture
def ag_ui_missing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process as if ag-ui-protocol were not installed; every module as it was afterwards."""
    import pydantic_ai.ui.ag_ui  # noqa: F401  (imported now, so that it is put back as it was)

    blocked = ("ag_ui", "ag_ui.")
    using_it = ("pydantic_ai.ui.ag_ui", "django_absurd_agents.agui_")
    before = set(sys.modules)
    for name in ["ag_ui", *[name for name in before if name.startswith(blocked)]]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules: the import fails, as when not installed
    for name in [name for name in before if name.startswith(using_it)]:
        monkeypatch.delitem(sys.modules, name)
    yield
    for name in set(sys.modules) - before:  # what a failed import left half-made
        if name.startswith(using_it):
            del sys.modules[name]


def test_without_ag_ui_protocol_the_endpoint_is_a_501_naming_the_extra(
    people: dict[str, User],  # noqa: F811
    ag_ui_missing: None,
) -> None:
    conversation = Conversation.objects.create(agent="narrator", owner=people["owner"])
    client = client_for(people["owner"])
    for response in (
        client.post(agui_url(conversation), run_input(("user", "hi")), content_type="application/json"),
        client.get(agui_url(conversation)),
    ):
        assert response.status_code == 501
        assert 'pip install "django-absurd-agents[ag-ui]"' in response.content.decode()
    assert not Turn.objects.filter(conversation=conversation).exists()


def test_the_urls_load_without_ag_ui_protocol() -> None:
    """A project without the extra still mounts the app's URLs: the AG-UI view imports it on use."""
    code = (
        "import sys; sys.modules['ag_ui'] = None\n"
        "import django; django.setup()\n"
        "from django.urls import reverse\n"
        "print(reverse('absurd_agents:conversation_agui', args=['01900000-0000-7000-8000-0000000000aa']))\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "/agents/conversations/01900000-0000-7000-8000-0000000000aa/agui"


def _part(kind: str, text: str) -> dict[str, Any]:
    return {"index": 0, "part": {"content": text, "part_kind": "text"}, "event_kind": kind}


def _delta(text: str) -> dict[str, Any]:
    return {"index": 0, "delta": {"content_delta": text, "part_delta_kind": "text"}, "event_kind": "part_delta"}


async def _log(task_id: str, rows: list[tuple[int, str, dict[str, Any]]]) -> list[int]:
    """Writes the rows (attempt, kind, payload) to the task's log; returns their offsets."""
    offsets = []
    for attempt, kind, payload in rows:
        offsets.append(
            (await AgentEvent.objects.acreate(task_id=task_id, attempt=attempt, kind=kind, payload=payload)).offset
        )
    return offsets


async def _encoded(task_id: str) -> list[dict[str, Any]]:
    from django_absurd_agents.agui_events import TurnEventStream
    from django_absurd_agents.turn_stream import native_events

    encoder = TurnEventStream(None)
    return parse_events(
        "".join([encoder.encode_event(e) async for e in encoder.transform_stream(native_events(task_id, None, None))])
    )


async def test_a_late_event_of_a_superseded_attempt_is_left_out_and_a_cancelled_turn_ends_in_run_error(
    project_absurd: Any,
) -> None:
    task_id = (await project_absurd.spawn("event_story", {}))["task_id"]
    [once, _] = await _log(
        task_id, [(1, "part_start", _part("part_start", "Once")), (1, "part_delta", _delta(" upon"))]
    )
    await _log(
        task_id,
        [
            (2, "attempt", {"attempt": 2, "discard_after": once - 1}),
            (2, "part_start", _part("part_start", "Twice")),
            (1, "part_delta", _delta(" zombie")),  # attempt 1's worker had not noticed it lost its lease
            (2, "part_delta", _delta(" more")),
            (2, "part_end", _part("part_end", "Twice more")),
        ],
    )
    await project_absurd.cancel_task(task_id)

    events = await _encoded(task_id)
    [marker] = [e for e in events if e["type"] == "CUSTOM"]
    void = set(marker["value"]["voidMessageIds"])
    assert marker["value"]["attempt"] == 2 and marker["value"]["discardAfter"] == once - 1
    assert text_of(events) == "Once uponTwice more" and text_of(events, void) == "Twice more"
    assert events[-1]["type"] == "RUN_ERROR" and "cancelled" in events[-1]["message"]
    assert "RUN_FINISHED" not in [e["type"] for e in events]


async def test_a_worker_lost_between_steps_voids_nothing(project_absurd: Any) -> None:
    task_id = (await project_absurd.spawn("event_story", {}))["task_id"]
    offsets = await _log(
        task_id, [(1, "part_start", _part("part_start", "Chapter")), (1, "part_end", _part("part_end", "Chapter"))]
    )
    await _log(
        task_id,
        [
            (2, "attempt", {"attempt": 2, "discard_after": offsets[-1]}),  # the step completed: nothing to void
            (2, "part_start", _part("part_start", " one")),
            (2, "part_end", _part("part_end", " one")),
        ],
    )
    await project_absurd.cancel_task(task_id)

    events = await _encoded(task_id)
    [marker] = [e for e in events if e["type"] == "CUSTOM"]
    assert marker["value"]["voidMessageIds"] == []
    assert text_of(events) == "Chapter one"
    at = events.index(marker)
    assert events[at - 1]["type"] == "TEXT_MESSAGE_END"  # the completed part's own end, nothing synthesised
    assert [e["type"] for e in events].count("TEXT_MESSAGE_END") == 2
