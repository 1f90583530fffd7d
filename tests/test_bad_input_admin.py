"""Bad input to the Absurd admin never answers 500: odd queue names in the catalog, impossible dates,
NUL in the text filters, and event payloads PostgreSQL cannot store (issue 12, items 8, 9 and 10).

Each test drives the real admin through Django's test client as a superuser, on the real database;
the client re-raises any exception a view lets escape, so a 500 fails the test with its traceback.
"""

from __future__ import annotations

import html
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.http import HttpResponse
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone
from django.utils.http import urlencode

from django_absurd_agents import absurd

UNSTORABLE_PAYLOADS: list[tuple[str, str]] = [
    # (payload text, what the error must say)
    ('{"x": NaN}', "NaN is not a JSON number"),
    ("Infinity", "Infinity is not a JSON number"),
    ("[1, -Infinity]", "-Infinity is not a JSON number"),
    ('{"big": [1e400]}', "The number inf at $.big[0]: JSON has no NaN or Infinity"),
    ("[" * 3000 + "]" * 3000, "nested more than 200 levels deep"),
    ("[" * 201 + "]" * 201, "Nesting deeper than 200 levels"),
    ('{"note": "a\\u0000b"}', "A NUL character (\\u0000) at position 1 of the string at $.note"),
    ('{"a\\u0000": 1}', "A NUL character (\\u0000) at position 1 of the key"),
    ('"\\ud800"', "unpaired surrogate (\\ud800)"),
    ('{"k": ["ok", "\\udfff"]}', "An unpaired surrogate (\\udfff) at position 0 of the string at $.k[1]"),
]
"""JSON text (or nearly) that parses in Python but that PostgreSQL's jsonb refuses or that breaks the encoder."""


def url(name: str, **kwargs: Any) -> str:
    return reverse(f"admin:absurd_agents_absurdtask_{name}", kwargs=kwargs or None)


def text(response: HttpResponse) -> str:
    return html.unescape(response.content.decode())


@pytest.fixture
def client(db: Any) -> Client:
    user = User.objects.create_superuser("root", password="pw")
    client = Client(raise_request_exception=True)
    client.force_login(user)
    return client


