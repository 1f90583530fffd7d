"""``manage.py absurd_cancel <id> [<id> ...]`` or ``--state pending --task-name X --since 1h``: cancel tasks."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from django_absurd_agents.client import absurd
from django_absurd_agents.management.commands import _ops
from django_absurd_agents.tables import ACTIVE_STATES, FINISHED_STATES


class Command(BaseCommand):
    help = (
        "Cancel pending, sleeping or running tasks. A running task is stopped at its next checkpoint or lease "
        "heartbeat (within a third of the claim timeout). Finished tasks are left alone. Name the tasks by id, "
        "or select them with a filter (--state pending --task-name NAME --since 1h); --dry-run lists them and "
        "changes nothing."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        _ops.add_selection_arguments(parser, states=ACTIVE_STATES, verb="cancel")

    def handle(self, *args: Any, **options: Any) -> None:
        if len(options["task_id"]) == 1 and not options["dry_run"] and not _ops.filtered(options):
            identifier = _ops.task_id(options["task_id"][0])
            queue, state = _ops.locate_task(identifier, options["queue"])
            if state in FINISHED_STATES:
                self.stdout.write(f"Task {identifier} is already {state}; nothing to cancel.")
                return
            absurd.cancel_task_sync(identifier, queue_name=queue)
            self.stdout.write(f"Cancelled task {identifier} in queue {queue} (it was {state}).")
            return
        tasks = _ops.selected_tasks(options, ACTIVE_STATES)
        cancelled = skipped = 0
        for task in tasks:
            if task.state in FINISHED_STATES:
                self.stdout.write(f"Skipped task {task.task_id} in queue {task.queue}: it is already {task.state}.")
                skipped += 1
            elif options["dry_run"]:
                self.stdout.write(f"Would cancel task {task.task_id} ({task.task_name}) in queue {task.queue}.")
                cancelled += 1
            else:
                absurd.cancel_task_sync(task.task_id, queue_name=task.queue)
                self.stdout.write(f"Cancelled task {task.task_id} in queue {task.queue} (it was {task.state}).")
                cancelled += 1
        verb = "Would cancel" if options["dry_run"] else "Cancelled"
        self.stdout.write(f"{verb} {cancelled} task(s); skipped {skipped}." if tasks else "No task matches.")
