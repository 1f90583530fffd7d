"""A fleet: several ``absurd_worker`` processes against one PostgreSQL, slow agent runs and durable waits at once.

Run: ``python bench/bench_fleet.py [--workers 4] [--concurrency 100] [--agents 2000] [--events 500]
[--sleeps 500] [--json PATH]``. With ``DATABASE_URL`` it works on that server, in a database of its
own, ``absurd_agents_bench_fleet`` (created and migrated if missing; its ``fleet`` queue is emptied
first); without it, on the embedded server (``bench/benchdb.py``).

The worker processes are ``python -m django absurd_worker`` with ``bench/fleet_settings.py`` (the
command ``manage.py absurd_worker`` runs), at the production poll interval. Everything is spawned
up front in one transaction, shuffled with a seed (``bench/fleet_tasks.py``):

* ``--agents`` agent runs whose model sleeps 1-5 s (drawn from the seed: the bench knows the mean);
* ``--events`` runs waiting durably for an event that the bench emits 2-30 s after the commit;
* ``--sleeps`` runs sleeping durably until 2-30 s after they start.

Measured over the run (commit to last completion, on the database clock): runs per second against
the physical limit (slots over the mean model latency), spawn-to-finish of the agent runs, how late
the waiting runs finish after their event or their due time, the most client connections the
server had (``pg_stat_activity``, sampled every 0.25 s) and the most waiting on a lock, PostgreSQL's
CPU (utime + stime of the postmaster and its children, live and exited, from ``/proc``), the workers'
CPU, the WAL written, commits, and the rows written per table. Two figures say whether the machine
was the limit: how long each agent run held its slot beyond its model's latency, and how long the
workers' event loops waited, runnable, for a CPU (``/proc/<pid>/schedstat``). It ends with the same
figures per run and per process, and what they make of 16 processes and of ten times the load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from benchdb import database_url  # noqa: E402
from benchworkers import WorkerProcesses, cpu_seconds  # noqa: E402

QUEUE = "fleet"
DATABASE = "absurd_agents_bench_fleet"
SETTINGS = "fleet_settings"
PREFIXES = ("t", "r", "c", "e", "w")
_SAMPLED = ("server", "database", "lock_waits", "claiming", "running")


def waiting_for_cpu(pids: list[int], *, main_only: bool = False) -> float:
    """Seconds the threads of ``pids`` (or only their main threads) spent runnable but waiting for a CPU.

    On a machine shared with other work this tells a slow run that was starved from one that was not:
    a worker's main thread runs the event loop that every one of its tasks goes through.
    """
    total = 0
    for pid in pids:
        threads = Path(f"/proc/{pid}/task")
        for thread in [threads / str(pid) / "schedstat"] if main_only else threads.glob("*/schedstat"):
            try:
                total += int(thread.read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue
    return total / 1e9


def server_pids(postmaster: int | None) -> list[int]:
    """The postmaster and its live children."""
    if postmaster is None:
        return []
    pids = [postmaster]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                    pids.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return pids


def server_cpu(postmaster: int | None) -> float | None:
    """PostgreSQL's CPU so far: the postmaster, its live children, and the children it has reaped."""
    if postmaster is None:
        return None
    total = cpu_seconds(postmaster, children=True)
    for pid in server_pids(postmaster)[1:]:
        try:
            total += cpu_seconds(pid)
        except OSError:
            continue  # exited meanwhile: its time is now in the postmaster's children's
    return total


