"""GET /agents/metrics: Prometheus's text format, for a user with the view permission or the metrics token."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test import Client, override_settings
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from django_absurd_agents import absurd
from django_absurd_agents.models import Worker
from django_absurd_agents.testing import run_tasks
from tests import agents  # noqa: F401  (registers analyse and analyse_then_fail_once)
from tests.test_admin import client_for, fail_by_claim_timeout, make_user
from tests.test_durable_agent import start_worker, wait_exit

TOKEN = "s3cret-scrape-token"
WITH_TOKEN = {"QUEUES": ["agents", "other"], "CLAIM_TIMEOUT": 30, "METRICS_TOKEN": TOKEN}


def metrics_url() -> str:
    return reverse("absurd_agents:metrics")


def samples(text: str) -> dict[str, float]:
    """``name{labels}`` -> value, for every sample line."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            found[key] = float(value)
    return found


def touches_tasks(queries: list[dict[str, Any]]) -> bool:
    return any("absurd." in q["sql"] or "absurd_agents_worker" in q["sql"] for q in queries)


@pytest.mark.django_db
def test_metrics_are_refused_before_any_query_without_permission_or_token() -> None:
    absurd.spawn_sync("analyse", {"prompt": "secret"})
    cases: list[tuple[Client, dict[str, str], dict[str, Any] | None]] = [
        (Client(), {}, None),
        (client_for(make_user("staff")), {}, None),
        (Client(), {"HTTP_AUTHORIZATION": f"Bearer {TOKEN}"}, None),  # no token configured: no token works
        (Client(), {"HTTP_AUTHORIZATION": "Bearer wrong"}, WITH_TOKEN),
        (Client(), {"HTTP_AUTHORIZATION": TOKEN}, WITH_TOKEN),  # not a bearer header
        (Client(), {"HTTP_AUTHORIZATION": "Bearer "}, WITH_TOKEN),
    ]
    for client, headers, settings in cases:
        overridden = override_settings(**({"ABSURD_AGENTS": settings} if settings else {}))
        with overridden, CaptureQueriesContext(connection) as queries:
            response = client.get(metrics_url(), **headers)  # type: ignore[arg-type]
        assert response.status_code == 403, headers
        assert b"absurd_tasks" not in response.content
        assert not touches_tasks(queries.captured_queries)


@pytest.mark.django_db
def test_metrics_for_a_viewer_count_tasks_runs_and_workers() -> None:
    failed = absurd.spawn_sync("analyse", {"prompt": "x"}, max_attempts=1)["task_id"]
    fail_by_claim_timeout(failed)
    absurd.spawn_sync("analyse", {"prompt": "y"})
    now = timezone.now()
    common = {"host": "h", "pid": 1, "queues": ["agents"], "concurrency": 1, "version": "x", "heartbeat_interval": 5.0}
    Worker.objects.create(worker_id="a", started=now, last_heartbeat=now, **common)
    Worker.objects.create(worker_id="g", started=now, last_heartbeat=now - datetime.timedelta(minutes=5), **common)

    viewer = client_for(make_user("viewer", "view_absurdtask"))
    with CaptureQueriesContext(connection) as queries:
        response = viewer.get(metrics_url())
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    # One statement per family over both queues (states, failures, runs, steps, replays), one catalog read.
    over_tables = [q["sql"] for q in queries.captured_queries if '"absurd"."' in q["sql"]]
    assert len(over_tables) == 5, over_tables
    assert sum("from absurd.queues" in q["sql"] for q in queries.captured_queries) == 1
    found = samples(response.content.decode())
    assert found['absurd_tasks{queue="agents",state="failed"}'] == 1
    assert found['absurd_tasks{queue="agents",state="pending"}'] == 1
    assert found['absurd_tasks{queue="other",state="pending"}'] == 0
    assert found['absurd_runs_started{queue="agents"}'] == 1
    assert found['absurd_runs_failed{queue="agents"}'] == 1
    assert found['absurd_runs_completed{queue="agents"}'] == 0
    assert found['absurd_oldest_pending_age_seconds{queue="agents"}'] >= 0
    assert found['absurd_workers{status="alive"}'] == 1
    assert found['absurd_workers{status="gone"}'] == 1
    assert found['absurd_workers{status="silent"}'] == 0