def create_queue(name: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute("select absurd.create_queue(%s)", [name])


def spawn_in(queue: str, task_name: str, params: str = "{}") -> str:
    """A task in any catalogued queue, spawned with Absurd's SQL (the client accepts only plain names)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "select task_id::text as task_id from absurd.spawn_task(%s, %s, %s::jsonb, '{}'::jsonb)",
            [queue, task_name, params],
        )
        return str(cursor.fetchone()[0])


def event_rows(name: str, queue: str = "agents") -> int:
    with connection.cursor() as cursor:
        cursor.execute(f"select count(*) from absurd.e_{queue} where event_name = %s", [name])
        return int(cursor.fetchone()[0])


# --- item 8: queue names with % ---------------------------------------------------------------------


@pytest.mark.parametrize("odd", ["50%off", "p%s", "%%", 'we%sird"q', "a/b%s"])
def test_a_queue_with_percent_in_its_name_is_listed_filtered_and_shown(client: Client, odd: str) -> None:
    create_queue(odd)
    task_id = spawn_in(odd, "pct_task", '{"needle": "haystack"}')
    plain = absurd.spawn_sync("plain_task", {"n": 1})["task_id"]

    page = client.get(url("changelist"))
    assert page.status_code == 200
    assert task_id in text(page) and str(plain) in text(page)
    assert "?" + urlencode({"queue": odd}) in page.content.decode()  # a filter link for the queue

    for query in ({"queue": odd}, {"queue": odd, "task_name": "pct_task"}, {"q": "haystack"}, {"state": "pending"}):
        page = client.get(url("changelist"), query)
        assert page.status_code == 200, query
        assert task_id in text(page), query
    assert str(plain) not in text(client.get(url("changelist"), {"queue": odd}))

    detail = client.get(url("detail", queue=odd, task_id=task_id))
    assert detail.status_code == 200 and "haystack" in text(detail)
    overview = client.get(url("overview"))
    assert overview.status_code == 200 and odd in text(overview)
    assert client.get(url("emit")).status_code == 200


@pytest.mark.parametrize("ghost", ["ghost%s", "ghost%", "ghost"])
def test_a_catalogued_queue_without_tables_is_left_out_with_a_message(client: Client, ghost: str) -> None:
    """A row in absurd.queues whose tables do not exist (inserted by hand, or by a tool that failed)."""
    with connection.cursor() as cursor:
        cursor.execute("insert into absurd.queues (queue_name) values (%s)", [ghost])
    task_id = absurd.spawn_sync("plain_task", {"n": 1})["task_id"]

    for query in ({}, {"queue": ghost}, {"task_name": "plain_task"}, {"q": "1"}):
        page = client.get(url("changelist"), query)
        assert page.status_code == 200, query
        body = text(page)
        assert f"Queue '{ghost}' is listed in absurd.queues but its tables are missing" in body
        assert f"absurd.create_queue('{ghost}')" in body
    assert str(task_id) in text(client.get(url("changelist")))

    overview = client.get(url("overview"))
    assert overview.status_code == 200 and "its tables are missing" in text(overview)
    emit = client.get(url("emit"))
    assert emit.status_code == 200
    assert f'value="{ghost}"' not in emit.content.decode()  # not offered as a queue to emit on


# --- item 9: impossible dates, NUL in text filters ----------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("created_since", "2024-02-30"),
        ("created_since", "2024-13-01"),
        ("created_until", "2024-01-01T25:00"),
        ("created_until", "2024-01-01 23:61"),
        ("created_since", "0000-01-01"),
        ("created_since", "2024-01-01T10:00:00+25:00"),
        ("created_since", "yesterday"),
    ],
)
def test_a_date_that_does_not_exist_is_ignored_with_a_message(client: Client, key: str, value: str) -> None:
    task_id = absurd.spawn_sync("plain_task", {"n": 1})["task_id"]
    page = client.get(url("changelist"), {key: value})
    assert page.status_code == 200
    body = text(page)
    assert f"The {key} filter {value!r} is not a date" in body
    assert "write YYYY-MM-DD or YYYY-MM-DD HH:MM. It is ignored." in body
    assert str(task_id) in body  # ignored: the list is not narrowed by it


def test_the_last_day_there_is_means_no_upper_bound(client: Client) -> None:
    """``created_until=9999-12-31`` is a real date; the midnight after it is past Python's calendar."""
    task_id = absurd.spawn_sync("plain_task", {"n": 1})["task_id"]
    page = client.get(url("changelist"), {"created_since": "0001-01-01", "created_until": "9999-12-31"})
    assert page.status_code == 200
    assert str(task_id) in text(page) and "is not a date" not in text(page)


def test_created_until_a_date_includes_that_day(client: Client) -> None:
    """The form's date inputs say "created on or before": a date means up to the midnight after it."""
    task_id = absurd.spawn_sync("plain_task", {"n": 1})["task_id"]
    today = timezone.localdate().isoformat()
    assert str(task_id) in text(client.get(url("changelist"), {"created_until": today}))
    assert str(task_id) in text(client.get(url("changelist"), {"created_since": today, "created_until": today}))


@pytest.mark.parametrize("key", ["q", "task_name"])
def test_nul_in_a_text_filter_matches_nothing_without_reaching_sql(client: Client, key: str) -> None:
    task_id = absurd.spawn_sync("plain_task", {"n": "a"})["task_id"]
    label = "search" if key == "q" else "task name"
    with CaptureQueriesContext(connection) as seen:
        page = client.get(url("changelist"), {key: "plain\x00task"})
    assert page.status_code == 200
    body = text(page)
    assert f"The {label} filter contains a NUL character (\\u0000), which no task can hold" in body
    assert f"Remove it from the {label}." in body
    assert str(task_id) not in body
    assert not [q for q in seen.captured_queries if "\x00" in q["sql"]]


# --- item 10: the emit form ----------------------------------------------------------------------------


@pytest.mark.parametrize(("payload", "fix"), UNSTORABLE_PAYLOADS)
def test_the_emit_form_refuses_json_postgres_cannot_store(client: Client, payload: str, fix: str) -> None:
    response = client.post(url("emit"), {"queue": "agents", "event_name": "bad-payload", "payload": payload})
    assert response.status_code == 200  # the form again, with the error
    body = text(response)
    assert "This JSON cannot be stored: " in body and fix in body
    assert event_rows("bad-payload") == 0


def test_the_emit_form_still_emits_storable_json(client: Client) -> None:
    payload = '{"ok": true, "nested": [[[1.5, "text \\u00e9 \\ud83d\\ude00"]]]}'
    response = client.post(url("emit"), {"queue": "agents", "event_name": "good-payload", "payload": payload})
    assert response.status_code == 302
    assert event_rows("good-payload") == 1


def test_the_emit_form_refuses_nul_in_the_event_name(client: Client) -> None:
    response = client.post(url("emit"), {"queue": "agents", "event_name": "evt\x00", "payload": "{}"})
    assert response.status_code == 200
    assert "Null characters are not allowed." in text(response)
