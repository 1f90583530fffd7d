"""Server-side render time of the Absurd admin and the metrics endpoint with 100,000 tasks and 20 workers,
and what an idle worker's heartbeat costs the database.

Run: ``.venv/bin/python bench/bench_admin.py [--tasks 100000] [--workers 20] [--checkpoints 200]
[--repeat 20] [--heartbeat-seconds 60]``.

Seeds queue ``bench_admin`` in database ``absurd_agents_bench_admin`` (on the server of
``$DATABASE_URL``, else the embedded one; created and migrated when missing) with ``--tasks`` tasks
spread over the last weeks, in every state, one run each, five checkpoints for every fifth task,
and one task with ``--checkpoints`` agent checkpoints (model responses and tool results, as a
durable agent writes them). The rows are written with ``generate_series`` in a few statements, the
way a busy queue would hold them, then the tables are analysed as autovacuum would. ``--workers``
worker rows are written too (most alive, a few silent or gone), as the worker list shows them.

Each page is requested ``--repeat`` times through Django's test client as a logged-in superuser
(URL resolution, middleware, the view's queries and the template, no network) after one warm-up
request; printed are the median and the 95th percentile. The pages are today's (the task list, a
task page, the overview) side by side with the charts page, the worker list and ``/agents/metrics``.
The goal: the task list and a task page with 200 checkpoints each render in under 200 ms. For
comparison it also times the statements the list avoids: an exact ``count(*)`` of the queue and a
list sorted by ``enqueue_at`` (no index).

Then (unless ``--heartbeat-seconds 0``) it starts a real worker, ``python -m django absurd_worker
--queue bench_idle`` with the test settings (``WORKER_HEARTBEAT`` 5 s, ``POLL_INTERVAL`` 0.5 s),
lets it idle that long and reads the database's own statistics before and after: the heartbeats
(rows inserted or updated in the worker table), the statements on the worker table (its sequential
and index scans: the upsert probes the primary key, the prune of long-gone rows scans the table),
and every transaction the worker committed (``xact_commit``: its claim polls included), each per
minute. Statistics reach the views within a second of a statement here, so the figures are exact
to a statement or two.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchdb import database_url, setup_django

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATABASE = "absurd_agents_bench_admin"
QUEUE = "bench_admin"
IDLE_QUEUE = "bench_idle"
"""The heartbeat's worker serves this empty queue (dropped afterwards), so it stays idle."""
GOAL_MS = 200.0


def setup_admin_django(url: str) -> None:
    from django.test.utils import override_settings

    setup_django(url)
    # The test client's host. (Not setup_test_environment(): it instruments every template render
    # to keep copies of the context, which a real server does not pay for.)
    override_settings(ALLOWED_HOSTS=["testserver"]).enable()


# A UUIDv7 from a timestamp and a seed: the admin pages by task id, so ids must follow time as
# Absurd's own ids do.
def uuid7(seed: str) -> str:
    return f"""(
  substr(lpad(to_hex((extract(epoch from at) * 1000)::bigint), 12, '0'), 1, 8) || '-' ||
  substr(lpad(to_hex((extract(epoch from at) * 1000)::bigint), 12, '0'), 9, 4) || '-7' ||
  substr(md5({seed}), 1, 3) || '-8' || substr(md5({seed}), 4, 3) || '-' || substr(md5({seed}), 7, 12)
)::uuid"""


