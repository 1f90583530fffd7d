"""The event log of agent runs: what is written, in which order, and what a reader assembles across crashes.

The crash tests run real ``absurd_worker`` processes and kill them with SIGKILL: once while the model
is streaming its answer (the answer hangs after a few words, and the test kills the worker once those
words are in the log), once between two steps (the worker kills itself when the answer's model step
starts, after the tool's step was recorded). Either way the task resumes in a second worker, and
what a reader assembles holds each step's events exactly once, the same as a run that never crashed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from django_absurd_agents import absurd
from django_absurd_agents.event_log import ATTEMPT
from django_absurd_agents.event_stream import LoggedEvent, assemble, delete_orphaned_events, listener, stream_events
from django_absurd_agents.models import AgentEvent
from tests import event_tasks
from tests.test_worker import WorkerProcess, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

NO_RETRY_DELAY = {"kind": "fixed", "base_seconds": 0}

CLEAN_RUN = [
    "part_start",  # the tool call
    "part_end",
    "function_tool_call",
    "function_tool_result",
    "part_start",  # the answer
    "final_result",
    "part_delta",  # consecutive deltas counted once (the writer merges them into batches)
    "part_end",
    "agent_run_result",
]


def squeezed(entries: list[LoggedEvent]) -> list[str]:
    kinds: list[str] = []
    for entry in entries:
        if not (entry.kind == "part_delta" and kinds and kinds[-1] == "part_delta"):
            kinds.append(entry.kind)
    return kinds


def streamed_text(entries: list[LoggedEvent]) -> str:
    """The text a reader shows: text parts' start content plus their deltas, in order."""
    text = ""
    for entry in entries:
        if entry.kind == "part_start" and entry.data["part"].get("part_kind") == "text":
            text += entry.data["part"]["content"]
        elif entry.kind == "part_delta" and entry.data["delta"].get("part_delta_kind") == "text":
            text += entry.data["delta"]["content_delta"]
    return text


def output_of(task_id: str) -> str:
    snapshot = absurd.fetch_task_result_sync(task_id)
    assert snapshot is not None and snapshot.state == "completed", snapshot
    return str(snapshot.result["output"])


@pytest.fixture
def gates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "gates"
    directory.mkdir()
    monkeypatch.setenv("EVENT_GATE_DIR", str(directory))
    return directory


# --- in this process ---------------------------------------------------------------------------------


async def test_a_streamed_run_is_logged_in_order(project_absurd: Any) -> None:
    spawned = await project_absurd.spawn("event_story", {})
    await project_absurd.work_batch(claim_timeout=30)
    entries = await asyncio.to_thread(lambda: absurd.events_sync(spawned["task_id"]))
    output = (await project_absurd.fetch_task_result(spawned["task_id"])).result["output"]

    assert entries[-1].kind == "end" and entries[-1].data == {"state": "completed"}
    assembled = assemble(entries)
    assert squeezed(assembled) == CLEAN_RUN
    assert streamed_text(assembled) == output
    assert [entry.offset for entry in entries[:-1]] == sorted(entry.offset for entry in entries[:-1])
    rows = {row.offset: row async for row in AgentEvent.objects.filter(task_id=spawned["task_id"])}
    for entry in assembled:  # model events carry their step; the others their place in the run, "w<n>"
        row = rows[entry.offset]
        if entry.kind in ("part_start", "part_delta", "part_end", "final_result"):
            assert row.step and row.step.startswith("storyteller__model.request_stream"), row.step
            assert row.position and not row.position.startswith("w")
        else:
            assert row.step is None and row.position and row.position.startswith("w")
    result = assembled[-1].event()
    assert result.result.output == output and result.result.response.parts[-1].content == output


