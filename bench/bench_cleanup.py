"""Cleanup of 1,000,000 finished tasks: a partitioned queue drops the week, an unpartitioned one deletes rows.

Run: ``.venv/bin/python bench/bench_cleanup.py [--tasks 1000000] [--limit 1000000] [--slow-rounds 5]``.

Two queues in database ``absurd_agents_bench_cleanup`` (on the server of ``$DATABASE_URL``, else the
embedded one; created and migrated when missing): ``bench_rows`` (unpartitioned) and ``bench_weeks``
(partitioned), both recreated empty. Each gets the same ``--tasks`` completed tasks, every one with
its run and one checkpoint, all made ten weeks ago within one week (UUIDv7 ids of that week, so a
partitioned queue stores them in that week's partitions). The rows are written with
``generate_series`` in a few statements; the load is timed apart and not part of any figure. Then
both queues are vacuumed and analysed, as autovacuum would have long done.

Timed, side by side:

- ``bench_rows``: ``manage.py absurd_cleanup --queue bench_rows`` with ``cleanup_limit`` set to
  ``--limit`` (default: every task in one round, the fastest row deletion can be), then the
  ``VACUUM`` that the deletion leaves to do before the space is reused; the table sizes before and
  after each. With ``--slow-rounds N`` it first times N rounds at Absurd's default ``cleanup_limit``
  of 1,000 (each round reads every finished task again to pick the oldest 1,000).
- ``bench_weeks``: ``manage.py absurd_cleanup --queue bench_weeks`` (the weeks ahead created, the
  expired week checked and dropped), then the same phases apart: the unlocked check of the week
  (``partitions.holding_tasks``) and the transaction that locks the queue's tables and drops it
  (``partitions.drop_week``), which is the time workers of that queue wait.

Measured once: on a shared two-core machine a million-row run takes minutes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from io import StringIO
from pathlib import Path

from benchdb import database_url, setup_django

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATABASE = "absurd_agents_bench_cleanup"
ROWS, WEEKS = "bench_rows", "bench_weeks"

SEED_SQL = """
create temporary table seed on commit drop as
select g,
       absurd.week_bucket_utc(now() - interval '70 days') + (g - 1) * (interval '6 days' / %(tasks)s) as at
  from generate_series(1, %(tasks)s) g;

create temporary table seed_ids on commit drop as
select g, at,
       encode(set_byte(substring(int8send((extract(epoch from at) * 1000)::bigint) from 3 for 6)
              || substring(uuid_send(gen_random_uuid()) from 7), 6, 112 + g %% 16), 'hex')::uuid as task_id,
       encode(set_byte(substring(int8send((extract(epoch from at) * 1000)::bigint + 1) from 3 for 6)
              || substring(uuid_send(gen_random_uuid()) from 7), 6, 112 + g %% 16), 'hex')::uuid as run_id
  from seed;
"""

LOAD_SQL = """
insert into {t} (task_id, task_name, params, retry_strategy, max_attempts, enqueue_at, first_started_at, state,
                 attempts, last_attempt_run, completed_payload)
select task_id, 'summarise', jsonb_build_object('prompt', 'Summarise report ' || g, 'customer_id', g),
       '{{"kind": "exponential", "base_seconds": 2}}'::jsonb, 5, at, at, 'completed', 1, run_id,
       jsonb_build_object('output', 'Summary of report ' || g)
  from seed_ids;
insert into {r} (run_id, task_id, attempt, state, claimed_by, available_at, started_at, completed_at, result,
                 created_at)
select run_id, task_id, 1, 'completed', 'worker-' || g %% 8, at, at, at + interval '2 seconds',
       jsonb_build_object('output', 'Summary of report ' || g), at
  from seed_ids;
insert into {c} (task_id, checkpoint_name, state, status, owner_run_id, updated_at)
select task_id, 'analyst__model.request',
       jsonb_build_object('kind', 'response', 'parts', jsonb_build_array(
           jsonb_build_object('part_kind', 'text', 'content', 'The report says revenue rose ' || g %% 50 || '%%.'))),
       'committed', run_id, at + interval '1 second'
  from seed_ids;
"""


def timed(work: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = work()
    return time.perf_counter() - started, result


def execute(statement: str, params: object = None) -> list[tuple[object, ...]]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(statement, params or [])  # a parameter list always: "%%" is "%" in every statement
        return cursor.fetchall() if cursor.description else []


def queue_bytes(queue: str) -> int:
    """Bytes on disk of the queue's tasks, runs and checkpoints (every partition, indexes, TOAST)."""
    [(size,)] = execute(
        "select coalesce(sum(pg_total_relation_size(c.oid)), 0) from pg_class c "
        "where c.relnamespace = 'absurd'::regnamespace and c.relkind in ('r', 'p') "
        "and (c.relname = any(%s) or c.relname like any(%s))",
        [[f"{p}_{queue}" for p in "trc"], [f"{p}\\_{queue}\\_%" for p in "trc"]],
    )
    return int(size)


