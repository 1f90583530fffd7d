"""Chaos run: durable agent tasks under SIGKILLed workers and a PostgreSQL restart, then the proof.

Run: ``make chaos`` (``python bench/chaos.py``), or ``python bench/chaos.py --short`` (what the test
suite runs). Options: ``--tasks``, ``--duration``, ``--workers``, ``--concurrency``, ``--kill-every``,
``--seed``, ``--json PATH`` (the report as JSON), ``--keep`` (leave the logs in the temporary directory).

What happens:

1. A PostgreSQL of its own: the embedded server in a temporary directory, migrated. The workers reach
   it through ``DATABASE_URL``; nothing else on the machine is touched.
2. ``--workers`` real worker processes (``python -m django absurd_worker --claim-timeout 2 ...``,
   settings ``tests.settings_chaos``, tasks ``tests.chaos_tasks``).
3. ``--tasks`` agent tasks are spawned evenly over most of ``--duration``. Each is an agent run whose
   FunctionModel sleeps 0-300 ms per request and whose tool has a side effect, eight times over.
   Every model request, side effect and execution of the task's code is appended to a log file by
   the worker that ran it, outside any checkpoint.
4. Meanwhile a killer SIGKILLs a random worker every ``--kill-every`` seconds or so and starts a
   replacement; half-way through, the database is stopped, held down for a second, and started again.
   Nobody restarts anything for the workers: they must reconnect by themselves.
5. Once every task has finished, the workers are stopped and the log is checked against the kills,
   the restart and the checkpoint table:

   * every task completed, with the answer built from its eight side effects;
   * no checkpoint that had committed was executed again: a model request (or a side effect) ran a
     second time only when its first execution never committed, because its worker was killed in
     flight or the database went away under it; each such repeat is matched to its cause;
   * no task ran in two places at once: the executions of one task never overlap in time (a killed
     worker's execution ends when it is killed);
   * no worker exited by itself: all of them rode out the database restart.

The exit status is 0 when every check holds. The figures (kills, repeats, time from a kill to the
resume, recovery after the restart) are printed, and written as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUEUE = "agents"
TASK = "chaos_agent"
AGENT = "chaos"
SETTINGS = "tests.settings_chaos"
NS = 1_000_000_000


# --- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    tasks: int
    duration: float
    workers: int
    concurrency: int
    kill_every: float
    claim_timeout: int
    poll_interval: float
    pg_down: float
    max_latency: float
    drain_timeout: float
    seed: int

    @property
    def spawn_window(self) -> float:
        """Tasks arrive evenly over most of the run, so there is work in flight for every kill."""
        return self.duration * 0.85

    @property
    def kill_window(self) -> float:
        return self.duration * 0.9


def parse_args(argv: list[str] | None = None) -> tuple[Plan, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="30 tasks over ~12 s: 2-3 kills, one restart.")
    parser.add_argument("--tasks", type=int)
    parser.add_argument("--duration", type=float, help="Seconds of chaos (spawning and killing).")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4, help="Slots per worker.")
    parser.add_argument("--kill-every", type=float, help="Mean seconds between two kills.")
    parser.add_argument("--claim-timeout", type=int, default=2)
    parser.add_argument("--poll-interval", type=float, default=0.2)
    parser.add_argument("--pg-down", type=float, default=1.0, help="Seconds the database stays down.")
    parser.add_argument(
        "--max-latency",
        type=float,
        default=0.3,
        help="Longest model request in seconds (each sleeps 0 to this); above --claim-timeout, steps outlive leases.",
    )
    parser.add_argument("--drain-timeout", type=float, default=90.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--json", type=Path, help="Write the report here as JSON.")
    parser.add_argument("--keep", action="store_true", help="Keep the temporary directory (logs, database).")
    args = parser.parse_args(argv)
    short = args.short
    plan = Plan(
        tasks=args.tasks or (30 if short else 100),
        duration=args.duration or (12.0 if short else 60.0),
        workers=args.workers,
        concurrency=args.concurrency,
        kill_every=args.kill_every or 3.0,
        claim_timeout=args.claim_timeout,
        poll_interval=args.poll_interval,
        pg_down=args.pg_down,
        max_latency=args.max_latency,
        drain_timeout=args.drain_timeout,
        seed=args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000),
    )
    return plan, args


# --- the processes ------------------------------------------------------------------------------


@dataclass
class Worker:
    slot: int
    generation: int
    process: subprocess.Popen[bytes]
    log: Path
    started: float = field(default_factory=time.monotonic)


class Fleet:
    """The worker processes, each in a numbered slot; a killed worker's slot gets a new process."""

    def __init__(self, plan: Plan, env: dict[str, str], log_dir: Path) -> None:
        self.plan = plan
        self.env = env
        self.log_dir = log_dir
        self.workers: dict[int, Worker] = {}
        self.kills: list[dict[str, Any]] = []
        self.unexpected_exits: list[dict[str, Any]] = []
        self._generations: dict[int, int] = defaultdict(int)

    def start(self, slot: int) -> Worker:
        generation = self._generations[slot] = self._generations[slot] + 1
        log = self.log_dir / f"worker-{slot}-{generation}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "django",
                    "absurd_worker",
                    "--queue",
                    QUEUE,
                    "--concurrency",
                    str(self.plan.concurrency),
                    "--claim-timeout",
                    str(self.plan.claim_timeout),
                    "--poll-interval",
                    str(self.plan.poll_interval),
                    "--shutdown-grace",
                    "5",
                    "--worker-id",
                    f"chaos-{slot}.{generation}",
                ],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        worker = Worker(slot=slot, generation=generation, process=process, log=log)
        self.workers[slot] = worker
        return worker

    def kill_one(self, rng: random.Random) -> dict[str, Any] | None:
        """SIGKILL a random worker that has been up long enough to be working, and replace it."""
        now = time.monotonic()
        ready = [w for w in self.workers.values() if w.process.poll() is None and now - w.started > 2.0]
        if not ready:
            return None
        victim = rng.choice(ready)
        before = time.monotonic_ns()
        victim.process.kill()
        victim.process.wait()
        kill = {"pid": victim.process.pid, "slot": victim.slot, "t0": before, "t": time.monotonic_ns()}
        self.kills.append(kill)
        self.start(victim.slot)
        return kill

    def check(self) -> None:
        """A worker that exited without being killed (a database error it did not survive) is a failure."""
        for slot, worker in list(self.workers.items()):
            code = worker.process.poll()
            if code is not None:
                self.unexpected_exits.append(
                    {"slot": slot, "pid": worker.process.pid, "code": code, "log": tail(worker.log)}
                )
                if len(self.unexpected_exits) > 3 * self.plan.workers:
                    raise RuntimeError(f"Workers keep exiting; the last one said:\n{tail(worker.log, 40)}")
                self.start(slot)

    def stop_all(self) -> None:
        for worker in self.workers.values():
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        for worker in self.workers.values():
            try:
                worker.process.wait(20)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- the database -------------------------------------------------------------------------------


