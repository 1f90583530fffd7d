"""One task as Absurd holds it: the task row, its runs, checkpoints and waits; events by name.

Read by the admin's task page and actions, ``manage.py absurd_task`` and the progress API
(``progress``), each statement against the task's own queue (``tables.table``), its columns named
like the fields of the records they fill.
"""

from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass, field
from typing import Any

from django.utils import timezone

from django_absurd_agents.tables import ACTIVE_STATES, over_queues, rows, table


@dataclass(frozen=True)
class Run:
    """One attempt at a task; a run whose worker stopped renewing its lease fails as ``$ClaimTimeout``."""

    run_id: str
    attempt: int
    state: str
    claimed_by: str | None
    claim_expires_at: datetime.datetime | None
    available_at: datetime.datetime | None  # None: sleeping until an event, without a timeout
    wake_event: str | None
    event_payload: Any
    started_at: datetime.datetime | None
    completed_at: datetime.datetime | None
    failed_at: datetime.datetime | None
    result: Any
    failure_reason: Any
    created_at: datetime.datetime

    @property
    def finished_at(self) -> datetime.datetime | None:
        return self.completed_at or self.failed_at

    @property
    def duration(self) -> datetime.timedelta | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return max(self.finished_at - self.started_at, datetime.timedelta(0))

    @property
    def failure_name(self) -> str | None:
        return self.failure_reason.get("name") if isinstance(self.failure_reason, dict) else None

    @property
    def failure_message(self) -> str | None:
        if isinstance(self.failure_reason, dict):
            message = self.failure_reason.get("message")
            return None if message is None else str(message)
        return None if self.failure_reason is None else str(self.failure_reason)

    @property
    def failure_traceback(self) -> str | None:
        if isinstance(self.failure_reason, dict):
            value = self.failure_reason.get("traceback")
            return str(value) if value else None
        return None

    @property
    def is_claim_timeout(self) -> bool:
        return self.failure_name == "$ClaimTimeout"


@dataclass(frozen=True)
class Checkpoint:
    """A step's recorded value: ``state`` is the JSON the step returned (or pydantic-ai's record of it)."""

    name: str
    state: Any
    status: str
    owner_run_id: str | None
    updated_at: datetime.datetime


@dataclass(frozen=True)
class Wait:
    """A task sleeping on an event (``ctx.await_event``), and whether the event was emitted already."""

    run_id: str
    step_name: str
    event_name: str
    timeout_at: datetime.datetime | None
    created_at: datetime.datetime
    emitted: bool
    payload: Any
    emitted_at: datetime.datetime | None


