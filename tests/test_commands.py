"""The operations commands beside the worker: absurd_task(s), absurd_retry, absurd_cancel, absurd_emit, absurd_cleanup.

Tasks are run in this process with ``work_batch`` (the client's own connection commits), and the
commands read and change them through Django's connection, as on a production box.
"""

from __future__ import annotations

import json
import re
import uuid
from io import StringIO
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

from django_absurd_agents import absurd
from tests import worker_tasks  # noqa: F401  (registers the handlers)
from tests.test_bad_input_admin import UNSTORABLE_PAYLOADS


def run(*args: Any, **options: Any) -> str:
    out = StringIO()
    call_command(*args, stdout=out, **options)
    return out.getvalue()


arun = sync_to_async(run)


def sql(query: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(query, params or [])
        return cursor.fetchall() if cursor.description else []


asql = sync_to_async(sql)


async def spawn(client: Any, name: str, params: Any = None, **options: Any) -> str:
    return (await client.spawn(name, params if params is not None else {}, **options))["task_id"]


def newest_first(*task_ids: str) -> list[str]:
    return sorted(task_ids, key=uuid.UUID, reverse=True)


async def test_task_dump_shows_runs_checkpoints_and_the_open_wait(project_absurd: Any) -> None:
    task_id = await spawn(project_absurd, "worker_approval", {"draft": "ship it"})
    await project_absurd.work_batch(claim_timeout=10)

    text = await arun("absurd_task", task_id)
    assert f"Task {task_id}  worker_approval  [sleeping]" in text
    assert "queue:        agents" in text
    assert "#1 " in text and "[sleeping]" in text
    assert f"waiting for event 'approval:{task_id}' (no timeout)" in text
    assert "prepare [committed]" in text and '{"draft": "ship it"}' in text
    assert f"event 'approval:{task_id}' (not emitted yet" in text

    dump = json.loads(await arun("absurd_task", task_id, "--json"))
    assert dump["params"] == {"draft": "ship it"}
    assert [c["checkpoint_name"] for c in dump["checkpoints"]] == ["prepare"]
    assert dump["checkpoints"][0]["value"] == {"draft": "ship it"}
    assert dump["waits"][0]["event_name"] == f"approval:{task_id}"

    # absurd_emit wakes it; the next claim completes it with the payload.
    out = await arun("absurd_emit", f"approval:{task_id}", "--payload", '{"approved": true}')
    assert f"Emitted event 'approval:{task_id}' on queue agents." in out
    again = await arun("absurd_emit", f"approval:{task_id}", "--payload", '{"approved": false}')
    assert "already emitted" in again and "first payload is kept" in again
    await project_absurd.work_batch(claim_timeout=10)
    snapshot = await project_absurd.fetch_task_result(task_id)
    assert snapshot.state == "completed"
    assert snapshot.result == {"draft": {"draft": "ship it"}, "decision": {"approved": True}}
    assert "result:" in await arun("absurd_task", task_id)


async def test_task_dump_finds_the_queue_and_shortens_long_values(project_absurd: Any) -> None:
    task_id = await spawn(project_absurd, "worker_other", {"blob": "x" * 2000}, queue="other")
    text = await arun("absurd_task", task_id)
    assert "queue:        other" in text
    assert "more characters; --full or --json shows everything" in text
    assert "x" * 2000 in await arun("absurd_task", task_id, "--full")
    with pytest.raises(CommandError, match="was not found in queue 'agents'"):
        await arun("absurd_task", task_id, "--queue", "agents")


async def test_listing_filters_by_queue_state_and_name(project_absurd: Any) -> None:
    noop = [await spawn(project_absurd, "worker_noop") for _ in range(3)]
    other = await spawn(project_absurd, "worker_other", queue="other")
    await project_absurd.work_batch(claim_timeout=10, batch_size=1)  # completes the oldest noop

    # Newest first as in the admin: by task id, a UUIDv7, so spawn order to the millisecond (and in no
    # particular order within one).
    everything = json.loads(await arun("absurd_tasks", "--json"))
    assert [t["task_id"] for t in everything] == newest_first(*noop, other)
    assert other[:13] >= max(noop)[:13]

    pending = json.loads(await arun("absurd_tasks", "--json", "--queue", "agents", "--state", "pending"))
    assert [t["task_id"] for t in pending] == newest_first(noop[1], noop[2])
    done = json.loads(await arun("absurd_tasks", "--json", "--state", "completed"))
    assert [t["task_id"] for t in done] == [noop[0]]
    assert [t["task_id"] for t in json.loads(await arun("absurd_tasks", "--json", "--name", "worker_other"))] == [other]
    assert len(json.loads(await arun("absurd_tasks", "--json", "--limit", "2"))) == 2

    table = await arun("absurd_tasks")
    assert table.splitlines()[0].split()[:4] == ["TASK", "ID", "QUEUE", "NAME"]
    assert f"{other}  other" in table
    assert "No tasks match." in await arun("absurd_tasks", "--name", "nothing_by_this_name")


async def test_retry_in_place_and_as_a_new_task(project_absurd: Any) -> None:
    task_id = await spawn(project_absurd, "worker_fail", max_attempts=1)
    await project_absurd.work_batch(claim_timeout=10)
    assert (await project_absurd.fetch_task_result(task_id)).state == "failed"

    out = await arun("absurd_retry", task_id)
    assert f"Task {task_id} in queue agents will run again: attempt 2" in out
    assert await asql("select state, max_attempts from absurd.t_agents where task_id = %s", [task_id]) == [
        ("pending", 2)
    ]
    with pytest.raises(CommandError, match="is pending; only failed tasks can be retried"):
        await arun("absurd_retry", task_id)

    await project_absurd.work_batch(claim_timeout=10)
    out = await arun("absurd_retry", task_id, "--spawn-new", "--max-attempts", "3")
    new_id = out.split()[2]
    assert new_id != task_id and "with the params of" in out
    assert await asql("select task_name, state from absurd.t_agents where task_id = %s", [new_id]) == [
        ("worker_fail", "pending")
    ]


async def test_cancel_is_idempotent_and_reports_unknown_ids(project_absurd: Any) -> None:
    task_id = await spawn(project_absurd, "worker_noop")
    assert "it was pending" in await arun("absurd_cancel", task_id)
    assert (await project_absurd.fetch_task_result(task_id)).state == "cancelled"
    assert "already cancelled; nothing to cancel" in await arun("absurd_cancel", task_id)
    with pytest.raises(CommandError, match="was not found in any queue"):
        await arun("absurd_cancel", "01900000-0000-7000-8000-000000000000")
    with pytest.raises(CommandError, match="is not a task id"):
        await arun("absurd_cancel", "42")


async def test_queue_names_are_validated_before_they_reach_sql(project_absurd: Any) -> None:
    with pytest.raises(CommandError, match="lowercase letters"):
        await arun("absurd_tasks", "--queue", 'agents"; drop schema absurd cascade; --')
    with pytest.raises(CommandError, match=r"Queue 'nope' does not exist\. Queues in the database: agents, other"):
        await arun("absurd_emit", "evt", "--queue", "nope")
    with pytest.raises(CommandError, match="--payload is not valid JSON"):
        await arun("absurd_emit", "evt", "--payload", "{nope")
    assert await asql("select count(*) from absurd.queues") == [(2,)]


async def test_cleanup_deletes_finished_tasks_past_the_ttl_in_rounds(project_absurd: Any) -> None:
    await asql("update absurd.queues set cleanup_ttl = interval '0 seconds', cleanup_limit = 2")
    try:
        done = [await spawn(project_absurd, "worker_noop") for _ in range(5)]
        await project_absurd.work_batch(claim_timeout=10, batch_size=5)
        waiting = await spawn(project_absurd, "worker_noop")

        out = await arun("absurd_cleanup")
        assert "agents: deleted 5 task(s)" in out
        remaining = await asql("select task_id::text from absurd.t_agents")
        assert remaining == [(waiting,)]
        assert await asql("select count(*) from absurd.r_agents where task_id = any(%s::uuid[])", [done]) == [(0,)]
        assert "Nothing to clean up." in await arun("absurd_cleanup", "--queue", "agents")
    finally:
        await asql("update absurd.queues set cleanup_ttl = interval '30 days', cleanup_limit = 1000")


# --- bad input: refused before any SQL (issue 12, items 10, 12, 14, 15) -----------------------------

SOME_ID = "01900000-0000-7000-8000-000000000000"


def refused_before_sql(match: str, *args: Any, **options: Any) -> None:
    """The command raises CommandError matching ``match`` without sending any SQL, inside a caller's
    transaction that stays usable afterwards."""
    with transaction.atomic():
        with CaptureQueriesContext(connection) as seen, pytest.raises(CommandError, match=match):
            run(*args, **options)
        assert seen.captured_queries == []
        assert sql("select 1 as alive") == [(1,)]


@pytest.mark.parametrize(
    "command",
    [
        ["absurd_cleanup"],
        ["absurd_tasks"],
        ["absurd_tasks", "--queue", "agents"],
        ["absurd_cancel", SOME_ID],
        ["absurd_retry", SOME_ID],
        ["absurd_task", SOME_ID],
        ["absurd_emit", "evt"],
        ["absurd_worker", "--burst"],
    ],
)
@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_queue_is_an_error_not_every_queue_or_the_default(db: Any, command: list[str], empty: str) -> None:
    refused_before_sql("--queue needs a queue name", *command, "--queue", empty)


def test_an_empty_queue_passed_as_a_keyword_is_refused_too(db: Any) -> None:
    refused_before_sql("--queue needs a queue name", "absurd_cleanup", queue="")
    refused_before_sql("--queue needs a queue name", "absurd_cancel", SOME_ID, queue="")
    refused_before_sql("--queue needs a queue name", "absurd_worker", queues=[""], burst=True)


@pytest.mark.parametrize("command", ["absurd_cancel", "absurd_retry", "absurd_task"])
@pytest.mark.parametrize(
    "bad",
    [
        "42",
        "not-a-uuid",
        "01900000-0000-7000-8000-00000000000",  # one digit short
        "+1900000-0000-7000-8000-000000000000",  # uuid.UUID reads it through int(): not a UUID all the same
        "01900000_0000_7000_8000_000000000000"[:31] + "_0",
        "'; drop table absurd.queues; --",
        "0190\x00000-0000-7000-8000-000000000000",
        "",
    ],
)
def test_a_malformed_task_id_is_refused_naming_it_before_any_sql(db: Any, command: str, bad: str) -> None:
    refused_before_sql(re.escape(f"{bad!r} is not a task id"), command, bad)


@pytest.mark.parametrize(("payload", "fix"), UNSTORABLE_PAYLOADS)
def test_absurd_emit_refuses_json_postgres_cannot_store(db: Any, payload: str, fix: str) -> None:
    refused_before_sql("--payload cannot be stored: .*" + re.escape(fix), "absurd_emit", "evt", "--payload", payload)


@pytest.mark.parametrize(
    ("name", "fix"),
    [("evt\x00", "NUL character"), ("evt\udcff", "unpaired surrogate (\\udcff)"), ("  ", "cannot be empty")],
)
def test_absurd_emit_refuses_an_event_name_postgres_cannot_store(db: Any, name: str, fix: str) -> None:
    """``\\udcff`` is what Python makes of an invalid UTF-8 byte on the command line (surrogateescape)."""
    refused_before_sql(re.escape(fix), "absurd_emit", name)


def test_absurd_tasks_refuses_a_task_name_postgres_cannot_store(db: Any) -> None:
    refused_before_sql(re.escape("--name: it contains a NUL character"), "absurd_tasks", "--name", "a\x00b")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--claim-timeout", "3000000000"], "--claim-timeout must be a whole number of seconds at least 1 and at most"),
        (["--claim-timeout", "0"], "--claim-timeout must be a whole number of seconds at least 1"),
        (["--claim-timeout", "604801"], "at most 604800, not 604801"),
        (["--poll-interval", "inf"], "--poll-interval must be a number of seconds above 0 and at most 3600, not inf"),
        (["--poll-interval", "nan"], "--poll-interval must be a number of seconds above 0 and at most 3600, not nan"),
        (["--poll-interval", "0"], "--poll-interval must be a number of seconds above 0"),
        (["--poll-interval", "3600.5"], "at most 3600, not 3600.5"),
        (["--concurrency", "10001"], "--concurrency must be a whole number of tasks at least 1 and at most 10000"),
        (["--concurrency", "0"], "--concurrency must be a whole number of tasks at least 1"),
        (["--shutdown-grace", "nan"], "--shutdown-grace must be a number of seconds at least 0"),
        (["--shutdown-grace", "-1"], "--shutdown-grace must be a number of seconds at least 0"),
        (["--max-tasks", "0"], "--max-tasks must be at least 1"),
    ],
)
def test_absurd_worker_refuses_out_of_range_options(db: Any, args: list[str], message: str) -> None:
    """Accepted, these left a worker alive with a fresh heartbeat that never ran anything."""
    refused_before_sql(re.escape(message), "absurd_worker", "--burst", *args)