def start_database(base: Path) -> tuple[Any, str]:
    from django_absurd_agents.embedded import ensure_server

    server = ensure_server(base / "pg")
    server.create_database("chaos")
    return server, server.url("chaos")


def setup_django(url: str) -> None:
    os.environ["DATABASE_URL"] = url
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)


def spawn(n: int, tag: str) -> str:
    """Spawn task ``n``, retrying through a database outage; the idempotency key makes a retry safe."""
    from django.db import Error, connection

    from django_absurd_agents import absurd

    deadline = time.monotonic() + 30
    while True:
        try:
            spawned = absurd.spawn_sync(
                TASK,
                {"n": n},
                idempotency_key=f"{tag}-{n}",
                max_attempts=50,  # kills consume attempts; a task must outlive its share of them
                retry_strategy={"kind": "none"},  # so the time to resume is the lease alone
            )
            return spawned["task_id"]
        except Error:
            connection.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def query(sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    from django.db import Error, connection

    deadline = time.monotonic() + 30
    while True:
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, params or [])
                return list(cursor.fetchall())
        except Error:
            connection.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def unfinished(task_ids: list[str]) -> int:
    rows = query(
        f"select count(*) from absurd.t_{QUEUE} where task_id = any(%s::uuid[]) "
        "and state not in ('completed', 'failed', 'cancelled')",
        [task_ids],
    )
    return int(rows[0][0])


# --- the run ------------------------------------------------------------------------------------


