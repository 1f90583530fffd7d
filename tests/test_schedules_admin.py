"""The schedules page of the admin: every schedule, its next and last occurrences, the last task it spawned."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth.models import Permission, User
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from django_absurd_agents import absurd, schedule_overview, schedules

pytestmark = pytest.mark.django_db(transaction=True)

PAGE = "admin:absurd_agents_absurdschedule_changelist"
SECRET = "payroll-of-4711"
"""Text in a schedule's params: it must never reach a user without the view permission."""
DAILY = "30 4 * * *"


@absurd.register_task(name="schedule_admin_elsewhere", queue="other")
async def elsewhere(params: Any, ctx: Any) -> None:
    return None


def make_user(username: str, *codenames: str) -> User:
    user = User.objects.create_user(username, password="pw", is_staff=True)
    for codename in codenames:
        user.user_permissions.add(Permission.objects.get(content_type__app_label="absurd_agents", codename=codename))
    return user


def page(user: User) -> str:
    client = Client()
    client.force_login(user)
    response = client.get(reverse(PAGE))
    assert response.status_code == 200
    return response.content.decode()


def row_html(html: str, name: str) -> str:
    found = re.search(rf'<tr id="schedule-\d+" data-schedule="{re.escape(name)}">(.*?)</tr>', html, re.S)
    assert found, f"no row for schedule {name!r}"
    return found.group(1)


def use_schedules(settings: Any, entries: dict[str, Any], cleanup: str | None = None) -> None:
    settings.ABSURD_AGENTS = {**settings.ABSURD_AGENTS, "SCHEDULES": entries, "CLEANUP_SCHEDULE": cleanup}


def last_and_next_daily(now: datetime) -> tuple[datetime, datetime]:
    """The occurrences of ``DAILY`` around ``now``, worked out by hand (not by cronsim)."""
    today = now.replace(hour=4, minute=30, second=0, microsecond=0)
    last = today if today <= now else today - timedelta(days=1)
    return last, last + timedelta(days=1)


def spawn_scheduled(until: datetime, window: timedelta, *skipped: str) -> int:
    """What a scheduler spawns for the window ending at ``until`` (but for ``skipped``), through its own function."""
    chosen = [schedule for schedule in schedules.configured() if schedule.name not in skipped]

    async def run() -> int:
        try:
            return await schedules.spawn_due(absurd, chosen, until - window, until)
        finally:
            await absurd.close()

    return async_to_sync(run)()


def absurd_statements(queries: CaptureQueriesContext) -> list[str]:
    """The statements that read Absurd's schema or the database's settings (the schedules page's own reads)."""
    own = re.compile(r'\babsurd\.|"absurd"\.|pg_database', re.I)
    return [query["sql"] for query in queries.captured_queries if own.search(query["sql"])]


def test_without_schedules_the_page_says_how_to_declare_them(settings: Any) -> None:
    use_schedules(settings, {})
    viewer = make_user("viewer", "view_absurdtask")
    with CaptureQueriesContext(connection) as queries:
        html = page(viewer)
    assert 'id="absurd-no-schedules"' in html and 'ABSURD_AGENTS["SCHEDULES"]' in html
    assert absurd_statements(queries) == []


def test_a_schedule_that_spawned_shows_its_last_task_and_its_occurrences(settings: Any) -> None:
    use_schedules(
        settings,
        {
            "nightly": {"task": "nightly_report", "cron": DAILY, "params": {"team": "ops"}},
            "nightly:eu": {"task": "nightly_report", "cron": "0 * * * *"},
            "never-ran": {"task": "schedule_admin_elsewhere", "cron": DAILY},
        },
    )
    before = datetime.now(UTC)
    last, following = last_and_next_daily(before)
    assert spawn_scheduled(before, timedelta(days=3), "never-ran") == 3 + 10  # three nights, the latest ten hours
    with connection.cursor() as cursor:
        cursor.execute(
            "select task_id, state from absurd.t_agents where idempotency_key = %s",
            [f"schedule:nightly:{last.isoformat()}"],
        )
        task_id, state = cursor.fetchone()

    html = page(make_user("viewer", "view_absurdtask"))
    nightly = row_html(html, "nightly")
    assert "nightly_report" in nightly and DAILY in nightly and "agents" in nightly
    assert "{&quot;team&quot;: &quot;ops&quot;}" in nightly
    assert f"<td>{following:%Y-%m-%d %H:%M}<br>" in nightly
    assert f"<td>{last:%Y-%m-%d %H:%M}<br>" in nightly
    detail = reverse("admin:absurd_agents_absurdtask_detail", kwargs={"queue": "agents", "task_id": str(task_id)})
    assert f'<a href="{detail}" class="absurd-mono">{task_id}</a>' in nightly
    assert f'<span class="absurd-state {state}">{state}</span>' in nightly
    assert f"for {last:%Y-%m-%d %H:%M}," in nightly
    # "nightly" and "nightly:eu" share a prefix; each finds its own keys only.
    assert str(task_id) not in row_html(html, "nightly:eu")
    never = row_html(html, "never-ran")
    assert "other" in never and "None in the queue" in never


