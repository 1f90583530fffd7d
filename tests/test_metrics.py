"""GET /agents/metrics: Prometheus's text format, for a user with the view permission or the metrics token."""

from __future__ import annotations

import datetime
import json
from typing import Any

import pytest
from django.db import connection
from django.test import Client, override_settings
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from django_absurd_agents import absurd
from django_absurd_agents.models import Worker
from tests.test_admin import client_for, fail_by_claim_timeout, make_user

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

    response = client_for(make_user("viewer", "view_absurdtask")).get(metrics_url())
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
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


@pytest.mark.django_db
def test_metrics_count_steps_by_kind_and_model_tokens_with_the_token() -> None:
    task_id = absurd.spawn_sync("analyse", {"prompt": "z"})["task_id"]
    usage = {"input_tokens": 120, "output_tokens": 30}
    checkpoints = [
        ("analyst__model.request", {"parts": [], "usage": usage}),
        ("analyst__model.request#2", {"parts": [], "usage": {"input_tokens": 200, "output_tokens": "n/a"}}),
        ("analyst__function_toolset__<agent>.call_tool:quote", {"return_value": 1}),
        ("my_own_step", 42),
    ]
    with connection.cursor() as cursor:
        for name, state in checkpoints:
            cursor.execute(
                "insert into absurd.c_agents (task_id, checkpoint_name, state) values (%s, %s, %s::jsonb)",
                [task_id, name, json.dumps(state)],
            )
        cursor.execute(  # an old checkpoint, outside the window
            "insert into absurd.c_agents (task_id, checkpoint_name, state, updated_at) "
            "values (%s, 'analyst__model.request#3', '{}'::jsonb, now() - interval '2 hours')",
            [task_id],
        )
    with override_settings(ABSURD_AGENTS=WITH_TOKEN):
        response = Client().get(metrics_url(), HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200
    found = samples(response.content.decode())
    assert found['absurd_steps{kind="model",queue="agents"}'] == 2
    assert found['absurd_steps{kind="tool",queue="agents"}'] == 1
    assert found['absurd_steps{kind="other",queue="agents"}'] == 1
    assert found['absurd_model_tokens{direction="input",queue="agents"}'] == 320
    assert found['absurd_model_tokens{direction="output",queue="agents"}'] == 30


@pytest.mark.django_db
def test_metrics_answer_get_only_and_an_empty_database() -> None:
    viewer = client_for(make_user("viewer", "view_absurdtask"))
    assert viewer.post(metrics_url()).status_code == 405
    found = samples(viewer.get(metrics_url()).content.decode())
    assert found['absurd_tasks{queue="agents",state="pending"}'] == 0
    assert found['absurd_workers{status="alive"}'] == 0