def recreate_queues(tasks: int, queues: tuple[str, ...] = (ROWS, WEEKS)) -> None:
    """Drop and create ``queues`` and load ``tasks`` completed tasks of ten weeks ago into each."""
    from django.db import transaction

    from django_absurd_agents.tables import table

    for queue in queues:
        execute("select absurd.drop_queue(%s)", [queue])
        execute("select absurd.create_queue(%s, %s)", [queue, "partitioned" if queue == WEEKS else "unpartitioned"])
    with transaction.atomic():
        execute("select set_config('absurd.fake_now', (now() - interval '70 days')::text, true)")
        execute("select absurd.ensure_partitions(%s)", [WEEKS])  # the weeks around the tasks' week
    with transaction.atomic():
        execute(SEED_SQL, {"tasks": tasks})
        for queue in queues:
            execute(LOAD_SQL.format(t=table("t", queue), r=table("r", queue), c=table("c", queue)))


def vacuum(queue: str) -> None:
    from django_absurd_agents.tables import table

    for prefix in "trc":
        execute(f"vacuum analyze {table(prefix, queue)}")


def cleanup(queue: str) -> str:
    from django.core.management import call_command

    out = StringIO()
    call_command("absurd_cleanup", "--queue", queue, stdout=out)
    return out.getvalue().strip()


def slow_rounds(rounds: int) -> float:
    """Seconds per round of Absurd's row cleanup at its default ``cleanup_limit`` (1,000)."""
    execute("update absurd.queues set cleanup_limit = 1000 where queue_name = %s", [ROWS])
    seconds, _ = timed(lambda: [execute("select absurd.cleanup_all_queues(%s)", [ROWS]) for _ in range(rounds)])
    return seconds / rounds


def phases_of_a_drop() -> tuple[float, float, int]:
    """(seconds of the unlocked check, seconds of the locked drop, tasks dropped) for the expired week."""
    from django_absurd_agents import partitions

    before = partitions.cutoff(WEEKS)
    weeks = [w for w in partitions.expired_weeks(WEEKS, before) if partitions.holding_tasks(WEEKS, w, before) == 0]
    full = max(weeks, key=lambda w: execute(f"select count(*) from {w.partition('t')}")[0][0])
    check, holding = timed(lambda: partitions.holding_tasks(WEEKS, full, before))
    assert holding == 0
    drop, (outcome, tasks) = timed(lambda: partitions.drop_week(WEEKS, full, before))
    assert outcome == partitions.DROPPED
    return check, drop, int(tasks)


def mb(size: int) -> str:
    return f"{size / 1024 / 1024:,.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--limit", type=int, default=None, help="cleanup_limit of the row deletion (default: --tasks)")
    parser.add_argument("--slow-rounds", type=int, default=0, help="rounds timed at cleanup_limit 1,000 first")
    args = parser.parse_args()
    setup_django(database_url(DATABASE))

    load, _ = timed(lambda: recreate_queues(args.tasks))
    settle, _ = timed(lambda: [vacuum(q) for q in (ROWS, WEEKS)])
    print(
        f"{args.tasks:,} completed tasks (+ a run and a checkpoint each) loaded into each queue in {load:.1f} s, "
        f"vacuumed and analysed in {settle:.1f} s"
    )
    sizes = {q: queue_bytes(q) for q in (ROWS, WEEKS)}

    per_round = slow_rounds(args.slow_rounds) if args.slow_rounds else None
    execute("update absurd.queues set cleanup_limit = %s where queue_name = %s", [args.limit or args.tasks, ROWS])
    delete, rows_out = timed(lambda: cleanup(ROWS))
    after_delete = queue_bytes(ROWS)
    vacuumed, _ = timed(lambda: vacuum(ROWS))
    after_vacuum = queue_bytes(ROWS)

    command, weeks_out = timed(lambda: cleanup(WEEKS))
    after_drop = queue_bytes(WEEKS)
    recreate_queues(args.tasks, (WEEKS,))  # the same week again, to time the check and the locked drop apart
    vacuum(WEEKS)
    check, drop, dropped = phases_of_a_drop()

    print(f"\n{ROWS}: {rows_out}\n{WEEKS}: {weeks_out}\n")
    print(f"| {args.tasks:,} finished tasks | unpartitioned (delete rows) | partitioned (drop the week) |")
    print("| --- | ---: | ---: |")
    print(f"| `absurd_cleanup --queue ...` | {delete:.1f} s | {command:.2f} s |")
    print(f"| then `VACUUM` before the space is reused | {vacuumed:.1f} s | none |")
    print(f"| size before | {mb(sizes[ROWS])} | {mb(sizes[WEEKS])} |")
    print(f"| size after cleanup | {mb(after_delete)} | {mb(after_drop)} |")
    print(f"| size after `VACUUM` | {mb(after_vacuum)} | — |")
    print(f"| of which: unlocked check of the week | — | {check:.2f} s |")
    print(f"| of which: queue locked (recheck, detach, drop; {dropped:,} tasks) | — | {drop * 1000:.0f} ms |")
    if per_round is not None:
        print(
            f"\nAt Absurd's default cleanup_limit of 1,000: {per_round:.2f} s per round "
            f"({args.slow_rounds} rounds timed), {args.tasks // 1000:,} rounds for the whole backlog."
        )


if __name__ == "__main__":
    main()
