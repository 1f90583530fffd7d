"""The ``django.tasks`` backend (``django-tasks`` backport on Django 5.2) on a real PostgreSQL.

Tasks run in-process through ``testing.run_tasks`` (the worker's own execution path), and in real
``manage.py absurd_worker`` processes where the work crosses processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import django
import pytest
from django.db import connection, transaction
from django.test import override_settings
from django.utils import timezone

from django_absurd_agents import absurd
from django_absurd_agents.backends import (
    AbsurdTaskBackend,
    InvalidTask,
    TaskResultDoesNotExist,
    task_enqueued,
    task_finished,
    task_started,
)
from django_absurd_agents.execution import unknown_task_message
from django_absurd_agents.testing import run_tasks
from tests import task_functions as tf

try:
    from django.tasks import TaskResultStatus, default_task_backend, task_backends
    from django.tasks.exceptions import TaskResultMismatch
except ImportError:  # Django 5.2
    from django_tasks import TaskResultStatus, default_task_backend, task_backends  # type: ignore[no-redef]
    from django_tasks.exceptions import TaskResultMismatch  # type: ignore[no-redef]

pytestmark = pytest.mark.django_db(transaction=True)

ROOT = Path(__file__).resolve().parent.parent
BACKEND = "django_absurd_agents.backends.AbsurdTaskBackend"
NO_BACKOFF = {"default": {"BACKEND": BACKEND, "OPTIONS": {"RETRY_STRATEGY": {"kind": "none"}, "MAX_ATTEMPTS": 3}}}


def task_rows(queue: str = "agents") -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(f"select task_id::text, task_name, state from absurd.t_{queue} order by task_id")
        return list(cursor.fetchall())


def test_the_django_leg_uses_its_own_tasks_framework() -> None:
    module = AbsurdTaskBackend.__mro__[1].__module__
    assert module.startswith("django.tasks" if django.VERSION >= (6,) else "django_tasks")
    assert isinstance(task_backends["default"], AbsurdTaskBackend)


def test_sync_and_async_tasks_run_and_return_their_values() -> None:
    added, multiplied = tf.add.enqueue(2, 3), tf.multiply.enqueue(4, b=5)
    assert added.status == TaskResultStatus.READY and added.backend == "default"
    assert [(name, state) for _, name, state in task_rows()] == [
        ("tests.task_functions.add", "pending"),
        ("tests.task_functions.multiply", "pending"),
    ]
    ran = run_tasks()
    assert [(r.task_name, r.outcome, r.result) for r in ran] == [
        ("tests.task_functions.add", "completed", 5),
        ("tests.task_functions.multiply", "completed", 20),
    ]
    result = tf.add.get_result(added.id)
    assert (result.status, result.return_value, result.args, result.kwargs) == (
        TaskResultStatus.SUCCESSFUL,
        5,
        [2, 3],
        {},
    )
    assert result.enqueued_at <= result.started_at <= result.finished_at
    assert result.attempts == 1 and result.worker_ids[0].startswith("run_tasks:")
    added.refresh()
    assert added.is_finished and added.return_value == 5
    assert default_task_backend.get_result(multiplied.id).return_value == 20


async def test_aenqueue_and_aget_result() -> None:
    from asgiref.sync import sync_to_async
    from django.db import connections

    from django_absurd_agents.testing import arun_tasks

    # sync_to_async's shared thread keeps its connection across tests; a test that ends other sessions
    # (test_conversation_turns) leaves it dead, so start this one with a fresh one.
    await sync_to_async(connections.close_all)()

    result = await tf.multiply.aenqueue(6, 7)
    assert [r.outcome for r in await arun_tasks()] == ["completed"]
    fetched = await tf.multiply.aget_result(result.id)
    assert fetched.return_value == 42
    await result.arefresh()
    assert result.status == TaskResultStatus.SUCCESSFUL
    await absurd.close()


def test_enqueue_commits_and_rolls_back_with_the_callers_transaction() -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        doomed = tf.add.enqueue(1, 1)
        assert len(task_rows()) == 1  # visible inside the transaction
        raise RuntimeError("roll back")
    assert task_rows() == []
    with pytest.raises(TaskResultDoesNotExist):
        tf.add.get_result(doomed.id)
    with transaction.atomic():
        kept = tf.add.enqueue(1, 2)
    assert [row[0] for row in task_rows()] == [kept.id]


def test_values_that_are_not_json_are_refused_before_anything_is_written() -> None:
    with pytest.raises(TypeError):
        tf.add.enqueue(uuid.uuid4(), 1)
    assert task_rows() == []


def test_queues_map_to_absurd_queues_and_using_moves_a_task() -> None:
    tf.on_other.enqueue(1)
    moved = tf.add.using(queue_name="other").enqueue(1, 2)
    assert [row[1] for row in task_rows("other")] == ["tests.task_functions.on_other", "tests.task_functions.add"]
    assert task_rows("agents") == []
    ran = run_tasks(["other"])
    assert [(r.queue, r.result) for r in ran] == [("other", {"queue": "other", "x": 1}), ("other", 3)]
    result = tf.add.get_result(moved.id)
    assert result.task.queue_name == "other" and result.return_value == 3


def test_what_an_enqueue_keeps_per_task_follows_the_settings() -> None:
    """The queue and options worked out at a task's first enqueue are worked out again when settings change."""
    tf.add.enqueue(1, 2)
    tf.on_other.enqueue(3)
    with override_settings(ABSURD_AGENTS={"QUEUES": ["agents", "other"], "DEFAULT_QUEUE": "other"}):
        tf.add.enqueue(4, 5)
    with (
        override_settings(ABSURD_AGENTS={"QUEUES": ["agents"]}),
        pytest.raises(InvalidTask, match=r"'other' is not an Absurd queue"),
    ):
        tf.on_other.enqueue(6)
    tf.add.enqueue(7, 8)
    assert [row[1] for row in task_rows("agents")] == ["tests.task_functions.add"] * 2
    assert [row[1] for row in task_rows("other")] == ["tests.task_functions.on_other", "tests.task_functions.add"]


