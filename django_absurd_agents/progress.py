"""A task's progress for your own pages: ``absurd.task_progress(task_id)`` and ``task_progress_sync``.

One read of what Absurd holds about a task, as plain dataclasses: its state and attempt, the steps it
has done (each decoded: a model request, a tool call, an event wait or a step of your own, with the
attempt that recorded it), what it waits for now, and its result or failure. A status page shows
these instead of reading Absurd's tables and parsing checkpoint names itself::

    progress = absurd.task_progress_sync(report.task_id)
    if progress is not None and not progress.done:
        tools = [step.tool for step in progress.steps if step.kind == "tool"]

The task is found in any queue unless ``queue_name`` is given. Steps are listed once committed, in
the order they were written; a step a dead attempt began but never recorded is not there.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from django_absurd_agents import conf, validation
from django_absurd_agents.steps import Step, decode_steps
from django_absurd_agents.tables import FINISHED_STATES, locate_task
from django_absurd_agents.task_records import Run, TaskDetail, task_detail


@dataclass(frozen=True)
class Failure:
    """Why an attempt (or the task) failed, as the worker recorded it; ``$ClaimTimeout`` for a lost lease."""

    name: str | None
    message: str | None
    traceback: str | None
    recorded: Any  # the stored failure as it is

    @classmethod
    def of(cls, run: Run) -> Failure | None:
        if run.failure_reason is None:
            return None
        return cls(run.failure_name, run.failure_message, run.failure_traceback, run.failure_reason)


@dataclass(frozen=True)
class StepDone:
    """A step the task has recorded: it will not run again, whatever happens to the worker."""

    name: str  # the checkpoint name, e.g. "analyst__model.request#2"
    kind: str  # "model", "tool", "event" or "step"
    number: int  # model request 2, the second call of a tool, ...
    agent: str | None
    tool: str | None  # tool steps: the tool that ran
    attempt: int | None  # the attempt that recorded it
    recorded_at: datetime.datetime
    value: Any  # what was recorded (the checkpoint's JSON)
    decoded: Step  # the model's texts and tool calls, the tool's outcome and arguments (``steps.Step``)


@dataclass(frozen=True)
class Attempt:
    number: int
    state: str
    worker: str | None
    started_at: datetime.datetime | None
    finished_at: datetime.datetime | None
    failure: Failure | None


@dataclass(frozen=True)
class Waiting:
    """What a sleeping task waits for: an event (``ctx.await_event``) or a time (``ctx.sleep``)."""

    event_name: str | None  # None: sleeping until ``until``
    step_name: str | None
    since: datetime.datetime | None
    until: datetime.datetime | None  # the timeout, or the wake-up time; None: no timeout


@dataclass(frozen=True)
class TaskProgress:
    task_id: str
    queue: str
    task_name: str
    state: str  # pending, running, sleeping, completed, failed or cancelled
    attempt: int  # the current (or last) attempt: 1 from the spawn on, 2 once a retry is scheduled, ...
    max_attempts: int | None
    steps: list[StepDone]
    attempts: list[Attempt]
    waiting: Waiting | None
    result: Any  # the task's return value once completed, else None
    failure: Failure | None  # what ended the task once it failed, else None

    @property
    def done(self) -> bool:
        return self.state in FINISHED_STATES


def _steps(detail: TaskDetail) -> list[StepDone]:
    attempts = {run.run_id: run.attempt for run in detail.runs}
    committed = [checkpoint for checkpoint in detail.checkpoints if checkpoint.status == "committed"]
    return [
        StepDone(
            name=step.name,
            kind=step.kind,
            number=step.number,
            agent=step.agent,
            tool=step.tool_name,
            attempt=step.owner_attempt,
            recorded_at=checkpoint.updated_at,
            value=checkpoint.state,
            decoded=step,
        )
        for step, checkpoint in zip(decode_steps(committed, attempts), committed, strict=True)
    ]


def _waiting(detail: TaskDetail) -> Waiting | None:
    if detail.state != "sleeping":
        return None
    for wait in detail.waits:
        if not wait.emitted:
            return Waiting(wait.event_name, wait.step_name, wait.created_at, wait.timeout_at)
    run = detail.last_run
    if run is None:
        return None
    return Waiting(run.wake_event, None, None, run.available_at)


def progress_of(detail: TaskDetail) -> TaskProgress:
    """The progress of a task already read (``task_records.task_detail``)."""
    failed = detail.failure
    return TaskProgress(
        task_id=detail.task_id,
        queue=detail.queue,
        task_name=detail.task_name,
        state=detail.state,
        attempt=detail.attempts,
        max_attempts=detail.max_attempts,
        steps=_steps(detail),
        attempts=[
            Attempt(run.attempt, run.state, run.claimed_by, run.started_at, run.finished_at, Failure.of(run))
            for run in detail.runs
        ],
        waiting=_waiting(detail),
        result=detail.completed_payload if detail.state == "completed" else None,
        failure=Failure.of(failed) if failed is not None else None,
    )


def read_progress(task_id: object, queue_name: str | None = None) -> TaskProgress | None:
    """The task's progress, or None when no task has this id (in ``queue_name``, or in any queue).

    A malformed id or queue name raises ``ValueError`` before any SQL; a queue that does not exist,
    ``UnknownQueue``.
    """
    identifier = validation.task_uuid(task_id)
    problem = conf.queue_name_error(queue_name) if queue_name is not None else None
    if problem:
        raise ValueError(problem)
    located = locate_task(identifier, queue_name)
    if located is None:
        return None
    detail = task_detail(located[0], identifier)
    return None if detail is None else progress_of(detail)
