"""``manage.py absurd_cleanup``: delete finished tasks and old events past each queue's TTL.

Nothing runs this automatically; schedule it (cron, a systemd timer, a Kubernetes CronJob), e.g.
hourly. See docs/production.md.
"""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from django_absurd_agents import tables
from django_absurd_agents.event_stream import delete_orphaned_events
from django_absurd_agents.management.commands import _ops

# Each call deletes at most the queue's cleanup_limit rows per table; a large backlog takes several.
_MAX_ROUNDS = 10_000


class Command(BaseCommand):
    help = (
        "Delete completed, failed and cancelled tasks (with their runs, checkpoints and waits) and events older "
        "than each queue's cleanup_ttl (30 days unless changed in absurd.queues)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--queue", "-q", help="Clean only this queue.")

    def handle(self, *args: Any, **options: Any) -> None:
        queue = _ops.queue_option(options["queue"])  # None: every queue; an empty value is an error
        if queue is None:
            _ops.known_queues()  # a clear error when the schema is missing
        totals: dict[str, list[int]] = {}
        for _ in range(_MAX_ROUNDS):
            # One statement per round, committed on its own: no long transaction holds the queue's rows.
            deleted = tables.rows(
                "select queue_name, tasks_deleted, events_deleted from absurd.cleanup_all_queues(%s)", [queue]
            )
            for row in deleted:
                total = totals.setdefault(row["queue_name"], [0, 0])
                total[0] += row["tasks_deleted"]
                total[1] += row["events_deleted"]
            if not any(row["tasks_deleted"] or row["events_deleted"] for row in deleted):
                break
        ttls = {
            row["queue_name"]: row["cleanup_ttl"]
            for row in tables.rows("select queue_name, cleanup_ttl from absurd.queues")
        }
        for name, (tasks, events) in sorted(totals.items()):
            if tasks or events or options["verbosity"] >= 2:
                self.stdout.write(f"{name}: deleted {tasks} task(s) and {events} event(s) older than {ttls.get(name)}.")
        logged = delete_orphaned_events()  # the agent event log of the tasks deleted above
        if logged or options["verbosity"] >= 2:
            self.stdout.write(f"Deleted {logged} agent event log entr{'y' if logged == 1 else 'ies'} of deleted tasks.")
        if not logged and not any(tasks or events for tasks, events in totals.values()):
            self.stdout.write("Nothing to clean up.")