async def test_deltas_are_batched_and_read_before_the_run_ends(
    project_absurd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORY_WORD_DELAY", "0.02")
    spawned = await project_absurd.spawn("event_story", {})
    worker = asyncio.create_task(project_absurd.work_batch(claim_timeout=30))
    first_delta_state = None
    deltas = 0
    async for entry in stream_events(spawned["task_id"]):
        if entry.kind == "part_delta":
            deltas += 1
            if first_delta_state is None:
                first_delta_state = (await project_absurd.fetch_task_result(spawned["task_id"])).state
    await worker
    words = len(event_tasks.story(1))
    assert first_delta_state == "running"  # tokens reach the reader while the model still streams
    assert 2 <= deltas <= words // 3, (deltas, words)  # ~100 ms batches, not a write per token


async def test_a_replay_writes_only_its_attempt_marker(project_absurd: Any, gates: Path) -> None:
    spawned = await project_absurd.spawn("event_story", {"fail_once_after": True}, retry_strategy=NO_RETRY_DELAY)
    await project_absurd.work_batch(claim_timeout=30)  # attempt 1: the run, then the task fails
    await project_absurd.work_batch(claim_timeout=30)  # attempt 2: replays the run from its checkpoints
    entries = await asyncio.to_thread(lambda: absurd.events_sync(spawned["task_id"]))
    second = [entry for entry in entries if entry.attempt == 2]
    first_last = max(entry.offset for entry in entries if entry.attempt == 1)
    assert [(entry.kind, entry.data) for entry in second] == [(ATTEMPT, {"attempt": 2, "discard_after": first_last})]
    assert squeezed(assemble(entries)) == CLEAN_RUN


async def test_readers_of_a_process_share_one_listen_connection(project_absurd: Any) -> None:
    task_ids = [(await project_absurd.spawn("event_story", {}))["task_id"] for _ in range(20)]  # nobody runs them
    readers = [asyncio.create_task(anext(stream_events(task_id))) for task_id in task_ids]
    try:
        shared = listener()
        await asyncio.wait_for(shared.listening.wait(), 10)
        for _ in range(100_000):  # let every reader subscribe (each needs a few turns of the loop)
            if shared.readers == len(readers) or any(reader.done() for reader in readers):
                break
            await asyncio.sleep(0)
        assert shared.readers == len(readers), [reader.exception() for reader in readers if reader.done()]
        assert shared.connects == 1
        assert await asyncio.to_thread(_listening_backends) == 1
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


def _listening_backends() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "select count(*) from pg_stat_activity where datname = current_database() and query ilike 'listen %%'"
        )
        return int(cursor.fetchone()[0])


def test_cleanup_deletes_the_log_of_tasks_that_are_gone(clean_queues: None) -> None:
    kept = absurd.spawn_sync("event_story", {})["task_id"]
    gone = "01900000-0000-7000-8000-000000000001"
    for task_id in (kept, gone):
        AgentEvent.objects.create(task_id=task_id, attempt=1, kind="custom", payload={"n": 1})
    assert delete_orphaned_events() == 1
    assert list(AgentEvent.objects.values_list("task_id", flat=True)) == [uuid.UUID(kept)]


def test_absurd_cleanup_deletes_the_log_with_the_tasks(clean_queues: None) -> None:
    from io import StringIO

    from django.core.management import call_command

    AgentEvent.objects.create(task_id="01900000-0000-7000-8000-000000000002", attempt=1, kind="custom", payload={})
    out = StringIO()
    call_command("absurd_cleanup", stdout=out)
    assert "Deleted 1 agent event log entry of deleted tasks." in out.getvalue()
    assert not AgentEvent.objects.exists()


# --- real worker processes, killed -----------------------------------------------------------------------


@pytest.fixture
def worker_env(worker_env: dict[str, str], clean_queues: None, tmp_path: Path, gates: Path) -> dict[str, str]:
    settings_dir = tmp_path / "settings"
    settings_dir.mkdir()
    (settings_dir / "event_worker_settings.py").write_text(
        "from tests.settings import *  # noqa: F403\n"
        "ABSURD_AGENTS = {**ABSURD_AGENTS, 'TASK_MODULES': ['tests.event_tasks']}  # noqa: F405\n"
    )
    env = dict(worker_env)
    env["DJANGO_SETTINGS_MODULE"] = "event_worker_settings"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(settings_dir), os.getcwd(), env.get("PYTHONPATH")]))
    env["EVENT_GATE_DIR"] = str(gates)
    return env


