"""``manage.py absurd_tasks``: recent tasks across queues, filtered by queue, state and name."""

from __future__ import annotations

import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from django_absurd_agents.json_text import pretty_json, text_problem
from django_absurd_agents.management.commands import _ops
from django_absurd_agents.tables import STATES
from django_absurd_agents.task_list import TaskFilters, task_page


class Command(BaseCommand):
    help = (
        "List tasks, newest first (by task id: spawn order, to the millisecond), across every queue unless "
        "--queue is given."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--queue", "-q", action="append", dest="queues", help="Only this queue (repeatable).")
        parser.add_argument(
            "--state", "-s", action="append", dest="states", choices=STATES, help="Only this state (repeatable)."
        )
        parser.add_argument("--name", "-n", help="Only tasks with this task name.")
        parser.add_argument("--limit", "-l", type=int, default=50, help="At most this many tasks (default 50).")
        parser.add_argument("--json", action="store_true", help="Print a JSON list.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["limit"] < 1:
            raise CommandError("--limit must be at least 1.")
        name = options["name"]
        problem = text_problem(name) if name else None
        if problem:
            raise CommandError(f"--name: {problem}")
        if options["queues"] is None:
            queues = _ops.known_queues()
        else:
            given = [_ops.queue_name_given(queue) for queue in options["queues"]]  # every one, before any SQL
            queues = [_ops.checked_queue(queue) for queue in given]
        tasks = list_tasks(queues, states=options["states"], name=name, limit=options["limit"])
        if options["json"]:
            self.stdout.write(pretty_json(tasks, limit=None))
            return
        if not tasks:
            self.stdout.write("No tasks match.")
            return
        self.stdout.write(render(tasks))


def list_tasks(queues: list[str], *, states: list[str] | None, name: str | None, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` tasks of ``queues`` matching the filters, in the admin's order (``task_list``)."""
    filters = TaskFilters(queues=tuple(queues), states=tuple(states or ()), task_name=name)
    page = task_page(filters, per_page=limit, with_total=False) if queues else None
    return [
        {
            "task_id": row.task_id,
            "queue": row.queue,
            "task_name": row.task_name,
            "state": row.state,
            "attempts": row.attempts,
            "max_attempts": row.max_attempts,
            "enqueued_at": row.enqueue_at,
            "updated_at": row.last_run_finished_at or row.last_run_started_at,
        }
        for row in (page.rows if page else [])
    ]


def _age(moment: datetime.datetime | None, now: datetime.datetime) -> str:
    if moment is None:
        return "-"
    seconds = max(int((now - moment).total_seconds()), 0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def render(tasks: list[dict[str, Any]]) -> str:
    now = timezone.now()
    header = ("TASK ID", "QUEUE", "NAME", "STATE", "ATTEMPTS", "ENQUEUED", "LAST CHANGE")
    rows = [
        (
            task["task_id"],
            task["queue"],
            task["task_name"],
            task["state"],
            f"{task['attempts']}/{task['max_attempts'] or '-'}",
            _ops.timestamp(task["enqueued_at"]),
            _age(task["updated_at"], now),
        )
        for task in tasks
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    )
