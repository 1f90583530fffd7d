"""Asking for a report and following its progress: the code the views and ``make demo`` share.

A report is an Absurd task (``write_report``). Asking for one writes a ``ReportRequest`` and spawns
the task in one transaction. Progress is read straight from Absurd's tables for the task's queue:
the task's state and result, its runs (one per attempt) and its checkpoints (the steps taken, in
the order they were recorded, each with the attempt that recorded it).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import connections, transaction

from analyst.models import Report, ReportRequest
from django_absurd_agents import absurd
from django_absurd_agents.conf import get as agent_settings
from django_absurd_agents.conf import queue_name_error

TASK_NAME = "write_report"
TERMINAL_STATES = frozenset({"completed", "failed", "cancelled"})


def request_report(company: str, question: str) -> ReportRequest:
    """Record the request and spawn its task atomically: if either fails, neither exists."""
    alias = agent_settings().database_alias
    with transaction.atomic(using=alias):
        request = ReportRequest.objects.using(alias).create(company=company, question=question)
        spawned = absurd.spawn_sync(
            TASK_NAME,
            {"request_id": request.pk, "company": company, "question": question},
            idempotency_key=f"report-request:{request.pk}",
        )
        request.task_id = uuid.UUID(spawned["task_id"])
        request.save(update_fields=["task_id"])
    return request


def task_queue() -> str:
    queue = absurd.resolve_queue(TASK_NAME)
    problem = queue_name_error(queue)
    if problem:  # the name becomes part of a table name below
        raise ValueError(problem)
    return queue


def _load(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


_MODEL_STEP = re.compile(r"__model\.request(?:_stream)?(?:#(?P<n>\d+))?$")
_TOOL_STEP = re.compile(r"\.call_tool:(?P<tool>[^#]+)(?:#(?P<n>\d+))?$")


def step_label(name: str) -> str:
    """``analyst__model.request_stream#2`` -> ``model call 2``; ``...call_tool:save_report`` -> ``tool save_report``."""
    if match := _MODEL_STEP.search(name):
        return f"model call {match.group('n') or 1}"
    if match := _TOOL_STEP.search(name):
        again = f" (call {match.group('n')})" if match.group("n") else ""
        return f"tool {match.group('tool')}{again}"
    return name


def _shorten(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def step_preview(name: str, state: Any) -> str:
    """One line on what a step recorded: the tools a model asked for, its text, or a tool's result."""
    if _MODEL_STEP.search(name) and isinstance(state, dict):
        calls, texts = [], []
        for part in state.get("parts") or []:
            if not isinstance(part, dict):
                continue
            if part.get("part_kind") == "tool-call":
                args = part.get("args")
                if isinstance(args, str):
                    args = _load(args)
                shown = ", ".join(f"{key}={value!r}" for key, value in (args or {}).items() if key != "summary")
                calls.append(f"{part.get('tool_name')}({_shorten(shown, 60)})")
            elif part.get("part_kind") == "text":
                texts.append(str(part.get("content", "")))
        if calls:
            return "asked for " + ", ".join(calls)
        return _shorten(" ".join(texts)) if texts else ""
    if isinstance(state, dict) and state.get("kind") == "tool_return":
        state = state.get("result")
    elif isinstance(state, dict) and "kind" in state:  # a ModelRetry, CallDeferred, ... recorded as data
        return _shorten(f"{state['kind']}: {json.dumps(state, default=str, ensure_ascii=False)}")
    return _shorten(json.dumps(state, default=str, ensure_ascii=False))


@dataclass(frozen=True)
class Step:
    """A checkpoint: a model call or tool call that will never run again for this task."""

    name: str
    attempt: int | None
    recorded_at: datetime
    state: Any

    @property
    def label(self) -> str:
        return step_label(self.name)

    @property
    def preview(self) -> str:
        return step_preview(self.name, self.state)


@dataclass(frozen=True)
class Run:
    """One attempt at the task; a killed worker's attempt ends as ``$ClaimTimeout``."""

    attempt: int
    state: str
    worker: str | None
    started_at: datetime | None
    ended_at: datetime | None
    failure: dict[str, Any] | None

    @property
    def outcome(self) -> str:
        if self.failure:
            return f"{self.state}: {self.failure.get('name', 'error')}: {self.failure.get('message', '')}".strip()
        return self.state


@dataclass(frozen=True)
class Progress:
    task_id: str
    state: str
    result: Any
    failure: Any
    steps: list[Step] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def answer(self) -> str | None:
        return self.result.get("answer") if isinstance(self.result, dict) else None

    def as_json(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "state": self.state,
            "done": self.done,
            "answer": self.answer,
            "failure": self.failure,
            "steps": [
                {"name": s.name, "label": s.label, "attempt": s.attempt, "preview": s.preview} for s in self.steps
            ],
            "runs": [{"attempt": r.attempt, "state": r.state, "outcome": r.outcome} for r in self.runs],
        }


def load_progress(task_id: str) -> Progress | None:
    """Everything Absurd knows about the task, in three small queries; None for an unknown task."""
    queue = task_queue()
    snapshot = absurd.fetch_task_result_sync(task_id, queue)
    if snapshot is None:
        return None
    with connections[agent_settings().database_alias].cursor() as cursor:
        cursor.execute(
            f"""select attempt, state, claimed_by, started_at, coalesce(completed_at, failed_at), failure_reason,
                       run_id
                  from absurd."r_{queue}" where task_id = %s order by attempt""",
            [str(task_id)],
        )
        run_rows = cursor.fetchall()
        cursor.execute(
            f"""select checkpoint_name, owner_run_id, updated_at, state
                  from absurd."c_{queue}" where task_id = %s and status = 'committed'
                 order by updated_at, checkpoint_name""",
            [str(task_id)],
        )
        step_rows = cursor.fetchall()
    attempts = {str(row[6]): row[0] for row in run_rows}
    runs = [
        Run(attempt=row[0], state=row[1], worker=row[2], started_at=row[3], ended_at=row[4], failure=_load(row[5]))
        for row in run_rows
    ]
    steps = [
        Step(name=row[0], attempt=attempts.get(str(row[1])), recorded_at=row[2], state=_load(row[3]))
        for row in step_rows
    ]
    return Progress(
        task_id=str(task_id),
        state=snapshot.state,
        result=snapshot.result,
        failure=snapshot.failure,
        steps=steps,
        runs=runs,
    )


def reports_for(task_id: str) -> list[Report]:
    return list(Report.objects.filter(task_id=task_id).order_by("created"))
