"""The project's Absurd client: spawn, work, fetch, transactional spawn, params validation."""

from __future__ import annotations

import datetime
import decimal
import json
import uuid
from typing import Any

import pytest
from django.db import connection, transaction

from django_absurd_agents import InvalidParams, absurd
from django_absurd_agents.client import ProjectAbsurd


def count_tasks(queue: str = "agents") -> int:
    with connection.cursor() as cursor:
        cursor.execute(f"select count(*) from absurd.t_{queue}")
        return int(cursor.fetchone()[0])


@pytest.mark.django_db(transaction=True)
def test_spawn_inside_rolled_back_atomic_leaves_no_task(clean_queues: None) -> None:
    before = count_tasks()
    with pytest.raises(RuntimeError), transaction.atomic():
        absurd.spawn_sync("analyse", {"q": 1})
        assert count_tasks() == before + 1  # visible inside the transaction
        raise RuntimeError("the view failed")
    assert count_tasks() == before


@pytest.mark.django_db(transaction=True)
def test_spawn_inside_committed_atomic_is_kept(clean_queues: None) -> None:
    with transaction.atomic():
        spawned = absurd.spawn_sync("analyse", {"q": 1})
    assert isinstance(spawned["task_id"], str)
    snapshot = absurd.fetch_task_result_sync(spawned["task_id"])
    assert snapshot is not None and snapshot.state == "pending"


class NotJson:
    pass


@pytest.mark.django_db(transaction=True)
def test_non_json_params_rejected_with_nothing_written(clean_queues: None) -> None:
    before = count_tasks()
    with pytest.raises(InvalidParams, match=r"must be JSON.*primary key"):
        absurd.spawn_sync("analyse", {"obj": NotJson()})
    with pytest.raises(InvalidParams, match="MAX_PARAMS_BYTES"):
        absurd.spawn_sync("analyse", {"blob": "x" * 1_000_001})
    assert count_tasks() == before


@pytest.mark.django_db(transaction=True)
def test_django_values_in_params_are_accepted(clean_queues: None) -> None:
    the_id = uuid.uuid4()
    spawned = absurd.spawn_sync(
        "analyse", {"id": the_id, "at": datetime.datetime(2026, 1, 2, tzinfo=datetime.UTC), "x": decimal.Decimal("1.5")}
    )
    with connection.cursor() as cursor:
        cursor.execute("select params from absurd.t_agents where task_id = %s", [spawned["task_id"]])
        params = json.loads(cursor.fetchone()[0])
    assert params == {"id": str(the_id), "at": "2026-01-02T00:00:00Z", "x": "1.5"}


@pytest.mark.django_db(transaction=True)
def test_spawn_routes_unregistered_task_by_settings(clean_queues: None, settings: Any) -> None:
    settings.ABSURD_AGENTS = {**settings.ABSURD_AGENTS, "TASK_ROUTES": {"report": "other"}}
    spawned = absurd.spawn_sync("report", {})
    assert count_tasks("other") == 1
    assert absurd.fetch_task_result_sync(spawned["task_id"], queue_name="other") is not None


@pytest.mark.django_db(transaction=True)
async def test_round_trip_spawn_work_batch_fetch(clean_queues: None) -> None:
    app = ProjectAbsurd()

    @app.register_task(name="double")
    async def double(params: dict[str, int], ctx: Any) -> dict[str, int]:
        value = await ctx.step("compute", lambda: _async(params["n"] * 2))
        return {"value": value}

    spawned = await app.spawn("double", {"n": 21})
    assert isinstance(spawned["task_id"], str)
    await app.work_batch(claim_timeout=10)
    snapshot = await app.fetch_task_result(uuid.UUID(spawned["task_id"]))
    assert snapshot is not None
    assert (snapshot.state, snapshot.result) == ("completed", {"value": 42})
    # The web process spawns by name without having registered the task.
    unregistered = await absurd.spawn("double", {"n": 1})
    assert (await absurd.fetch_task_result(unregistered["task_id"])).state == "pending"  # type: ignore[union-attr]
    await app.close()
    await absurd.close()