def test_absurd_worker_checks_the_settings_it_falls_back_on(db: Any) -> None:
    with override_settings(ABSURD_AGENTS={"QUEUES": ["agents"], "CLAIM_TIMEOUT": 3_000_000_000}):
        refused_before_sql(
            re.escape("ABSURD_AGENTS['CLAIM_TIMEOUT'] must be a whole number"), "absurd_worker", "--burst"
        )
    with override_settings(ABSURD_AGENTS={"QUEUES": ["agents"], "POLL_INTERVAL": float("inf")}):
        refused_before_sql(re.escape("ABSURD_AGENTS['POLL_INTERVAL'] must be a number"), "absurd_worker", "--burst")
    refused_before_sql(re.escape("--claim-timeout must be"), "absurd_worker", claim_timeout=3_000_000_000, burst=True)


def test_a_catalogued_queue_without_tables_is_left_out_of_the_commands(db: Any) -> None:
    sql("insert into absurd.queues (queue_name) values (%s)", ["ghost%s"])
    task_id = absurd.spawn_sync("worker_noop", {})["task_id"]
    assert str(task_id) in run("absurd_tasks")
    with pytest.raises(CommandError, match=re.escape("was not found in any queue (agents, other)")):
        run("absurd_cancel", SOME_ID)


async def test_retry_several_ids_or_a_filter_with_a_dry_run(project_absurd: Any) -> None:
    failed = [await spawn(project_absurd, "worker_fail", {"n": n}, max_attempts=1) for n in range(3)]
    pending = await spawn(project_absurd, "worker_noop")
    for _ in range(2):
        await project_absurd.work_batch(claim_timeout=10, batch_size=10)
    states = "select task_id::text, state from absurd.t_agents where task_id = any(%s::uuid[]) order by task_id"
    assert {state for _, state in await asql(states, [failed])} == {"failed"}

    dry = await arun("absurd_retry", "--state", "failed", "--task-name", "worker_fail", "--since", "1h", "--dry-run")
    assert all(f"Would retry task {task_id} (worker_fail) in queue agents." in dry for task_id in failed)
    assert "Would retry 3 task(s); skipped 0." in dry
    assert {state for _, state in await asql(states, [failed])} == {"failed"}

    out = await arun("absurd_retry", failed[0], failed[1], pending)
    assert f"Task {failed[0]} in queue agents will run again: attempt 2" in out
    assert f"Skipped task {pending} in queue agents: it is completed." in out
    assert "Retried 2 task(s); skipped 1." in out
    assert dict(await asql(states, [failed])) == {failed[0]: "pending", failed[1]: "pending", failed[2]: "failed"}

    out = await arun("absurd_retry", "--task-name", "worker_fail", "--spawn-new")
    assert f"with the params of {failed[2]}" in out and "Retried 1 task(s)" in out
    assert "No task matches." in await arun("absurd_retry", "--task-name", "nothing_by_this_name")


