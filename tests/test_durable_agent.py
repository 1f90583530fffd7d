"""AbsurdAgent inside tasks: checkpoints, replay, refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from tests import agents


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