def test_unknown_queues_and_priority_are_refused_with_the_fix() -> None:
    with pytest.raises(InvalidTask, match=r"not an Absurd queue: add it to ABSURD_AGENTS\['QUEUES'\]"):
        tf.add.using(queue_name="nowhere")
    with pytest.raises(InvalidTask, match="does not support priority"):
        tf.add.using(priority=10)


def test_run_after_delays_the_run_until_then() -> None:
    due = timezone.now() + timedelta(hours=1)
    result = tf.add.using(run_after=due).enqueue(2, 2)
    with connection.cursor() as cursor:
        cursor.execute("select available_at from absurd.r_agents")
        assert cursor.fetchone()[0] == due
    assert run_tasks() == []  # not due
    assert tf.add.get_result(result.id).status == TaskResultStatus.READY
    # Every new session of this database sees Absurd's clock an hour and a minute later.
    later = (due + timedelta(minutes=1)).isoformat()
    with connection.cursor() as cursor:
        cursor.execute(f"alter database {connection.settings_dict['NAME']} set absurd.fake_now = '{later}'")
    try:
        assert [r.result for r in run_tasks()] == [4]
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"alter database {connection.settings_dict['NAME']} reset absurd.fake_now")


def test_run_after_rolls_back_with_the_spawn() -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        tf.add.using(run_after=timezone.now() + timedelta(hours=1)).enqueue(1, 1)
        raise RuntimeError("roll back")
    assert task_rows() == []


def test_a_failure_is_recorded_with_the_exception_class_path() -> None:
    with override_settings(TASKS={"default": {"BACKEND": BACKEND, "OPTIONS": {"MAX_ATTEMPTS": 1}}}):
        result = tf.decline.enqueue("card declined")
        [ran] = run_tasks()
        assert ran.outcome == "failed" and isinstance(ran.error, tf.PaymentDeclined)
        result.refresh()
    assert result.status == TaskResultStatus.FAILED and result.is_finished
    [error] = result.errors
    assert error.exception_class is tf.PaymentDeclined
    assert "card declined" in error.traceback
    with pytest.raises(ValueError, match="Task failed"):
        result.return_value  # noqa: B018


def test_failures_are_retried_and_the_context_counts_attempts() -> None:
    with override_settings(TASKS=NO_BACKOFF):
        result = tf.flaky.enqueue(fail_times=2)
        ran = run_tasks()
        assert [r.outcome for r in ran] == ["failed", "failed", "completed"]
        result.refresh()
    assert result.return_value == {"attempt": 3, "task_id": result.id, "workers": 3}
    assert [e.exception_class for e in result.errors] == [RuntimeError, RuntimeError]
    assert result.attempts == 3