def test_both_statements_find_the_same_last_tasks(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The index walk (C collations) and the ``collate "C"`` scan (linguistic ones) agree."""
    use_schedules(settings, {"a": {"task": "t", "cron": "*/5 * * * *"}, "a:b": {"task": "t", "cron": "* * * * *"}})
    until = datetime(2026, 12, 3, 12, 2, 30, tzinfo=UTC)
    spawn_scheduled(until, timedelta(minutes=30))
    by_queue = {"agents": schedules.configured()}

    by_index = schedule_overview.last_spawns(by_queue)
    monkeypatch.setattr(schedule_overview, "sorts_by_code_point", lambda: False)
    by_scan = schedule_overview.last_spawns(by_queue)

    assert by_index == by_scan
    if schedule_overview.sorts_by_code_point():  # then the bounds are a range of the index, as they are in C
        with connection.cursor() as cursor:
            own, nested, low, high = "schedule:a:2026", "schedule:a:b:2026", "schedule:a:0", "schedule:a::"
            cursor.execute("select %s > %s and %s < %s and %s > %s", [own, low, own, high, nested, high])
            assert cursor.fetchone()[0] is True
    assert by_index["a"].occurrence == datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    assert by_index["a:b"].occurrence == datetime(2026, 12, 3, 12, 2, tzinfo=UTC)


def test_a_schedule_on_a_partitioned_queue_finds_its_last_task_through_the_key_table(settings: Any) -> None:
    """A partitioned queue keeps its keys in ``i_<queue>`` (the task partitions have no index on them)."""
    parted = {"name": "sched_parted", "storage": "partitioned"}
    settings.ABSURD_AGENTS = {**settings.ABSURD_AGENTS, "QUEUES": ["agents", "other", parted]}
    call_command("migrate", verbosity=0)
    try:
        use_schedules(settings, {"hourly": {"task": "digest", "cron": "0 * * * *", "queue": "sched_parted"}})
        until = datetime(2026, 12, 3, 12, 30, tzinfo=UTC)
        assert spawn_scheduled(until, timedelta(hours=3)) == 3
        found = schedule_overview.last_spawns({"sched_parted": schedules.configured()})
        assert found["hourly"].occurrence == datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
        with connection.cursor() as cursor:
            cursor.execute(
                "select task_id from absurd.i_sched_parted where idempotency_key = %s",
                ["schedule:hourly:2026-12-03T12:00:00+00:00"],
            )
            assert found["hourly"].task_id == cursor.fetchone()[0]
        assert "None in the queue" not in row_html(page(make_user("viewer", "view_absurdtask")), "hourly")
    finally:
        with connection.cursor() as cursor:
            cursor.execute("select absurd.drop_queue('sched_parted')")


def test_the_built_in_cleanup_schedule_is_listed(settings: Any) -> None:
    use_schedules(settings, {}, cleanup="17 3 * * *")
    cleanup = row_html(page(make_user("viewer", "view_absurdtask")), schedules.CLEANUP_SCHEDULE_NAME)
    assert schedules.CLEANUP_TASK in cleanup and "17 3 * * *" in cleanup and "built in" in cleanup


def test_a_schedule_that_cannot_run_is_an_error_row_not_a_failed_page(settings: Any) -> None:
    use_schedules(
        settings,
        {
            "typo": {"task": "digest", "cron": "every morning"},
            "misrouted": {"task": "schedule_admin_elsewhere", "cron": DAILY, "queue": "agents"},
            "fine": {"task": "digest", "cron": DAILY},
        },
    )
    html = page(make_user("viewer", "view_absurdtask"))
    assert "Cannot run:" in row_html(html, "typo") and "is not a cron expression" in row_html(html, "typo")
    assert "registered for queue &#x27;other&#x27;" in row_html(html, "misrouted")
    assert "Cannot run" not in row_html(html, "fine")


def test_a_schedule_on_a_missing_queue_says_so(settings: Any) -> None:
    use_schedules(settings, {"lost": {"task": "digest", "cron": DAILY, "queue": "nowhere"}})
    assert "There is no queue “nowhere”" in row_html(page(make_user("viewer", "view_absurdtask")), "lost")


def test_without_the_view_permission_the_page_is_403_before_any_query(settings: Any) -> None:
    use_schedules(settings, {"secret": {"task": "digest", "cron": DAILY, "params": {"who": SECRET}}})
    nobody = make_user("nobody")
    client = Client()
    client.force_login(nobody)
    with CaptureQueriesContext(connection) as queries:
        response = client.get(reverse(PAGE))
    assert response.status_code == 403 and SECRET not in response.content.decode()
    assert absurd_statements(queries) == []
    assert reverse(PAGE) not in client.get(reverse("admin:index")).content.decode()

    viewer = make_user("viewer", "view_absurdtask")
    index = Client()
    index.force_login(viewer)
    listed = index.get(reverse("admin:index")).content.decode()
    assert reverse(PAGE) in listed and "Absurd schedules" in listed


def test_the_admin_tabs_lead_to_the_schedules(settings: Any) -> None:
    use_schedules(settings, {})
    viewer = make_user("viewer", "view_absurdtask")
    client = Client()
    client.force_login(viewer)
    tasks_page = client.get(reverse("admin:absurd_agents_absurdtask_changelist")).content.decode()
    assert f'<a href="{reverse(PAGE)}">Schedules</a>' in tasks_page
    assert '<span class="current">Schedules</span>' in page(viewer)