def run(plan: Plan, base: Path) -> dict[str, Any]:
    rng = random.Random(plan.seed)
    began = time.monotonic()
    server, url = start_database(base)
    setup_django(url)
    log_path = base / "events.jsonl"
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "DJANGO_SETTINGS_MODULE": SETTINGS,
        "CHAOS_LOG": str(log_path),
        "CHAOS_MAX_LATENCY": str(plan.max_latency),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    log_dir = base / "workers"
    log_dir.mkdir()
    fleet = Fleet(plan, env, log_dir)
    for slot in range(plan.workers):
        fleet.start(slot)

    tag = f"chaos-{plan.seed}-{os.getpid()}"
    spawn_at = [plan.spawn_window * i / plan.tasks for i in range(plan.tasks)]
    kill_at: list[float] = []
    moment = plan.kill_every * rng.uniform(0.7, 1.3)
    while moment < plan.kill_window:
        kill_at.append(moment)
        moment += plan.kill_every * rng.uniform(0.7, 1.3)
    restart_at = plan.duration / 2
    restart: dict[str, Any] = {}

    task_ids: list[str] = []
    chaos_start = time.monotonic()
    try:
        while len(task_ids) < plan.tasks or kill_at or not restart:
            elapsed = time.monotonic() - chaos_start
            while len(task_ids) < plan.tasks and spawn_at[len(task_ids)] <= elapsed:
                task_ids.append(spawn(len(task_ids), tag))
            if kill_at and kill_at[0] <= elapsed:
                kill_at.pop(0)
                kill = fleet.kill_one(rng)
                if kill is not None:
                    print(f"  {elapsed:5.1f}s  SIGKILL worker pid {kill['pid']} (slot {kill['slot']})", flush=True)
            if not restart and elapsed >= restart_at:
                print(f"  {elapsed:5.1f}s  stopping PostgreSQL for {plan.pg_down:g}s", flush=True)
                restart["down"] = time.monotonic_ns()
                server.stop()
                time.sleep(plan.pg_down)  # the outage itself, not a synchronisation
                server, _ = start_database(base)
                restart["up"] = time.monotonic_ns()
                print(f"  {time.monotonic() - chaos_start:5.1f}s  PostgreSQL is back", flush=True)
            fleet.check()
            time.sleep(0.02)
        print(f"  {time.monotonic() - chaos_start:5.1f}s  chaos over; waiting for the tasks to finish", flush=True)
        deadline = time.monotonic() + plan.drain_timeout
        while unfinished(task_ids):
            fleet.check()
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
        finished = time.monotonic()
        fleet.check()
    finally:
        fleet.stop_all()
    report = analyse(plan, task_ids, fleet, restart, log_path)
    report["timing"] = {
        "chaos_s": round(finished - chaos_start, 1),
        "total_s": round(time.monotonic() - began, 1),
    }
    server.stop()
    return report


# --- the proof ----------------------------------------------------------------------------------


def model_checkpoint(call: int) -> str:
    name = f"{AGENT}__model.request"
    return name if call == 1 else f"{name}#{call}"


def tool_checkpoint(step: int) -> str:
    name = f"{AGENT}__function_toolset__<agent>.call_tool:record_effect"
    return name if step == 1 else f"{name}#{step}"