@pytest.mark.parametrize("which", ["checkpointed", "checkpointed_sync"])
def test_a_context_step_runs_once_across_retries(which: str, tmp_path: Path) -> None:
    log = tmp_path / "side-effects.log"
    with override_settings(TASKS=NO_BACKOFF):
        result = getattr(tf, which).enqueue(str(log))
        assert [r.outcome for r in run_tasks()] == ["failed", "completed"]
        assert getattr(tf, which).get_result(result.id).return_value == {"step": "done", "attempt": 2}
    assert len(log.read_text().splitlines()) == 1


def test_sync_tasks_run_on_the_tasks_own_thread_and_connection() -> None:
    tf.where_am_i.enqueue()
    [ran] = run_tasks()
    with connection.cursor() as cursor:
        cursor.execute("select pg_backend_pid()")
        own_pid = cursor.fetchone()[0]
    assert ran.result["thread"].startswith("absurd-task") and ran.result["backend_pid"] != own_pid


def test_a_task_enqueued_by_a_task_runs_too() -> None:
    tf.enqueue_child.enqueue(41)
    ran = run_tasks()
    assert [(r.task_name, r.outcome) for r in ran] == [
        ("tests.task_functions.enqueue_child", "completed"),
        ("tests.task_functions.add", "completed"),
    ]
    assert tf.add.get_result(ran[0].result).return_value == 42


def test_a_result_that_cannot_be_stored_fails_the_task() -> None:
    with override_settings(TASKS={"default": {"BACKEND": BACKEND, "OPTIONS": {"MAX_ATTEMPTS": 1}}}):
        result = tf.returns_unstorable.enqueue()
        [ran] = run_tasks()
    assert ran.outcome == "failed" and "Unsupported type" in str(ran.error)
    assert tf.returns_unstorable.get_result(result.id).status == TaskResultStatus.FAILED


@pytest.fixture
def signals() -> Iterator[list[tuple[str, str, str]]]:
    seen: list[tuple[str, str, str]] = []

    def receiver(name: str) -> Any:
        def receive(sender: Any, task_result: Any, **kwargs: Any) -> None:
            seen.append((name, sender.__name__, str(task_result.status)))

        return receive

    receivers = {
        signal: receiver(name)
        for signal, name in [(task_enqueued, "enqueued"), (task_started, "started"), (task_finished, "finished")]
    }
    for signal, receive in receivers.items():
        signal.connect(receive)
    yield seen
    for signal, receive in receivers.items():
        signal.disconnect(receive)


def test_djangos_task_signals_fire(signals: list[tuple[str, str, str]]) -> None:
    with override_settings(TASKS={"default": {"BACKEND": BACKEND, "OPTIONS": {"MAX_ATTEMPTS": 1}}}):
        tf.add.enqueue(1, 2)
        tf.decline.enqueue("no")
        run_tasks()
    assert signals == [
        ("enqueued", "AbsurdTaskBackend", "READY"),
        ("enqueued", "AbsurdTaskBackend", "READY"),
        ("started", "AbsurdTaskBackend", "RUNNING"),
        ("finished", "AbsurdTaskBackend", "SUCCESSFUL"),
        ("started", "AbsurdTaskBackend", "RUNNING"),
        ("finished", "AbsurdTaskBackend", "FAILED"),
    ]


def test_results_that_are_not_this_backends_tasks_do_not_exist() -> None:
    with pytest.raises(TaskResultDoesNotExist):
        default_task_backend.get_result("not-a-uuid")
    with pytest.raises(TaskResultDoesNotExist):
        default_task_backend.get_result(str(uuid.uuid4()))
    agent_task = absurd.spawn_sync("analyse", {"prompt": "hi"})
    with pytest.raises(TaskResultDoesNotExist, match=r"is not a django\.tasks task"):
        default_task_backend.get_result(agent_task["task_id"])
    other = tf.add.enqueue(1, 1)
    with pytest.raises(TaskResultMismatch):
        tf.multiply.get_result(other.id)


def test_a_name_that_is_no_task_fails_like_any_unknown_task() -> None:
    spawned = absurd.spawn_sync("tests.task_functions.not_a_task", {"args": [], "kwargs": {}})
    with override_settings(ABSURD_AGENTS={"QUEUES": ["agents", "other"], "UNKNOWN_TASK_GRACE": 0}):
        [ran] = run_tasks()
    assert ran.outcome == "unknown"
    snapshot = absurd.fetch_task_result_sync(spawned["task_id"])
    assert snapshot is not None and snapshot.state == "failed"
    assert unknown_task_message("tests.task_functions.not_a_task") in snapshot.failure["message"]


