"""The event log of agent runs, live: latency to the browser, cost for the worker, readers per process.

Run: ``python bench/bench_events.py [--rounds 9] [--latency-tasks 5] [--runs 200] [--readers 200]``
with ``DATABASE_URL`` naming a server (its database ``bench_events`` is created and migrated), or
without it on the embedded PostgreSQL. Three figures:

1. latency from a model delta produced in the worker to the SSE bytes read by a client: a real
   ``absurd_worker`` process runs an agent whose model streams 200 tokens at 50 tokens/s, each token
   carrying the wall-clock time it was produced; a client reads ``GET /agents/tasks/<id>/events``
   from uvicorn (ASGI, one process) on loopback and subtracts. p50 and p99 over every token;
2. agent runs per second of a streaming agent (one tool call, then a 30-token answer) with the event
   log on and off, side by side in alternating rounds, one ``absurd_worker`` process at concurrency
   10; once with a model that streams as fast as it can (the worst case for the log) and once with
   a model that takes 10 ms a token. "Off" is the same agent streaming its model requests inside
   their steps with nothing logged; a third column has the model answer whole (the same tokens at
   the same pace), which is what a durable agent does when nothing makes it stream;
3. ``--readers`` concurrent SSE readers on one uvicorn process (10 per task, tasks streaming 200
   tokens at 50 tokens/s): the server's memory and CPU, the ``LISTEN`` connections it holds, and the
   latency readers see under that load.

This file is also the settings' ``TASK_MODULES`` entry of the processes it starts (the agents below).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for entry in (str(ROOT), str(HERE)):
    if entry not in sys.path:
        sys.path.insert(0, entry)

SETTINGS = """\
from tests.settings import *  # noqa: F403
ROOT_URLCONF = "tests.urls"
ALLOWED_HOSTS = ["127.0.0.1"]
ABSURD_AGENTS = {"QUEUES": ["agents"], "CLAIM_TIMEOUT": 60, "TASK_MODULES": ["bench_events"],
                 "EVENTS_ACCESS": "bench_events.allow_all", "RETRY_STRATEGY": None}
LOGGING = {"version": 1, "disable_existing_loggers": False, "root": {"level": "WARNING"}}
"""


# --- what the worker runs (imported through TASK_MODULES) ---------------------------------------------


VARIANTS = ("whole", "streamed", "logged")
"""The model answers whole (nothing makes a durable agent stream without the log); the model streams
(inside its step) and nothing is logged; the model streams and the event log is on."""


def allow_all(request: Any, task_id: str) -> bool:
    return True


def _register() -> None:
    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
    from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel

    from django_absurd_agents import AbsurdDurability, absurd

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        prompt = json.loads(str(messages[0].parts[-1].content))  # type: ignore[union-attr]
        if not any(isinstance(part, ToolReturnPart) for message in messages for part in message.parts):
            yield {0: DeltaToolCall(name="lookup", json_args='{"key": "x"}', tool_call_id="call-1")}
            return
        for _ in range(prompt["tokens"]):
            if prompt["pace"]:
                await asyncio.sleep(prompt["pace"])
            yield f"{time.time():.6f}|"  # the moment the token was produced

    async def whole(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        """The same response, not streamed: what the agent calls when nothing makes it stream (the log off)."""
        text, calls = "", []
        async for item in stream(messages, info):
            if isinstance(item, str):
                text += item
            else:
                calls += [ToolCallPart(call.name or "", call.json_args, call.tool_call_id) for call in item.values()]
        return ModelResponse(parts=calls or [TextPart(text)])

    def lookup(key: str) -> str:
        """Look a key up."""
        return f"value of {key}"

    class StreamedWithoutLog(AbsurdDurability[Any]):
        """Streams its model requests inside a task, like a logged agent, but logs nothing."""

        @property
        def has_wrap_run_event_stream(self) -> bool:
            return self.in_durable_context or super().has_wrap_run_event_stream

    def agent(name: str, variant: str) -> Agent[None, str]:
        durability = (
            StreamedWithoutLog(name=name)
            if variant == "streamed"
            else AbsurdDurability(name=name, event_log=variant == "logged")
        )
        return Agent(FunctionModel(whole, stream_function=stream), name=name, tools=[lookup], capabilities=[durability])

    agents = {variant: agent(f"bench_{variant}", variant) for variant in VARIANTS}

    @absurd.register_task(name="bench_stream")
    async def bench_stream(params: dict[str, Any], ctx: Any) -> int:
        result = await agents[params["variant"]].run(json.dumps(params))
        return len(result.output)


if os.environ.get("DJANGO_SETTINGS_MODULE") == "bench_events_settings":
    _register()


# --- processes ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Processes:
    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *command: str) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.started.append(process)
        return process

    def worker(self, concurrency: int) -> subprocess.Popen[bytes]:
        return self.start(
            "worker", sys.executable, "-m", "django", "absurd_worker", "--queue", "agents",
            "--concurrency", str(concurrency), "--poll-interval", "0.05",
        )  # fmt: skip

    def server(self, port: int) -> subprocess.Popen[bytes]:
        process = self.start(
            "uvicorn", sys.executable, "-m", "uvicorn", "--factory", "django.core.asgi:get_asgi_application",
            "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "warning", "--timeout-graceful-shutdown", "1",
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    return process
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"uvicorn did not start; see {self.logs / 'uvicorn.log'}")
            time.sleep(0.05)

    @staticmethod
    def stop(process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def stop_all(self) -> None:
        for process in self.started:
            self.stop(process)


# --- an SSE client on a raw socket ------------------------------------------------------------------------


async def read_events(port: int, task_id: str, received: list[float], kinds: list[str]) -> None:
    """Read the task's SSE stream to its end; for every token of every delta, the delay since it was produced."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET /agents/tasks/{task_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode()
    )
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(head.decode(errors="replace"))
    buffer = b""
    try:
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)  # chunked transfer encoding
            if size == 0:
                return
            buffer += await reader.readexactly(size + 2)
            buffer = buffer[:-2] if buffer.endswith(b"\r\n") else buffer
            now = time.time()
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                fields = dict(line.split(": ", 1) for line in block.decode().split("\n") if ": " in line)
                kind = fields.get("event")
                if kind is None:
                    continue
                kinds.append(kind)
                data = json.loads(fields["data"])
                text = ""
                if kind == "part_start" and data["part"].get("part_kind") == "text":
                    text = data["part"]["content"]
                elif kind == "part_delta" and data["delta"].get("part_delta_kind") == "text":
                    text = data["delta"]["content_delta"]
                received.extend(now - float(stamp) for stamp in text.split("|") if stamp)
                if kind == "end":
                    return
    finally:
        writer.close()