# Placeholders: __T__/__R__/__C__ (the queue's tables), __TASKS__ (how many).
SEED_SQL = f"""
create temporary table seed on commit drop as
select g,
       {uuid7("'t' || g")} as task_id,
       {uuid7("'r' || g")} as run_id,
       at,
       (array['analyse', 'summarise', 'triage', 'digest', 'classify'])[1 + g % 5] as task_name,
       case when g > __TASKS__ - 50 then (array['pending', 'running', 'sleeping'])[1 + g % 3]
            when g % 10 = 0 then 'failed'
            when g % 97 = 0 then 'cancelled'
            else 'completed' end as state
from (select g, now() - (__TASKS__ - g) * interval '20 seconds' as at
        from generate_series(1, __TASKS__) g) s;

insert into __T__ (task_id, task_name, params, headers, retry_strategy, max_attempts, cancellation,
                          enqueue_at, first_started_at, state, attempts, last_attempt_run, completed_payload,
                          cancelled_at)
select task_id, task_name,
       jsonb_build_object('prompt', 'Customer ' || g || ' asks about invoice ' || (g * 7919) % 100000,
                          'customer_id', g, 'tags', jsonb_build_array('bench', task_name)),
       null, '{{"kind": "exponential", "base_seconds": 2, "factor": 2, "max_seconds": 300}}'::jsonb, 5, null,
       at, case when state = 'pending' then null else at + interval '1 second' end,
       state, case when state = 'failed' then 5 else 1 end, run_id,
       case when state = 'completed' then jsonb_build_object('output', 'Answer for customer ' || g) end,
       case when state = 'cancelled' then at + interval '2 seconds' end
from seed;

insert into __R__ (run_id, task_id, attempt, state, claimed_by, claim_expires_at, available_at,
                          started_at, completed_at, failed_at, result, failure_reason, created_at)
select run_id, task_id, case when state = 'failed' then 5 else 1 end,
       state, case when state <> 'pending' then 'worker-' || g % 8 end,
       case when state = 'running' then now() + interval '2 minutes' end,
       at, case when state <> 'pending' then at + interval '1 second' end,
       case when state = 'completed' then at + interval '1 second' + (g % 5000) * interval '1 millisecond' end,
       case when state = 'failed' then at + interval '3 seconds' end,
       case when state = 'completed' then jsonb_build_object('output', 'Answer for customer ' || g) end,
       case when state = 'failed' then jsonb_build_object('name', 'ValueError', 'message', 'bad input ' || g,
            'traceback', 'Traceback (most recent call last):\n  File "tasks.py", line 9\nValueError: bad input') end,
       at
from seed;

insert into __C__ (task_id, checkpoint_name, state, status, owner_run_id, updated_at)
select task_id, 'analyst__model.request' || case when n > 1 then '#' || n else '' end,
       jsonb_build_object('kind', 'response', 'parts', jsonb_build_array(
           jsonb_build_object('part_kind', 'text', 'content', repeat('Some model text. ', 20)))),
       'committed', run_id, at + interval '1 second' + n * interval '800 milliseconds'
from seed, generate_series(1, 5) n
where g % 5 = 0;
"""

MODEL_STEP = {
    "kind": "response",
    "model_name": "gpt-bench",
    "usage": {"input_tokens": 812, "output_tokens": 64},
    "parts": [
        {"part_kind": "thinking", "content": "The customer wants the invoice total; look it up first. " * 3},
        {"part_kind": "text", "content": "Let me look that invoice up for you. " * 6},
        {
            "part_kind": "tool-call",
            "tool_name": "lookup_invoice",
            "args": {"invoice": 4711, "fields": ["total", "due", "lines"]},
            "tool_call_id": "call_{n}",
        },
    ],
}
TOOL_STEP = {
    "kind": "tool_return",
    "result": {
        "invoice": 4711,
        "total": "1249.50",
        "due": "2026-12-01",
        "lines": [{"sku": f"SKU-{i}", "qty": i, "price": "12.50"} for i in range(8)],
    },
    "content_file_digests": [],
}


