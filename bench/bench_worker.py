"""``manage.py absurd_worker`` against absurd-sdk's ``start_worker``, side by side in one run.

Run: ``python bench/bench_worker.py [--rounds 3] [--trivial 2000] [--agents 400]``
with ``DATABASE_URL`` (default ``postgresql://postgres@127.0.0.1:5433/bench_worker``; the database is
created and migrated if needed; its ``bench`` queue is emptied before every measurement).

``--baseline TREE`` (a checkout of an older commit, e.g. ``git worktree add /tmp/old 817e238``)
measures instead the agent runs of ``absurd_worker`` from TREE against ``absurd_worker`` from this
checkout, rounds alternating: the same handlers (this file's), the same seeded latencies, each side
on a database its own migrations created (TREE's is ``DATABASE_URL``'s name + ``_baseline``,
dropped and migrated again by TREE's code at every start). The worker's CPU per run is the
question: issue 16 asked for it halved.

Both sides run in a worker process of their own, with the same project client (``absurd``), the
same handlers and the same lease keeping; only the scheduling loop differs:

* ``absurd_worker``: ``call_command("absurd_worker")``, the production command;
* ``start_worker``: ``absurd.for_queue("bench").start_worker(...)``, absurd-sdk's loop;
* ``start_worker (bare SDK)``: a plain ``AsyncAbsurd(url)`` without the project's hooks (trivial only).

Figures:

1. trivial tasks per second: N tasks that return at once are committed in one transaction while the
   worker idles; rate = N / (last ``completed_at`` - commit time), both on the database clock;
2. agent runs per second: an ``AbsurdAgent`` whose FunctionModel sleeps 200-1000 ms at random
   (one checkpointed model request per run), concurrency 50, next to the physical limit: concurrency
   over the mean model latency. The latencies come from a seeded generator, so every contender sleeps
   the same ones and the parent knows their mean (and the ceiling of a loop that waits for the
   slowest of each batch, as ``start_worker`` does);
3. idle cost: CPU seconds and RSS of an idle worker over a window, and the database time of one
   empty poll.

Rounds alternate the contenders; medians are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# A worker of the --baseline tree imports django_absurd_agents from that tree, ahead of the venv's install.
sys.path.insert(0, os.environ.get("BENCH_TREE", str(ROOT)))

QUEUE = "bench"
LATENCY_SEED = 16
LATENCY_RANGE = (0.2, 1.0)
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5433/bench_worker"


def setup_django(url: str) -> None:
    import django
    from django.conf import settings

    from django_absurd_agents.database import url_to_config

    settings.configure(
        SECRET_KEY="bench",
        USE_TZ=True,
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "django_absurd_agents"],
        DATABASES={"default": url_to_config(url)},
        ABSURD_AGENTS={"QUEUES": [QUEUE], "CLAIM_TIMEOUT": 60},
        LOGGING_CONFIG=None,
    )
    django.setup()


def register_tasks() -> None:
    """The handlers every contender registers: a trivial task and a durable agent run."""
    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
    from pydantic_ai.models.function import AgentInfo, FunctionModel

    from django_absurd_agents import AbsurdAgent, absurd

    model_latency = random.Random(LATENCY_SEED)
    sleep_latency = random.Random(LATENCY_SEED)

    async def slow_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        await asyncio.sleep(model_latency.uniform(*LATENCY_RANGE))
        return ModelResponse(parts=[TextPart("done")])

    agent = AbsurdAgent(Agent(FunctionModel(slow_model), name="bench_agent"), absurd)

    @absurd.register_task(name="bench_trivial")
    async def trivial(params: Any, ctx: Any) -> int:
        return 1

    @absurd.register_task(name="bench_sleepy")
    async def sleepy(params: Any, ctx: Any) -> float:
        """The agent run's shape without pydantic-ai's CPU cost: one checkpointed 200-1000 ms wait."""

        async def wait() -> float:
            seconds = sleep_latency.uniform(*LATENCY_RANGE)
            await asyncio.sleep(seconds)
            return seconds

        return float(await ctx.step("wait", wait))

    @absurd.register_task(name="bench_agent")
    async def agent_run(params: Any, ctx: Any) -> str:
        result = await agent.run("go")
        return str(result.output)


# --- worker processes (this file re-run with "serve") ------------------------------------------------


def serve(kind: str, concurrency: int, poll: float, ready: str) -> None:
    url = os.environ["DATABASE_URL"]
    setup_django(url)
    register_tasks()
    import django_absurd_agents
    from django_absurd_agents import absurd

    Path(ready).with_name("origin").write_text(str(django_absurd_agents.__file__))

    if kind == "absurd_worker":
        from django.core.management import call_command

        call_command(
            "absurd_worker",
            queues=[QUEUE],
            concurrency=concurrency,
            poll_interval=poll,
            claim_timeout=60,
            heartbeat_file=ready,
            verbosity=int(os.environ.get("BENCH_VERBOSITY", "0")),
        )
        return

    async def run_sdk() -> None:
        if kind == "start_worker":
            client: Any = absurd.for_queue(QUEUE)
            await client.live_connection()
        else:
            from absurd_sdk import AsyncAbsurd

            client = AsyncAbsurd(url, queue_name=QUEUE)
            client._registry = {name: {**task, "queue": QUEUE} for name, task in absurd.registry.items()}
            await client._ensure_connected()
        Path(ready).write_text("ready")
        await client.start_worker(concurrency=concurrency, claim_timeout=60, poll_interval=poll)

    asyncio.run(run_sdk())


class Contender:
    def __init__(self, kind: str, url: str, concurrency: int, poll: float, tree: Path = ROOT) -> None:
        self.kind = kind
        self.ready = Path(tempfile.mkdtemp(prefix="bench-worker-")) / "ready"
        env = {**os.environ, "DATABASE_URL": url, "BENCH_TREE": str(tree)}
        self.process = subprocess.Popen(
            [sys.executable, __file__, "serve", kind, str(concurrency), str(poll), str(self.ready)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL if os.environ.get("BENCH_QUIET", "1") == "1" else None,
        )
        deadline = time.monotonic() + 60
        while not self.ready.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} worker did not start (exit {self.process.poll()})")
            time.sleep(0.05)
        self.origin = Path(self.ready.with_name("origin").read_text())
        if not self.origin.is_relative_to(tree):
            self.stop()
            raise RuntimeError(f"{kind} worker imported {self.origin}, not the tree {tree}")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# --- the parent --------------------------------------------------------------------------------------


def prepare_database(url: str) -> None:
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    params = conninfo_to_dict(url)
    name = params["dbname"]
    admin = make_conninfo(**{**params, "dbname": "postgres"})
    with psycopg.connect(admin, autocommit=True) as conn:
        if not conn.execute("select 1 from pg_database where datname = %s", [name]).fetchone():
            conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    setup_django(url)
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def empty_queue(conn: Any) -> None:
    for prefix in ("t", "r", "c", "e", "w"):
        conn.execute(f"truncate absurd.{prefix}_{QUEUE}")


def measure_batch(conn: Any, contender: Contender, task_name: str, count: int, timeout: float) -> dict[str, float]:
    """Commit ``count`` tasks at once while ``contender`` idles, and time them on the database clock.

    ``overall`` is count / (last completion - commit); ``steady`` counts the completions between the
    10th and the 90th percentile, leaving out the ramp-up and the tail of the last slow runs;
    ``cpu_ms`` is the worker process's CPU time per task; ``wall_s`` the commit-to-last-completion time.
    """
    options = json.dumps({"max_attempts": 1})
    cpu_before = contender.cpu_seconds()
    with conn.transaction():
        conn.execute(
            "select absurd.spawn_task(%s, %s, '{}'::jsonb, %s::jsonb) from generate_series(1, %s)",
            [QUEUE, task_name, options, count],
        )
    committed = conn.execute("select clock_timestamp()").fetchone()[0]
    deadline = time.monotonic() + timeout
    while True:
        done, failed = conn.execute(
            f"select count(*) filter (where state = 'completed'), count(*) filter (where state = 'failed') "
            f"from absurd.t_{QUEUE}"
        ).fetchone()
        if done + failed >= count:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{contender.kind}: only {done}/{count} done after {timeout}s")
        time.sleep(0.1)
    cpu = contender.cpu_seconds() - cpu_before
    if failed:
        raise RuntimeError(f"{contender.kind}: {failed} task(s) failed")
    ends = [row[0] for row in conn.execute(f"select completed_at from absurd.r_{QUEUE} order by completed_at")]
    low, high = int(count * 0.1), int(count * 0.9)
    return {
        "overall": count / (ends[-1] - committed).total_seconds(),
        "steady": (high - low) / (ends[high] - ends[low]).total_seconds(),
        "cpu_ms": cpu / count * 1000,
        "wall_s": (ends[-1] - committed).total_seconds(),
    }


def latency_limits(count: int, concurrency: int) -> dict[str, float]:
    """What the drawn latencies allow: each worker process draws the same ``count`` from the seed.

    ``limit`` is the physical limit, concurrency over the mean latency: every slot always busy.
    ``batch_ceiling`` is the best a loop can do that claims ``concurrency`` tasks and waits for all
    of them (``start_worker``): concurrency over the mean, across batches, of each batch's slowest.
    """
    draws = random.Random(LATENCY_SEED)
    latencies = [draws.uniform(*LATENCY_RANGE) for _ in range(count)]
    batches = [latencies[i : i + concurrency] for i in range(0, count, concurrency)]
    return {
        "mean_ms": statistics.fmean(latencies) * 1000,
        "limit": concurrency / statistics.fmean(latencies),
        "batch_ceiling": count / sum(max(batch) for batch in batches),
    }


def empty_poll_ms(url: str, polls: int = 300) -> float:
    async def run() -> float:
        from absurd_sdk import AsyncAbsurd

        client = AsyncAbsurd(url, queue_name=QUEUE)
        await client.claim_tasks(batch_size=10)
        started = time.perf_counter()
        for _ in range(polls):
            await client.claim_tasks(batch_size=10, claim_timeout=60, worker_id="bench")
        elapsed = time.perf_counter() - started
        await client.close()
        return elapsed / polls * 1000

    return asyncio.run(run())


def migrate_baseline(url: str, tree: Path) -> str:
    """Drop and recreate ``url``'s database + ``_baseline``, migrated by ``tree``'s code in a child process."""
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = f"{conninfo_to_dict(url)['dbname']}_baseline"
    with psycopg.connect(make_conninfo(url, dbname="postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))
    baseline_url = make_conninfo(url, dbname=name)
    env = {**os.environ, "DATABASE_URL": baseline_url, "BENCH_TREE": str(tree)}
    origin = subprocess.run(
        [sys.executable, __file__, "migrate"], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    if not Path(origin).is_relative_to(tree):
        raise RuntimeError(f"the baseline's migrations ran from {origin}, not the tree {tree}")
    return baseline_url


def commit_of(tree: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()


def compare_baseline(url: str, tree: Path, rounds: int, count: int, concurrency: int) -> None:
    """``absurd_worker`` from ``tree`` against this checkout's: agent runs, rounds alternating the sides."""
    import psycopg

    sides = {
        f"{commit_of(tree)} (baseline)": (tree, migrate_baseline(url, tree)),
        f"{commit_of(ROOT)} (this checkout)": (ROOT, url),
    }
    results: dict[str, list[dict[str, float]]] = {label: [] for label in sides}
    loads = [os.getloadavg()[0]]
    for round_ in range(rounds):
        for label in list(sides) if round_ % 2 == 0 else reversed(list(sides)):
            side_tree, side_url = sides[label]
            with psycopg.connect(side_url, autocommit=True) as conn:
                empty_queue(conn)
                contender = Contender("absurd_worker", side_url, concurrency, 0.1, side_tree)
                try:
                    figures = measure_batch(conn, contender, "bench_agent", count, timeout=600)
                finally:
                    contender.stop()
            results[label].append(figures)
            loads.append(os.getloadavg()[0])
            print(f"  {label} ({contender.origin.parent}): " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))

    print()
    print(
        f"absurd_worker, {count} one-step agent runs at concurrency {concurrency}, model 200-1000 ms; "
        f"{rounds} rounds, medians; {os.cpu_count()} CPUs, load average {min(loads):.1f} to {max(loads):.1f}"
    )
    print(f"{'':<28} {'CPU ms/run':>10} {'runs/s':>7} {'wall s':>7}   CPU ms/run per round")
    medians = {}
    for label, values in results.items():
        medians[label] = statistics.median(value["cpu_ms"] for value in values)
        rate = statistics.median(value["overall"] for value in values)
        wall = statistics.median(value["wall_s"] for value in values)
        rounds_cpu = ", ".join(f"{value['cpu_ms']:.2f}" for value in values)
        print(f"{label:<28} {medians[label]:10.2f} {rate:7.1f} {wall:7.2f}   {rounds_cpu}")
    before, after = medians.values()
    print(f"worker CPU per run: {after / before:.2f}x the baseline's (halved: {after <= before / 2})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--trivial", type=int, default=2000, help="trivial tasks per measurement")
    parser.add_argument("--trivial-concurrency", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--agents", type=int, default=1000, help="agent runs per measurement")
    parser.add_argument("--agent-concurrency", type=int, default=50)
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--sleepy", type=int, default=1000, help="checkpointed 200-1000 ms sleeps per measurement")
    parser.add_argument("--skip", nargs="*", default=[], choices=["trivial", "agents", "sleepy", "idle"])
    parser.add_argument("--baseline", type=Path, help="an older checkout: its absurd_worker's agent runs against ours")
    args = parser.parse_args()
    url = os.environ.get("DATABASE_URL", DEFAULT_URL)
    prepare_database(url)
    if args.baseline:
        compare_baseline(url, args.baseline.resolve(), args.rounds, args.agents, args.agent_concurrency)
        return
    import psycopg

    conn = psycopg.connect(url, autocommit=True)
    poll = 0.1
    results: dict[str, list[dict[str, float]]] = {}

    def record(label: str, value: dict[str, float]) -> None:
        results.setdefault(label, []).append(value)
        print(f"  {label}: " + ", ".join(f"{k} {v:.1f}" for k, v in value.items()), flush=True)

    if "trivial" not in args.skip:
        for concurrency in args.trivial_concurrency:
            for round_ in range(args.rounds):
                kinds = ["absurd_worker", "start_worker", "bare_sdk"]
                for kind in kinds if round_ % 2 == 0 else reversed(kinds):
                    empty_queue(conn)
                    contender = Contender(kind, url, concurrency, poll)
                    try:
                        figures = measure_batch(conn, contender, "bench_trivial", args.trivial, timeout=300)
                    finally:
                        contender.stop()
                    record(f"trivial c={concurrency} {kind}", figures)

    for workload, task_name, count in (("agents", "bench_agent", args.agents), ("sleepy", "bench_sleepy", args.sleepy)):
        if workload in args.skip:
            continue
        for round_ in range(args.rounds):
            kinds = ["absurd_worker", "start_worker"]
            for kind in kinds if round_ % 2 == 0 else reversed(kinds):
                empty_queue(conn)
                contender = Contender(kind, url, args.agent_concurrency, poll)
                try:
                    figures = measure_batch(conn, contender, task_name, count, timeout=600)
                finally:
                    contender.stop()
                record(f"{workload} c={args.agent_concurrency} {kind}", figures)

    idle: dict[str, tuple[float, float]] = {}
    if "idle" not in args.skip:
        empty_queue(conn)
        for kind in ["absurd_worker", "start_worker"]:
            # Production poll intervals: the setting's default for ours, the SDK's default for start_worker.
            contender = Contender(kind, url, 10, 0.5 if kind == "absurd_worker" else 0.25)
            try:
                time.sleep(2.0)  # let imports settle before the window opens
                before = contender.cpu_seconds()
                time.sleep(args.idle_seconds)
                cpu = (contender.cpu_seconds() - before) / args.idle_seconds * 100
                idle[kind] = (cpu, contender.rss_mb())
            finally:
                contender.stop()
        poll_ms = empty_poll_ms(url)
    conn.close()

    print()
    print(f"bench_worker: PostgreSQL at {url.split('@')[-1]}, {os.cpu_count()} CPUs, {args.rounds} rounds, medians")

    def median(values: list[dict[str, float]], key: str) -> float:
        return statistics.median(value[key] for value in values)

    print(f"{'':<34} {'runs/s':>8} {'steady/s':>9} {'CPU ms/task':>12}")
    for label, values in results.items():
        print(
            f"{label:<34} {median(values, 'overall'):8.1f} {median(values, 'steady'):9.1f} "
            f"{median(values, 'cpu_ms'):12.2f}   (runs/s: {', '.join(f'{v["overall"]:.1f}' for v in values)})"
        )
    for prefix in sorted({label.rsplit(" ", 1)[0] for label in results}):
        ours = results.get(f"{prefix} absurd_worker")
        theirs = results.get(f"{prefix} start_worker")
        if ours and theirs:
            overall = median(ours, "overall") / median(theirs, "overall")
            steady = median(ours, "steady") / median(theirs, "steady")
            print(f"{prefix:<34} absurd_worker / start_worker = {overall:.2f}x (steady {steady:.2f}x)")
    for workload, count in (("agents", args.agents), ("sleepy", args.sleepy)):
        prefix = f"{workload} c={args.agent_concurrency}"
        if f"{prefix} absurd_worker" not in results:
            continue
        limits = latency_limits(count, args.agent_concurrency)
        print(
            f"{prefix}: physical limit {args.agent_concurrency} / {limits['mean_ms']:.0f} ms mean latency = "
            f"{limits['limit']:.1f} runs/s; a loop that waits for each batch's slowest: {limits['batch_ceiling']:.1f}"
        )
        for kind in ("absurd_worker", "start_worker"):
            values = results.get(f"{prefix} {kind}")
            if values:
                print(
                    f"  {kind:<14} {median(values, 'overall') / limits['limit']:6.1%} of the limit "
                    f"(steady {median(values, 'steady') / limits['limit']:.1%}), "
                    f"{median(values, 'cpu_ms'):.2f} ms worker CPU per run"
                )
    for kind, (cpu, rss) in idle.items():
        print(f"idle {kind:<35} {cpu:6.2f}% of one CPU, RSS {rss:.0f} MB")
    if idle:
        print(f"one empty poll (claim_task on an empty queue)  {poll_ms:.2f} ms")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
    elif len(sys.argv) > 1 and sys.argv[1] == "migrate":
        prepare_database(os.environ["DATABASE_URL"])
        import django_absurd_agents

        print(django_absurd_agents.__file__)
    else:
        main()
