"""``manage.py absurd_cancel <id>``: cancel a task that has not finished."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from django_absurd_agents.client import absurd
from django_absurd_agents.management.commands import _ops
from django_absurd_agents.tables import FINISHED_STATES


class Command(BaseCommand):
    help = (
        "Cancel a pending, sleeping or running task. A running task is stopped at its next checkpoint or lease "
        "heartbeat (within a third of the claim timeout). Finished tasks are left alone."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("task_id", help="The task's id.")
        parser.add_argument("--queue", "-q", help="The task's queue (found automatically otherwise).")

    def handle(self, *args: Any, **options: Any) -> None:
        identifier = _ops.task_id(options["task_id"])
        queue, state = _ops.locate_task(identifier, options["queue"])
        if state in FINISHED_STATES:
            self.stdout.write(f"Task {identifier} is already {state}; nothing to cancel.")
            return
        absurd.cancel_task_sync(identifier, queue_name=queue)
        self.stdout.write(f"Cancelled task {identifier} in queue {queue} (it was {state}).")