@pytest.fixture
def start_worker(worker_env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(**extra: str) -> WorkerProcess:
        args = ["--queue", "agents", "--poll-interval", "0.05", "--claim-timeout", "2"]
        worker = WorkerProcess({**worker_env, **extra}, tmp_path / f"worker-{len(started)}.log", *args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


class Reader(threading.Thread):
    """A reader following the log live, from before the crash to the task's end, in its own event loop."""

    def __init__(self, task_id: str) -> None:
        super().__init__(daemon=True)
        self.task_id = task_id
        self.entries: list[LoggedEvent] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        async def follow() -> None:
            try:
                async for entry in absurd.stream_events(self.task_id):
                    self.entries.append(entry)
            finally:
                await absurd.close()

        try:
            asyncio.run(follow())
        except BaseException as exc:
            self.error = exc


def raw_text(task_id: str, attempt: int) -> str:
    return streamed_text([e for e in absurd.events_sync(task_id) if e.attempt == attempt])


def assert_exactly_once(task_id: str, reader: Reader) -> None:
    entries = absurd.events_sync(task_id)
    assembled = assemble(entries)
    assert squeezed(assembled) == CLEAN_RUN
    assert streamed_text(assembled) == output_of(task_id)
    # The tool's step completed in the first attempt: its events are in the log once, not written again.
    tool_events = [e.kind for e in entries if e.kind.startswith("function_tool")]
    assert tool_events == ["function_tool_call", "function_tool_result"]
    reader.join(60)
    assert reader.error is None and not reader.is_alive()
    assert reader.entries[-1].kind == "end"
    assert [e.offset for e in assemble(reader.entries)] == [e.offset for e in assembled]


@pytest.mark.slow
def test_a_worker_killed_in_the_middle_of_a_streamed_answer(start_worker: Callable[..., WorkerProcess]) -> None:
    task_id = absurd.spawn_sync("event_story", {}, retry_strategy=NO_RETRY_DELAY)["task_id"]
    reader = Reader(task_id)
    reader.start()
    first = start_worker(EVENT_CRASH="stall")
    # The answer hangs after a few words: kill the worker once they are in the log.
    wait_until(lambda: len(raw_text(task_id, 1).split()) >= event_tasks.STALL_AFTER, "the first words of the answer")
    first.process.send_signal(signal.SIGKILL)
    first.wait()
    partial = raw_text(task_id, 1)
    assert partial.startswith("take1 ")
    start_worker()
    wait_until(lambda: absurd.fetch_task_result_sync(task_id).state == "completed", "the resumed task", 60)

    output = output_of(task_id)
    assert output.startswith("take2 ") and partial not in output
    entries = absurd.events_sync(task_id)
    [marker] = [e for e in entries if e.kind == ATTEMPT]
    voided = [e for e in entries if marker.data["discard_after"] < e.offset < marker.offset]
    assert voided and {e.attempt for e in voided} == {1} and streamed_text(voided) == partial
    assert_exactly_once(task_id, reader)


@pytest.mark.slow
def test_a_worker_killed_between_steps(start_worker: Callable[..., WorkerProcess]) -> None:
    task_id = absurd.spawn_sync("event_story", {}, retry_strategy=NO_RETRY_DELAY)["task_id"]
    reader = Reader(task_id)
    reader.start()
    first = start_worker(EVENT_CRASH="kill-before-answer")
    assert first.wait(60) == -signal.SIGKILL  # killed itself when the answer's step started
    start_worker()
    wait_until(lambda: absurd.fetch_task_result_sync(task_id).state == "completed", "the resumed task", 60)

    entries = absurd.events_sync(task_id)
    [marker] = [e for e in entries if e.kind == ATTEMPT]
    before = [e.offset for e in entries if e.offset < marker.offset]
    assert marker.data == {"attempt": 2, "discard_after": max(before, default=0)}  # nothing to void
    assert output_of(task_id).startswith("take1 ")  # the answer never started before the kill
    assert_exactly_once(task_id, reader)
