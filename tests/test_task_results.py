"""A task's result on its way out: encoded once, written by the completion statement, read back as stored.

``execution.py`` encodes what a handler returns with ``jsonsafe.encode`` (Django's values, pydantic
models) and hands that text to ``absurd.complete_run``. These tests pin what that must keep doing: the
stored result is the value's JSON form, and a result returned after the task was cancelled is not
written (Absurd refuses the completion; the run ends as cancelled).
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import uuid
from typing import Any

import pytest
from pydantic import BaseModel

from django_absurd_agents import absurd
from django_absurd_agents.execution import execute_claimed

pytestmark = pytest.mark.django_db(transaction=True)

REPORT_ID = uuid.UUID("01900000-0000-7000-8000-0000000000ab")
AT = datetime.datetime(2026, 12, 3, 9, 30, tzinfo=datetime.UTC)


class Report(BaseModel):
    title: str
    at: datetime.datetime


@absurd.register_task(name="tr_report")
async def tr_report(params: Any, ctx: Any) -> dict[str, Any]:
    return {"report": Report(title="Wöchentlich \u2603", at=AT), "id": REPORT_ID, "total": decimal.Decimal("1.50")}


gate: dict[str, asyncio.Event] = {}


@absurd.register_task(name="tr_gated")
async def tr_gated(params: Any, ctx: Any) -> dict[str, bool]:
    gate["started"].set()
    await gate["release"].wait()
    return {"done": True}


async def test_a_result_is_stored_as_its_json_form(project_absurd: Any) -> None:
    spawned = await project_absurd.spawn("tr_report", {})
    await project_absurd.work_batch(claim_timeout=10)
    snapshot = await project_absurd.fetch_task_result(spawned["task_id"])
    assert snapshot.state == "completed"
    assert snapshot.result == {
        "report": {"title": "Wöchentlich \u2603", "at": "2026-12-03T09:30:00Z"},
        "id": str(REPORT_ID),
        "total": "1.50",
    }


async def test_a_result_returned_after_a_cancel_is_not_written(project_absurd: Any) -> None:
    gate["started"], gate["release"] = asyncio.Event(), asyncio.Event()
    spawned = await project_absurd.spawn("tr_gated", {})
    claimed = await project_absurd.claim_tasks(batch_size=1, claim_timeout=60, worker_id="tr")
    assert [task["task_name"] for task in claimed] == ["tr_gated"]
    execution = asyncio.create_task(execute_claimed(project_absurd, claimed[0], 60))
    await asyncio.wait_for(gate["started"].wait(), timeout=10)

    canceller = project_absurd.for_queue(project_absurd.queue_name)  # a connection of its own, like the admin's
    try:
        await canceller.cancel_task(spawned["task_id"])
    finally:
        await canceller.close()
    gate["release"].set()  # the handler returns its result only now, after the cancel

    ended = await asyncio.wait_for(execution, timeout=10)
    assert ended.outcome == "cancelled"
    snapshot = await project_absurd.fetch_task_result(spawned["task_id"])
    assert snapshot.state == "cancelled" and snapshot.result is None
