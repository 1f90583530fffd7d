"""The ``django.tasks`` backend against the project's own Absurd calls, side by side in one run.

Run: ``.venv/bin/python bench/bench_tasks_backend.py [--spawns 200] [--rounds 15] [--tasks 1000] [--worker-rounds 3]``
(``--worker-rounds 0``: the enqueue rate only).

1. Enqueue rate: ``@task.enqueue()`` through ``AbsurdTaskBackend`` against ``absurd.spawn_sync`` of the
   same params, each call its own transaction on Django's connection. Within a round the two sides
   alternate call by call (so both see the same moments of load); printed are each side's median
   rate and the median of the per-round ratios (goal: at least 0.9). On a shared machine a few calls
   preempted for milliseconds sway those sums, so the ratio of each side's median call, and their
   difference (what the backend adds to a spawn, in microseconds), are printed too.
2. Worker throughput: ``manage.py absurd_worker`` (one process, default concurrency) runs N trivial
   tasks committed in one transaction while it idles: the sync ``@task`` ``add`` (run through
   ``sync_to_async`` on the task's thread, with Django's task signals), the async ``@task``
   ``multiply``, and the same addition registered as a plain Absurd task. Rate = N / (last
   ``completed_at`` - commit time), both on the database clock; medians of the rounds.

The database is ``absurd_agents_bench_tasks`` on the server of ``$DATABASE_URL``, else on the
embedded server; it is created and migrated when missing.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchdb import database_url, setup_django

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATABASE = "absurd_agents_bench_tasks"
QUEUE = "agents"
PLAIN = "bench_plain_add"


def empty_queue() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("truncate " + ", ".join(f'absurd."{kind}_{QUEUE}"' for kind in "trcew"))


def per_second(call: Callable[[], object], count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        call()
    return count / (time.perf_counter() - started)


@dataclass
class EnqueueRates:
    """Per round: each side's rate (calls / time spent), and the two ratios of backend to plain."""

    backend: list[float] = field(default_factory=list)
    plain: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    typical_ratios: list[float] = field(default_factory=list)
    """Of the median calls: a call that another process preempted for milliseconds does not count."""
    overhead_us: list[float] = field(default_factory=list)
    """Median enqueue minus median spawn, in microseconds: what the backend adds to a spawn."""


def bench_enqueue(count: int, rounds: int) -> EnqueueRates:
    from django.db import connection

    from django_absurd_agents import absurd
    from tests.task_functions import add

    def enqueue() -> object:
        return add.enqueue(20, 22)

    def spawn() -> object:
        return absurd.spawn_sync("tests.task_functions.add", {"args": [20, 22], "kwargs": {}})

    connection.ensure_connection()
    per_second(enqueue, 50)
    per_second(spawn, 50)  # warm both paths
    rates = EnqueueRates()
    clock = time.perf_counter
    for _ in range(rounds):
        empty_queue()
        spent: dict[Callable[[], object], list[float]] = {enqueue: [], spawn: []}
        # Call by call, alternating which side goes first, so that both see the same moments of load.
        for number in range(count):
            for call in (enqueue, spawn) if number % 2 == 0 else (spawn, enqueue):
                started = clock()
                call()
                spent[call].append(clock() - started)
        rates.backend.append(count / sum(spent[enqueue]))
        rates.plain.append(count / sum(spent[spawn]))
        rates.ratios.append(rates.backend[-1] / rates.plain[-1])
        typical_enqueue, typical_spawn = statistics.median(spent[enqueue]), statistics.median(spent[spawn])
        rates.typical_ratios.append(typical_spawn / typical_enqueue)
        rates.overhead_us.append((typical_enqueue - typical_spawn) * 1e6)
    empty_queue()
    return rates


def serve(ready: str) -> None:
    """A worker process (this file re-run with ``serve``): the plain handler registered, then absurd_worker."""
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    import django
    from django.core.management import call_command

    django.setup()

    from django_absurd_agents import absurd

    @absurd.register_task(name=PLAIN, queue=QUEUE)
    async def plain_add(params: Any, ctx: Any) -> int:
        return int(params["args"][0]) + int(params["args"][1])

    call_command("absurd_worker", queues=[QUEUE], poll_interval=0.05, heartbeat_file=ready, verbosity=0)


def start_worker(url: str) -> subprocess.Popen[bytes]:
    ready = Path(tempfile.mkdtemp(prefix="bench-tasks-")) / "ready"
    process = subprocess.Popen(
        [sys.executable, __file__, "serve", str(ready)],
        env={**os.environ, "DATABASE_URL": url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not start (exit {process.poll()})")
        time.sleep(0.05)
    return process


def run_batch(kind: str, count: int) -> float:
    from django.db import connection, transaction

    from django_absurd_agents import absurd
    from tests.task_functions import add, multiply

    empty_queue()
    with transaction.atomic():
        for _ in range(count):
            if kind == "@task add (sync)":
                add.enqueue(20, 22)
            elif kind == "@task multiply (async)":
                multiply.enqueue(6, 7)
            else:
                absurd.spawn_sync(PLAIN, {"args": [20, 22]}, queue=QUEUE)
    with connection.cursor() as cursor:
        cursor.execute("select clock_timestamp()")
        committed = cursor.fetchone()[0]
        deadline = time.monotonic() + 300
        while True:
            cursor.execute(f"select count(*), max(completed_at) from absurd.r_{QUEUE} where state = 'completed'")
            done, last = cursor.fetchone()
            if done >= count:
                return count / (last - committed).total_seconds()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{kind}: only {done} of {count} tasks completed")
            time.sleep(0.05)


def bench_worker(url: str, count: int, rounds: int) -> dict[str, list[float]]:
    kinds = ["@task add (sync)", "@task multiply (async)", "plain Absurd task (async)"]
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    worker = start_worker(url)
    try:
        run_batch(kinds[0], 50)  # warm the worker's imports and connections
        for number in range(rounds):
            order = kinds[number % len(kinds) :] + kinds[: number % len(kinds)]
            for kind in order:
                rates[kind].append(run_batch(kind, count))
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
        empty_queue()
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spawns", type=int, default=200, help="enqueues per side and round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tasks", type=int, default=1000, help="tasks per worker measurement")
    parser.add_argument("--worker-rounds", type=int, default=3, help="0 measures the enqueue rate only")
    args = parser.parse_args()
    url = database_url(DATABASE)
    setup_django(url)
    rates = bench_enqueue(args.spawns, args.rounds)
    median = statistics.median
    print(f"enqueue, {args.rounds} rounds of {args.spawns} (each its own transaction on Django's connection):")
    print(f"  @task.enqueue() (AbsurdTaskBackend)  {median(rates.backend):8.0f} /s")
    print(f"  absurd.spawn_sync()                  {median(rates.plain):8.0f} /s")
    print(f"  ratio (median of rounds)             {median(rates.ratios):8.2f}  (goal >= 0.9)")
    print(f"  ratio of the median calls            {median(rates.typical_ratios):8.2f}")
    print(f"  backend's cost per enqueue           {median(rates.overhead_us):8.0f} us")
    if not args.worker_rounds:  # --worker-rounds 0: the enqueue rate only
        return
    worker_rates = bench_worker(url, args.tasks, args.worker_rounds)
    print(f"absurd_worker, {args.tasks} trivial tasks committed at once, median of {args.worker_rounds} rounds:")
    for kind, values in worker_rates.items():
        print(f"  {kind:28s} {statistics.median(values):8.0f} tasks/s")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        serve(sys.argv[2])
    else:
        main()
