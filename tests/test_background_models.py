"""A background-mode model job waits in a durable sleep: no worker slot held, each poll made once.

Real ``absurd_worker`` processes run ``tests.background_tasks``: a model whose first request submits a
job and whose later requests poll it (``BackgroundJobModel``), as OpenAI's background mode does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection

from django_absurd_agents import absurd
from tests.test_worker import FAST, WorkerProcess, all_in_state, runs, spawn, states, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

SETTINGS_MODULE = "absurd_background_test_settings"


@pytest.fixture
def jobs(tmp_path: Path) -> Path:
    directory = tmp_path / "jobs"
    directory.mkdir()
    return directory


@pytest.fixture
def env(worker_env: dict[str, str], clean_queues: None, tmp_path: Path, jobs: Path) -> dict[str, str]:
    settings_dir = tmp_path / "settings"
    settings_dir.mkdir()
    (settings_dir / f"{SETTINGS_MODULE}.py").write_text(
        "from tests.settings import *  # noqa: F403\n"
        "ABSURD_AGENTS = {**ABSURD_AGENTS, 'TASK_MODULES': ['tests.worker_tasks', 'tests.background_tasks']}"
        "  # noqa: F405\n"
    )
    environment = dict(worker_env)
    environment["DJANGO_SETTINGS_MODULE"] = SETTINGS_MODULE
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(settings_dir), os.getcwd(), environment.get("PYTHONPATH")])
    )
    environment["WORKER_LOG"] = str(tmp_path / "runs.log")
    environment["BACKGROUND_JOBS"] = str(jobs)
    return environment


@pytest.fixture
def start_worker(env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(*args: str) -> WorkerProcess:
        worker = WorkerProcess(env, tmp_path / f"worker-{len(started)}.log", *args)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


def provider_log(jobs: Path) -> list[tuple[str, str, int]]:
    """(event, job, poll number) lines the model wrote: submit, poll, cancel."""
    path = jobs / "jobs.log"
    if not path.exists():
        return []
    return [
        (event, job, int(poll)) for event, job, poll, _pid in (line.split() for line in path.read_text().splitlines())
    ]


def checkpoints(task_id: str) -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("select checkpoint_name from absurd.c_agents where task_id = %s", [task_id])
        return sorted(row[0] for row in cursor.fetchall())


def polls(jobs: Path) -> list[int]:
    return [poll for event, _job, poll in provider_log(jobs) if event == "poll"]


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True], ids=["request", "streamed-request"])
def test_a_background_job_frees_the_slot_and_each_poll_runs_once(
    env: dict[str, str], start_worker: Callable[..., WorkerProcess], jobs: Path, stream: bool
) -> None:
    worker = start_worker("--concurrency", "1", *FAST)
    [report] = spawn("background_report", {"stream": stream})
    prefix = "live_researcher" if stream else "researcher"

    # The job is still running at the provider: the task sleeps between polls, in the database.
    wait_until(lambda: len(polls(jobs)) >= 2 and states([report])[report] == "sleeping", "two polls, then a sleep")
    # With one slot, another task runs while the report waits for its job.
    [other] = spawn("worker_record")
    wait_until(lambda: all_in_state([other], "completed"), "the other task to complete in the only slot")
    assert states([report])[report] in ("sleeping", "running", "pending")  # its job is not released yet

    (jobs / "release").touch()
    wait_until(lambda: all_in_state([report], "completed"), "the report to complete", timeout=60)
    worker.signal(15)
    assert worker.wait() == 0, worker.log()

    snapshot = absurd.fetch_task_result_sync(report)
    assert snapshot is not None
    log = provider_log(jobs)
    [(_submit, job, _zero)] = [entry for entry in log if entry[0] == "submit"]
    made = polls(jobs)
    # Each poll once: numbered 1..n with no repeat, although every wake-up replayed the run from the top.
    assert made == list(range(1, len(made) + 1)), log
    assert snapshot.result == {"output": f"report of {job}, ready after {len(made)} polls"}
    # The suspensions did not cancel the job.
    assert [entry for entry in log if entry[0] == "cancel"] == []

    # One step per request (the submission and each poll) and one per wait between them.
    names = checkpoints(report)
    requests = [name for name in names if name.startswith(f"{prefix}__model.request")]
    sleeps = [name for name in names if name.startswith(f"{prefix}__agent_graph.sleep")]
    assert len(requests) == len(made) + 1 and len(sleeps) == len(made), names
    assert set(names) == {*requests, *sleeps}, names
    # Each wait ended the claim: the report was claimed once more than it slept (at least), and
    # the other task's start falls between two of the report's claims.
    starts = [(event, task) for event, task, _pid, _at in runs(env) if event == "start"]
    assert len([task for _event, task in starts if task == report]) >= len(sleeps) + 1, starts
    order = [task for _event, task in starts]
    assert order[0] == report and order[-1] == report and other in order, order


@pytest.mark.slow
def test_cancelling_the_task_during_a_poll_cancels_the_job(
    env: dict[str, str], start_worker: Callable[..., WorkerProcess], jobs: Path
) -> None:
    (jobs / "hang").touch()
    start_worker("--concurrency", "1", *FAST)
    [report] = spawn("background_report")
    wait_until(lambda: polls(jobs) == [1], "the first poll to be in flight")

    absurd.cancel_task_sync(report)

    def cancelled() -> Any:
        return [entry for entry in provider_log(jobs) if entry[0] == "cancel"]

    [(_cancel, job, poll)] = wait_until(cancelled, "the job to be cancelled at the provider", timeout=30)
    assert (job, poll) == (provider_log(jobs)[0][1], 0)  # the job the report submitted
    wait_until(lambda: all_in_state([report], "cancelled"), "the task to be cancelled")


def test_outside_a_task_the_run_waits_in_process(jobs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.background_tasks import researcher

    monkeypatch.setenv("BACKGROUND_JOBS", str(jobs))
    (jobs / "release").touch()
    result = researcher.run_sync("Write the quarterly report.")  # no task: no steps, an ordinary sleep
    [(_submit, job, _zero), poll] = provider_log(jobs)
    assert poll == ("poll", job, 1)
    assert result.output == f"report of {job}, ready after 1 polls"


async def test_a_wait_inside_a_step_is_an_ordinary_sleep(
    project_absurd: Any, jobs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain agent run by a tool waits in the worker: a suspension would throw the tool's step away."""
    import tests.background_tasks  # noqa: F401  (registers the task in this process)

    monkeypatch.setenv("BACKGROUND_JOBS", str(jobs))
    (jobs / "release").touch()
    spawned = await project_absurd.spawn("background_in_tool", {})
    await project_absurd.work_batch(claim_timeout=30)  # one claim runs it to the end
    snapshot = await project_absurd.fetch_task_result(spawned["task_id"])
    assert snapshot is not None and snapshot.state == "completed", snapshot
    assert [event for event, _job, _poll in provider_log(jobs)] == ["submit", "poll"]
    names = await sync_to_async(checkpoints)(str(spawned["task_id"]))
    assert names == [
        "editor__function_toolset__<agent>.call_tool:research",
        "editor__model.request",
        "editor__model.request#2",
    ]  # and no sleep checkpoint: the wait was in the tool's step, in process