def test_the_backend_check_names_bad_options_and_queues() -> None:
    backend = AbsurdTaskBackend("absurd", {"QUEUES": ["default", "nowhere"], "OPTIONS": {"MAX_ATEMPTS": 2}})
    assert [m.id for m in backend.check()] == ["absurd_agents.E020", "absurd_agents.E021"]
    assert AbsurdTaskBackend("absurd", {"QUEUES": ["default", "other"]}).check() == []


# --- real worker processes --------------------------------------------------------------------------


@pytest.fixture
def process_env(worker_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    settings = tmp_path / "settings"
    settings.mkdir()
    (settings / "tasks_backend_settings.py").write_text(
        "from tests.settings import *  # noqa: F403\n"
        "ABSURD_AGENTS = {**ABSURD_AGENTS, 'TASK_MODULES': ['tests.worker_tasks']}  # noqa: F405\n"
        "ABSURD_AGENTS['UNKNOWN_TASK_GRACE'] = 0\n"
    )
    env = dict(worker_env)
    env["DJANGO_SETTINGS_MODULE"] = "tasks_backend_settings"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(settings), str(ROOT), env.get("PYTHONPATH")]))
    env["CALL_LOG"] = str(tmp_path / "calls.log")
    env["WORKER_LOG"] = str(tmp_path / "runs.log")
    return env


def worker(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "django", "absurd_worker", "--poll-interval", "0.05", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_absurd_worker_runs_task_functions_next_to_agent_tasks(process_env: dict[str, str]) -> None:
    sync_result, async_result = tf.add.enqueue(20, 22), tf.multiply.enqueue(6, 7)
    other = tf.on_other.enqueue("x")
    agent_task = absurd.spawn_sync("worker_noop", {})
    done = worker(process_env, "--burst")
    assert done.returncode == 0, done.stderr
    assert tf.add.get_result(sync_result.id).return_value == 42
    assert tf.multiply.get_result(async_result.id).return_value == 42
    assert tf.on_other.get_result(other.id).return_value == {"queue": "other", "x": "x"}
    snapshot = absurd.fetch_task_result_sync(agent_task["task_id"])
    assert snapshot is not None and snapshot.state == "completed"
    result = tf.add.get_result(sync_result.id)
    assert len(result.worker_ids) == 1 and not result.worker_ids[0].startswith("run_tasks:")  # the worker host:pid
    assert "task completed name=tests.task_functions.add" in done.stderr


def test_a_worker_fails_an_unknown_task_path_clearly(process_env: dict[str, str]) -> None:
    spawned = absurd.spawn_sync("tests.task_functions.vanished", {"args": [], "kwargs": {}})
    done = worker(process_env, "--burst")
    assert done.returncode == 0, done.stderr
    assert "Task 'tests.task_functions.vanished' is not a django.tasks @task in this worker" in done.stderr
    snapshot = absurd.fetch_task_result_sync(spawned["task_id"])
    assert snapshot is not None and snapshot.state == "failed"
    assert unknown_task_message("tests.task_functions.vanished") in snapshot.failure["message"]


@pytest.mark.slow
def test_a_durable_agent_in_a_task_resumes_after_its_worker_is_killed(process_env: dict[str, str]) -> None:
    result = tf.analyse_report.enqueue("How is ACME?")
    crashed = worker({**process_env, "CRASH_AT": "tool:quote"}, "--claim-timeout", "2", "--max-tasks", "1")
    assert crashed.returncode == 137, crashed.stderr
    resumed = worker(process_env, "--claim-timeout", "2", "--max-tasks", "1")
    assert resumed.returncode == 0, resumed.stderr
    final = tf.analyse_report.get_result(result.id)
    assert final.status == TaskResultStatus.SUCCESSFUL
    assert final.return_value["attempt"] == 2 and final.return_value["output"].startswith("done: quote=")
    calls = Path(process_env["CALL_LOG"]).read_text().splitlines()
    # The first model call was checkpointed before the crash: the second attempt does not pay for it again.
    assert calls.count("model:1") == 1 and calls.count("attempt:1") == calls.count("attempt:2") == 1
    assert calls.count("tool:quote") == 2  # the tool was cut short by the crash, so it ran again
