"""``manage.py absurd_retry <id> [<id> ...]`` or ``--state failed --task-name X --since 1h``: run failed tasks again."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_absurd_agents.client import absurd
from django_absurd_agents.management.commands import _ops
from django_absurd_agents.tables import FINISHED_STATES
from django_absurd_agents.task_list import TaskRow, tasks_by_id


class Command(BaseCommand):
    help = (
        "Retry failed tasks: in place with one more attempt (completed steps are not run again), or with "
        "--spawn-new as fresh tasks with the same params. Name the tasks by id, or select them with a filter "
        "(--state failed --task-name NAME --since 1h); --dry-run lists them and changes nothing."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        _ops.add_selection_arguments(parser, states=("failed",), verb="retry")
        parser.add_argument(
            "--spawn-new", action="store_true", help="Start a new task (new id, no checkpoints) instead."
        )
        parser.add_argument(
            "--max-attempts", type=int, help="New attempt limit (default: one more attempt than were used)."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["max_attempts"] is not None and options["max_attempts"] < 1:
            raise CommandError("--max-attempts must be at least 1.")
        if len(options["task_id"]) == 1 and not options["dry_run"] and not _ops.filtered(options):
            self._retry_one(options)
            return
        tasks = _ops.selected_tasks(options, ("failed",))
        retried = skipped = 0
        for task in tasks:
            if task.state != "failed":
                self.stdout.write(f"Skipped task {task.task_id} in queue {task.queue}: it is {task.state}.")
                skipped += 1
            elif options["dry_run"]:
                self.stdout.write(f"Would retry task {task.task_id} ({task.task_name}) in queue {task.queue}.")
                retried += 1
            else:
                self._retry(task, options)
                retried += 1
        verb = "Would retry" if options["dry_run"] else "Retried"
        self.stdout.write(f"{verb} {retried} task(s); skipped {skipped}." if tasks else "No task matches.")

    def _retry_one(self, options: dict[str, Any]) -> None:
        identifier = _ops.task_id(options["task_id"][0])
        queue, state = _ops.locate_task(identifier, options["queue"])
        if state != "failed":
            raise CommandError(
                f"Task {identifier} is {state}; only failed tasks can be retried"
                + (" (cancel it first with absurd_cancel)." if state not in FINISHED_STATES else ".")
            )
        [task] = tasks_by_id([(queue, identifier)])
        self._retry(task, options)

    def _retry(self, task: TaskRow, options: dict[str, Any]) -> None:
        result = absurd.retry_task_sync(
            task.task_id, max_attempts=options["max_attempts"], spawn_new=options["spawn_new"], queue_name=task.queue
        )
        if result["created"]:
            self.stdout.write(
                f"Spawned task {result['task_id']} in queue {task.queue} with the params of {task.task_id}."
            )
        else:
            self.stdout.write(
                f"Task {task.task_id} in queue {task.queue} will run again: "
                f"attempt {result['attempt']} (run {result['run_id']})."
            )
