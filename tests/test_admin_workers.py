"""The worker list in the admin: read-only rows with their status, and the task page's link to its worker."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from django_absurd_agents import absurd
from django_absurd_agents.models import Worker
from tests.test_admin import client_for, make_user, task_url

WORKER_LIST = "admin:absurd_agents_worker_changelist"


def worker(worker_id: str, missed: float = 0.0, **fields: Any) -> Worker:
    """A worker row whose last heartbeat was ``missed`` heartbeats (of 5 s) ago."""
    now = timezone.now()
    values = {
        "host": "box-1",
        "pid": 4242,
        "queues": ["agents", "reports"],
        "concurrency": 4,
        "version": "0.1.0",
        "heartbeat_interval": 5.0,
        "started": now - datetime.timedelta(hours=1),
        "last_heartbeat": now - datetime.timedelta(seconds=5 * missed),
        "tasks_in_flight": 2,
        "tasks_done": 17,
        "last_error": "",
    }
    values.update(fields)
    return Worker.objects.create(worker_id=worker_id, **values)


def change_url(worker_id: str) -> str:
    return reverse("admin:absurd_agents_worker_change", args=[worker_id])


@pytest.fixture
def watcher(db: Any) -> User:
    return make_user("watcher", "view_worker", "view_absurdtask")


@pytest.mark.django_db
def test_worker_list_needs_its_view_permission_before_any_query(watcher: User) -> None:
    worker("w-secret-host", host="secret-host")
    for user in [make_user("nobody"), make_user("tasks-only", "view_absurdtask")]:
        client = client_for(user)
        with CaptureQueriesContext(connection) as queries:
            response = client.get(reverse(WORKER_LIST))
        assert response.status_code == 403
        assert b"secret-host" not in response.content
        assert not any("absurd_agents_worker" in query["sql"] for query in queries.captured_queries)
        assert client.get(change_url("w-secret-host")).status_code == 403
    assert client_for(None).get(reverse(WORKER_LIST)).status_code == 302  # to the login page


@pytest.mark.django_db
def test_worker_list_shows_every_column_and_status(watcher: User) -> None:
    worker("w-alive", last_error="")
    worker("w-silent", missed=5, host="box-2")
    worker("w-gone", missed=50, last_error="ConnectionError: the database went away")
    response = client_for(watcher).get(reverse(WORKER_LIST))
    assert response.status_code == 200
    text = response.content.decode()
    for expected in [
        "w-alive",
        "w-silent",
        "w-gone",
        "box-1",
        "box-2",
        "4242",
        "agents, reports",
        "0.1.0",
        "alive, ",
        "silent, ",
        "gone, ",
        "ConnectionError: the database went away",
        ">17<",
    ]:
        assert expected in text, expected
    assert "addlink" not in text
    assert 'name="action"' not in text  # no delete action: nothing to select


@pytest.mark.django_db
def test_worker_page_is_read_only(watcher: User) -> None:
    worker("w-1", last_error="boom")
    client = client_for(watcher)
    response = client.get(change_url("w-1"))
    assert response.status_code == 200
    assert b"alive" in response.content and b"boom" in response.content
    assert b'name="host"' not in response.content  # no input: read-only
    assert client.post(change_url("w-1"), {"host": "elsewhere"}).status_code == 403
    assert client.post(reverse("admin:absurd_agents_worker_delete", args=["w-1"]), {"post": "yes"}).status_code == 403
    assert client.get(reverse("admin:absurd_agents_worker_add")).status_code == 403
    assert Worker.objects.get(pk="w-1").host == "box-1"


def claimed_task(worker_id: str) -> str:
    task_id = absurd.spawn_sync("analyse", {"prompt": "who holds me?"})["task_id"]
    with connection.cursor() as cursor:
        cursor.execute("select task_id from absurd.claim_task('agents', %s, 60, 1)", [worker_id])
        assert str(cursor.fetchone()[0]) == task_id
    return task_id


@pytest.mark.django_db
def test_task_page_links_the_worker_that_holds_it(watcher: User) -> None:
    task_id = claimed_task("w-holder")
    page = task_url("agents", task_id)
    text = client_for(watcher).get(page).content.decode()
    assert "w-holder" in text and change_url("w-holder") not in text  # no row yet: the id, no link

    worker("w-holder", missed=50)
    text = client_for(watcher).get(page).content.decode()
    assert f'href="{change_url("w-holder")}"' in text
    assert 'absurd-worker-status gone">gone<' in text

    tasks_only = make_user("tasks-only", "view_absurdtask")  # may see the task, not the workers
    text = client_for(tasks_only).get(page).content.decode()
    assert "w-holder" in text and change_url("w-holder") not in text


@pytest.mark.django_db
def test_task_admin_tabs_lead_to_the_workers_for_those_who_may_see_them(watcher: User) -> None:
    overview = reverse("admin:absurd_agents_absurdtask_overview")
    assert reverse(WORKER_LIST).encode() in client_for(watcher).get(overview).content
    tasks_only = make_user("tasks-only", "view_absurdtask")
    assert reverse(WORKER_LIST).encode() not in client_for(tasks_only).get(overview).content
