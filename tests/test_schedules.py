"""Scheduled runs: ``ABSURD_AGENTS["SCHEDULES"]`` spawned by ``absurd_worker --schedule``, once per occurrence."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.core.management import CommandError, call_command
from django.db import connection

from django_absurd_agents import schedules
from tests.test_worker import WorkerProcess, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

EVERY_MINUTE = {"minutely": {"task": "worker_noop", "cron": "* * * * *", "params": {"from": "schedule"}}}


def scheduled_keys() -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("select idempotency_key from absurd.t_agents where idempotency_key like 'schedule:%' order by 1")
        return [row[0] for row in cursor.fetchall()]


def test_a_bad_cron_is_refused_naming_the_schedule(settings: Any) -> None:
    settings.ABSURD_AGENTS = {**settings.ABSURD_AGENTS, "SCHEDULES": {"digest": {"task": "x", "cron": "every day"}}}
    with pytest.raises(CommandError, match=r"SCHEDULES'\]\['digest'\].*not a cron expression"):
        call_command("absurd_worker", schedule=True, burst=True, verbosity=0)


async def test_each_occurrence_is_spawned_once_however_often_it_is_asked(settings: Any, project_absurd: Any) -> None:
    settings.ABSURD_AGENTS = {**settings.ABSURD_AGENTS, "SCHEDULES": EVERY_MINUTE, "CLEANUP_SCHEDULE": None}
    configured = schedules.configured()
    now = datetime(2026, 12, 3, 12, 0, 30, tzinfo=UTC)

    first = await schedules.spawn_due(project_absurd, configured, now - timedelta(minutes=5), now)
    second = await schedules.spawn_due(project_absurd, configured, now - timedelta(minutes=5), now)
    assert [first, second] == [5, 0]
    assert await sync_to_async(scheduled_keys)() == [
        f"schedule:minutely:2026-12-03T11:5{m}:00+00:00" for m in range(6, 10)
    ] + ["schedule:minutely:2026-12-03T12:00:00+00:00"]


async def test_a_long_outage_catches_up_on_the_latest_occurrences_only(settings: Any, project_absurd: Any) -> None:
    settings.ABSURD_AGENTS = {**settings.ABSURD_AGENTS, "SCHEDULES": EVERY_MINUTE, "CLEANUP_SCHEDULE": None}
    now = datetime(2026, 12, 3, 12, 0, 30, tzinfo=UTC)
    created = await schedules.spawn_due(project_absurd, schedules.configured(), now - timedelta(days=1), now)
    assert created == schedules.MAX_CATCH_UP
    assert (await sync_to_async(scheduled_keys)())[-1] == "schedule:minutely:2026-12-03T12:00:00+00:00"


@pytest.mark.slow
def test_two_scheduling_workers_spawn_each_occurrence_once(
    worker_env: dict[str, str], clean_queues: None, tmp_path: Path
) -> None:
    settings_dir = tmp_path / "settings"
    settings_dir.mkdir()
    (settings_dir / "scheduling_settings.py").write_text(
        "from tests.settings import *  # noqa: F403\n"
        "ABSURD_AGENTS = {**ABSURD_AGENTS, 'TASK_MODULES': ['tests.worker_tasks'], "
        f"'SCHEDULES': {EVERY_MINUTE!r}, 'SCHEDULE_CATCH_UP': 300, 'CLEANUP_SCHEDULE': None}}\n"
    )
    env = {**worker_env, "DJANGO_SETTINGS_MODULE": "scheduling_settings",
           "PYTHONPATH": f"{settings_dir}:{Path.cwd()}"}  # fmt: skip
    workers = [
        WorkerProcess(env, tmp_path / f"scheduler-{n}.log", "--schedule", "--poll-interval", "0.05") for n in range(2)
    ]
    try:
        # Each catches up on the last five minutes at start: five occurrences, asked for twice.
        wait_until(lambda: len(scheduled_keys()) >= 5, "the catch-up spawns")
        for worker in workers:
            worker.wait_for_log("Scheduling minutely")
        keys = scheduled_keys()
        assert len(keys) == len(set(keys)) and 5 <= len(keys) <= 6  # 6 when a minute turned meanwhile
        with connection.cursor() as cursor:
            cursor.execute("select count(*) from absurd.t_agents where task_name = 'worker_noop'")
            assert cursor.fetchone()[0] == len(keys)
    finally:
        for worker in workers:
            worker.close()


async def test_the_built_in_cleanup_schedule_runs_absurd_cleanup(project_absurd: Any) -> None:
    names = [schedule.name for schedule in schedules.configured()]
    assert schedules.CLEANUP_SCHEDULE_NAME in names

    spawned = await project_absurd.spawn(schedules.CLEANUP_TASK)
    await project_absurd.work_batch()
    snapshot = await project_absurd.fetch_task_result(spawned["task_id"])
    assert snapshot.state == "completed" and "Nothing to clean up" in snapshot.result


def test_the_last_occurrence_counts_the_moment_itself_and_the_next_one_does_not() -> None:
    daily = schedules.Schedule("daily", "t", "30 4 * * *")
    on_time = datetime(2026, 12, 3, 4, 30, tzinfo=UTC)
    assert daily.last_due(on_time) == on_time
    assert daily.last_due(on_time - timedelta(microseconds=1)) == on_time - timedelta(days=1)
    assert daily.next_after(on_time) == on_time + timedelta(days=1)
    assert daily.last_due(on_time) == daily.occurrences(on_time - timedelta(days=2), on_time)[-1]


def test_a_key_gives_back_its_occurrence_for_its_own_schedule_only() -> None:
    daily, nested = schedules.Schedule("a", "t", "0 6 * * *"), schedules.Schedule("a:b", "t", "0 6 * * *")
    moment = datetime(2026, 12, 3, 6, tzinfo=UTC)
    assert daily.occurrence_of(daily.key(moment)) == moment
    assert daily.occurrence_of(nested.key(moment)) is None
    assert nested.occurrence_of(daily.key(moment)) is None
