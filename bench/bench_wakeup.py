"""Spawn-to-claim latency with an idle worker: spawns that notify (``absurd.spawn_sync``) against
spawns that do not (the raw SQL of absurdctl or another SDK), side by side in one run.

Run: ``python bench/bench_wakeup.py [--spawns 40] [--poll-interval 0.5]`` (``DATABASE_URL`` or the
embedded server; the database ``absurd_agents_bench_wakeup`` is created and migrated if needed).

One ``absurd_worker`` process idles on the queue with the given poll interval. Spawns of a trivial
task alternate between the two kinds, each after the previous one has finished and a random pause,
so the worker is idle at every spawn. Latency = the run's ``started_at`` minus the task's
``enqueue_at``, both on the database clock.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import benchdb  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spawns", type=int, default=40, help="Spawns of each kind.")
    parser.add_argument("--poll-interval", type=float, default=0.5)
    args = parser.parse_args()
    url = benchdb.database_url("absurd_agents_bench_wakeup")
    benchdb.setup_django(url)
    from django.db import connection

    from django_absurd_agents import absurd

    with connection.cursor() as cursor:
        for prefix in "trcew":
            cursor.execute(f"truncate absurd.{prefix}_agents")
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "django", "absurd_worker", "--queue", "agents", "--poll-interval",
         str(args.poll_interval), "-v", "0"],
        env={**env, "DJANGO_SETTINGS_MODULE": "tests.settings_chaos"},
        cwd=ROOT,
    )  # fmt: skip
    latencies: dict[str, list[float]] = {"spawn_sync (NOTIFY)": [], "raw spawn_task (poll)": []}
    try:
        time.sleep(2.0)  # the worker's startup, not a synchronisation: the first spawns are discarded anyway
        kinds = list(latencies) * args.spawns
        for index, kind in enumerate(kinds):
            time.sleep(random.uniform(0.05, args.poll_interval))  # land anywhere in the poll cycle
            if kind.startswith("spawn_sync"):
                task_id = absurd.spawn_sync("worker_noop", {})["task_id"]
            else:
                with connection.cursor() as cursor:
                    cursor.execute(
                        "select task_id from absurd.spawn_task('agents', 'worker_noop', '{}'::jsonb, "
                        "'{\"max_attempts\": 1}'::jsonb)"
                    )
                    task_id = str(cursor.fetchone()[0])
            deadline = time.monotonic() + 30
            while True:
                with connection.cursor() as cursor:
                    cursor.execute(
                        "select extract(epoch from r.started_at - t.enqueue_at), t.state from absurd.t_agents t "
                        "join absurd.r_agents r on r.task_id = t.task_id where t.task_id = %s",
                        [task_id],
                    )
                    row = cursor.fetchone()
                if row is not None and row[1] == "completed":
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"task {task_id} did not finish")
                time.sleep(0.005)
            if index >= 2:
                latencies[kind].append(float(row[0]) * 1000)
    finally:
        worker.terminate()
        worker.wait(30)
    report = {
        kind: {"n": len(v), "p50_ms": round(statistics.median(v), 1), "p90_ms": round(percentile(v, 0.9), 1),
               "max_ms": round(max(v), 1)}
        for kind, v in latencies.items()
    }  # fmt: skip
    print(f"Spawn to claim, idle worker polling every {args.poll_interval:g}s:")
    for kind, figures in report.items():
        p50, p90, worst = figures["p50_ms"], figures["p90_ms"], figures["max_ms"]
        print(f"  {kind:24} p50 {p50:7.1f} ms   p90 {p90:7.1f} ms   max {worst:7.1f} ms")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