def seed(tasks: int, checkpoints: int) -> str:
    """Recreate the bench queue with ``tasks`` tasks; return the id of the task with many checkpoints."""
    import json

    from django.db import connection, transaction

    from django_absurd_agents.tables import table

    script = SEED_SQL.replace("__TASKS__", str(int(tasks)))
    for prefix in ("t", "r", "c"):
        script = script.replace(f"__{prefix.upper()}__", table(prefix, QUEUE))
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("select absurd.drop_queue(%s)", [QUEUE])
        cursor.execute("select absurd.create_queue(%s)", [QUEUE])
        for statement in script.split(";\n\n"):
            if statement.strip():
                cursor.execute(statement)
        cursor.execute(f"select task_id, last_attempt_run from {table('t', QUEUE)} order by task_id desc limit 1")
        task_id, run_id = cursor.fetchone()
        cursor.execute(f"delete from {table('c', QUEUE)} where task_id = %s", [task_id])
        rows = []
        for n in range(1, checkpoints // 2 + 1):
            suffix = f"#{n}" if n > 1 else ""
            model = json.loads(json.dumps(MODEL_STEP).replace("call_{n}", f"call_{n}"))
            rows.append((f"analyst__model.request{suffix}", json.dumps(model), 2 * n))
            rows.append(
                (
                    f"analyst__function_toolset__<agent>.call_tool:lookup_invoice{suffix}",
                    json.dumps(TOOL_STEP),
                    2 * n + 1,
                )
            )
        cursor.executemany(
            f"insert into {table('c', QUEUE)} (task_id, checkpoint_name, state, status, owner_run_id, updated_at) "
            "values (%s, %s, %s::jsonb, 'committed', %s, now() + %s * interval '1 millisecond')",
            [(task_id, name, state, run_id, order) for name, state, order in rows],
        )
    with connection.cursor() as cursor:  # outside the transaction: VACUUM cannot run inside one
        for prefix in ("t", "r", "c"):
            cursor.execute(f"vacuum analyze {table(prefix, QUEUE)}")
    return str(task_id)


def seed_workers(count: int) -> None:
    """``count`` worker rows, as the worker list shows them: one in ten silent, one in ten gone."""
    import datetime

    from django.utils import timezone

    from django_absurd_agents.worker_record import Worker

    now = timezone.now()
    Worker.objects.filter(worker_id__startswith="bench-").delete()
    Worker.objects.bulk_create(
        Worker(
            worker_id=f"bench-{n}",
            host=f"worker-host-{n % 5}",
            pid=1000 + n,
            queues=[QUEUE],
            concurrency=8,
            version="bench",
            heartbeat_interval=5.0,
            started=now - datetime.timedelta(hours=n),
            last_heartbeat=now - datetime.timedelta(seconds=20 if n % 10 == 8 else 300 if n % 10 == 9 else 1),
            tasks_in_flight=n % 8,
            tasks_done=1000 * n,
        )
        for n in range(count)
    )


def timed(get: Callable[[], object], repeat: int) -> list[float]:
    get()  # warm-up: template loading, first plans
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        get()
        times.append((time.perf_counter() - started) * 1000)
    return times


def p95(times: list[float]) -> float:
    return statistics.quantiles(times, n=20, method="inclusive")[18] if len(times) > 1 else times[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--checkpoints", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--heartbeat-seconds", type=float, default=60.0)
    args = parser.parse_args()

    url = database_url(DATABASE)
    setup_admin_django(url)
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client
    from django.urls import reverse

    from django_absurd_agents.tables import table

    started = time.perf_counter()
    detail_task = seed(args.tasks, args.checkpoints)
    seed_workers(args.workers)
    seeded_in = time.perf_counter() - started
    user = User.objects.filter(username="bench").first() or User.objects.create_superuser("bench", "b@example.org", "x")
    client = Client()
    client.force_login(user)

    list_url = reverse("admin:absurd_agents_absurdtask_changelist")
    detail_url = reverse("admin:absurd_agents_absurdtask_detail", kwargs={"queue": QUEUE, "task_id": detail_task})
    with connection.cursor() as cursor:
        cursor.execute(f"select task_id from {table('t', QUEUE)} order by task_id limit 1 offset %s", [args.tasks // 2])
        middle = str(cursor.fetchone()[0])
        cursor.execute(f"select count(*) from {table('c', QUEUE)}")
        checkpoint_rows = cursor.fetchone()[0]

    def get(address: str, check: str | None = None) -> Callable[[], object]:
        def run() -> object:
            response = client.get(address)
            assert response.status_code == 200, (address, response.status_code)
            if check is not None:
                assert check in response.content.decode(), (address, check)
            return response

        return run

    pages: list[tuple[str, str, str | None, bool]] = [
        ("task list, first page", list_url, "Newest first", True),
        ("task list, page in the middle (keyset)", f"{list_url}?after={middle}", "Newest first", True),
        ("task list, this queue only", f"{list_url}?queue={QUEUE}", None, False),
        ("task list, state=failed", f"{list_url}?state=failed", None, False),
        ("task list, task_name=triage", f"{list_url}?task_name=triage", None, False),
        ("task list, created in the past hour", f"{list_url}?created=hour", None, False),
        ("task list, search by task id", f"{list_url}?q={middle}", middle, False),
        ("task list, search text in params", f"{list_url}?q=invoice+4711", None, False),
        (f"task page, {args.checkpoints} checkpoints", detail_url, "Tool <strong>lookup_invoice</strong>", True),
        ("overview", reverse("admin:absurd_agents_absurdtask_overview"), None, False),
        ("overview charts", reverse("admin:absurd_agents_absurdtask_charts"), None, False),
        (f"worker list, {args.workers} workers", reverse("admin:absurd_agents_worker_changelist"), "bench-1", False),
        ("/agents/metrics", reverse("absurd_agents:metrics"), "absurd_model_tokens_replayed", False),
    ]
    connection.ensure_connection()
    version = connection.connection.info.server_version // 10000
    print(
        f"PostgreSQL {version}, queue {QUEUE}: {args.tasks:,} tasks, {checkpoint_rows:,} checkpoints, "
        f"{args.workers} workers"
    )
    print(f"seeded and analysed in {seeded_in:.1f} s; each page requested {args.repeat} times after a warm-up")
    print(f"{'page':<44} {'median':>9} {'p95':>9}")
    failures = []
    for label, address, check, has_goal in pages:
        times = timed(get(address, check), args.repeat)
        median = statistics.median(times)
        goal = ""
        if has_goal:
            goal = "  ok" if median < GOAL_MS else f"  OVER the {GOAL_MS:.0f} ms goal"
            if median >= GOAL_MS:
                failures.append(label)
        print(f"{label:<44} {median:7.1f} ms {p95(times):7.1f} ms{goal}")

    compare_statements(args.repeat)
    if args.heartbeat_seconds > 0:
        connection.close()
        measure_heartbeat(url, args.heartbeat_seconds)
    if failures:
        print(f"\nover the goal: {', '.join(failures)}")
        sys.exit(1)


def compare_statements(repeat: int) -> None:
    from django.db import connection

    from django_absurd_agents.tables import table

    print("\nfor comparison, statements the list does not run:")
    with connection.cursor() as cursor:
        for label, statement in (
            ("exact count(*) of the queue", f"select count(*) from {table('t', QUEUE)}"),
            (
                "newest 51 by enqueue_at (no index)",
                f"select task_id from {table('t', QUEUE)} order by enqueue_at desc limit 51",
            ),
            (
                "newest 51 by task_id (primary key)",
                f"select task_id from {table('t', QUEUE)} order by task_id desc limit 51",
            ),
        ):

            def run(statement: str = statement) -> object:
                cursor.execute(statement)
                return cursor.fetchall()

            times = timed(run, repeat)
            print(f"{label:<44} {statistics.median(times):7.1f} ms {p95(times):7.1f} ms")


STATS_SQL = """
select (select xact_commit from pg_stat_database where datname = current_database()) as commits,
       n_tup_ins + n_tup_upd as heartbeats, seq_scan + coalesce(idx_scan, 0) as statements
  from pg_stat_user_tables where relname = 'absurd_agents_worker'
"""


def measure_heartbeat(url: str, seconds: float) -> None:
    """Start a real idle worker, and count what it asks of the database over ``seconds``."""
    import psycopg

    env = {**os.environ, "DATABASE_URL": url, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    command = [sys.executable, "-m", "django", "absurd_worker", "--queue", IDLE_QUEUE, "--worker-id", "bench-heartbeat"]
    with psycopg.connect(url, autocommit=True) as stats:
        stats.execute("select absurd.create_queue(%s)", [IDLE_QUEUE])

        def read() -> tuple[int, int, int]:
            stats.execute("select pg_stat_clear_snapshot()")
            row = stats.execute(STATS_SQL).fetchone()
            assert row is not None
            return int(row[0]), int(row[1]), int(row[2])

        def worker_row() -> bool:
            found = stats.execute("select 1 from absurd_agents_worker where worker_id = 'bench-heartbeat'").fetchone()
            return found is not None

        worker = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while not worker_row():
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"the worker did not start: {worker.stderr.read().decode() if worker.stderr else ''}"
                    )
                time.sleep(0.1)
            time.sleep(2)  # past the worker's start-up statements: what follows is the idle steady state
            before = read()
            started = time.monotonic()
            time.sleep(seconds)  # the measurement's length, not a wait for something to happen
            after = read()
            elapsed = time.monotonic() - started
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(30)
            stats.execute("select absurd.drop_queue(%s)", [IDLE_QUEUE])
    per_minute = [(b - a) * 60 / elapsed for a, b in zip(before, after, strict=True)]
    commits = per_minute[0] - 60 / elapsed  # less this connection's own reading
    heartbeats, statements = per_minute[1], per_minute[2]
    print(
        f"\nan idle worker (empty queue {IDLE_QUEUE}, WORKER_HEARTBEAT 5 s, POLL_INTERVAL 0.5 s) over {elapsed:.0f} s:"
    )
    print(f"{'heartbeats per minute':<44} {heartbeats:7.1f}")
    print(f"{'heartbeat statements per minute':<44} {statements:7.1f}  ({statements / max(heartbeats, 1):.1f} a beat)")
    print(f"{'all its transactions per minute':<44} {commits:7.1f}  (claim polls included)")


if __name__ == "__main__":
    main()
