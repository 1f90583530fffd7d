"""Partitioned queues' upkeep: the weeks ahead created, expired weeks dropped whole instead of row by row.

Absurd stores a partitioned queue's tasks, runs, checkpoints and waits in weekly partitions by id
range; its ids are UUIDv7, so an id says in which week it was made. ``absurd.ensure_partitions``
creates the weeks ahead. Absurd's own cleanup still deletes finished tasks one row at a time, and its
detach planning takes only weeks already emptied that way. Here a week whose every task finished
longer than the queue's ``cleanup_ttl`` ago goes as a whole: four ``DETACH PARTITION`` + ``DROP TABLE``
in one short transaction, which leaves no dead rows for vacuum, whatever the week held.

A week is kept while it holds an unfinished task (pending, running, sleeping), a task finished within
the TTL, or a run of such a task from an older week (a retry made later is stored in its own week).
The check reads the week without locks; the drop then locks the queue's tables (``lock_timeout``
bounded) and checks again what could have changed meanwhile: a task of the week retried, or an
unfinished run, before anything is dropped.
"""

from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass, field

from django.db import DatabaseError, transaction

from django_absurd_agents import validation
from django_absurd_agents.tables import FINISHED_STATES, connection, first_row, rows, table

DROPPED, HELD, BUSY = "dropped", "held", "busy"

PREFIXES: tuple[str, ...] = ("r", "t", "c", "w")
"""The partitioned tables of a queue (runs, tasks, checkpoints, waits), in the order they are locked:
runs before tasks, as Absurd's own functions lock them."""

LOCK_TIMEOUT = "2s"
"""How long a drop waits for the queue's tables before it gives the week up until the next run: the
wait queues the workers' statements behind it, so it stays short."""

_BUSY_SQLSTATES = {"55P03", "40P01"}  # lock_not_available, deadlock_detected

_WEEKS_SQL = (
    "select parent.relname as parent, child.relname as partition, "
    "bounds[1]::uuid as lower, bounds[2]::uuid as upper, "
    "absurd.uuidv7_timestamp(bounds[1]::uuid) as starts "
    "from pg_inherits i join pg_class parent on parent.oid = i.inhparent "
    "join pg_class child on child.oid = i.inhrelid, "
    "lateral regexp_match(pg_get_expr(child.relpartbound, child.oid), "
    "'FROM \\(''([^'']+)''\\) TO \\(''([^'']+)''\\)') as bounds "
    "where parent.relnamespace = 'absurd'::regnamespace and parent.relname = any(%s) "
    "and absurd.uuidv7_timestamp(bounds[2]::uuid) <= %s "
    "order by lower"
)


@dataclass(frozen=True)
class Week:
    """One week of a partitioned queue: the id range and its four partitions by table prefix."""

    lower: uuid.UUID
    upper: uuid.UUID
    starts: datetime.datetime
    partitions: dict[str, str]

    def partition(self, prefix: str) -> str:
        """The qualified name of this week's partition of the ``prefix`` table."""
        name = self.partitions[prefix]
        return table(prefix, name[len(prefix) + 1 :])


@dataclass
class Upkeep:
    """What :func:`upkeep` did to one queue."""

    queue: str
    cutoff: datetime.datetime
    dropped: list[datetime.datetime] = field(default_factory=list)
    """Start (UTC) of each week dropped."""
    dropped_tasks: int = 0
    kept: list[tuple[datetime.datetime, int]] = field(default_factory=list)
    """Expired weeks kept, with how many of their tasks hold them (unfinished or finished recently)."""
    busy: list[datetime.datetime] = field(default_factory=list)
    """Expired weeks left for the next run: the queue's tables stayed locked past ``LOCK_TIMEOUT``."""


def partitioned_queues(queue: str | None = None) -> list[str]:
    """The partitioned queues (only ``queue`` when given and partitioned)."""
    found = rows(
        "select queue_name from absurd.queues where storage_mode = 'partitioned' "
        "and (%s::text is null or queue_name = %s) order by queue_name",
        [queue, queue],
    )
    return [row["queue_name"] for row in found]


def ensure_ahead(queue: str) -> None:
    """Create the weeks of the queue's window (``partition_lookback`` to ``partition_lookahead``)."""
    _execute("select absurd.ensure_partitions(%s)", [queue])


def cutoff(queue: str) -> datetime.datetime:
    """The database's now (``absurd.current_time()``, which tests may fake) less the queue's ``cleanup_ttl``."""
    found = first_row(
        "select absurd.current_time() - cleanup_ttl as cutoff from absurd.queues where queue_name = %s", [queue]
    )
    if found is None:
        raise validation.unknown_queue(queue)
    return found["cutoff"]


