"""The overview's charts: runs per minute and per hour per queue, as inline SVG, with 0, 1 and many tasks."""

from __future__ import annotations

import datetime
import re
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from django_absurd_agents import absurd, charts
from tests.test_admin import client_for, make_user, task_url

CHARTS = "admin:absurd_agents_absurdtask_charts"


def overview_html(user: Any) -> str:
    response = client_for(user).get(reverse(CHARTS))
    assert response.status_code == 200
    return response.content.decode()


def chart_totals(html: str, queue_index: int = 1) -> list[str]:
    section = html.split(f'id="absurd-charts-{queue_index}"')[1].split("</section>")[0]
    return re.findall(r'<span class="absurd-key (\w+)">(\d+) ', section)


@pytest.mark.django_db
def test_the_overview_links_to_the_charts_without_reading_runs_over_time() -> None:
    client = client_for(make_user("viewer", "view_absurdtask"))
    html = client.get(reverse("admin:absurd_agents_absurdtask_overview")).content.decode()
    assert f'href="{reverse(CHARTS)}"' in html and '<figure class="absurd-chart">' not in html


@pytest.mark.django_db
def test_charts_are_not_read_without_the_view_permission() -> None:
    with CaptureQueriesContext(connection) as queries:
        response = client_for(make_user("staff")).get(reverse(CHARTS))
    assert response.status_code == 403 and b"<svg" not in response.content
    assert not any("absurd.r_" in q["sql"] or '"absurd"."r_' in q["sql"] for q in queries.captured_queries)


@pytest.mark.django_db
def test_an_empty_database_draws_empty_charts() -> None:
    html = overview_html(make_user("viewer", "view_absurdtask"))
    assert html.count('<figure class="absurd-chart">') == 4  # two queues, two charts each
    assert "No runs in this time." in html and "<rect" not in html
    assert "Depth: 0 pending, 0 sleeping." in html and "Oldest waiting: none." in html


@pytest.mark.django_db
def test_one_failed_task_is_one_started_and_one_failed_run() -> None:
    absurd.spawn_sync("analyse", {"prompt": "x"}, max_attempts=1)
    with connection.cursor() as cursor:
        cursor.execute("select run_id from absurd.claim_task('agents', 'w', 60, 1)")
        cursor.execute("select absurd.fail_run('agents', %s, '{\"name\": \"E\"}'::jsonb)", [cursor.fetchone()[0]])
    absurd.spawn_sync("analyse", {"prompt": "waiting"})
    html = overview_html(make_user("viewer", "view_absurdtask"))
    assert chart_totals(html) == [("started", "1"), ("completed", "0"), ("failed", "1")] * 2
    assert html.count('class="failed"><title>') == 2 and html.count('class="started"><title>') == 2
    assert "Depth: 1 pending, 0 sleeping." in html
    assert re.search(r"Oldest waiting: \d+ ms\.|Oldest waiting: [\d.]+ s\.", html)


@pytest.mark.django_db
def test_many_tasks_are_drawn_to_scale() -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "select absurd.spawn_task('agents', 'analyse', '{}'::jsonb, '{}'::jsonb) from generate_series(1, 400)"
        )
        cursor.execute("select count(*) from absurd.claim_task('agents', 'bulk-worker', 60, 300)")
        assert cursor.fetchone()[0] == 300
    html = overview_html(make_user("viewer", "view_absurdtask"))
    assert chart_totals(html)[:3] == [("started", "300"), ("completed", "0"), ("failed", "0")]
    assert "Depth: 100 pending" in html
    heights = [float(h) for h in re.findall(r'<rect [^>]*height="([\d.]+)" class="started"', html)]
    assert max(heights) == pytest.approx(charts.HEIGHT - charts.BOTTOM - charts.TOP, abs=0.2)