async def test_cancel_several_ids_or_a_filter_with_a_dry_run(project_absurd: Any) -> None:
    waiting = [await spawn(project_absurd, "worker_noop", {"n": n}) for n in range(3)]
    other = await spawn(project_absurd, "worker_other")
    rows = "select task_id::text, state from absurd.t_agents where task_id = any(%s::uuid[])"

    dry = await arun("absurd_cancel", "--task-name", "worker_noop", "--dry-run")
    assert "Would cancel 3 task(s); skipped 0." in dry and other not in dry
    assert {state for _, state in await asql(rows, [waiting])} == {"pending"}

    out = await arun("absurd_cancel", "--state", "pending", "--task-name", "worker_noop", "--queue", "agents")
    assert "Cancelled 3 task(s); skipped 0." in out
    assert {state for _, state in await asql(rows, [waiting])} == {"cancelled"}

    out = await arun("absurd_cancel", waiting[0], other)
    assert f"Skipped task {waiting[0]} in queue agents: it is already cancelled." in out
    assert f"Cancelled task {other} in queue other (it was pending)." in out
    with pytest.raises(CommandError, match="was not found in any queue"):
        await arun("absurd_cancel", other, "01900000-0000-7000-8000-000000000000")


@pytest.mark.parametrize("command", ["absurd_retry", "absurd_cancel"])
@pytest.mark.parametrize(
    ("args", "match"),
    [
        ([], "Give one or more task ids, or select tasks"),
        ([SOME_ID, "--task-name", "x"], "not both"),
        (["--since", "yesterday"], "give an age such as"),
        (["--since", "0h"], "give an age such as"),
        (["--task-name", "x", "--limit", "0"], "--limit must be at least 1"),
        ([SOME_ID, "42"], "'42' is not a task id"),
    ],
)
def test_bulk_selection_is_checked_before_any_sql(db: Any, command: str, args: list[str], match: str) -> None:
    refused_before_sql(match, command, *args)
