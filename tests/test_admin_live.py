"""The live admin pages, through the test client: what they mark for ``admin_live.js``, and who may refresh them.

The browser side (regions swapped in place, the event log followed) is ``test_admin_live_browser.py``.
A refresh is the same URL fetched again with the ``X-Absurd-Live`` header, so it runs the same view and
the same permission check as opening the page: these tests hold that, for each live page, before any
query reads a task or a worker.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.contrib.staticfiles import finders
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from django_absurd_agents import absurd
from django_absurd_agents.admin.task_admin import LIVE_HEADER
from tests.test_admin import client_for, make_user, run_worker, task_url, url

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "absurd_agents/admin_live.js"
LIVE = {"headers": {LIVE_HEADER: "refresh"}}
WORKER_LIST = "admin:absurd_agents_worker_changelist"


def live_urls(task_id: str) -> list[str]:
    return [url("overview"), url("charts"), task_url("agents", task_id), reverse(WORKER_LIST)]


@pytest.fixture
def everything() -> User:
    return make_user("operator", "view_absurdtask", "view_worker")


@pytest.mark.django_db
def test_each_live_page_loads_the_script_and_marks_what_it_refreshes(everything: User) -> None:
    task_id = absurd.spawn_sync("analyse", {"prompt": "later"})["task_id"]
    client = client_for(everything)
    marks = {
        url("overview"): 'id="absurd-overview-live" data-live-refresh="5"',
        url("charts"): 'id="absurd-charts-live" data-live-refresh="15"',
        task_url("agents", task_id): 'id="absurd-task-progress" data-live-refresh="3">',
        reverse(WORKER_LIST): 'id="absurd-workers-live" data-live-refresh="5"',
    }
    for address, mark in marks.items():
        for extra in ({}, LIVE):
            html = client.get(address, **extra).content.decode()  # type: ignore[arg-type]
            assert f'<script src="/static/{SCRIPT}" defer></script>' in html, address
            assert mark in html, address
            assert "data-live-status" in html, address
    pending = client.get(task_url("agents", task_id)).content.decode()
    assert f'data-live-events="/agents/tasks/{task_id}/events"' in pending
    assert "event_log=True" in pending  # what the panel says when the task logs nothing
    assert "data-live-final" not in pending


@pytest.mark.django_db(transaction=True)
def test_a_finished_tasks_page_tells_the_script_to_stop(everything: User, clean_queues: None) -> None:
    task_id = absurd.spawn_sync("analyse", {"prompt": "How is ACME doing today?"})["task_id"]
    run_worker()
    html = client_for(everything).get(task_url("agents", task_id), **LIVE).content.decode()  # type: ignore[arg-type]
    for region in ("absurd-task-title", "absurd-task-summary", "absurd-task-progress"):
        assert f'id="{region}" data-live-refresh="3" data-live-final>' in html, region


@pytest.mark.django_db
@pytest.mark.urls("tests.urls_admin_only")
def test_without_the_apps_urls_the_task_page_says_how_to_mount_them(everything: User) -> None:
    task_id = absurd.spawn_sync("analyse", {"prompt": "later"})["task_id"]
    html = client_for(everything).get(task_url("agents", task_id)).content.decode()
    assert "data-live-events=" not in html
    assert 'path("agents/", include("django_absurd_agents.urls"))' in html


@pytest.mark.django_db
def test_a_refresh_without_the_view_permission_is_403_before_any_query() -> None:
    task_id = absurd.spawn_sync("analyse", {"prompt": "secret plans"})["task_id"]
    task_pages = [url("overview"), url("charts"), task_url("agents", task_id)]
    forbidden = [
        (make_user("nobody"), [*task_pages, reverse(WORKER_LIST)]),
        (make_user("workers-only", "view_worker"), task_pages),
        (make_user("tasks-only", "view_absurdtask"), [reverse(WORKER_LIST)]),
    ]
    for user, addresses in forbidden:
        client = client_for(user)
        for address in addresses:
            with CaptureQueriesContext(connection) as queries:
                response = client.get(address, **LIVE)  # type: ignore[arg-type]
            assert response.status_code == 403, (user.username, address)
            assert "secret plans" not in response.content.decode()
            read = [query["sql"] for query in queries.captured_queries]
            assert not [sql for sql in read if "absurd." in sql or "absurd_agents_worker" in sql], (address, read)
    for address in live_urls(task_id):  # logged out: the login page, which the script takes as "stop"
        response = client_for(None).get(address, **LIVE)  # type: ignore[arg-type]
        assert response.status_code == 302 and "/admin/login/" in response["Location"]


@pytest.mark.django_db
def test_the_overview_warns_about_a_queue_without_tables_on_opening_not_on_each_refresh(everything: User) -> None:
    with connection.cursor() as cursor:
        cursor.execute("insert into absurd.queues (queue_name) values ('ghost')")
    client = client_for(everything)
    warning = "Queue &#x27;ghost&#x27; is listed in absurd.queues but its tables are missing"
    assert warning in client.get(url("overview")).content.decode()
    refreshed = client.get(url("overview"), **LIVE)  # type: ignore[arg-type]
    assert refreshed.status_code == 200 and warning not in refreshed.content.decode()


def test_the_script_is_a_static_file_of_the_app_and_in_the_wheel() -> None:
    found = finders.find(SCRIPT)
    assert found is not None and Path(str(found)) == ROOT / "django_absurd_agents" / "static" / SCRIPT
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "static/**/*" in package_data["django_absurd_agents"]