def test_bars_scale_to_the_peak_and_render_without_localized_decimals(settings: Any) -> None:
    now = datetime.datetime(2026, 1, 1, 12, 30, tzinfo=datetime.UTC)
    minutes = [now - datetime.timedelta(minutes=m) for m in range(3, -1, -1)]
    chart = charts._chart("t", minutes, {("started", minutes[0]): 10, ("failed", minutes[3]): 5})
    assert chart.peak == 10 and chart.totals == {"started": 10, "completed": 0, "failed": 5}
    started, failed = chart.bars
    assert started.height == pytest.approx(2 * failed.height, abs=0.2)
    assert failed.title == f"{timezone.localtime(minutes[3]):%H:%M}: 5 failed"  # in the site's TIME_ZONE
    from django.template.loader import render_to_string

    settings.LANGUAGE_CODE = "de"
    settings.USE_THOUSAND_SEPARATOR = True
    from django.utils import translation

    with translation.override("de"):
        svg = render_to_string("admin/absurd_agents/_chart.html", {"chart": chart, "label": "q"})
    assert re.search(r'width="\d+\.\d+"', svg) and not re.search(r'="\d+,\d+"', svg)
    assert timezone.is_aware(now)


def crash_and_resume(max_attempts: int = 2) -> str:
    """A task whose first worker "dies": its lease expires, a second worker claims attempt 2."""
    task_id = absurd.spawn_sync("analyse", {"prompt": "crash me"}, max_attempts=max_attempts)["task_id"]
    with connection.cursor() as cursor:
        cursor.execute("select run_id from absurd.claim_task('agents', 'doomed-worker', 1, 1)")
        first_run = cursor.fetchone()[0]
        for name in ("analyst__model.request", "analyst__function_toolset__<agent>.call_tool:quote"):
            cursor.execute(
                "insert into absurd.c_agents (task_id, checkpoint_name, state, owner_run_id) "
                "values (%s, %s, '{}'::jsonb, %s)",
                [task_id, name, first_run],
            )
        cursor.execute("select set_config('absurd.fake_now', (clock_timestamp() + interval '1 minute')::text, false)")
        try:
            cursor.execute("select count(*) from absurd.claim_task('agents', 'sweeper', 60, 1)")  # expires the lease
            cursor.execute("select set_config('absurd.fake_now', (clock_timestamp() + interval '1 hour')::text, false)")
            cursor.execute("select run_id from absurd.claim_task('agents', 'rescuer', 60, 1)")  # after the backoff
            second_run = cursor.fetchone()[0]
        finally:
            cursor.execute("select set_config('absurd.fake_now', '', false)")
        cursor.execute(
            "insert into absurd.c_agents (task_id, checkpoint_name, state, owner_run_id, updated_at) "
            "values (%s, 'analyst__model.request#2', '{}'::jsonb, %s, now() + interval '61 minutes')",
            [task_id, second_run],
        )
    return task_id


@pytest.mark.django_db
def test_task_timeline_shows_a_crash_and_the_resume() -> None:
    task_id = crash_and_resume()
    html = client_for(make_user("viewer", "view_absurdtask")).get(task_url("agents", task_id)).content.decode()
    svg = html.split('<svg xmlns="http://www.w3.org/2000/svg" class="absurd-timeline"')[1].split("</svg>")[0]
    assert svg.count('<g class="lane') == 2
    assert "Attempt 1 · doomed-worker" in svg and "Attempt 2 · rescuer" in svg
    assert "lease expired" in svg and 'class="end">running<' in svg
    assert svg.count('class="mark model"') == 2 and svg.count('class="mark tool"') == 1
    assert "tool quote (the agent&#x27;s own tools) at " in svg and "model request 2 at " in svg
    first, second = re.findall(r'<rect x="([\d.]+)"', svg)
    assert float(second) > float(first)  # the resume starts after the crash


@pytest.mark.django_db
def test_a_task_never_claimed_has_no_timeline() -> None:
    task_id = absurd.spawn_sync("analyse", {"prompt": "later"})["task_id"]
    html = client_for(make_user("viewer", "view_absurdtask")).get(task_url("agents", task_id)).content.decode()
    assert "absurd-timeline" not in html.split("</style>")[-1]