def start_workers(count: int, concurrency: int, base: Path) -> WorkerProcesses:
    path = os.pathsep.join(filter(None, [str(ROOT), str(HERE), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "DJANGO_SETTINGS_MODULE": SETTINGS}
    return WorkerProcesses(count, QUEUE, concurrency, base, cwd=ROOT, env=env, start_timeout=120, stop_timeout=60)


@dataclass
class Sampler:
    """Samples ``pg_stat_activity`` on a connection of its own (left out of the counts) until stopped."""

    url: str
    every: float = 0.25
    samples: list[dict[str, int]] = field(default_factory=list)
    busiest: list[tuple[str, int]] = field(default_factory=list)
    """The bench database's connections by their last statement, when there were the most of them."""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.is_set():
                row = conn.execute(
                    "select count(*), count(*) filter (where datname = current_database()), "
                    "count(*) filter (where wait_event_type = 'Lock'), "
                    "count(*) filter (where state = 'active' and query like %s), "
                    f"(select count(*) from absurd.r_{QUEUE} where state = 'running') "
                    "from pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid()",
                    ["%claim_task%"],
                ).fetchone()
                assert row is not None
                if not self.samples or row[1] > max(sample["database"] for sample in self.samples):
                    self.busiest = conn.execute(
                        "select regexp_replace(left(query, 60), '\\s+', ' ', 'g'), count(*) from pg_stat_activity "
                        "where datname = current_database() and pid <> pg_backend_pid() group by 1 order by 2 desc"
                    ).fetchall()
                self.samples.append(dict(zip(_SAMPLED, row, strict=True)))
                self._stop.wait(self.every)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.samples:
            return {}
        figures: dict[str, float] = {}
        for key in self.samples[0]:
            values = [sample[key] for sample in self.samples]
            figures[f"max_{key}"] = max(values)
            figures[f"mean_{key}"] = statistics.fmean(values)
        figures["samples"] = len(self.samples)
        return figures


def sql(query: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(query, params or [])
        return list(cursor.fetchall()) if cursor.description else []


def prepare(url: str) -> None:
    os.environ["DATABASE_URL"] = url
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    for prefix in PREFIXES:
        sql(f"truncate absurd.{prefix}_{QUEUE}")


def plan(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    """The spawns, shuffled: each agent's model latency, each event's delay, each sleep's length."""
    draws = random.Random(args.seed)
    spawns: list[tuple[str, dict[str, Any]]] = []
    spawns += [("fleet_agent", {"latency": round(draws.uniform(*args.latency), 3)}) for _ in range(args.agents)]
    spawns += [
        ("fleet_event", {"event": f"fleet-{n}", "delay": round(draws.uniform(*args.wait), 3)})
        for n in range(args.events)
    ]
    spawns += [("fleet_sleep", {"seconds": round(draws.uniform(*args.wait), 3)}) for _ in range(args.sleeps)]
    draws.shuffle(spawns)
    return spawns


def spawn_all(spawns: list[tuple[str, dict[str, Any]]]) -> tuple[datetime, float]:
    """Spawn everything in one transaction; the commit time on the database clock and on ours."""
    from django.db import transaction

    from django_absurd_agents import absurd

    with transaction.atomic():
        for name, params in spawns:
            absurd.spawn_sync(name, params, max_attempts=1, queue=QUEUE)
    return sql("select clock_timestamp()")[0][0], time.monotonic()


def drain(spawns: list[tuple[str, dict[str, Any]]], committed: float, timeout: float) -> None:
    """Emit each event when its delay is up, until every run has finished."""
    from django_absurd_agents import absurd

    emits = sorted((params["delay"], params["event"]) for name, params in spawns if name == "fleet_event")
    deadline = committed + timeout
    next_poll = next_report = time.monotonic()
    while True:
        now = time.monotonic()
        while emits and committed + emits[0][0] <= now:
            _, event = emits.pop(0)
            absurd.emit_event_sync(event, {"emitted": time.time()}, queue_name=QUEUE)
        if now >= next_poll:
            done, failed, running = sql(
                f"select count(*) filter (where state = 'completed'), count(*) filter (where state = 'failed'), "
                f"count(*) filter (where state = 'running') from absurd.t_{QUEUE}"
            )[0]
            if failed:
                raise RuntimeError(f"{failed} run(s) failed: see `manage.py absurd_tasks --state failed`")
            if done == len(spawns):
                return
            if now >= next_report:
                load = os.getloadavg()[0]
                print(
                    f"  {now - committed:5.0f} s: {done:,} of {len(spawns):,} finished, {running} running, "
                    f"load average {load:.1f}",
                    flush=True,
                )
                next_report = now + 10
            next_poll = now + 0.5
        if now > deadline:
            raise RuntimeError(f"not finished after {timeout:g} s")
        time.sleep(0.02 if emits else 0.1)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def finishes(committed: datetime) -> dict[str, list[float]]:
    """Per kind, seconds from the spawn commit (agents) or from the wake-up (waits) to the finish.

    ``overhead``: how long each agent run held its slot beyond its model's latency.
    """
    rows = sql(
        f"select t.task_name, t.params, r.started_at, r.completed_at, r.result, e.emitted_at from absurd.t_{QUEUE} t "
        f"join absurd.r_{QUEUE} r on r.run_id = t.last_attempt_run "
        f"left join absurd.e_{QUEUE} e on e.event_name = t.params->>'event'"
    )
    out: dict[str, list[float]] = {"all": [], "fleet_agent": [], "fleet_event": [], "fleet_sleep": [], "overhead": []}
    for name, params, started, completed, result, emitted in rows:
        out["all"].append((completed - committed).total_seconds())
        if name == "fleet_agent":
            out[name].append((completed - committed).total_seconds())
            latency = (json.loads(params) if isinstance(params, str) else params)["latency"]
            out["overhead"].append((completed - started).total_seconds() - latency)
        elif name == "fleet_event":
            out[name].append((completed - emitted).total_seconds())
        else:
            out[name].append(completed.timestamp() - float(result))
    return out


def table_writes() -> dict[str, tuple[int, int, int]]:
    """Rows inserted, updated and deleted so far, per table of this database that saw any."""
    sql("select pg_stat_clear_snapshot()")
    rows = sql(
        "select schemaname || '.' || relname, n_tup_ins, n_tup_upd, n_tup_del "
        "from pg_stat_user_tables where schemaname in ('absurd', 'public')"
    )
    return {name: (ins, upd, dele) for name, ins, upd, dele in rows}


def stored_bytes() -> int:
    """Bytes the queue's tables (with their indexes and TOAST) take once the run is over."""
    return sum(int(sql("select pg_total_relation_size(%s::regclass)", [f"absurd.{p}_{QUEUE}"])[0][0]) for p in PREFIXES)


def server_counters() -> tuple[int, int, int]:
    """WAL position (bytes), and the commits and sessions (connections opened) of this database so far."""
    sql("select pg_stat_clear_snapshot()")
    wal, commits, sessions = sql(
        "select pg_current_wal_lsn() - '0/0'::pg_lsn, xact_commit, sessions from pg_stat_database "
        "where datname = current_database()"
    )[0]
    return int(wal), int(commits), int(sessions)


def postmaster_pid() -> int | None:
    """The server's postmaster, when it runs on this machine (the parent of our backend)."""
    backend = sql("select pg_backend_pid()")[0][0]
    try:
        return int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=100, help="Slots per worker process.")
    parser.add_argument("--agents", type=int, default=2000)
    parser.add_argument("--events", type=int, default=500)
    parser.add_argument("--sleeps", type=int, default=500)
    parser.add_argument("--latency", type=float, nargs=2, default=(1.0, 5.0), help="Model latency range, s.")
    parser.add_argument("--wait", type=float, nargs=2, default=(2.0, 30.0), help="Event delay / sleep range, s.")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    url = database_url(DATABASE)
    prepare(url)
    version = sql("select current_setting('server_version'), current_setting('max_connections')::int")[0]
    postmaster = postmaster_pid()
    spawns = plan(args)
    latencies = [params["latency"] for name, params in spawns if name == "fleet_agent"]
    slots = args.workers * args.concurrency
    print(
        f"PostgreSQL {version[0]} (max_connections {version[1]}), {os.cpu_count()} CPUs; {args.workers} workers x "
        f"{args.concurrency} slots; {args.agents:,} agent runs (model {args.latency[0]:g}-{args.latency[1]:g} s, "
        f"mean {statistics.fmean(latencies):.2f} s), {args.events:,} event waits, {args.sleeps:,} durable sleeps",
        flush=True,
    )
    base = Path(tempfile.mkdtemp(prefix="absurd-fleet-"))
    workers = start_workers(args.workers, args.concurrency, base)
    sampler = Sampler(url)
    try:
        time.sleep(2.0)  # imports settled, every worker idle and polling
        wal_before, commits_before, sessions_before = server_counters()
        writes_before = table_writes()
        pg_before, cpu_before = server_cpu(postmaster), workers.cpu_seconds()
        starved_before = (
            waiting_for_cpu(workers.pids, main_only=True),
            waiting_for_cpu(server_pids(postmaster)),
        )
        load_before = os.getloadavg()[0]
        sampler.start()
        started = time.monotonic()
        committed_at, committed = spawn_all(spawns)
        print(f"  spawned {len(spawns):,} in one transaction in {committed - started:.1f} s; draining", flush=True)
        drain(spawns, committed, args.timeout)
        activity = sampler.stop()
        pg_after, cpu_after = server_cpu(postmaster), workers.cpu_seconds()
        starved_after = (
            waiting_for_cpu(workers.pids, main_only=True),
            waiting_for_cpu(server_pids(postmaster)),
        )
        load_after = os.getloadavg()[0]
    finally:
        sampler.stop()
        workers.stop()
    wal_after, commits_after, sessions_after = server_counters()
    writes_after = table_writes()
    times = finishes(committed_at)
    stored = stored_bytes()
    wall = max(times["all"])
    agent_wall = max(times["fleet_agent"])
    runs = len(spawns)
    pg_cpu = None if pg_before is None or pg_after is None else pg_after - pg_before
    worker_cpu = cpu_after - cpu_before
    limit = slots / statistics.fmean(latencies)
    report: dict[str, Any] = {
        "postgres": version[0],
        "max_connections": version[1],
        "workers": args.workers,
        "concurrency": args.concurrency,
        "runs": runs,
        "wall_s": round(wall, 1),
        "runs_per_s": round(runs / wall, 1),
        "agent_runs_per_s": round(args.agents / agent_wall, 1),
        "agent_limit_per_s": round(limit, 1),
        "agent_spawn_to_finish_s": {k: round(percentile(times["fleet_agent"], q), 2) for k, q in _QS},
        "agent_slot_beyond_model_s": {k: round(percentile(times["overhead"], q), 3) for k, q in _QS},
        "event_emit_to_finish_s": {k: round(percentile(times["fleet_event"], q), 2) for k, q in _QS}
        if args.events
        else None,
        "sleep_due_to_finish_s": {k: round(percentile(times["fleet_sleep"], q), 2) for k, q in _QS}
        if args.sleeps
        else None,
        "activity": {k: round(v, 2) for k, v in activity.items()},
        "busiest": sampler.busiest,
        "postgres_cpu_s": None if pg_cpu is None else round(pg_cpu, 1),
        "worker_cpu_s": round(worker_cpu, 1),
        "worker_loops_waiting_for_cpu_s": round(starved_after[0] - starved_before[0], 1),
        "postgres_waiting_for_cpu_s": round(starved_after[1] - starved_before[1], 1),
        "load_average": [round(load_before, 1), round(load_after, 1)],
        "wal_mb": round((wal_after - wal_before) / 2**20, 1),
        "commits": commits_after - commits_before,
        "stored_kb_per_run": round(stored / runs / 1024, 2),
        "sessions": sessions_after - sessions_before - 1,  # the sampler's
        "table_writes": {
            name: [after[i] - writes_before.get(name, (0, 0, 0))[i] for i in range(3)]
            for name, after in writes_after.items()
            if after != writes_before.get(name, (0, 0, 0))
        },
    }
    print_report(report, args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


_QS = (("p50", 0.5), ("p99", 0.99), ("max", 1.0))


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    runs, wall = report["runs"], report["wall_s"]
    activity = report["activity"]
    print(f"\nFinished {runs:,} runs in {wall} s (commit to last completion): {report['runs_per_s']} runs/s")
    print(
        f"  agent runs: {report['agent_runs_per_s']}/s against a physical limit of {report['agent_limit_per_s']}/s "
        f"(slots / mean model latency) = {report['agent_runs_per_s'] / report['agent_limit_per_s']:.0%}"
    )
    for label, key in (
        ("agent runs, spawn to finish", "agent_spawn_to_finish_s"),
        ("agent runs, slot held beyond model", "agent_slot_beyond_model_s"),
        ("event waits, emit to finish", "event_emit_to_finish_s"),
        ("durable sleeps, due to finish", "sleep_due_to_finish_s"),
    ):
        if report[key]:
            print(f"  {label:<32} " + ", ".join(f"{k} {v:.2f} s" for k, v in report[key].items()))
    print(
        f"  client connections: at most {activity['max_server']:.0f} on the server, {activity['max_database']:.0f} "
        f"on the bench database (mean {activity['mean_database']:.1f}; max_connections {report['max_connections']})"
    )
    print(
        f"  runs holding a worker slot: mean {activity['mean_running']:.0f}, at most {activity['max_running']:.0f} "
        f"of {args.workers * args.concurrency}"
    )
    for statement, count in report["busiest"]:
        print(f"    {count:4d} whose last statement was {statement!r}")
    print(
        f"  connections opened during the run: {report['sessions']:,} "
        f"({report['sessions'] / args.workers:.0f} per worker process)"
    )
    print(
        f"  backends waiting on a lock: at most {activity['max_lock_waits']:.0f} "
        f"(mean {activity['mean_lock_waits']:.2f}); "
        f"claims in progress: at most {activity['max_claiming']:.0f} (mean {activity['mean_claiming']:.2f}); "
        f"{activity['samples']:.0f} samples"
    )
    pg = report["postgres_cpu_s"]
    if pg is not None:
        print(f"  PostgreSQL CPU: {pg} s = {pg / wall:.0%} of a core, {pg / runs * 1000:.1f} ms per run")
    cpu = report["worker_cpu_s"]
    print(
        f"  worker CPU: {cpu} s = {cpu / wall:.0%} of a core for {args.workers} processes, "
        f"{cpu / runs * 1000:.1f} ms per run"
    )
    print(
        f"  waiting for a CPU (runnable, not running): the workers' event loops "
        f"{report['worker_loops_waiting_for_cpu_s'] / args.workers / wall:.0%} of the run each, "
        f"PostgreSQL's processes {report['postgres_waiting_for_cpu_s']} s in all; machine load average "
        f"{report['load_average'][0]} at the start, {report['load_average'][1]} at the end"
    )
    print(
        f"  WAL: {report['wal_mb']} MB ({report['wal_mb'] * 1024 / runs:.1f} kB per run); "
        f"commits: {report['commits']:,} ({report['commits'] / runs:.1f} per run)"
    )
    print(f"  the queue's tables hold {report['stored_kb_per_run']} kB per finished run until absurd_cleanup")
    print("  rows written per run:")
    for name, (ins, upd, dele) in sorted(report["table_writes"].items()):
        print(f"    {name:<42} {ins / runs:5.1f} inserted, {upd / runs:5.1f} updated, {dele / runs:5.1f} deleted")
    print_paper(report, args)


def print_paper(report: dict[str, Any], args: argparse.Namespace) -> None:
    """The measured per-run and per-process figures scaled to 16 processes, and to ten times the load."""
    runs, wall = report["runs"], report["wall_s"]
    per_run_pg = (report["postgres_cpu_s"] or 0) / runs
    per_run_worker = report["worker_cpu_s"] / runs
    per_run_wal = report["wal_mb"] / runs
    per_run_commits = report["commits"] / runs
    per_process_conns = (report["activity"]["max_database"] - 1) / args.workers  # the bench's own connection
    mean_latency = args.concurrency * args.workers / report["agent_limit_per_s"]
    mix = runs / args.agents  # runs of every kind per agent run, as in this run
    print("\nOn paper (the figures above per run and per process, scaled):")
    scenarios = (
        (args.workers, 1, f"this fleet ({args.workers} processes), this load"),
        (args.workers, 10, "this fleet, 10x the load"),
        (16, 1, "16 processes, this load"),
        (16, 10, "16 processes, 10x the load"),
        (args.workers * 10, 10, f"{args.workers * 10} processes, 10x the load (this run's drain time)"),
    )
    for processes, scale, label in scenarios:
        slots = processes * args.concurrency
        agent_rate = slots / mean_latency
        rate = agent_rate * mix
        drain_s = args.agents * scale / agent_rate
        print(
            f"  {label}: {agent_rate:,.0f} agent runs/s ({rate:,.0f} runs/s) at best, {drain_s:.0f} s to drain; "
            f"PostgreSQL {rate * per_run_pg:.2f} cores, workers {rate * per_run_worker:.2f} cores "
            f"({rate * per_run_worker / processes:.2f} each), {processes * per_process_conns + 1:,.0f} connections, "
            f"WAL {rate * per_run_wal:.1f} MB/s, {rate * per_run_commits:,.0f} commits/s"
        )
    print(f"  (measured here: {runs / wall:.0f} runs/s)")


if __name__ == "__main__":
    sys.exit(main())