def at(cursor: Any, moment: str) -> None:
    """Move Absurd's clock (``absurd.fake_now``) to ``moment``, an SQL timestamp expression ('' for the real one)."""
    cursor.execute(f"select set_config('absurd.fake_now', coalesce(({moment})::text, ''), false)")


def checkpoint(cursor: Any, task_id: str, run_id: str, name: str, state: Any) -> None:
    cursor.execute(
        "select absurd.set_task_checkpoint_state('agents', %s, %s, %s::jsonb, %s, null)",
        [task_id, name, json.dumps(state), run_id],
    )


@pytest.mark.django_db
def test_metrics_count_steps_by_kind_with_durations_and_model_tokens_with_the_token() -> None:
    """Steps written through Absurd's own functions on a moved clock, so every duration is known.

    Task A is claimed at T0 (20 minutes ago) and writes its steps 1, 3, 6 and 10 s later. Task B was
    claimed three hours ago, wrote a model step then (outside the window), slept and was claimed
    again at T0; its tool step 2.5 s later took 2.5 s, not three hours.
    """
    t0 = "date_trunc('second', clock_timestamp()) - interval '20 minutes'"
    with connection.cursor() as cursor:
        try:
            at(cursor, f"{t0} - interval '3 hours'")
            b = absurd.spawn_sync("analyse", {"prompt": "b"})
            cursor.execute("select run_id from absurd.claim_task('agents', 'w', 3600, 1)")
            assert str(cursor.fetchone()[0]) == str(b["run_id"])
            at(cursor, f"{t0} - interval '3 hours' + interval '1 second'")
            old_usage = {"input_tokens": 1000, "output_tokens": 1000}
            checkpoint(cursor, b["task_id"], b["run_id"], "analyst__model.request", {"parts": [], "usage": old_usage})
            cursor.execute(f"select absurd.schedule_run('agents', %s, {t0})", [b["run_id"]])
            at(cursor, t0)
            a = absurd.spawn_sync("analyse", {"prompt": "a"})
            cursor.execute("select count(*) from absurd.claim_task('agents', 'w', 3600, 2)")
            assert cursor.fetchone()[0] == 2
            steps = [
                (a, 1, "analyst__model.request", {"parts": [], "usage": {"input_tokens": 120, "output_tokens": 30}}),
                (b, 2.5, "analyst__function_toolset__<agent>.call_tool:quote", {"return_value": 2}),
                (a, 3, "analyst__function_toolset__<agent>.call_tool:quote", {"return_value": 1}),
                (a, 6, "analyst__model.request#2", {"parts": [], "usage": {"input_tokens": 200, "output_tokens": "?"}}),
                (a, 10, "my_own_step", 42),
            ]
            for task, seconds, name, state in steps:
                at(cursor, f"{t0} + interval '{seconds} seconds'")
                checkpoint(cursor, task["task_id"], task["run_id"], name, state)
        finally:
            at(cursor, "''")
    with override_settings(ABSURD_AGENTS=WITH_TOKEN):
        response = Client().get(metrics_url(), HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200
    text = response.content.decode()
    found = samples(text)
    # (steps, seconds): A's model steps took 1 and 6 - 3 s, its tool 3 - 1 s and B's 2.5 s; A's own step 10 - 6 s.
    expected = {"model": (2, 1 + 3), "tool": (2, 2 + 2.5), "other": (1, 4)}
    for kind, (count, seconds) in expected.items():
        labels = f'{{kind="{kind}",queue="agents"}}'
        assert found[f"absurd_steps{labels}"] == count, kind
        assert found[f"absurd_step_duration_seconds_count{labels}"] == count, kind
        assert found[f"absurd_step_duration_seconds_sum{labels}"] == pytest.approx(seconds), kind
    assert found['absurd_model_tokens{direction="input",queue="agents"}'] == 320
    assert found['absurd_model_tokens{direction="output",queue="agents"}'] == 30
    assert found['absurd_model_tokens_replayed{direction="input",queue="agents"}'] == 0  # one attempt each
    assert "# HELP absurd_step_duration_seconds_sum" in text and "previous checkpoint" in text


@pytest.mark.django_db(transaction=True)
def test_metrics_count_the_tokens_a_second_attempt_replayed_instead_of_paying() -> None:
    """A real run: the first attempt runs the agent then fails, the second replays its model steps."""
    task_id = absurd.spawn_sync(
        "analyse_then_fail_once", {"agent": "analyst"}, retry_strategy={"kind": "none"}, max_attempts=2
    )["task_id"]
    ran = run_tasks(["agents"])
    assert [(task.attempt, task.outcome) for task in ran] == [(1, "failed"), (2, "completed")]
    with connection.cursor() as cursor:
        cursor.execute(
            "select r.attempt, count(*), sum((c.state->'usage'->>'input_tokens')::int), "
            "sum((c.state->'usage'->>'output_tokens')::int) from absurd.c_agents c "
            "join absurd.r_agents r on r.run_id = c.owner_run_id "
            "where c.task_id = %s and c.checkpoint_name like 'analyst__model.request%%' group by 1",
            [task_id],
        )
        by_attempt = {attempt: (count, paid_in, paid_out) for attempt, count, paid_in, paid_out in cursor.fetchall()}
    assert list(by_attempt) == [1]  # the second attempt wrote no model step: it replayed all three
    count, paid_in, paid_out = by_attempt[1]
    assert count == 3 and paid_in > 0 and paid_out > 0

    found = samples(client_for(make_user("viewer", "view_absurdtask")).get(metrics_url()).content.decode())
    assert found['absurd_model_tokens_replayed{direction="input",queue="agents"}'] == paid_in
    assert found['absurd_model_tokens_replayed{direction="output",queue="agents"}'] == paid_out
    assert found['absurd_model_tokens{direction="input",queue="agents"}'] == paid_in
    model = '{kind="model",queue="agents"}'
    assert found[f"absurd_steps{model}"] == found[f"absurd_step_duration_seconds_count{model}"] == 3
    assert found[f"absurd_step_duration_seconds_sum{model}"] >= 0


@pytest.mark.slow
def test_metrics_count_the_tokens_replayed_after_a_worker_died(
    worker_env: dict[str, str], clean_queues: None, tmp_path: Path
) -> None:
    """A worker process exits hard inside the first tool call; the next one replays the first model request."""
    env = {**worker_env, "CALL_LOG": str(tmp_path / "calls.log"), "CLAIM_TIMEOUT": "1"}
    task_id = absurd.spawn_sync("analyse", {"prompt": "How is ACME?"})["task_id"]
    assert wait_exit(start_worker(task_id, env, CRASH_AT="tool:quote")) == 137
    assert wait_exit(start_worker(task_id, env)) == 0
    with connection.cursor() as cursor:
        cursor.execute(
            "select c.checkpoint_name, r.attempt, (c.state->'usage'->>'input_tokens')::int, "
            "(c.state->'usage'->>'output_tokens')::int from absurd.c_agents c "
            "join absurd.r_agents r on r.run_id = c.owner_run_id "
            "where c.task_id = %s and c.checkpoint_name like 'analyst__model.request%%' order by c.updated_at",
            [task_id],
        )
        models = cursor.fetchall()
    assert [(name, attempt) for name, attempt, _, _ in models] == [
        ("analyst__model.request", 1),  # paid by the killed attempt, replayed by the second
        ("analyst__model.request#2", 2),
        ("analyst__model.request#3", 2),
    ]
    first_in, first_out = models[0][2], models[0][3]
    assert first_in > 0 and first_out > 0

    found = samples(client_for(make_user("viewer", "view_absurdtask")).get(metrics_url()).content.decode())
    assert found['absurd_model_tokens_replayed{direction="input",queue="agents"}'] == first_in
    assert found['absurd_model_tokens_replayed{direction="output",queue="agents"}'] == first_out
    assert found['absurd_model_tokens{direction="input",queue="agents"}'] == sum(row[2] for row in models)


@pytest.mark.django_db
def test_metrics_answer_get_only_and_an_empty_database() -> None:
    viewer = client_for(make_user("viewer", "view_absurdtask"))
    assert viewer.post(metrics_url()).status_code == 405
    found = samples(viewer.get(metrics_url()).content.decode())
    assert found['absurd_tasks{queue="agents",state="pending"}'] == 0
    assert found['absurd_workers{status="alive"}'] == 0