def summary(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0, "median": None, "max": None}
    return {"count": len(values), "median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def analyse(plan: Plan, task_ids: list[str], fleet: Fleet, restart: dict[str, Any], log_path: Path) -> dict[str, Any]:
    from tests.chaos_tasks import STEPS, expected_output

    failures: list[str] = []
    events = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []
    kills_by_pid: dict[int, list[int]] = defaultdict(list)
    for kill in fleet.kills:
        kills_by_pid[kill["pid"]].append(kill["t"])

    def killed_after(pid: int, t: int) -> int | None:
        later = [k for k in kills_by_pid.get(pid, []) if k >= t]
        return min(later) if later else None

    # Executions of the task's code, of each model request and of each side effect.
    runs: dict[str, dict[str, Any]] = {}
    model: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    model_by_run: dict[tuple[str, int], dict[str, Any]] = {}
    effects: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    furthest_call: dict[str, int] = defaultdict(int)
    furthest_effect: dict[str, int] = defaultdict(int)
    for event in events:
        kind, run_id = event["kind"], event["run"]
        if kind == "run-start":
            runs[run_id] = {"task": event["task"], "pid": event["pid"], "start": event["t"], "end": None}
        elif kind == "run-end":
            runs[run_id].update(end=event["t"], outcome=event["outcome"])
        elif kind == "model-start":
            execution = {"run": run_id, "pid": event["pid"], "start": event["t"], "end": None}
            if (run_id, event["call"]) in model_by_run:
                failures.append(f"run {run_id} executed model request {event['call']} twice")
            model_by_run[(run_id, event["call"])] = execution
            model[(event["task"], event["call"])].append(execution)
            furthest_call[run_id] = max(furthest_call[run_id], event["call"])
        elif kind == "model-end":
            model_by_run[(run_id, event["call"])]["end"] = event["t"]
        elif kind == "effect":
            effects[(event["task"], event["step"])].append({"run": run_id, "pid": event["pid"], "start": event["t"]})
            furthest_effect[run_id] = max(furthest_effect[run_id], event["step"])

    rows = query(f"select task_id::text, state, completed_payload from absurd.t_{QUEUE}")
    tasks = {row[0]: (row[1], json.loads(row[2]) if isinstance(row[2], str) else row[2]) for row in rows}
    owners = {
        (row[0], row[1]): row[2]
        for row in query(f"select task_id::text, checkpoint_name, owner_run_id::text from absurd.c_{QUEUE}")
    }
    claim_timeouts = query(f"select count(*) from absurd.r_{QUEUE} where failure_reason->>'name' = '$ClaimTimeout'")

    # 1. Every task completed, with the answer its side effects make.
    completed = 0
    for task_id in task_ids:
        state, payload = tasks.get(task_id, ("missing", None))
        if state != "completed":
            failures.append(f"task {task_id} is {state}")
        elif not payload or payload.get("output") != expected_output():
            failures.append(f"task {task_id} completed with {payload!r}")
        else:
            completed += 1

    # 2. A step executed again only when its earlier execution never committed, and for a known cause.
    def cause(execution: dict[str, Any]) -> str | None:
        """Why this execution did not commit: its worker was killed, or the database went away."""
        record = runs.get(execution["run"])
        if record is None:
            return None
        if record["end"] is None:
            killed = killed_after(execution["pid"], execution["start"])
            return "kill" if killed is not None else None
        if record.get("outcome") != "returned" and restart and record["end"] >= restart["down"]:
            return "database restart"
        return None

    def repeats(groups: dict[tuple[str, int], list[dict[str, Any]]], what: str, committed: Any) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for (task_id, number), executions in groups.items():
            executions.sort(key=lambda e: e["start"])
            checkpoint_owner = owners.get((task_id, committed["name"](number)))
            if checkpoint_owner is None or all(e["run"] != checkpoint_owner for e in executions):
                failures.append(f"{what} {number} of task {task_id}: checkpoint owned by a run that never executed it")
            for earlier in executions[:-1]:
                if committed["moved_on"](earlier["run"], number) or earlier["run"] == checkpoint_owner:
                    failures.append(
                        f"{what} {number} of task {task_id} had committed (run {earlier['run']}) and ran again"
                    )
                    continue
                why = cause(earlier)
                if why is None:
                    failures.append(
                        f"{what} {number} of task {task_id} ran again after run {earlier['run']} "
                        "with no kill or restart to explain it"
                    )
                    why = "unexplained"
                counts[why] += 1
        return dict(counts)

    def returned(run_id: str) -> bool:
        return runs.get(run_id, {}).get("outcome") == "returned"

    model_repeats = repeats(
        model,
        "model request",
        {
            "name": model_checkpoint,
            "moved_on": lambda run, n: returned(run) or furthest_effect[run] >= n or furthest_call[run] > n,
        },
    )
    effect_repeats = repeats(
        effects,
        "side effect",
        {"name": tool_checkpoint, "moved_on": lambda run, n: returned(run) or furthest_call[run] > n},
    )
    for task_id in task_ids:
        if tasks.get(task_id, ("",))[0] == "completed":
            missing = [s for s in range(1, STEPS + 1) if not effects.get((task_id, s))]
            if missing:
                failures.append(f"task {task_id} completed without side effect(s) {missing}")

    # 3. No task ran in two places at once.
    intervals: dict[str, list[tuple[int, int, str, int]]] = defaultdict(list)
    for run_id, record in runs.items():
        end = record["end"]
        if end is None:
            end = killed_after(record["pid"], record["start"])
            if end is None:
                failures.append(f"run {run_id} of task {record['task']} never ended and its worker was not killed")
                end = 2**63
        intervals[record["task"]].append((record["start"], end, run_id, record["pid"]))
    overlaps = 0
    for task_id, spans in intervals.items():
        spans.sort()
        for (_, end_a, run_a, pid_a), (start_b, _, run_b, pid_b) in itertools.pairwise(spans):
            if start_b < end_a:
                overlaps += 1
                failures.append(
                    f"task {task_id} ran in run {run_a} (pid {pid_a}) and run {run_b} (pid {pid_b}) at the same time"
                )

    # 4. Workers rode out the restart by themselves.
    for exit_ in fleet.unexpected_exits:
        failures.append(f"worker pid {exit_['pid']} exited by itself with status {exit_['code']}:\n{exit_['log']}")

    # Figures: what each kill interrupted and how long until another worker resumed it.
    resume_delays: list[float] = []
    interrupted = 0
    kills_in_flight = 0
    for kill in fleet.kills:
        hit = [
            r
            for r in runs.values()
            if r["pid"] == kill["pid"] and r["start"] <= kill["t"] and (r["end"] is None or r["end"] > kill["t"])
        ]
        kills_in_flight += bool(hit)
        for record in hit:
            interrupted += 1
            later = [r["start"] for r in runs.values() if r["task"] == record["task"] and r["start"] > kill["t"]]
            if later:
                resume_delays.append((min(later) - kill["t"]) / NS)
    recovery: dict[str, Any] = {}
    if restart:
        after = [e["t"] for e in events if e["kind"] in ("model-end", "effect") and e["t"] > restart["up"]]
        recovery = {
            "down_s": round((restart["up"] - restart["down"]) / NS, 2),
            "first_step_after_s": round((min(after) - restart["up"]) / NS, 2) if after else None,
            "runs_failed_by_it": sum(
                1
                for r in runs.values()
                if r["end"] is not None and r.get("outcome") != "returned" and r["end"] >= restart["down"]
            ),
        }
    return {
        "plan": {
            "tasks": plan.tasks,
            "duration_s": plan.duration,
            "workers": plan.workers,
            "concurrency": plan.concurrency,
            "claim_timeout_s": plan.claim_timeout,
            "max_latency_s": plan.max_latency,
            "kill_every_s": plan.kill_every,
            "seed": plan.seed,
            "model_requests_per_task": STEPS + 1,
            "side_effects_per_task": STEPS,
        },
        "completed": completed,
        "kills": len(fleet.kills),
        "kills_with_tasks_in_flight": kills_in_flight,
        "runs": len(runs),
        "runs_interrupted_by_kills": interrupted,
        "claim_timeouts_recorded": int(claim_timeouts[0][0]),
        "model_requests": sum(len(v) for v in model.values()),
        "model_requests_repeated": model_repeats,
        "side_effects": sum(len(v) for v in effects.values()),
        "side_effects_repeated": effect_repeats,
        "overlapping_runs": overlaps,
        "resume_after_kill_s": summary(resume_delays),
        "database_restart": recovery,
        "workers_exited_by_themselves": len(fleet.unexpected_exits),
        "failures": failures,
        "ok": not failures,
    }


def print_report(report: dict[str, Any]) -> None:
    plan = report["plan"]
    resume = report["resume_after_kill_s"]
    restart = report["database_restart"]
    print()
    print(
        f"Tasks: {report['completed']}/{plan['tasks']} completed, {plan['workers']} workers x "
        f"{plan['concurrency']} slots, claim timeout {plan['claim_timeout_s']}s, seed {plan['seed']}"
    )
    print(
        f"Kills: {report['kills']} SIGKILLs ({report['kills_with_tasks_in_flight']} with tasks in flight), "
        f"{report['runs_interrupted_by_kills']} executions interrupted, "
        f"{report['claim_timeouts_recorded']} expired leases swept"
    )
    print(f"Resume after a kill: median {resume['median']}s, max {resume['max']}s over {resume['count']} interruptions")
    print(
        f"Model requests: {report['model_requests']} executed, repeated {report['model_requests_repeated'] or 'never'}"
    )
    print(f"Side effects: {report['side_effects']} made, repeated {report['side_effects_repeated'] or 'never'}")
    if restart:
        print(
            f"Database restart: down {restart['down_s']}s, first step {restart['first_step_after_s']}s after it "
            f"came back, {restart['runs_failed_by_it']} executions cut short, "
            f"{report['workers_exited_by_themselves']} workers exited"
        )
    print(f"Overlapping executions of one task: {report['overlapping_runs']}")
    timing = report.get("timing", {})
    print(f"Time: {timing.get('chaos_s')}s of chaos and drain, {timing.get('total_s')}s in all")
    if report["failures"]:
        print(f"\nFAILED: {len(report['failures'])} problem(s)")
        for failure in report["failures"][:30]:
            print(f"  - {failure}")
    else:
        print("\nOK: every check holds.")


def main(argv: list[str] | None = None) -> int:
    plan, args = parse_args(argv)
    print(
        f"Chaos: {plan.tasks} agent tasks over {plan.spawn_window:g}s, {plan.workers} workers, a SIGKILL every "
        f"~{plan.kill_every:g}s, PostgreSQL restarted at {plan.duration / 2:g}s (seed {plan.seed})",
        flush=True,
    )
    base = Path(tempfile.mkdtemp(prefix="absurd-chaos-"))
    base.chmod(0o755)  # the embedded server runs as an unprivileged user when we are root
    try:
        report = run(plan, base)
    finally:
        if args.keep:
            print(f"Logs kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
