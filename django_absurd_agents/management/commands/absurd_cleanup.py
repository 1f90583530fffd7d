"""``manage.py absurd_cleanup``: remove finished tasks and old events past each queue's TTL.

An unpartitioned queue loses its old finished tasks row by row (``absurd.cleanup_all_queues``). A
partitioned queue gets its weeks ahead created and its expired weeks dropped whole
(``partitions.upkeep``); only its events are deleted row by row. The built-in cleanup schedule of
``absurd_worker --schedule`` runs this command; without it, schedule it yourself (cron, a systemd
timer, a Kubernetes CronJob). See docs/production.md and docs/partitioned-queues.md.
"""

from __future__ import annotations

import datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from django_absurd_agents import partitions, tables
from django_absurd_agents.event_stream import delete_orphaned_events
from django_absurd_agents.management.commands import _ops

# Each call deletes at most the queue's cleanup_limit rows per table; a large backlog takes several.
_MAX_ROUNDS = 10_000

_ROWS_SQL = "select tasks_deleted, events_deleted from absurd.cleanup_all_queues(%s)"
_EVENTS_ONLY_SQL = (
    "select 0 as tasks_deleted, absurd.cleanup_events(queue_name, "
    "greatest(floor(extract(epoch from cleanup_ttl))::integer, 0), cleanup_limit) as events_deleted "
    "from absurd.queues where queue_name = %s"
)


def delete_rows(queue: str, *, events_only: bool) -> tuple[int, int]:
    """Delete the queue's expired rows in rounds; returns (tasks, events) deleted.

    One statement per round, committed on its own: no long transaction holds the queue's rows.
    """
    tasks = events = 0
    for _ in range(_MAX_ROUNDS):
        found = tables.rows(_EVENTS_ONLY_SQL if events_only else _ROWS_SQL, [queue])
        if not found:  # dropped since it was listed: nothing of it is left to delete
            break
        [deleted] = found
        tasks += deleted["tasks_deleted"]
        events += deleted["events_deleted"]
        if not (deleted["tasks_deleted"] or deleted["events_deleted"]):
            break
    return tasks, events


def _day(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).date().isoformat()


def upkeep_lines(done: partitions.Upkeep) -> list[str]:
    """What ``partitions.upkeep`` did to one queue, for a terminal."""
    lines = []
    if done.dropped:
        lines.append(
            f"{done.queue}: dropped {len(done.dropped)} week(s) of partitions (from "
            f"{', '.join(map(_day, done.dropped))}) holding {done.dropped_tasks} task(s) finished before "
            f"{done.cutoff:%Y-%m-%d %H:%M} UTC."
        )
    for starts, holding in done.kept:
        lines.append(
            f"{done.queue}: kept the week from {_day(starts)}: {holding} of its task(s) are unfinished or "
            f"finished after {done.cutoff:%Y-%m-%d %H:%M} UTC."
        )
    for starts in done.busy:
        lines.append(f"{done.queue}: the week from {_day(starts)} is left for the next run (its tables were busy).")
    return lines


class Command(BaseCommand):
    help = (
        "Delete completed, failed and cancelled tasks (with their runs, checkpoints and waits) and events older "
        "than each queue's cleanup_ttl (30 days unless set in QUEUES or absurd.queues). A partitioned queue "
        "drops whole expired weeks instead, and gets its weeks ahead created."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--queue", "-q", help="Clean only this queue.")

    def handle(self, *args: Any, **options: Any) -> None:
        queue = _ops.queue_option(options["queue"])  # None: every queue; an empty value is an error
        queues = [queue] if queue is not None else _ops.known_queues()  # a clear error when the schema is missing
        partitioned = set(partitions.partitioned_queues(queue))
        verbose = options["verbosity"] >= 2
        ttls = {
            row["queue_name"]: row["cleanup_ttl"]
            for row in tables.rows("select queue_name, cleanup_ttl from absurd.queues")
        }
        changed = False
        for name in queues:
            tasks, events = delete_rows(name, events_only=name in partitioned)
            changed = changed or bool(tasks or events)
            if tasks or events or verbose:
                self.stdout.write(f"{name}: deleted {tasks} task(s) and {events} event(s) older than {ttls.get(name)}.")
        for name in sorted(partitioned):
            done = partitions.upkeep(name)
            changed = changed or bool(done.dropped)
            for line in upkeep_lines(done):
                self.stdout.write(line)
        logged = delete_orphaned_events()  # the agent event log of the tasks deleted above
        if logged or verbose:
            self.stdout.write(f"Deleted {logged} agent event log entr{'y' if logged == 1 else 'ies'} of deleted tasks.")
        if not logged and not changed:
            self.stdout.write("Nothing to clean up.")
