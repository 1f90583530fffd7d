"""``manage.py absurd_task <id>``: one task with its runs, checkpoints and waits."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_absurd_agents import task_records
from django_absurd_agents.json_text import compact_json, pretty_json
from django_absurd_agents.management.commands import _ops


class Command(BaseCommand):
    help = (
        "Show a task with its runs (attempts), checkpoints (completed steps) and open waits. The queue is found "
        "automatically unless --queue is given. Shows params and step results: operators' eyes only."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("task_id", help="The task's id (a UUID).")
        parser.add_argument("--queue", "-q", help="Look only in this queue.")
        parser.add_argument("--json", action="store_true", help="Print everything as one JSON document.")
        parser.add_argument("--full", action="store_true", help="Do not shorten long JSON values.")

    def handle(self, *args: Any, **options: Any) -> None:
        identifier = _ops.task_id(options["task_id"])
        queue, _ = _ops.locate_task(identifier, options["queue"])
        dump = task_dump(queue, identifier)
        if options["json"]:
            self.stdout.write(pretty_json(dump, limit=None))
        else:
            self.stdout.write(render(dump, limit=0 if options["full"] else 400))


def task_dump(queue: str, identifier: uuid.UUID) -> dict[str, Any]:
    """The task, its runs (oldest first), checkpoints (in the order written) and waits, as plain data.

    Read like the admin's task page reads it (``task_records``); the keys are the column names.
    """
    detail = task_records.task_detail(queue, identifier)
    if detail is None:
        raise CommandError(f"Task {identifier} was not found in queue {queue!r}.")
    dump = {name: value for name, value in vars(detail).items() if name not in {"runs", "checkpoints", "waits"}}
    dump["runs"] = [dataclasses.asdict(run) for run in detail.runs]
    dump["checkpoints"] = [
        {
            "checkpoint_name": checkpoint.name,
            "value": checkpoint.state,
            "status": checkpoint.status,
            "owner_run_id": checkpoint.owner_run_id,
            "updated_at": checkpoint.updated_at,
        }
        for checkpoint in detail.checkpoints
    ]
    dump["waits"] = [
        {
            "run_id": wait.run_id,
            "step_name": wait.step_name,
            "event_name": wait.event_name,
            "timeout_at": wait.timeout_at,
            "created_at": wait.created_at,
            "event_emitted_at": wait.emitted_at,
        }
        for wait in detail.waits
    ]
    return dump


def render(dump: dict[str, Any], *, limit: int) -> str:
    def value(data: Any) -> str:
        return _ops.shortened(compact_json(data), limit)

    return "\n".join([*_task_lines(dump, value), *_run_lines(dump, value), *_step_lines(dump, value)])


def _task_lines(dump: dict[str, Any], value: Callable[[Any], str]) -> list[str]:
    lines = [
        f"Task {dump['task_id']}  {dump['task_name']}  [{dump['state']}]",
        f"  queue:        {dump['queue']}",
        f"  attempts:     {dump['attempts']} of {dump['max_attempts'] or 'unlimited'}",
        f"  enqueued:     {_ops.timestamp(dump['enqueue_at'])}",
        f"  first start:  {_ops.timestamp(dump['first_started_at'])}",
    ]
    if dump["cancelled_at"]:
        lines.append(f"  cancelled:    {_ops.timestamp(dump['cancelled_at'])}")
    if dump["idempotency_key"]:
        lines.append(f"  idempotency:  {dump['idempotency_key']}")
    for key, label in (("retry_strategy", "retry"), ("cancellation", "cancellation"), ("headers", "headers")):
        if dump[key]:
            lines.append(f"  {label + ':':<14}{value(dump[key])}")
    lines.append(f"  params:       {value(dump['params'])}")
    if dump["state"] == "completed":
        lines.append(f"  result:       {value(dump['completed_payload'])}")
    return lines


def _run_lines(dump: dict[str, Any], value: Callable[[Any], str]) -> list[str]:
    lines = ["", f"Runs ({len(dump['runs'])})"]
    for run in dump["runs"]:
        lines.append(f"  #{run['attempt']} {run['run_id']} [{run['state']}]")
        lines.append(f"     created {_ops.timestamp(run['created_at'])}, started {_ops.timestamp(run['started_at'])}")
        if run["claimed_by"]:
            lines.append(f"     claimed by {run['claimed_by']} until {_ops.timestamp(run['claim_expires_at'])}")
        if run["state"] == "sleeping" and run["wake_event"]:
            timeout = f"times out {_ops.timestamp(run['available_at'])}" if run["available_at"] else "no timeout"
            lines.append(f"     waiting for event {run['wake_event']!r} ({timeout})")
        elif run["state"] == "sleeping":
            lines.append(f"     sleeping until {_ops.timestamp(run['available_at'])}")
        if run["completed_at"]:
            lines.append(f"     completed {_ops.timestamp(run['completed_at'])}")
        if run["failed_at"]:
            lines.append(f"     failed {_ops.timestamp(run['failed_at'])}: {value(run['failure_reason'])}")
    return lines


def _step_lines(dump: dict[str, Any], value: Callable[[Any], str]) -> list[str]:
    lines = ["", f"Checkpoints ({len(dump['checkpoints'])})"]
    for checkpoint in dump["checkpoints"]:
        when = _ops.timestamp(checkpoint["updated_at"])
        lines.append(f"  {checkpoint['checkpoint_name']} [{checkpoint['status']}] {when}")
        lines.append(f"     {value(checkpoint['value'])}")
    if dump["waits"]:
        lines.extend(["", f"Waits ({len(dump['waits'])})"])
    for wait in dump["waits"]:
        emitted = (
            f"emitted {_ops.timestamp(wait['event_emitted_at'])}" if wait["event_emitted_at"] else "not emitted yet"
        )
        timeout = f", times out {_ops.timestamp(wait['timeout_at'])}" if wait["timeout_at"] else ""
        lines.append(f"  step {wait['step_name']}: event {wait['event_name']!r} ({emitted}{timeout})")
    return lines
