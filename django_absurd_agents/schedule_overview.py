"""Every configured schedule as the admin shows it: its next and last occurrences, the last task it spawned.

Schedules live in settings (``schedules``); what they spawned lives in the queues' task tables, each
task under the idempotency key ``schedule:<name>:<occurrence>``. The last task a schedule spawned is
the one with the greatest key after that prefix (the occurrences are UTC ISO times of one fixed width,
so their text sorts as their time). It is read with one statement per queue, each schedule's newest
key found by walking an index of the keys backwards from the end of its prefix: the task table's
unique index in an unpartitioned queue, the ``i_<queue>`` table's primary key in a partitioned one
(whose weekly task partitions have no index on the key). On 100,000 tasks either reads one index
entry and one task per schedule (0.1 ms).

That walk needs the index to sort keys code point by code point, as the C collations do (``C``,
``POSIX``, ``C.UTF-8``, the builtin provider). Under a linguistic collation (``en_US.UTF-8``, ICU) a
prefix is not a range of the index (punctuation weighs little or nothing there), so the keys are
compared under ``collate "C"`` instead, which reads all of them once per schedule (about 15 ms per
100,000 tasks): correct, slower on a big queue. (``like 'prefix%'`` is no better: without a
``text_pattern_ops`` index it filters the index backwards, 25 ms.)

A schedule that cannot run (a bad cron, an unknown key, a task routed to another queue than the one
it names) is a row carrying its error rather than a failed page.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django_absurd_agents import schedules
from django_absurd_agents.client import absurd
from django_absurd_agents.json_text import compact_json
from django_absurd_agents.partitions import partitioned_queues
from django_absurd_agents.tables import first_row, list_queues, over_queues, rows, table

PARAMS_SUMMARY_CHARS = 80
"""A schedule's params are shown on one line, cut at this many characters."""

# An occurrence starts with its year, so a key's text after the prefix starts with a digit ("0" to
# "9", then ":" in code point order): a schedule ``a`` never finds the keys of a schedule ``a:b``.
_FIRST_DIGIT, _AFTER_LAST_DIGIT = "0", ":"

_COLLATION_SQL = (
    "select coalesce(to_jsonb(d) ->> 'datlocprovider', 'c') as provider, d.datcollate as collate "
    "from pg_catalog.pg_database d where d.datname = current_database()"
)

_LATEST = (
    "select p.name, t.task_id, t.state, t.enqueue_at, k.idempotency_key "
    "from unnest(%s::text[], %s::text[], %s::text[]) as p(name, low, high) "
    "cross join lateral (select idempotency_key, task_id from {keys} "
    "where idempotency_key{c} >= p.low and idempotency_key{c} < p.high "
    "order by idempotency_key{c} desc limit 1) k "
    "join {tasks} t on t.task_id = k.task_id"
)
"""Each schedule's newest key in ``keys`` (the task table, or a partitioned queue's ``i_<queue>``), then its task."""


@dataclass(frozen=True)
class LastSpawn:
    """The newest task of a schedule still in its queue (cleanup deletes old ones)."""

    task_id: uuid.UUID
    queue: str
    state: str
    occurrence: datetime | None
    spawned_at: datetime


@dataclass(frozen=True)
class ScheduleRow:
    name: str
    task: str
    cron: str
    queue: str | None
    params: str
    next_occurrence: datetime | None = None
    last_occurrence: datetime | None = None
    last_spawn: LastSpawn | None = None
    error: str | None = None
    queue_missing: bool = False
    builtin: bool = False


def schedule_rows(now: datetime) -> list[ScheduleRow]:
    """One row per schedule in settings (the built-in cleanup one included), in settings order."""
    parsed: dict[str, schedules.Schedule | ScheduleRow] = {}
    for name, entry in schedules.settings_entries().items():
        parsed[name] = _parse(name, entry)
    by_queue: dict[str, list[schedules.Schedule]] = defaultdict(list)
    for item in parsed.values():
        if isinstance(item, schedules.Schedule):
            by_queue[str(item.queue)].append(item)
    present = list_queues() if by_queue else []
    spawns = last_spawns({queue: found for queue, found in by_queue.items() if queue in present}, present=present)
    return [
        item
        if isinstance(item, ScheduleRow)
        else ScheduleRow(
            name=item.name,
            task=item.task,
            cron=item.cron,
            queue=item.queue,
            params=params_summary(item.params),
            next_occurrence=item.next_after(now),
            last_occurrence=item.last_due(now),
            last_spawn=spawns.get(item.name),
            queue_missing=str(item.queue) not in present,
            builtin=item.name == schedules.CLEANUP_SCHEDULE_NAME and item.task == schedules.CLEANUP_TASK,
        )
        for item in parsed.values()
    ]


def _parse(name: str, entry: Any) -> schedules.Schedule | ScheduleRow:
    """The schedule with its queue resolved as a spawn resolves it, or an error row naming the fix."""
    fields = entry if isinstance(entry, dict) else {}
    try:
        schedule = schedules.parse(name, entry)
        queue = absurd.resolve_queue(schedule.task, schedule.queue)
    except ValueError as exc:  # ScheduleError, or a task registered on another queue than the entry's
        return ScheduleRow(
            name=name,
            task=str(fields.get("task", "")),
            cron=str(fields.get("cron", "")),
            queue=fields.get("queue"),
            params=params_summary(fields.get("params")),
            error=str(exc),
        )
    return schedules.Schedule(schedule.name, schedule.task, schedule.cron, schedule.params, queue, schedule.options)


def params_summary(params: Any) -> str:
    if params is None:
        return ""
    text = compact_json(params)
    return text if len(text) <= PARAMS_SUMMARY_CHARS else f"{text[: PARAMS_SUMMARY_CHARS - 1]}…"


def last_spawns(
    by_queue: dict[str, list[schedules.Schedule]], *, present: list[str] | None = None
) -> dict[str, LastSpawn]:
    """Schedule name -> the newest task it spawned, one statement per queue.

    ``present`` is the catalog's queues with tables when the caller has read it (``tables.over_queues``).
    """
    if not by_queue:
        return {}
    collation = "" if sorts_by_code_point() else ' collate "C"'
    partitioned = set(partitioned_queues())

    def read(present: list[str]) -> dict[str, LastSpawn]:
        found: dict[str, LastSpawn] = {}
        for queue in present:
            listed = {schedule.name: schedule for schedule in by_queue[queue]}
            bounds = [
                list(listed),
                [schedule.key_prefix + _FIRST_DIGIT for schedule in listed.values()],
                [schedule.key_prefix + _AFTER_LAST_DIGIT for schedule in listed.values()],
            ]
            keys = table("i" if queue in partitioned else "t", queue)
            statement = _LATEST.format(keys=keys, tasks=table("t", queue), c=collation)
            for row in rows(statement, bounds):
                found[row["name"]] = LastSpawn(
                    task_id=row["task_id"],
                    queue=queue,
                    state=row["state"],
                    occurrence=listed[row["name"]].occurrence_of(row["idempotency_key"]),
                    spawned_at=row["enqueue_at"],
                )
        return found

    return over_queues(list(by_queue), read, present=present)


def sorts_by_code_point() -> bool:
    """Whether the database's collation orders text code point by code point, so a key prefix is an index range."""
    row = first_row(_COLLATION_SQL) or {}
    provider, collate = row.get("provider"), str(row.get("collate", ""))
    if provider == "b":  # the builtin provider (PostgreSQL 17): C, C.UTF-8 and PG_UNICODE_FAST all sort so
        return True
    return provider == "c" and (collate in {"C", "POSIX"} or collate.startswith(("C.", "c.")))