@dataclass
class TaskDetail:
    queue: str
    task_id: str
    task_name: str
    params: Any
    headers: Any
    retry_strategy: Any
    max_attempts: int | None
    cancellation: Any
    enqueue_at: datetime.datetime
    first_started_at: datetime.datetime | None
    state: str
    attempts: int
    last_attempt_run: str | None
    completed_payload: Any
    cancelled_at: datetime.datetime | None
    idempotency_key: str | None
    runs: list[Run] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    waits: list[Wait] = field(default_factory=list)

    @property
    def last_run(self) -> Run | None:
        for run in self.runs:
            if run.run_id == self.last_attempt_run:
                return run
        return self.runs[-1] if self.runs else None

    @property
    def failure(self) -> Run | None:
        """The run whose failure ended the task, when it failed."""
        if self.state != "failed":
            return None
        failed = [run for run in self.runs if run.failure_reason is not None]
        return failed[-1] if failed else None

    @property
    def can_retry(self) -> bool:
        return self.state == "failed"

    @property
    def can_cancel(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def can_emit(self) -> bool:
        """An event can still wake this task: it has not finished."""
        return self.state in ACTIVE_STATES

    @property
    def sleep_reason(self) -> str | None:
        """What a ``sleeping`` task waits for, in words: an event, a retry after a failed attempt, or a time."""
        run = self.last_run
        if self.state != "sleeping" or run is None:
            return None
        if run.wake_event:
            return f"waiting for the event {run.wake_event}"
        when = f" at {timezone.localtime(run.available_at):%Y-%m-%d %H:%M:%S}" if run.available_at else ""
        if run.attempt > 1 and run.started_at is None:
            return f"waiting to retry: attempt {run.attempt - 1} failed, attempt {run.attempt} starts{when}"
        return f"sleeping until{when}" if when else "sleeping"


def task_detail(queue: str, task_id: uuid.UUID) -> TaskDetail | None:
    """Everything about one task, or None when the task (or its queue) does not exist."""

    def run(queues: list[str]) -> TaskDetail | None:
        if queue not in queues:
            return None
        t, r, c, w, e = (table(prefix, queue) for prefix in "trcwe")
        found = rows(
            "select task_id::text as task_id, task_name, params, headers, retry_strategy, max_attempts, cancellation, "
            "enqueue_at, first_started_at, state, attempts, last_attempt_run::text as last_attempt_run, "
            f"completed_payload, cancelled_at, idempotency_key from {t} where task_id = %s",
            [task_id],
        )
        if not found:
            return None
        detail = TaskDetail(queue=queue, **found[0])
        runs = rows(
            "select run_id::text as run_id, attempt, state, claimed_by, claim_expires_at, "
            # An event wait without a timeout sleeps until 'infinity', which Python datetimes cannot hold.
            "nullif(available_at, 'infinity') as available_at, wake_event, event_payload, started_at, "
            f"completed_at, failed_at, result, failure_reason, created_at from {r} "
            "where task_id = %s order by attempt, created_at, run_id",
            [task_id],
        )
        detail.runs = [Run(**row) for row in runs]
        checkpoints = rows(
            "select checkpoint_name as name, state, status, owner_run_id::text as owner_run_id, updated_at "
            f"from {c} where task_id = %s order by updated_at, checkpoint_name",
            [task_id],
        )
        detail.checkpoints = [Checkpoint(**row) for row in checkpoints]
        waits = rows(
            "select w.run_id::text as run_id, w.step_name, w.event_name, "
            "nullif(w.timeout_at, 'infinity') as timeout_at, w.created_at, "
            # A wait registers its event with a SQL NULL payload; an emitted event has a JSON value (maybe null).
            "e.payload is not null as emitted, e.payload, case when e.payload is not null then e.emitted_at end "
            f"as emitted_at from {w} w left join {e} e on e.event_name = w.event_name "
            "where w.task_id = %s order by w.created_at, w.step_name",
            [task_id],
        )
        detail.waits = [Wait(**row) for row in waits]
        return detail

    return over_queues([queue], run)


@dataclass(frozen=True)
class Event:
    queue: str
    name: str
    emitted: bool
    payload: Any
    emitted_at: datetime.datetime | None


def event(queue: str, name: str) -> Event | None:
    """An event (emitted, or only awaited so far), or None when nobody emitted or awaited it."""

    def run(queues: list[str]) -> Event | None:
        if queue not in queues:
            return None
        found = rows(
            f"select payload is not null as emitted, payload, emitted_at from {table('e', queue)} "
            "where event_name = %s",
            [name],
        )
        if not found:
            return None
        row = found[0]
        return Event(
            queue=queue,
            name=name,
            emitted=row["emitted"],
            payload=row["payload"],
            emitted_at=row["emitted_at"] if row["emitted"] else None,
        )

    return over_queues([queue], run)


def waiting_tasks(queue: str, event_name: str) -> list[tuple[str, str]]:
    """``(task_id, task_name)`` of the tasks of ``queue`` waiting for ``event_name``."""

    def run(queues: list[str]) -> list[tuple[str, str]]:
        if queue not in queues:
            return []
        found = rows(
            f"select distinct w.task_id::text as task_id, t.task_name from {table('w', queue)} w "
            f"join {table('t', queue)} t on t.task_id = w.task_id where w.event_name = %s order by 1",
            [event_name],
        )
        return [(row["task_id"], row["task_name"]) for row in found]

    return over_queues([queue], run)
