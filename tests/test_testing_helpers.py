"""``django_absurd_agents.testing`` and its pytest plugin, as a project's own tests would use them."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from django.db import connection, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.test import Client, TestCase, override_settings
from django.urls import path
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from django_absurd_agents import AbsurdAgent, absurd
from django_absurd_agents.testing import (
    AbsurdTransactionTestCase,
    TransactionNotCommitted,
    clean_queues,
    count_model_calls,
    eager_tasks,
    run_tasks,
)
from tests import task_functions as tf

ROOT = Path(__file__).resolve().parent.parent


def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(parts=[TextPart(f"answer #{len(messages)}")])


summariser_model = FunctionModel(answer)
summariser = AbsurdAgent(Agent(summariser_model, name="summariser"), absurd)


@absurd.register_task(name="summarise")
async def summarise(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    result = await summariser.run(params["text"])
    if params.get("fail_first") and ctx._task["attempt"] == 1:
        raise RuntimeError("fail after the run, to replay it")
    return {"summary": result.output}


def request_summary(request: HttpRequest) -> HttpResponse:
    """A view that spawns an agent task in its transaction."""
    with transaction.atomic():
        task = absurd.spawn_sync("summarise", {"text": request.POST["text"]})
    return JsonResponse({"task_id": task["task_id"]}, status=202)


urlpatterns = [path("summaries", request_summary)]


def task_count() -> int:
    with connection.cursor() as cursor:
        cursor.execute("select count(*) from absurd.t_agents")
        return int(cursor.fetchone()[0])


@pytest.mark.django_db(transaction=True)
@pytest.mark.urls(__name__)
def test_a_view_that_spawns_an_agent_task_with_run_tasks() -> None:
    response = Client().post("/summaries", {"text": "A long report."})
    task_id = response.json()["task_id"]
    with count_model_calls(summariser_model) as calls:
        ran = run_tasks()
    assert [(r.task_id, r.task_name, r.outcome, r.result) for r in ran] == [
        (task_id, "summarise", "completed", {"summary": "answer #1"})
    ]
    assert calls.count == 1


@pytest.mark.urls(__name__)
def test_eager_mode_runs_the_task_when_the_view_commits(absurd_eager: Any) -> None:
    with count_model_calls(summariser) as calls:  # an agent works too: its model is counted
        response = Client().post("/summaries", {"text": "Short."})
    snapshot = absurd.fetch_task_result_sync(response.json()["task_id"])
    assert snapshot is not None and snapshot.state == "completed" and snapshot.result == {"summary": "answer #1"}
    assert calls.count == 1
    assert [r.outcome for r in absurd_eager.ran] == ["completed"]


@pytest.mark.django_db(transaction=True)
def test_eager_mode_waits_for_the_transaction_and_forgets_a_rollback() -> None:
    with eager_tasks() as eager:
        with transaction.atomic():
            result = tf.add.enqueue(1, 2)
            assert eager.ran == []  # not committed yet: no worker could see it
        assert [r.result for r in eager.ran] == [3]
        assert tf.add.get_result(result.id).return_value == 3
        with pytest.raises(RuntimeError), transaction.atomic():
            tf.add.enqueue(5, 5)
            raise RuntimeError("roll back")
        assert len(eager.ran) == 1
    assert "spawn_sync" not in vars(absurd) and "spawn" not in vars(absurd)  # restored


@pytest.mark.django_db(transaction=True)
async def test_eager_mode_runs_async_spawns_before_they_return() -> None:
    with eager_tasks() as eager:
        spawned = await absurd.spawn("summarise", {"text": "async"})
    assert [r.task_id for r in eager.ran] == [spawned["task_id"]]
    await absurd.close()


@pytest.mark.django_db(transaction=True)
def test_a_replayed_model_call_is_not_counted() -> None:
    absurd.spawn_sync("summarise", {"text": "twice?", "fail_first": True}, retry_strategy={"kind": "none"})
    with count_model_calls(summariser_model) as calls:
        ran = run_tasks()
    assert [r.outcome for r in ran] == ["failed", "completed"]
    assert calls.count == 1 and len(calls.requests) == 1


def test_count_model_calls_wants_a_model() -> None:
    with pytest.raises(TypeError, match="needs a model instance"), count_model_calls("openai:gpt-5.2"):
        pass


@pytest.mark.django_db(transaction=True)
def test_run_tasks_stops_a_task_that_spawns_forever() -> None:
    for n in range(3):
        tf.add.enqueue(n, n)
    with pytest.raises(RuntimeError, match="ran 2 tasks and more are due"):
        run_tasks(max_tasks=2)


@pytest.mark.django_db(transaction=True)
def test_clean_queues_empties_absurds_tables() -> None:
    tf.add.enqueue(1, 1)
    absurd.spawn_sync("summarise", {"text": "x"}, queue="agents")
    assert task_count() == 2
    clean_queues()
    assert task_count() == 0


@pytest.mark.django_db(transaction=True)
def test_the_plugin_left_no_task_behind() -> None:
    """Runs after the tests above, which all left tasks: the plugin emptied the tables after each."""
    assert task_count() == 0


class RunTasksInATestCase(TestCase):
    def test_run_tasks_explains_why_a_testcase_cannot_work(self) -> None:
        tf.add.enqueue(1, 1)
        with self.assertRaisesMessage(TransactionNotCommitted, "Use TransactionTestCase"):
            run_tasks()


class CleanedAfterEachTest(AbsurdTransactionTestCase):
    def test_a_leaves_a_task(self) -> None:
        tf.add.enqueue(1, 1)

    def test_b_finds_none(self) -> None:
        self.assertEqual(task_count(), 0)


PROJECT_TEST = """
    import pytest
    from django.db import connection

    from tests import task_functions as tf


    def count():
        with connection.cursor() as cursor:
            cursor.execute("select count(*) from absurd.t_agents")
            return cursor.fetchone()[0]


    def test_leaves_a_task(transactional_db, absurd_run_tasks):
        tf.add.enqueue(2, 2)
        assert [r.result for r in absurd_run_tasks()] == [4]
        assert count() == 1


    def test_finds_none(transactional_db):
        assert count() == 0
"""


@pytest.mark.slow
def test_the_plugin_is_found_through_its_entry_point(tmp_path: Path, worker_env: dict[str, str]) -> None:
    """A fresh pytest run, as in a user's project: the fixtures exist without any conftest import."""
    (tmp_path / "test_project.py").write_text(textwrap.dedent(PROJECT_TEST))
    env = {**worker_env, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path)]
    command += ["--ds", "tests.settings", str(tmp_path / "test_project.py")]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


@override_settings(ABSURD_AGENTS={"QUEUES": ["agents", "other"]})
@pytest.mark.django_db(transaction=True)
def test_run_tasks_serves_the_queues_asked_for() -> None:
    tf.on_other.enqueue(1)
    tf.add.enqueue(1, 2)
    assert [r.queue for r in run_tasks(["other"])] == ["other"]
    assert [r.queue for r in run_tasks()] == ["agents"]