@pytest.mark.django_db(transaction=True)
def test_default_retry_strategy_is_exponential(clean_queues: None) -> None:
    spawned = absurd.spawn_sync("anything", {})
    with connection.cursor() as cursor:
        cursor.execute(
            "select retry_strategy, max_attempts from absurd.t_agents where task_id = %s", [spawned["task_id"]]
        )
        strategy, max_attempts = cursor.fetchone()
    assert json.loads(strategy)["kind"] == "exponential"
    assert max_attempts == 5


async def _async(value: Any) -> Any:
    return value


def headers_of(task_id: str) -> Any:
    with connection.cursor() as cursor:
        cursor.execute("select headers from absurd.t_agents where task_id = %s", [task_id])
        value = cursor.fetchone()[0]
    return json.loads(value) if isinstance(value, str) else value


@pytest.mark.django_db(transaction=True)
def test_spawn_and_spawn_sync_both_apply_the_before_spawn_hook(clean_queues: None) -> None:
    """One hook, two spellings of spawn: a sync and an async hook change the options of both."""
    import asyncio

    def stamp(task_name: str, params: Any, options: dict[str, Any]) -> dict[str, Any]:
        return {**options, "headers": {"tenant": "acme", "task": task_name}}

    async def stamp_async(task_name: str, params: Any, options: dict[str, Any]) -> dict[str, Any]:
        return stamp(task_name, params, options)

    for hook in (stamp, stamp_async):
        client = ProjectAbsurd(hooks={"before_spawn": hook})
        synced = client.spawn_sync("analyse", {"q": 1})["task_id"]

        async def spawn_async(client: ProjectAbsurd = client) -> str:
            try:
                return (await client.spawn("analyse", {"q": 2}))["task_id"]
            finally:
                await client.close()

        awaited = asyncio.run(spawn_async())
        assert headers_of(synced) == headers_of(awaited) == {"tenant": "acme", "task": "analyse"}


@pytest.mark.django_db(transaction=True)
def test_sync_calls_are_absurd_sdks_own_on_djangos_connection(clean_queues: None) -> None:
    """cancel, emit, retry and fetch go through absurd-sdk's sync client on Django's cursor: they show
    where Django shows queries, and roll back with the caller's transaction."""
    from django.test.utils import CaptureQueriesContext

    task_id = absurd.spawn_sync("analyse", {"q": 1})["task_id"]
    with pytest.raises(RuntimeError), transaction.atomic():
        with CaptureQueriesContext(connection) as queries:
            absurd.cancel_task_sync(task_id)
            absurd.emit_event_sync("approval:7", {"ok": True}, queue_name="agents")
        sent = " ".join(query["sql"] for query in queries.captured_queries)
        assert "absurd.cancel_task" in sent and "absurd.emit_event" in sent
        snapshot = absurd.fetch_task_result_sync(task_id)
        assert snapshot is not None and snapshot.state == "cancelled"
        raise RuntimeError("the view failed")
    snapshot = absurd.fetch_task_result_sync(task_id)
    assert snapshot is not None and snapshot.state == "pending"
    with connection.cursor() as cursor:
        cursor.execute("select count(*) from absurd.e_agents where event_name = 'approval:7'")
        assert cursor.fetchone()[0] == 0


@pytest.mark.django_db(transaction=True)
async def test_the_sdk_client_is_built_on_first_use_through_asyncabsurds_own_init(settings: Any) -> None:
    """``ProjectAbsurd()`` holds registrations and hooks only; the SDK's client comes on first use, per loop."""
    from absurd_sdk import AsyncAbsurd

    app = ProjectAbsurd()  # as at import time: no settings read, no connection opened
    assert not app.connected
    first = await app.sdk_client()
    assert isinstance(first, AsyncAbsurd) and app.connected
    # State only AsyncAbsurd.__init__ sets: the connection handed to it, not owned by it.
    assert (first._conn_string, first._owned_conn, first._queue_name) == (None, False, "agents")
    assert first._conn is await app.live_connection()
    assert await app.sdk_client() is first
    other = app.for_queue("other")
    assert (await other.sdk_client())._queue_name == "other"
    await other.close()

    settings.ABSURD_AGENTS = {**settings.ABSURD_AGENTS, "DEFAULT_MAX_ATTEMPTS": 3}
    changed = await app.sdk_client()
    assert changed is not first and changed._default_max_attempts == 3
    await app.close()
    assert not app.connected
