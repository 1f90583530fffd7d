"""AbsurdAgent inside tasks: checkpoints, replay, refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

import tests.agents  # noqa: F401  (registers the tasks this file spawns: analyse, ...)


def checkpoint_names(task_id: str, queue: str = "agents") -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute(
            f"select checkpoint_name from absurd.c_{queue} where task_id = %s order by updated_at", [task_id]
        )
        return [row[0] for row in cursor.fetchall()]


def calls(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


@pytest.fixture
def call_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "calls.log"
    monkeypatch.setenv("CALL_LOG", str(path))
    return path


async def test_durable_run_checkpoints_every_model_and_tool_call(project_absurd: Any, call_log: Path) -> None:
    spawned = await project_absurd.spawn("analyse", {"prompt": "How is ACME?"})
    await project_absurd.work_batch(claim_timeout=10)
    snapshot = await project_absurd.fetch_task_result(spawned["task_id"])
    assert snapshot.state == "completed", snapshot
    assert "quote=" in snapshot.result["output"]
    names = await _names(spawned["task_id"])
    assert names == [
        "analyst__model.request",
        "analyst__function_toolset__<agent>.call_tool:quote",
        "analyst__model.request#2",
        "analyst__function_toolset__<agent>.call_tool:stamp",
        "analyst__model.request#3",
    ]


async def _names(task_id: str) -> list[str]:
    from asgiref.sync import sync_to_async

    return await sync_to_async(checkpoint_names)(task_id)


def start_worker(task_id: str, env: dict[str, str], **extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.worker_process", task_id],
        env={**env, **extra},
        cwd=Path(__file__).resolve().parent.parent,
    )


def wait_exit(process: subprocess.Popen[bytes], timeout: float = 60) -> int:
    return process.wait(timeout=timeout)


@pytest.mark.slow
def test_killed_inside_tool_resumes_without_repeating_model_call(
    worker_env: dict[str, str], clean_queues: None, tmp_path: Path
) -> None:
    from django_absurd_agents import absurd

    log = tmp_path / "calls.log"
    env = {**worker_env, "CALL_LOG": str(log), "CLAIM_TIMEOUT": "1"}
    task_id = absurd.spawn_sync("analyse", {"prompt": "How is ACME?"})["task_id"]
    assert wait_exit(start_worker(task_id, env, CRASH_AT="tool:quote")) == 137
    assert calls(log) == ["model:1", "tool:quote"]
    assert checkpoint_names(task_id) == ["analyst__model.request"]
    assert wait_exit(start_worker(task_id, env)) == 0
    snapshot = absurd.fetch_task_result_sync(task_id)
    assert snapshot is not None and snapshot.state == "completed"
    # Model call 1 was paid once; the tool that was in flight when the worker died ran again.
    assert calls(log) == ["model:1", "tool:quote", "tool:quote", "model:2", "tool:stamp", "model:3"]


@pytest.mark.slow
def test_killed_inside_second_model_call_runs_tool_once(
    worker_env: dict[str, str], clean_queues: None, tmp_path: Path
) -> None:
    from django_absurd_agents import absurd

    log = tmp_path / "calls.log"
    env = {**worker_env, "CALL_LOG": str(log), "CLAIM_TIMEOUT": "1"}
    task_id = absurd.spawn_sync("analyse", {"prompt": "How is ACME?"})["task_id"]
    assert wait_exit(start_worker(task_id, env, CRASH_AT="model:2")) == 137
    assert wait_exit(start_worker(task_id, env)) == 0
    assert absurd.fetch_task_result_sync(task_id).state == "completed"  # type: ignore[union-attr]
    log_lines = calls(log)
    assert log_lines.count("tool:quote") == 1
    assert log_lines.count("model:1") == 1
    assert log_lines.count("model:2") == 2  # in flight at the kill, so paid again: the at-least-once window
