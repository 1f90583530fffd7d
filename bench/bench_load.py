"""Load: 10,000 queued agent tasks drained by two worker processes, then ``absurd_cleanup``.

Run: ``python bench/bench_load.py [--tasks 10000] [--workers 2] [--concurrency 16] [--json PATH]``.
With ``DATABASE_URL`` set it works on that server, in a database of its own, ``absurd_agents_bench_load``
(created and migrated if missing; its ``agents`` queue is emptied first); without it, in an embedded
PostgreSQL of its own in a temporary directory.

Each task is an agent run (``tests.chaos_tasks.load_agent``): a zero-latency FunctionModel asks for an
instant tool, then answers, so a task writes three checkpoints (model request, tool call, model
request) besides its claim and its completion. What is measured is the engine and the database,
not a model.

1. **Throughput.** The workers start and idle; the tasks are committed in one transaction; the rate is
   the task count over the time from the commit to the last completion, both on the database clock.
2. **Cleanup.** The queue's ``cleanup_ttl`` is set to zero and ``manage.py absurd_cleanup`` runs, as a
   cron job would once the tasks have aged. Row counts, table sizes and dead tuples of the queue's
   tables are shown before, after it, and after autovacuum has been through (or a manual ``VACUUM``
   when ``--no-wait`` is given or autovacuum has not come within ``--autovacuum-wait`` seconds).
3. **Healthy afterwards.** A second round of ``--second-round`` tasks is drained the same way: its rate
   should match the first, and the tables should reuse the freed space rather than grow.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchworkers import WorkerProcesses  # noqa: E402  (this script's folder is first on sys.path)

QUEUE = "agents"
TASK = "load_agent"
SETTINGS = "tests.settings_chaos"
PREFIXES = ("t", "r", "c", "e", "w")
DATABASE = "absurd_agents_bench_load"
"""Its own database, whatever ``DATABASE_URL`` names: the bench empties the ``agents`` queue."""


def prepare_database(url: str | None, base: Path) -> Any:
    """Point Django at the database (migrated); returns the embedded server when this process started one."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    server = None
    if url is None:
        from django_absurd_agents.embedded import ensure_server

        server = ensure_server(base / "pg")
        server.create_database(DATABASE)
        url = server.url(DATABASE)
    else:
        admin = make_conninfo(url, dbname="postgres")
        with psycopg.connect(admin, autocommit=True) as conn:
            if not conn.execute("select 1 from pg_database where datname = %s", [DATABASE]).fetchone():
                conn.execute(sql.SQL("create database {}").format(sql.Identifier(DATABASE)))
        url = make_conninfo(url, dbname=DATABASE)
    os.environ["DATABASE_URL"] = url
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    return server


