"""Asking for a report and following its progress: the code the views and ``make demo`` share.

A report is an Absurd task (``write_report``). Asking for one writes a ``ReportRequest`` and spawns
the task in one transaction. Its progress comes from the app's progress API
(``absurd.task_progress_sync``): the task's state and result, its attempts, and the steps taken in
the order they were recorded, each decoded (a model call and the tools it asked for, a tool's result)
and with the attempt that recorded it. This module only words them for the status page.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import transaction

from analyst.models import Report, ReportRequest
from django_absurd_agents import absurd
from django_absurd_agents.conf import get as agent_settings
from django_absurd_agents.json_text import compact_json
from django_absurd_agents.progress import TaskProgress
from django_absurd_agents.steps import Step as DecodedStep
from django_absurd_agents.steps import parse_step_name
from django_absurd_agents.tables import FINISHED_STATES

TASK_NAME = "write_report"


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
    return absurd.resolve_queue(TASK_NAME)


def step_label(name: str) -> str:
    """``analyst__model.request_stream#2`` -> ``model call 2``; ``...call_tool:save_report`` -> ``tool save_report``."""
    step = parse_step_name(name)
    if step.kind == "model":
        return f"model call {step.number}"
    if step.kind == "tool" and step.tool:
        return f"tool {step.tool}" + (f" (call {step.number})" if step.number > 1 else "")
    return name


def _shorten(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _arguments(args: Any) -> str:
    shown = args.items() if isinstance(args, dict) else []
    return ", ".join(f"{key}={value!r}" for key, value in shown if key != "summary")


def step_preview(step: DecodedStep) -> str:
    """One line on what a step recorded: the tools a model asked for, its text, or a tool's result."""
    if step.kind == "model":
        if step.tool_calls:
            return "asked for " + ", ".join(
                f"{call.tool_name}({_shorten(_arguments(call.args), 60)})" for call in step.tool_calls
            )
        return _shorten(" ".join(step.texts))
    if step.kind == "tool" and step.returned:
        return _shorten(compact_json(step.result))
    if step.kind == "tool":  # a ModelRetry, CallDeferred, ... recorded as data
        return _shorten(f"{step.outcome_kind}: {compact_json(step.state)}")
    return _shorten(compact_json(step.state))


@dataclass(frozen=True)
class Step:
    """A checkpoint: a model call or tool call that will never run again for this task."""

    name: str
    attempt: int | None
    recorded_at: datetime
    state: Any
    decoded: DecodedStep | None = None

    @property
    def label(self) -> str:
        return step_label(self.name)

    @property
    def preview(self) -> str:
        return step_preview(self.decoded) if self.decoded is not None else ""


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

    @classmethod
    def of(cls, task: TaskProgress) -> Progress:
        """The status page's view of the app's progress record (``absurd.task_progress``)."""
        return cls(
            task_id=task.task_id,
            state=task.state,
            result=task.result,
            failure=task.failure.recorded if task.failure else None,
            steps=[Step(s.name, s.attempt, s.recorded_at, s.value, s.decoded) for s in task.steps],
            runs=[
                Run(a.number, a.state, a.worker, a.started_at, a.finished_at, a.failure.recorded if a.failure else None)
                for a in task.attempts
            ],
        )

    @property
    def done(self) -> bool:
        return self.state in FINISHED_STATES

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
    """Everything Absurd knows about the task (``absurd.task_progress_sync``); None for an unknown task."""
    task = absurd.task_progress_sync(task_id)
    return Progress.of(task) if task is not None else None


def reports_for(task_id: str) -> list[Report]:
    return list(Report.objects.filter(task_id=task_id).order_by("created"))
