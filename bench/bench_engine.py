"""What durability costs per step, and what a replay costs, side by side in one run.

Run: ``.venv/bin/python bench/bench_engine.py [--rounds 5] [--tool-calls 25] [--replay-tool-calls 100]``
(``--profile`` prints a cProfile of the durable run instead).

The database is ``absurd_agents_bench_engine`` on the server of ``$DATABASE_URL`` (or on the embedded
PostgreSQL when it is unset); it is created and migrated if needed, and its queues are emptied before
every measurement. Everything runs in this one process, on one event loop and one connection.

Figures (medians over the rounds; one warm-up round is not counted), each as wall time and as the
CPU time of this process (user + system), which a busy machine disturbs less:

1. per step, for a run of ``2k+1`` steps (``k`` tool calls, ``k+1`` model requests) with a zero-latency
   ``FunctionModel``:

   * raw ``ctx.step``: a task doing as many steps itself, with a tiny value and with a value the size
     of the agent's average checkpoint;
   * the agent not durable: the same run outside a task (pure pydantic-ai, no database);
   * the agent durable: the same run inside a task, every model request and tool call a step;
   * durability overhead = durable - not durable, and its ratio to the raw step (the goal: 1.25x);
   * with ``--decompose``, also the agent durable with steps that store nothing (the engine's backend
     replaced by one that only runs the body): what pydantic-ai's durable layer costs on its own.

2. one-step runs: ``--one-step-runs`` tasks whose agent run is one model request, each spawned and
   worked by ``work_batch`` (claim, run, checkpoint, complete): the CPU a worker spends per agent run;

3. both of the above with the durable capability bound on every run, as pydantic-ai does by default
   ("binding per run"), next to ``AbsurdDurability``'s binding reused across the runs of an agent;

4. replay: a task whose first attempt runs ``2k+1`` steps and then fails, timed on its second
   attempt, which replays them all; against a raw task replaying as many raw steps and the same run
   not durable (the floor: a replay runs the agent loop again).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchdb import database_url, setup_django

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATABASE = "absurd_agents_bench_engine"


def setup() -> None:
    setup_django(database_url(DATABASE))


# --- measuring ---------------------------------------------------------------------------------------

timings: dict[str, tuple[float, float]] = {}
"""``(wall seconds, CPU seconds)`` of the latest measurement, by label."""


@contextmanager
def measure(label: str) -> Iterator[None]:
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    timings[label] = (time.perf_counter() - wall, time.process_time() - cpu)


# --- the agent and the tasks ---------------------------------------------------------------------

PLAN = {"tool_calls": 0}
"""How many tool calls the model asks for before it answers (set before each run)."""


def build() -> Any:
    """The plain agent; registers the bench's tasks, which run it durably (or do raw steps)."""
    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
    from pydantic_ai.models.function import AgentInfo, FunctionModel
    from pydantic_ai.usage import UsageLimits

    from django_absurd_agents import AbsurdAgent, absurd

    no_limit = UsageLimits(request_limit=None)  # the default stops a run at 50 requests

    async def chain(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        done = sum(isinstance(part, ToolReturnPart) for message in messages for part in message.parts)
        if done < PLAN["tool_calls"]:
            return ModelResponse(parts=[ToolCallPart("bump", {"n": done})])
        return ModelResponse(parts=[TextPart(f"bumped {done} times")])

    inner: Agent[None, str] = Agent(FunctionModel(chain), name="bench")

    @inner.tool_plain
    def bump(n: int) -> dict[str, Any]:
        """Add one."""
        return {"n": n + 1, "note": "bumped"}

    durable = AbsurdAgent(inner, absurd)

    @absurd.register_task(name="bench_durable")
    async def bench_durable(params: dict[str, Any], ctx: Any) -> str:
        PLAN["tool_calls"] = params["tool_calls"]
        first = ctx._task["attempt"] == 1
        with measure(params["label"] if first else "replay"):
            output = (await durable.run("go", usage_limits=no_limit)).output
        if params.get("fail_first") and first:
            raise RuntimeError("fail after the run, so the second attempt replays it")
        return output

    @absurd.register_task(name="bench_raw")
    async def bench_raw(params: dict[str, Any], ctx: Any) -> int:
        padding = "x" * params["padding"]
        first = ctx._task["attempt"] == 1
        with measure(params["label"] if first else "raw_replay"):
            for i in range(params["steps"]):

                async def body(i: int = i) -> dict[str, Any]:
                    return {"i": i, "padding": padding}

                await ctx.step("bench__raw", body)
        if params.get("fail_first") and first:
            raise RuntimeError("fail after the steps, so the second attempt replays them")
        return params["steps"]

    async def plain_run(tool_calls: int, label: str) -> None:
        PLAN["tool_calls"] = tool_calls
        with measure(label):
            await inner.run("go", usage_limits=no_limit)

    return plain_run


# --- running tasks ----------------------------------------------------------------------------------


async def execute(sql: str, params: list[Any] | None = None) -> list[Any]:
    from django_absurd_agents import absurd

    cursor = await (await absurd.live_connection()).execute(sql, params)
    return await cursor.fetchall() if cursor.description else []


async def empty_queues() -> None:
    for (queue,) in await execute("select queue_name from absurd.queues"):
        for prefix in ("t", "r", "c", "e", "w"):
            await execute(f'truncate absurd."{prefix}_{queue}"')


async def run_task(name: str, params: dict[str, Any], *, attempts: int = 1) -> str:
    """Spawn a task and work it to completion (each ``work_batch`` runs one attempt)."""
    from django_absurd_agents import absurd

    spawned = await absurd.spawn(name, params, retry_strategy={"kind": "none"}, max_attempts=attempts)
    label = params["label"]
    for attempt in range(1, attempts + 1):
        with measure(f"{label}_work_batch_{attempt}"):
            await absurd.work_batch(claim_timeout=60)
    snapshot = await absurd.fetch_task_result(spawned["task_id"])
    if snapshot is None or snapshot.state != "completed":
        raise RuntimeError(f"{name} did not complete: {snapshot}")
    return str(spawned["task_id"])


@contextmanager
def binding_per_run() -> Iterator[None]:
    """Bind the durable capability on every run, as pydantic-ai's base class does (the "before" side)."""
    from pydantic_ai.durable_exec import BaseDurabilityCapability

    from django_absurd_agents.durability import AbsurdDurability

    reused = AbsurdDurability.__dict__["for_agent"]
    AbsurdDurability.for_agent = BaseDurabilityCapability.for_agent  # type: ignore[method-assign]
    try:
        yield
    finally:
        AbsurdDurability.for_agent = reused  # type: ignore[method-assign]


async def one_step_runs(n: int, label: str, *, accumulate: bool) -> None:
    """``n`` one-step agent tasks, spawned and worked one by one; adds their work_batch time to ``label``."""
    wall, cpu = timings[label] if accumulate else (0.0, 0.0)
    for _ in range(n):
        await run_task("bench_durable", {"tool_calls": 0, "label": label})
        wall += timings[f"{label}_work_batch_1"][0]
        cpu += timings[f"{label}_work_batch_1"][1]
    timings[label] = (wall, cpu)


@contextmanager
def steps_storing_nothing() -> Iterator[None]:
    """Swap the engine's backend for one that runs each body and stores nothing (``--decompose``)."""
    from pydantic_ai.durable_exec import record_durable_unit

    from django_absurd_agents.durability import AbsurdOperationBackend

    async def run_body(self: Any, *, body: Any, **kwargs: Any) -> object:
        value = await body()
        record_durable_unit(executed=True)
        return value

    real = AbsurdOperationBackend.execute
    AbsurdOperationBackend.execute = run_body  # type: ignore[method-assign]
    try:
        yield
    finally:
        AbsurdOperationBackend.execute = real  # type: ignore[method-assign]


async def one_round(
    plain_run: Any, tool_calls: int, replay_tool_calls: int, padding: int, decompose: bool, one_step: int
) -> dict[str, Any]:
    """Every measurement once: ``(wall, cpu)`` by label, and the average checkpoint size."""
    steps = 2 * tool_calls + 1
    replay_steps = 2 * replay_tool_calls + 1
    timings.clear()
    if decompose:
        await empty_queues()
        with steps_storing_nothing():
            await run_task("bench_durable", {"tool_calls": tool_calls, "label": "layer"})

    await empty_queues()
    await run_task("bench_raw", {"steps": steps, "padding": 0, "label": "raw_tiny"})
    await empty_queues()
    await run_task("bench_raw", {"steps": steps, "padding": padding, "label": "raw_sized"})
    await empty_queues()
    task_id = await run_task("bench_durable", {"tool_calls": tool_calls, "label": "durable"})
    [(size,)] = await execute(
        "select avg(octet_length(state::text))::int from absurd.c_agents where task_id = %s", [task_id]
    )
    await plain_run(tool_calls, "plain")
    await empty_queues()
    with binding_per_run():
        await run_task("bench_durable", {"tool_calls": tool_calls, "label": "durable_per_run"})
    # The two sides alternate, so that a burst of load elsewhere spoils one pair rather than one side.
    for pair in range(max(one_step // 10, 1)):
        sides = [("one_step", contextlib.nullcontext()), ("one_step_per_run", binding_per_run())]
        for label, binding in sides if pair % 2 == 0 else reversed(sides):
            await empty_queues()
            with binding:
                await one_step_runs(10, label, accumulate=pair > 0)
    for label in ("one_step", "one_step_per_run"):
        wall, cpu = timings[label]
        timings[label] = (wall / one_step, cpu / one_step)

    await empty_queues()
    await run_task("bench_durable", {"tool_calls": replay_tool_calls, "label": "first", "fail_first": True}, attempts=2)
    await empty_queues()
    raw_params = {"steps": replay_steps, "padding": padding, "label": "raw_first", "fail_first": True}
    await run_task("bench_raw", raw_params, attempts=2)
    await plain_run(replay_tool_calls, "plain_long")
    return {**timings, "checkpoint_bytes": size}


async def main(rounds: int, tool_calls: int, replay_tool_calls: int, decompose: bool, one_step: int) -> None:
    from django_absurd_agents import absurd

    plain_run = build()
    steps = 2 * tool_calls + 1
    replay_steps = 2 * replay_tool_calls + 1
    load_before = os.getloadavg()[0]
    warm_up = await one_round(plain_run, tool_calls, replay_tool_calls, 0, decompose, one_step)
    padding = max(warm_up["checkpoint_bytes"] - len('{"i": 0, "padding": ""}'), 0)
    results = [
        await one_round(plain_run, tool_calls, replay_tool_calls, padding, decompose, one_step) for _ in range(rounds)
    ]
    [(version,)] = await execute("show server_version")
    await empty_queues()
    await absurd.close()

    def med(label: str, kind: int) -> float:
        return statistics.median(result[label][kind] for result in results)

    print(f"PostgreSQL {version}; {os.cpu_count()} CPUs, load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    print(
        f"{rounds} rounds (medians); a run of {steps} steps ({tool_calls} tool calls, {tool_calls + 1} model requests)"
    )
    print(f"average checkpoint of the durable run: {int(statistics.median(r['checkpoint_bytes'] for r in results))} B")
    print()
    print(f"{'per step':<46}{'wall ms':>9}{'x raw':>7}{'CPU ms':>9}{'x raw':>7}")
    raw = (med("raw_tiny", 0) / steps, med("raw_tiny", 1) / steps)
    sized = (med("raw_sized", 0) / steps, med("raw_sized", 1) / steps)
    plain = (med("plain", 0) / steps, med("plain", 1) / steps)
    durable = (med("durable", 0) / steps, med("durable", 1) / steps)
    overhead = (durable[0] - plain[0], durable[1] - plain[1])
    rows = [
        ("raw ctx.step, tiny value", raw),
        ("raw ctx.step, checkpoint-sized value", sized),
        ("agent, not durable (no database)", plain),
        ("agent, durable (inside a task)", durable),
        ("durability overhead (durable - not durable)", overhead),
    ]
    if decompose:
        layer = (med("layer", 0) / steps, med("layer", 1) / steps)
        rows.insert(3, ("agent, durable, steps storing nothing", layer))
        rows.append(("  of which pydantic-ai's durable layer", (layer[0] - plain[0], layer[1] - plain[1])))
        rows.append(("  of which storing the steps", (durable[0] - layer[0], durable[1] - layer[1])))
    for label, (wall, cpu) in rows:
        print(f"{label:<46}{wall * 1000:>9.3f}{wall / raw[0]:>7.2f}{cpu * 1000:>9.3f}{cpu / raw[1]:>7.2f}")
    print()
    print(
        f"durability overhead per step = {overhead[0] / raw[0]:.2f}x a raw ctx.step "
        f"({overhead[0] / sized[0]:.2f}x the checkpoint-sized one); goal: at most 1.25x"
    )
    per_run = (med("durable_per_run", 0) / steps, med("durable_per_run", 1) / steps)
    overhead_per_run = (per_run[0] - plain[0], per_run[1] - plain[1])
    print(
        f"with the capability bound on every run (pydantic-ai's default): durable {per_run[0] * 1000:.3f} ms "
        f"({per_run[1] * 1000:.3f} ms CPU), overhead {overhead_per_run[0] * 1000:.3f} ms = "
        f"{overhead_per_run[0] / raw[0]:.2f}x a raw ctx.step ({overhead_per_run[1] * 1000:.3f} ms CPU)"
    )
    print()
    print(f"one-step agent run, spawned and worked by work_batch ({one_step} runs a round)")
    print(f"{'':<46}{'wall ms':>9}{'CPU ms':>9}")
    for label, key in [
        ("binding reused across runs (AbsurdDurability)", "one_step"),
        ("binding per run (pydantic-ai's default)", "one_step_per_run"),
    ]:
        print(f"{label:<46}{med(key, 0) * 1000:>9.2f}{med(key, 1) * 1000:>9.2f}")
    print()
    print(f"replay of a task with {replay_steps} completed steps ({replay_tool_calls} tool calls)")
    print(f"{'':<46}{'wall ms':>9}{'us/step':>9}{'CPU ms':>9}")
    for label, key in [
        ("first attempt: the agent run (executes them)", "first"),
        ("second attempt: the agent run (replays them)", "replay"),
        ("second attempt: its whole work_batch", "first_work_batch_2"),
        ("the same run, not durable (the floor)", "plain_long"),
        ("raw task, first attempt: its steps", "raw_first"),
        ("raw task, second attempt: its steps replayed", "raw_replay"),
        ("raw task, second attempt: its whole work_batch", "raw_first_work_batch_2"),
    ]:
        wall, cpu = med(key, 0), med(key, 1)
        print(f"{label:<46}{wall * 1000:>9.2f}{wall / replay_steps * 1e6:>9.1f}{cpu * 1000:>9.2f}")


async def profile(tool_calls: int) -> None:
    """cProfile five durable runs and print the functions that took the most time themselves."""
    import cProfile
    import pstats

    from django_absurd_agents import absurd

    build()
    await empty_queues()
    await run_task("bench_durable", {"tool_calls": tool_calls, "label": "warm"})
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(5):
        await run_task("bench_durable", {"tool_calls": tool_calls, "label": "durable"})
    profiler.disable()
    await empty_queues()
    await absurd.close()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tool-calls", type=int, default=25, help="tool calls of the measured run (2k+1 steps)")
    parser.add_argument("--replay-tool-calls", type=int, default=100, help="tool calls of the replayed run")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the durable run instead")
    parser.add_argument("--decompose", action="store_true", help="also time the durable layer storing nothing")
    parser.add_argument(
        "--one-step-runs", type=int, default=100, help="one-step agent tasks per round and side (a multiple of 10)"
    )
    args = parser.parse_args()
    setup()
    if args.profile:
        asyncio.run(profile(args.tool_calls))
    else:
        asyncio.run(main(args.rounds, args.tool_calls, args.replay_tool_calls, args.decompose, args.one_step_runs))