def sql(query: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(query, params or [])
        return list(cursor.fetchall()) if cursor.description else []


def empty_queue() -> None:
    for prefix in PREFIXES:
        sql(f"truncate absurd.{prefix}_{QUEUE}")


def table_stats() -> dict[str, dict[str, Any]]:
    """Rows, on-disk size (with indexes and TOAST) and the statistics collector's live/dead tuples."""
    sql("select pg_stat_clear_snapshot()")
    stats: dict[str, dict[str, Any]] = {}
    for prefix in PREFIXES:
        name = f"{prefix}_{QUEUE}"
        rows = sql(f"select count(*) from absurd.{name}")[0][0]
        size, live, dead, vacuumed = sql(
            "select pg_total_relation_size(c.oid), coalesce(s.n_live_tup, 0), coalesce(s.n_dead_tup, 0), "
            "greatest(s.last_autovacuum, s.last_vacuum) "
            "from pg_class c join pg_namespace n on n.oid = c.relnamespace "
            "left join pg_stat_user_tables s on s.relid = c.oid where n.nspname = 'absurd' and c.relname = %s",
            [name],
        )[0]
        stats[name] = {"rows": rows, "size_kb": size // 1024, "live": live, "dead": dead, "vacuumed_at": vacuumed}
    return stats


def print_stats(title: str, stats: dict[str, dict[str, Any]]) -> None:
    print(f"\n{title}")
    print(f"  {'table':<10} {'rows':>8} {'size':>10} {'live tuples':>12} {'dead tuples':>12}")
    for name, row in stats.items():
        print(f"  {name:<10} {row['rows']:>8} {row['size_kb']:>8}kB {row['live']:>12} {row['dead']:>12}")


def start_workers(count: int, concurrency: int, base: Path) -> WorkerProcesses:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    options = ("--poll-interval", "0.1", "--claim-timeout", "60")
    return WorkerProcesses(count, QUEUE, concurrency, base, cwd=ROOT, env=env, options=options)


def drain_round(tasks: int, first: int, timeout: float, label: str) -> dict[str, Any]:
    """Commit ``tasks`` spawns at once and wait until every one has completed; the rate on the DB clock."""
    from django.db import transaction

    from django_absurd_agents import absurd

    started = time.monotonic()
    with transaction.atomic():
        ids = [absurd.spawn_sync(TASK, {"n": n})["task_id"] for n in range(first, first + tasks)]
    spawn_seconds = time.monotonic() - started
    committed = sql("select clock_timestamp()")[0][0]
    print(f"{label}: {tasks:,} tasks committed in one transaction ({tasks / spawn_seconds:,.0f} spawns/s); draining")
    deadline = time.monotonic() + timeout
    while True:
        done, failed = sql(
            f"select count(*) filter (where state = 'completed'), count(*) filter (where state = 'failed') "
            f"from absurd.t_{QUEUE} where task_id = any(%s::uuid[])",
            [ids],
        )[0]
        if failed:
            raise RuntimeError(f"{failed} task(s) failed; see `manage.py absurd_tasks --state failed`")
        if done == tasks:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {done} of {tasks} tasks completed within {timeout:g}s")
        time.sleep(0.5)
    last = sql(f"select max(completed_at) from absurd.r_{QUEUE} where task_id = any(%s::uuid[])", [ids])[0][0]
    seconds = (last - committed).total_seconds()
    rate = tasks / seconds
    print(f"{label}: drained in {seconds:.1f}s, {rate:,.0f} tasks/s")
    return {
        "tasks": tasks,
        "seconds": round(seconds, 1),
        "tasks_per_s": round(rate),
        "spawns_per_s": round(tasks / spawn_seconds),
    }


def wait_for_autovacuum(seconds: float, since: Any) -> bool:
    """Whether autovacuum went through every queue table with dead tuples within ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        stats = table_stats()
        pending = [
            name
            for name, row in stats.items()
            if row["dead"] > 0 and (row["vacuumed_at"] is None or row["vacuumed_at"] < since)
        ]
        if not pending:
            return True
        time.sleep(2)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--second-round", type=int, default=2_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16, help="Slots per worker.")
    parser.add_argument("--timeout", type=float, default=600.0, help="Give up draining after this many seconds.")
    parser.add_argument("--autovacuum-wait", type=float, default=90.0)
    parser.add_argument("--no-wait", action="store_true", help="VACUUM at once instead of waiting for autovacuum.")
    parser.add_argument("--json", type=Path, help="Write the figures here as JSON.")
    args = parser.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="absurd-load-"))
    base.chmod(0o755)  # the embedded server runs as an unprivileged user when we are root
    server = None
    workers: WorkerProcesses | None = None
    report: dict[str, Any] = {"workers": args.workers, "concurrency": args.concurrency}
    began = time.monotonic()
    try:
        server = prepare_database(os.environ.get("DATABASE_URL"), base)
        version = sql("select current_setting('server_version')")[0][0]
        where = "embedded, Unix socket" if server is not None else "DATABASE_URL"
        print(f"PostgreSQL {version} ({where}); {args.workers} workers x {args.concurrency} slots")
        report["postgres"] = f"{version} ({where})"
        empty_queue()
        workers = start_workers(args.workers, args.concurrency, base)
        cpu_before = workers.cpu_seconds()
        report["first_round"] = drain_round(args.tasks, 0, args.timeout, "Round 1")
        report["first_round"]["worker_cpu_s"] = round(workers.cpu_seconds() - cpu_before, 1)

        drained = table_stats()
        print_stats("Queue tables once drained:", drained)
        sql("select absurd.set_queue_policy(%s, %s::jsonb)", [QUEUE, json.dumps({"cleanup_ttl": "0 seconds"})])
        since = sql("select now()")[0][0]
        started = time.monotonic()
        cleanup = subprocess.run(
            [sys.executable, "-m", "django", "absurd_cleanup", "--queue", QUEUE],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            check=True,
        )
        cleanup_seconds = time.monotonic() - started
        print(f"\nabsurd_cleanup ({cleanup_seconds:.1f}s): {cleanup.stdout.strip()}")
        cleaned = table_stats()
        print_stats("After absurd_cleanup:", cleaned)
        if not args.no_wait and wait_for_autovacuum(args.autovacuum_wait, since):
            vacuum = "autovacuum"
        else:
            for prefix in PREFIXES:
                sql(f"vacuum (analyze) absurd.{prefix}_{QUEUE}")
            vacuum = "manual VACUUM"
        vacuumed = table_stats()
        print_stats(f"After {vacuum}:", vacuumed)

        report["second_round"] = drain_round(args.second_round, args.tasks, args.timeout, "Round 2")
        again = table_stats()
        print_stats("After the second round:", again)
        report.update(
            cleanup_s=round(cleanup_seconds, 1),
            cleanup_output=cleanup.stdout.strip(),
            vacuum=vacuum,
            tables={"drained": drained, "cleaned": cleaned, "vacuumed": vacuumed, "second_round": again},
        )
    finally:
        if workers is not None:
            workers.stop()
        if server is not None:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)
    report["total_s"] = round(time.monotonic() - began, 1)
    grown = {
        name: (row["size_kb"], again[name]["size_kb"])
        for name, row in drained.items()
        if again[name]["size_kb"] > row["size_kb"] * 1.1 + 64
    }
    print(
        f"\nThroughput: {report['first_round']['tasks_per_s']:,} tasks/s for {args.tasks:,} tasks, "
        f"{report['second_round']['tasks_per_s']:,} tasks/s after cleanup; "
        f"tables {'grew: ' + str(grown) if grown else 'did not grow past their first-round size'}; "
        f"{report['total_s']}s in all."
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
