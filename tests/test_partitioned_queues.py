"""Partitioned queues: declared in QUEUES, provisioned by migrate, run by the worker, read by the admin,
kept by ``absurd_cleanup``, which drops expired weeks whole and never a week holding unfinished work.

A task is put in a past week by giving it (and its runs) ids of that week (:func:`move_back`): on
PostgreSQL 18 Absurd's UUIDv7 ids come from the server's ``uuidv7()``, which ``absurd.fake_now``
does not move. The clock is faked only for what Absurd reads from ``absurd.current_time()``: the
weeks ``ensure_partitions`` creates, the cleanup's "now", a cancellation's time.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterator
from io import StringIO
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.db import connection, transaction
from django.test import Client, override_settings
from django.urls import reverse

from django_absurd_agents import absurd, conf, partitions, schema, task_list
from django_absurd_agents.checks import check_database, check_settings
from django_absurd_agents.testing import run_tasks

QUEUE = "parted"
PARTED = {"name": QUEUE, "storage": "partitioned", "cleanup_ttl": "30 days", "partition_lookahead": "14 days"}
SETTINGS = {"QUEUES": ["agents", "other", PARTED], "CLAIM_TIMEOUT": 30}


@absurd.register_task(name="parted_echo", queue=QUEUE)
async def parted_echo(params: dict[str, Any], ctx: Any) -> dict[str, Any]:
    async def double() -> int:
        return int(params["n"]) * 2

    return {"doubled": await ctx.step("double", double)}


@absurd.register_task(name="parted_sleeper", queue=QUEUE)
async def parted_sleeper(params: Any, ctx: Any) -> None:
    await ctx.sleep_for("nap", 86_400)


def sql(query: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(query, params or [])
        return cursor.fetchall() if cursor.description else []


def fake_now(moment: datetime.datetime | None) -> None:
    """Move Absurd's clock on Django's connection (None: the real clock again)."""
    sql("select set_config('absurd.fake_now', %s, false)", [moment.isoformat() if moment else ""])


def weeks_ago(weeks: int) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(weeks=weeks)


WEEK_MS = 7 * 86_400 * 1000


def shifted(value: object, weeks: int) -> uuid.UUID:
    """The UUIDv7 ``weeks`` earlier: its 48-bit millisecond prefix moved back, the random bits kept."""
    return uuid.UUID(int=uuid.UUID(str(value)).int - ((weeks * WEEK_MS) << 80))


def move_back(task_id: str, weeks: int, *, keep_attempts: tuple[int, ...] = ()) -> str:
    """Give the task (and its runs, but those of ``keep_attempts``) ids ``weeks`` earlier; returns its new id.

    On PostgreSQL 18 Absurd's ids come from ``uuidv7()``, which ``absurd.fake_now`` does not move; new
    ids are the only way to put a real task, with its runs and checkpoints, into a past week's partitions.
    Postgres moves each updated row to the partition of its new id.
    """
    fake_now(weeks_ago(weeks))
    try:
        sql("select absurd.ensure_partitions(%s)", [QUEUE])
    finally:
        fake_now(None)
    runs = sql(f"select run_id, attempt from absurd.r_{QUEUE} where task_id = %s", [task_id])
    new_task = shifted(task_id, weeks)
    with transaction.atomic():
        for run_id, attempt in runs:
            if attempt in keep_attempts:
                continue
            new_run = shifted(run_id, weeks)
            sql(f"update absurd.r_{QUEUE} set run_id = %s where run_id = %s", [new_run, run_id])
            sql(f"update absurd.w_{QUEUE} set run_id = %s where run_id = %s", [new_run, run_id])
            sql(f"update absurd.c_{QUEUE} set owner_run_id = %s where owner_run_id = %s", [new_run, run_id])
            sql(f"update absurd.t_{QUEUE} set last_attempt_run = %s where last_attempt_run = %s", [new_run, run_id])
        for prefix in ("t", "r", "c", "w", "i"):
            sql(f"update absurd.{prefix}_{QUEUE} set task_id = %s where task_id = %s", [new_task, task_id])
    return str(new_task)


def spawn(name: str = "parted_echo", **options: Any) -> str:
    return str(absurd.spawn_sync(name, {"n": 1}, **options)["task_id"])


def week_table(task_id: str) -> str | None:
    """The task partition that holds ``task_id`` (None when the task is gone)."""
    found = sql(f"select tableoid::regclass::text from absurd.t_{QUEUE} where task_id = %s", [task_id])
    return found[0][0] if found else None


def state(task_id: str) -> str | None:
    found = sql(f"select state from absurd.t_{QUEUE} where task_id = %s", [task_id])
    return found[0][0] if found else None


def cleanup(at: datetime.datetime) -> str:
    out = StringIO()
    fake_now(at)
    try:
        call_command("absurd_cleanup", "--queue", QUEUE, stdout=out)
    finally:
        fake_now(None)
    return out.getvalue()


@pytest.fixture
def parted(transactional_db: Any) -> Iterator[str]:
    """The settings declare ``parted`` partitioned; ``migrate`` provisions it; it is dropped afterwards."""
    with override_settings(ABSURD_AGENTS=SETTINGS):
        call_command("migrate", verbosity=0)
        try:
            yield QUEUE
        finally:
            fake_now(None)
            sql("select absurd.drop_queue(%s)", [QUEUE])


def test_queue_entries_may_be_dicts_and_names_stay_names() -> None:
    with override_settings(ABSURD_AGENTS=SETTINGS):
        settings = conf.get()
        assert settings.queues == ("agents", "other", QUEUE)
        assert settings.default_queue == "agents"
        spec = settings.queue_spec(QUEUE)
        assert (spec.storage, spec.policy) == (
            "partitioned",
            {"cleanup_ttl": "30 days", "partition_lookahead": "14 days"},
        )
        assert settings.queue_spec("agents").storage is None  # a plain name says nothing about storage
        assert check_settings() == []
    ttl = {"name": "q", "storage": "partitioned", "cleanup_ttl": datetime.timedelta(days=7, hours=1)}
    assert conf.parse_queues([ttl])[0][0].policy == {"cleanup_ttl": "7 days 3600 seconds"}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "q", "storage": "weekly"}, "storage 'weekly' is not one of 'unpartitioned', 'partitioned'"),
        ({"name": "q", "storage": "partitioned", "cleanup_ttl": "30 dayz"}, "'30 dayz' is not an interval"),
        ({"name": "q", "cleanup_ttl": datetime.timedelta(days=-1)}, "is not an interval"),
        ({"name": "q", "partition_lookahead": "7 days"}, 'applies to partitioned queues only. Add "storage"'),
        ({"name": "q", "storage": "partitioned", "ttl": "1 day"}, "unknown key(s) 'ttl'. Valid keys: name, storage"),
        ({"name": "q", "cleanup_limit": 0}, "cleanup_limit must be a whole number of at least 1"),
        ({"storage": "partitioned"}, "Give the dict a 'name' key"),
    ],
)
def test_bad_queue_entries_are_reported_by_check_and_refused_by_migrate_before_sql(
    entry: dict[str, Any], message: str
) -> None:
    with override_settings(ABSURD_AGENTS={"QUEUES": ["agents", entry]}):
        errors = check_settings()
        assert [error.id for error in errors] == ["absurd_agents.E006"]
        assert message in errors[0].msg
        with pytest.raises(ImproperlyConfigured, match="QUEUES"):
            schema.provision_queues(connection, conf.get().all_queues)  # no database access: refused first


def test_migrate_provisions_the_partitioned_queue_with_its_policy(parted: str) -> None:
    [(mode, ttl, lookahead)] = sql(
        "select storage_mode, cleanup_ttl::text, partition_lookahead::text from absurd.queues where queue_name = %s",
        [parted],
    )
    assert (mode, ttl, lookahead) == ("partitioned", "30 days", "14 days")
    kinds = dict(
        sql("select relname, relkind::text from pg_class where relname = any(%s)", [[f"t_{parted}", "t_agents"]])
    )
    assert kinds == {f"t_{parted}": "p", "t_agents": "r"}
    [(weeks,)] = sql("select count(*) from pg_inherits where inhparent = %s::regclass", [f"absurd.t_{parted}"])
    assert weeks >= 3  # the default partition, this week and the two ahead (14 days)
    with override_settings(
        ABSURD_AGENTS={**SETTINGS, "QUEUES": ["agents", "other", {**PARTED, "cleanup_ttl": "9 days"}]}
    ):
        call_command("migrate", verbosity=0)  # a changed policy is written by the next migrate
    assert sql("select cleanup_ttl::text from absurd.queues where queue_name = %s", [parted]) == [("9 days",)]


def test_a_storage_mode_the_database_does_not_have_is_an_error_naming_the_fix(parted: str) -> None:
    declared = {**SETTINGS, "QUEUES": [{"name": "agents", "storage": "partitioned"}, "other", PARTED]}
    with override_settings(ABSURD_AGENTS=declared):
        errors = check_database(databases=["default"])
        assert [error.id for error in errors] == ["absurd_agents.E007"]
        assert "Queue 'agents' is stored unpartitioned in the database" in errors[0].msg
        assert "new name" in (errors[0].hint or "") and "absurd.drop_queue('agents')" in (errors[0].hint or "")
        with pytest.raises(schema.QueueStorageError, match="cannot change the storage"):
            schema.provision_queues(connection, conf.get().all_queues)
    assert sql("select storage_mode from absurd.queues where queue_name = 'agents'") == [("unpartitioned",)]


def test_tasks_run_through_the_worker_path_and_idempotency_keys_hold_across_weeks(parted: str) -> None:
    first = move_back(spawn(idempotency_key="nightly:2026-01-01"), 2)
    again = absurd.spawn_sync("parted_echo", {"n": 1}, idempotency_key="nightly:2026-01-01")
    assert str(again["task_id"]) == first and not again["created"]  # found in the week two weeks back
    current = str(absurd.spawn_sync("parted_echo", {"n": 21})["task_id"])
    assert week_table(first) != week_table(current)

    ran = run_tasks([parted])
    assert {(task.task_id, task.outcome) for task in ran} == {(first, "completed"), (current, "completed")}
    assert next(task.result for task in ran if task.task_id == current) == {"doubled": 42}


def test_the_admin_lists_and_shows_tasks_of_a_partitioned_queue(parted: str) -> None:
    old = spawn()
    new = str(absurd.spawn_sync("parted_echo", {"n": 5})["task_id"])
    run_tasks([parted])
    old = move_back(old, 1)
    client = Client()
    client.force_login(User.objects.create_superuser("root", password="pw"))

    listing = client.get(reverse("admin:absurd_agents_absurdtask_changelist"), {"queue": parted})
    assert listing.status_code == 200
    page = listing.content.decode()
    assert old in page and new in page
    for task_id in (old, new):
        detail = client.get(
            reverse("admin:absurd_agents_absurdtask_detail", kwargs={"queue": parted, "task_id": task_id})
        )
        assert detail.status_code == 200
        assert "double" in detail.content.decode()  # the step, read from the week's checkpoint partition


def test_the_row_estimate_and_task_names_of_a_partitioned_queue_come_from_its_weeks(
    parted: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    move_back(spawn(), 3)
    for _ in range(2):  # twice in this week's partition: a name the statistics count as common
        spawn()
        absurd.spawn_sync("parted_unregistered", {}, queue=parted)
    assert task_list._estimated_rows([parted]) == {parted: -1.0}  # weeks with rows, never analysed
    leaves = sql(
        "select inhrelid::regclass::text from pg_inherits where inhparent = %s::regclass", [f"absurd.t_{parted}"]
    )
    for (leaf,) in leaves:  # as autovacuum does: the partitions, never the partitioned table itself
        sql(f"analyze {leaf}")
    assert task_list._estimated_rows([parted]) == {parted: 5.0}
    monkeypatch.setattr(task_list, "SMALL_TABLE_ROWS", 1)  # read as a large queue: from statistics only
    assert task_list.task_names([parted]) == ["parted_echo", "parted_unregistered"]


def claim_one() -> str:
    [(task_id,)] = sql("select task_id from absurd.claim_task(%s, 'gone-worker', 3600, 1)", [QUEUE])
    return str(task_id)


def test_cleanup_drops_an_expired_finished_week_and_keeps_weeks_with_unfinished_tasks(parted: str) -> None:
    finished = [spawn(idempotency_key=f"old:{n}") for n in range(3)]
    sleeping = spawn("parted_sleeper")
    run_tasks([parted])
    assert {state(task) for task in finished} == {"completed"} and state(sleeping) == "sleeping"
    running = spawn()
    assert claim_one() == running
    pending = spawn()
    finished = [move_back(task, 8) for task in finished]
    kept = {move_back(sleeping, 6): "sleeping", move_back(running, 5): "running", move_back(pending, 7): "pending"}
    weeks = {task: week_table(task) for task in kept}
    dropped_week = week_table(finished[0])
    assert len({dropped_week, *weeks.values()}) == 4

    out = cleanup(datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=60))

    assert "dropped" in out and "holding 3 task(s)" in out
    assert out.count("kept the week from") == 3
    assert [state(task) for task in finished] == [None, None, None]
    assert sql("select to_regclass(%s)", [dropped_week]) == [(None,)]
    assert {task: state(task) for task in kept} == kept
    assert {task: week_table(task) for task in kept} == weeks
    assert sql(f"select count(*) from absurd.i_{parted}") == [(0,)]  # the dropped tasks' keys went with them
    reborn = absurd.spawn_sync("parted_echo", {"n": 1}, idempotency_key="old:0")
    assert reborn["created"] and str(reborn["task_id"]) not in finished

    fake_now(datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=50))
    for task in kept:
        sql("select absurd.cancel_task(%s, %s)", [parted, task])  # cancelled_at: 50 days ahead
    fake_now(None)
    soon = cleanup(datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=60))
    assert soon.count("kept the week from") == 3  # finished, but within the TTL
    later = cleanup(datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=100))
    assert "kept the week" not in later and "holding 3 task(s)" in later
    assert [state(task) for task in kept] == [None, None, None]


def test_a_week_holding_the_first_run_of_a_task_retried_later_is_kept(parted: str) -> None:
    task = spawn()
    [(first_run,)] = sql(f"select run_id from absurd.r_{parted} where task_id = %s", [task])
    assert claim_one() == task
    sql('select absurd.fail_run(%s, %s, \'{"message": "boom"}\'::jsonb, null)', [parted, first_run])
    task = move_back(task, 9, keep_attempts=(2,))  # the retry's run stays in this week, as if made later
    before = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30)
    weeks = partitions.expired_weeks(parted, before)
    task_week = next(week for week in weeks if week.lower <= uuid.UUID(task) < week.upper)
    assert partitions.holding_tasks(parted, task_week, before) == 1  # its task is pending again
    [(retry_run,)] = sql(f"select last_attempt_run from absurd.t_{parted} where task_id = %s", [task])
    run_week = next(week for week in weeks if week.lower <= retry_run < week.upper)
    assert partitions.holding_tasks(parted, run_week, before) == 1  # the pending task of an older week


@absurd.register_task(name="parted_agents_noop", queue="agents")
async def agents_noop(params: Any, ctx: Any) -> None:
    return None


def test_one_cleanup_deletes_rows_of_an_unpartitioned_queue_and_only_drops_weeks_of_a_partitioned_one(
    parted: str,
) -> None:
    row_task = str(absurd.spawn_sync("parted_agents_noop", {})["task_id"])
    finished = spawn()
    run_tasks(["agents", parted])
    finished = move_back(finished, 6)
    holder = move_back(spawn(), 6)  # pending, in the same week as the finished task

    out = StringIO()
    fake_now(datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=60))
    try:
        call_command("absurd_cleanup", stdout=out)
    finally:
        fake_now(None)

    assert "agents: deleted 1 task(s)" in out.getvalue()
    assert sql("select count(*) from absurd.t_agents where task_id = %s", [row_task]) == [(0,)]
    assert "parted: kept the week from" in out.getvalue() and "1 of its task(s)" in out.getvalue()
    assert (state(finished), state(holder)) == ("completed", "pending")  # no row deletion in a kept week


def expired_week_of(task_id: str, before: datetime.datetime) -> partitions.Week:
    return next(w for w in partitions.expired_weeks(QUEUE, before) if w.lower <= uuid.UUID(task_id) < w.upper)


def test_a_drop_checks_again_under_its_lock_and_keeps_a_task_retried_since_the_check(parted: str) -> None:
    failed = str(absurd.spawn_sync("parted_echo", {"n": 1}, max_attempts=1)["task_id"])
    assert claim_one() == failed
    [(run_id,)] = sql(f"select run_id from absurd.r_{parted} where task_id = %s", [failed])
    sql('select absurd.fail_run(%s, %s, \'{"message": "boom"}\'::jsonb, null)', [parted, run_id])
    assert state(failed) == "failed"
    failed = move_back(failed, 6)
    before = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30)
    week = expired_week_of(failed, before)
    assert partitions.holding_tasks(parted, week, before) == 0  # the unlocked check would drop it

    sql("select absurd.retry_task(%s, %s)", [parted, failed])  # an operator retries it meanwhile
    assert partitions.drop_week(parted, week, before) == (partitions.HELD, 0)
    assert state(failed) == "pending" and week_table(failed) is not None


def test_a_drop_gives_up_after_the_lock_timeout_when_the_queue_is_busy(parted: str) -> None:
    import psycopg

    from tests.conftest import database_url

    done = spawn()
    run_tasks([parted])
    done = move_back(done, 6)
    before = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=30)
    week = expired_week_of(done, before)
    with psycopg.connect(database_url()) as other:  # another session reading the queue, in a long transaction
        other.execute(f"select count(*) from absurd.t_{parted}")
        assert partitions.drop_week(parted, week, before) == (partitions.BUSY, 0)
    assert state(done) == "completed"
    assert partitions.drop_week(parted, week, before) == (partitions.DROPPED, 1)  # once the session is gone
    assert state(done) is None