def expired_weeks(queue: str, before: datetime.datetime) -> list[Week]:
    """The queue's weeks that ended before ``before``, oldest first; a week missing one of its four
    partitions (detached by hand) is left alone. The default partitions (rows outside every week) are
    never among them."""
    by_range: dict[tuple[uuid.UUID, uuid.UUID], dict[str, str]] = {}
    starts: dict[tuple[uuid.UUID, uuid.UUID], datetime.datetime] = {}
    for row in rows(_WEEKS_SQL, [[f"{prefix}_{queue}" for prefix in PREFIXES], before]):
        key = (row["lower"], row["upper"])
        by_range.setdefault(key, {})[row["parent"][0]] = row["partition"]
        starts[key] = row["starts"]
    return [
        Week(lower, upper, starts[(lower, upper)], parts)
        for (lower, upper), parts in sorted(by_range.items())
        if set(parts) == set(PREFIXES)
    ]


def holding_tasks(queue: str, week: Week, before: datetime.datetime) -> int:
    """How many tasks keep ``week``: its own unfinished or recently finished tasks, and such tasks of
    older weeks whose runs it stores. A task's finish is its last run's ``completed_at`` or
    ``failed_at``, or its ``cancelled_at``; a finished task whose last run is gone already (its week was
    dropped) does not count."""
    t, r = table("t", queue), table("r", queue)
    statement = (
        f"select count(*) as holding from ("
        f"select state, cancelled_at, last_attempt_run, task_id from {week.partition('t')} "
        f"union all "
        f"select distinct t.state, t.cancelled_at, t.last_attempt_run, t.task_id from {week.partition('r')} wr "
        f"join {t} t on t.task_id = wr.task_id where not (wr.task_id >= %s and wr.task_id < %s)"
        f") t left join {r} r on r.run_id = t.last_attempt_run "
        "where t.state <> all(%s) or case t.state when 'completed' then r.completed_at "
        "when 'failed' then r.failed_at when 'cancelled' then t.cancelled_at end >= %s"
    )
    params = [week.lower, week.upper, list(FINISHED_STATES), before]
    return int(rows(statement, params)[0]["holding"])


def _changed_since_check(week: Week, before: datetime.datetime) -> tuple[bool, int]:
    """Under the drop's locks: ``(whether the week now holds work, how many tasks it stores)``.

    Only a retry can bring a finished task back, and a retry makes a run in the current week; new
    tasks and runs never land in a past week. So this cheaper check completes :func:`holding_tasks`.
    """
    statement = (
        f"select count(*) as tasks, "
        f"count(*) filter (where state <> all(%s) or last_attempt_run >= absurd.uuidv7_floor(%s)) "
        f"+ (select count(*) from (select 1 from {week.partition('r')} where state <> all(%s) limit 1) r) as changed "
        f"from {week.partition('t')}"
    )
    finished = list(FINISHED_STATES)
    found = rows(statement, [finished, before, finished])[0]
    return found["changed"] > 0, int(found["tasks"])


def _execute(statement: str, params: list[object] | None = None) -> None:
    """Run a statement that returns no rows (always with a parameter list: :func:`table` doubles ``%``)."""
    with connection().cursor() as cursor:
        cursor.execute(statement, params or [])


def drop_week(queue: str, week: Week, before: datetime.datetime) -> tuple[str, int]:
    """Detach and drop the week's four partitions and delete its idempotency keys, in one transaction.

    Returns ``(DROPPED, tasks dropped)``, ``(HELD, 0)`` when the week holds work again, or ``(BUSY, 0)``
    when the queue's tables stayed locked longer than :data:`LOCK_TIMEOUT` (the next upkeep tries again).
    """
    try:
        with transaction.atomic(using=connection().alias):
            _execute("select set_config('lock_timeout', %s, true)", [LOCK_TIMEOUT])
            _execute(f"lock table {', '.join(table(prefix, queue) for prefix in PREFIXES)} in access exclusive mode")
            changed, tasks = _changed_since_check(week, before)
            if changed:
                return HELD, 0
            for prefix in PREFIXES:
                _execute(f"alter table {table(prefix, queue)} detach partition {week.partition(prefix)}")
                _execute(f"drop table {week.partition(prefix)}")
            _execute(f"delete from {table('i', queue)} where task_id >= %s and task_id < %s", [week.lower, week.upper])
            return DROPPED, tasks
    except DatabaseError as exc:
        if getattr(exc.__cause__, "sqlstate", None) in _BUSY_SQLSTATES:
            return BUSY, 0
        raise


def upkeep(queue: str) -> Upkeep:
    """Create the weeks ahead, then drop every expired week that holds no work, oldest first."""
    ensure_ahead(queue)
    before = cutoff(queue)
    done = Upkeep(queue, before)
    for week in expired_weeks(queue, before):
        holding = holding_tasks(queue, week, before)
        if holding:
            done.kept.append((week.starts, holding))
            continue
        outcome, tasks = drop_week(queue, week, before)
        if outcome == DROPPED:
            done.dropped.append(week.starts)
            done.dropped_tasks += tasks
        elif outcome == BUSY:
            done.busy.append(week.starts)
        else:  # work came back between the check and the lock: a task retried meanwhile
            done.kept.append((week.starts, max(1, holding_tasks(queue, week, before))))
    return done
