"""``manage.py absurd_retry <id>``: run a failed task again."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_absurd_agents.client import absurd
from django_absurd_agents.management.commands import _ops
from django_absurd_agents.tables import FINISHED_STATES


class Command(BaseCommand):
    help = (
        "Retry a failed task: in place with one more attempt (completed steps are not run again), or with "
        "--spawn-new as a fresh task with the same params."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("task_id", help="The failed task's id.")
        parser.add_argument("--queue", "-q", help="The task's queue (found automatically otherwise).")
        parser.add_argument(
            "--spawn-new", action="store_true", help="Start a new task (new id, no checkpoints) instead."
        )
        parser.add_argument(
            "--max-attempts", type=int, help="New attempt limit (default: one more attempt than were used)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        identifier = _ops.task_id(options["task_id"])
        queue, state = _ops.locate_task(identifier, options["queue"])
        if state != "failed":
            raise CommandError(
                f"Task {identifier} is {state}; only failed tasks can be retried"
                + (" (cancel it first with absurd_cancel)." if state not in FINISHED_STATES else ".")
            )
        if options["max_attempts"] is not None and options["max_attempts"] < 1:
            raise CommandError("--max-attempts must be at least 1.")
        result = absurd.retry_task_sync(
            identifier, max_attempts=options["max_attempts"], spawn_new=options["spawn_new"], queue_name=queue
        )
        if result["created"]:
            self.stdout.write(f"Spawned task {result['task_id']} in queue {queue} with the params of {identifier}.")
        else:
            self.stdout.write(
                f"Task {identifier} in queue {queue} will run again: "
                f"attempt {result['attempt']} (run {result['run_id']})."
            )