def spawn(count: int, **params: Any) -> list[str]:
    from django.db import transaction

    from django_absurd_agents import absurd

    with transaction.atomic():
        return [absurd.spawn_sync("bench_stream", params)["task_id"] for _ in range(count)]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


# --- the figures --------------------------------------------------------------------------------------------


def latency(port: int, tasks: int) -> dict[str, float]:
    delays: list[float] = []
    for _ in range(tasks):
        [task_id] = spawn(1, variant="logged", tokens=200, pace=0.02)
        asyncio.run(read_events(port, task_id, delays, []))
    return {"tokens": len(delays), "p50_ms": percentile(delays, 0.5) * 1e3, "p99_ms": percentile(delays, 0.99) * 1e3}


def completed_rate(task_ids: list[str]) -> float:
    """Runs per second: tasks / (last completion - first start), on the database clock."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "select count(*), extract(epoch from max(r.completed_at) - min(r.started_at)) from absurd.r_agents r "
            "where r.task_id = any(%s::uuid[]) and r.state = 'completed'",
            [task_ids],
        )
        done, seconds = cursor.fetchone()
    assert done == len(task_ids), (done, len(task_ids))
    return len(task_ids) / float(seconds)


def wait_done(task_ids: list[str], timeout: float = 600) -> None:
    from django.db import connection

    deadline = time.monotonic() + timeout
    while True:
        with connection.cursor() as cursor:
            cursor.execute(
                "select count(*) from absurd.t_agents where task_id = any(%s::uuid[]) "
                "and state in ('completed', 'failed', 'cancelled')",
                [task_ids],
            )
            if cursor.fetchone()[0] == len(task_ids):
                return
        if time.monotonic() > deadline:
            raise SystemExit("tasks did not finish in time")
        time.sleep(0.1)


def throughput(runs: int, rounds: int, pace: float) -> dict[str, float]:
    """Runs/s of each variant, medians of the rounds, and the median within-round ratios."""
    rates: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for _ in range(rounds):
        for variant in VARIANTS:
            task_ids = spawn(runs, variant=variant, tokens=30, pace=pace)
            wait_done(task_ids)
            rates[variant].append(completed_rate(task_ids))
    for variant, values in rates.items():
        print(f"   {variant:9s} rounds: " + ", ".join(f"{value:.1f}" for value in values), flush=True)
    medians = {variant: statistics.median(values) for variant, values in rates.items()}
    # Rounds run one after another while the machine's load changes: compare within a round.
    logged = rates["logged"]
    medians["ratio"] = statistics.median(on / off for on, off in zip(logged, rates["streamed"], strict=True))
    medians["ratio_whole"] = statistics.median(on / off for on, off in zip(logged, rates["whole"], strict=True))
    return medians


def listen_connections() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "select count(*) from pg_stat_activity where datname = current_database() "
            "and query ilike 'listen %%absurd_agents_events%%'"
        )
        return int(cursor.fetchone()[0])


def readers(server: subprocess.Popen[bytes], port: int, count: int, per_task: int) -> dict[str, Any]:
    import psutil

    process = psutil.Process(server.pid)
    idle_rss = process.memory_info().rss
    tasks = max(1, count // per_task)
    task_ids = spawn(tasks, variant="logged", tokens=200, pace=0.02)
    delays: list[float] = []
    kinds: list[list[str]] = [[] for _ in range(count)]
    peak = [idle_rss]
    listening = [0]

    async def run() -> None:
        async def sample() -> None:
            while True:
                peak[0] = max(peak[0], process.memory_info().rss)
                listening[0] = max(listening[0], await asyncio.to_thread(listen_connections))
                await asyncio.sleep(0.2)

        sampler = asyncio.create_task(sample())
        await asyncio.gather(*(read_events(port, task_ids[i % tasks], delays, kinds[i]) for i in range(count)))
        sampler.cancel()

    cpu_before = process.cpu_times()
    started = time.monotonic()
    asyncio.run(run())
    wall = time.monotonic() - started
    cpu_after = process.cpu_times()
    cpu = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    complete = sum(1 for seen in kinds if seen and seen[-1] == "end")
    return {
        "readers": count,
        "tasks": tasks,
        "complete": complete,
        "wall_s": wall,
        "cpu_share": cpu / wall,
        "idle_rss_mb": idle_rss / 2**20,
        "peak_rss_mb": peak[0] / 2**20,
        "listen_connections": listening[0],
        "p50_ms": percentile(delays, 0.5) * 1e3,
        "p99_ms": percentile(delays, 0.99) * 1e3,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--latency-tasks", type=int, default=5)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--readers", type=int, default=200)
    parser.add_argument("--readers-per-task", type=int, default=10)
    parser.add_argument("--only", choices=["latency", "throughput", "readers"], help="Measure only this.")
    parser.add_argument("--paces", type=float, nargs="+", default=[0.0, 0.01], help="Seconds a token (throughput).")
    args = parser.parse_args()

    from benchdb import database_url

    url = database_url("bench_events")
    settings_dir = Path(tempfile.mkdtemp(prefix="bench-events-"))
    (settings_dir / "bench_events_settings.py").write_text(SETTINGS)
    os.environ.update(
        DATABASE_URL=url,
        DJANGO_SETTINGS_MODULE="bench_events_settings",
        PYTHONPATH=os.pathsep.join([str(settings_dir), str(HERE), str(ROOT)]),
    )
    sys.path.insert(0, str(settings_dir))
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    _register()
    procs = Processes(dict(os.environ), settings_dir)
    print(f"database {url}; process logs in {settings_dir}", flush=True)
    try:
        port = free_port()
        server = procs.server(port)
        worker = procs.worker(concurrency=10)
        if args.only in (None, "latency"):
            figures = latency(port, args.latency_tasks)
            print(
                f"1. delta to SSE bytes, loopback, {figures['tokens']:.0f} tokens: "
                f"p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms",
                flush=True,
            )
        for pace in args.paces if args.only in (None, "throughput") else ():
            rates = throughput(args.runs, args.rounds, pace)
            model = "as fast as it can" if not pace else f"at {pace * 1e3:.0f} ms a token"
            print(
                f"2. runs/s, model {model}: answers whole {rates['whole']:.1f}/s, streamed without the log "
                f"{rates['streamed']:.1f}/s, streamed with the log {rates['logged']:.1f}/s; log on / off "
                f"{rates['ratio']:.2f} (vs whole {rates['ratio_whole']:.2f}; medians of the rounds' ratios)",
                flush=True,
            )
        procs.stop(worker)
        if args.only not in (None, "readers"):
            return 0
        worker = procs.worker(concurrency=max(1, args.readers // args.readers_per_task))
        load = readers(server, port, args.readers, args.readers_per_task)
        print(
            f"3. {load['readers']} SSE readers of {load['tasks']} tasks on one uvicorn process: "
            f"{load['complete']} read to the end in {load['wall_s']:.1f} s; server CPU {load['cpu_share'] * 100:.0f} % "
            f"of a core, RSS {load['idle_rss_mb']:.0f} MB idle -> {load['peak_rss_mb']:.0f} MB peak; "
            f"LISTEN connections {load['listen_connections']}; latency p50 {load['p50_ms']:.1f} ms, "
            f"p99 {load['p99_ms']:.1f} ms",
            flush=True,
        )
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
