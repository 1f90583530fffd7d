"""SQL over Absurd's tables, for the admin.

There is no Django model per queue: every queue ``q`` has its own tables (``absurd.t_q`` tasks,
``r_q`` runs, ``c_q`` checkpoints, ``e_q`` events, ``w_q`` waits), and queues come and go while the
site runs. So the queue list is read from ``absurd.queues`` on every call, never cached, and the SQL
is built per queue with quoted identifiers. A queue dropped between reading the catalog and reading
its tables makes the statement fail with "undefined table"; the statement is then rebuilt from a
fresh catalog and run again, so a page never breaks, nor goes empty, because of a concurrent drop.

Paging is by keyset on ``task_id``: Absurd's ids are UUIDv7, so id order is spawn order, and each
queue's primary key index serves "the newest N tasks before this id" without touching the rest of
the table. Totals are exact up to ``EXACT_TOTAL_ROWS`` tasks (unfiltered) or ``COUNT_CAP`` matches
(filtered); past that, an unfiltered list shows the planner's estimate (``pg_class.reltuples``) and a
filtered one says "more than". A text search in params reads every row (there is no index for it)
and counts nothing.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db import ProgrammingError, transaction
from psycopg import sql as pgsql

from django_absurd_agents.client import django_connection, load_json

STATES: tuple[str, ...] = ("pending", "running", "sleeping", "completed", "failed", "cancelled")
ACTIVE_STATES: tuple[str, ...] = ("pending", "running", "sleeping")
FINISHED_STATES: tuple[str, ...] = ("completed", "failed", "cancelled")

COUNT_CAP = 1_000
"""Filtered totals are counted exactly up to this many rows, then shown as "more than"."""

EXACT_TOTAL_ROWS = 20_000
"""Unfiltered totals are counted exactly while the queues are estimated to hold at most this many tasks
(an index-only count, a few milliseconds); above it the planner's estimate is shown instead."""

SMALL_TABLE_ROWS = 10_000
"""Below this many rows (estimated) a queue's task names are read exactly instead of from statistics."""

_UNDEFINED_TABLE = "42P01"
_RETRIES_ON_DROPPED_QUEUE = 3


def table(prefix: str, queue: str) -> str:
    """The qualified name of one of a queue's tables, e.g. ``"absurd"."t_agents"``.

    Quoted by psycopg's ``sql.Identifier``, so any name Absurd catalogues (quotes, ``%``, spaces) is
    safe. A ``%`` is doubled: every statement of this module runs with a parameter list (``[]`` when
    it has no parameter), so psycopg turns ``%%`` back into ``%`` every time.
    """
    return pgsql.Identifier("absurd", f"{prefix}_{queue}").as_string(None).replace("%", "%%")


def _cursor() -> Any:
    return django_connection().cursor()


def _alias() -> str:
    return str(django_connection().alias)


QUEUE_CATALOG_SQL = (
    "select q.queue_name, (select count(*) from pg_catalog.pg_class c "
    "where c.relnamespace = 'absurd'::regnamespace and c.relname::text = any(array["
    "'t_' || q.queue_name, 'r_' || q.queue_name, 'c_' || q.queue_name, 'e_' || q.queue_name, 'w_' || q.queue_name"
    "])) = 5 as has_tables from absurd.queues q order by q.queue_name"
)
"""Every catalogued queue, and whether its five tables exist (a row inserted into ``absurd.queues``
by hand, or left behind by a failed tool, has none)."""


def queue_catalog() -> list[tuple[str, bool]]:
    """``(queue, has_tables)`` for every row of ``absurd.queues`` (empty without Absurd's schema)."""
    with _cursor() as cursor:
        cursor.execute("select to_regclass('absurd.queues') is not null as installed", [])
        if not cursor.fetchone()[0]:
            return []
        cursor.execute(QUEUE_CATALOG_SQL, [])
        columns = [column.name for column in cursor.description]
        rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
    return [(row["queue_name"], bool(row["has_tables"])) for row in rows]


def list_queues() -> list[str]:
    """Queues in the database right now, with their tables (a catalogued queue without tables is left out)."""
    return [queue for queue, has_tables in queue_catalog() if has_tables]


def queue_exists(queue: str) -> bool:
    return queue in list_queues()


def _is_undefined_table(exc: BaseException) -> bool:
    cause = exc.__cause__
    return getattr(cause, "sqlstate", None) == _UNDEFINED_TABLE


def over_queues[T](queues: Sequence[str] | None, run: Callable[[list[str]], T]) -> T:
    """Run ``run(queues)`` (SQL over those queues' tables), surviving a queue dropped meanwhile.

    ``queues=None`` means every queue. Each attempt is a savepoint, so a failed statement does not
    poison a surrounding transaction; the retry intersects the wanted queues with a fresh catalog.
    """
    for attempt in range(_RETRIES_ON_DROPPED_QUEUE + 1):
        present = list_queues()
        chosen = present if queues is None else [q for q in queues if q in present]
        try:
            with transaction.atomic(using=_alias()):
                return run(chosen)
        except ProgrammingError as exc:
            if not _is_undefined_table(exc) or attempt == _RETRIES_ON_DROPPED_QUEUE:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


# --- task list ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskFilters:
    """What the task list is narrowed to; every field is optional."""

    queue: str | None = None
    state: str | None = None
    task_name: str | None = None
    created_since: datetime.datetime | None = None
    created_before: datetime.datetime | None = None
    search: str | None = None

    @property
    def is_text_search(self) -> bool:
        return bool(self.search) and parse_uuid(self.search) is None

    @property
    def narrows_rows(self) -> bool:
        """Whether anything but the queue filters rows (then table estimates say nothing)."""
        return any(
            value not in (None, "")
            for value in (self.state, self.task_name, self.created_since, self.created_before, self.search)
        )


@dataclass(frozen=True)
class TaskRow:
    queue: str
    task_id: str
    task_name: str
    state: str
    attempts: int
    max_attempts: int | None
    enqueue_at: datetime.datetime
    first_started_at: datetime.datetime | None
    last_run_state: str | None
    last_run_started_at: datetime.datetime | None
    last_run_finished_at: datetime.datetime | None

    @property
    def last_run_duration(self) -> datetime.timedelta | None:
        """How long the last run took, or has been running so far."""
        if self.last_run_started_at is None:
            return None
        end = self.last_run_finished_at
        if end is None:
            if self.last_run_state != "running":
                return None
            end = datetime.datetime.now(datetime.UTC)
        return max(end - self.last_run_started_at, datetime.timedelta(0))


@dataclass
class TaskPage:
    rows: list[TaskRow]
    has_next: bool
    has_previous: bool
    total: int | None = None
    total_is_estimate: bool = False
    total_is_lower_bound: bool = False
    queues: list[str] = field(default_factory=list)

    @property
    def next_cursor(self) -> str | None:
        return self.rows[-1].task_id if self.has_next and self.rows else None

    @property
    def previous_cursor(self) -> str | None:
        return self.rows[0].task_id if self.has_previous and self.rows else None


def parse_uuid(value: object) -> uuid.UUID | None:
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str):
        return None
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        return None


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _where(filters: TaskFilters) -> tuple[list[str], list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if filters.state:
        clauses.append("t.state = %s")
        params.append(filters.state)
    if filters.task_name:
        clauses.append("t.task_name = %s")
        params.append(filters.task_name)
    if filters.created_since is not None:
        clauses.append("t.enqueue_at >= %s")
        params.append(filters.created_since)
    if filters.created_before is not None:
        clauses.append("t.enqueue_at < %s")
        params.append(filters.created_before)
    if filters.search:
        task_id = parse_uuid(filters.search)
        if task_id is not None:
            clauses.append("t.task_id = %s")
            params.append(task_id)
        else:
            clauses.append("t.params::text ilike %s")
            params.append(f"%{_escape_like(filters.search.strip())}%")
    return clauses, params


_LIST_COLUMNS = (
    "t.task_id, t.task_name, t.state, t.attempts, t.max_attempts, t.enqueue_at, t.first_started_at, "
    "r.state, r.started_at, coalesce(r.completed_at, r.failed_at, t.cancelled_at)"
)


def task_page(
    filters: TaskFilters,
    *,
    after: uuid.UUID | None = None,
    before: uuid.UUID | None = None,
    per_page: int = 50,
    with_total: bool = True,
) -> TaskPage:
    """One page of tasks across queues, newest first.

    ``after`` is the last id of the page before (gives the next page), ``before`` the first id of
    the page after (gives the previous page). Each queue contributes its own ``ORDER BY task_id
    LIMIT`` branch, so each reads only its primary key index, however large the table.
    """
    wanted = [filters.queue] if filters.queue else None

    def run(queues: list[str]) -> TaskPage:
        if not queues:
            return TaskPage(rows=[], has_next=False, has_previous=False, total=0, queues=queues)
        backwards = before is not None and after is None
        clauses, where_params = _where(filters)
        if after is not None:
            clauses.append("t.task_id < %s")
            where_params.append(after)
        elif before is not None:
            clauses.append("t.task_id > %s")
            where_params.append(before)
        direction = "asc" if backwards else "desc"
        where = (" where " + " and ".join(clauses)) if clauses else ""
        branches: list[str] = []
        params: list[Any] = []
        for queue in queues:
            branches.append(
                f"(select %s::text as queue, {_LIST_COLUMNS} from {table('t', queue)} t "
                f"left join {table('r', queue)} r on r.run_id = t.last_attempt_run{where} "
                f"order by t.task_id {direction} limit %s)"
            )
            params.extend([queue, *where_params, per_page + 1])
        sql = f"select * from ({' union all '.join(branches)}) listed order by task_id {direction} limit %s"
        params.append(per_page + 1)
        with _cursor() as cursor:
            cursor.execute(sql, params)
            fetched = cursor.fetchall()
        more = len(fetched) > per_page
        fetched = fetched[:per_page]
        if backwards:
            fetched.reverse()
        rows = [
            TaskRow(
                queue=row[0],
                task_id=str(row[1]),
                task_name=row[2],
                state=row[3],
                attempts=row[4],
                max_attempts=row[5],
                enqueue_at=row[6],
                first_started_at=row[7],
                last_run_state=row[8],
                last_run_started_at=row[9],
                last_run_finished_at=row[10],
            )
            for row in fetched
        ]
        page = TaskPage(
            rows=rows,
            has_next=more if not backwards else True,
            has_previous=(after is not None) if not backwards else more,
            queues=queues,
        )
        if with_total:
            _fill_total(page, filters, queues)
        return page

    return over_queues(wanted, run)


def _estimated_rows(queues: Iterable[str], prefix: str = "t") -> dict[str, float]:
    """The planner's row estimate of each queue's table (-1 when the table was never analysed).

    Like the planner, the density measured by the last ANALYZE is scaled to the table's current size,
    so a table that grew since is not under-counted.
    """
    names = [f"{prefix}_{queue}" for queue in queues]
    with _cursor() as cursor:
        cursor.execute(
            "select c.relname, case when c.reltuples < 0 then -1 "
            "when c.relpages > 0 then c.reltuples / c.relpages "
            "* (pg_relation_size(c.oid) / current_setting('block_size')::float8) "
            "else c.reltuples end "
            "from pg_class c join pg_namespace n on n.oid = c.relnamespace "
            "where n.nspname = 'absurd' and c.relname = any(%s)",
            [names],
        )
        by_name = {row[0]: float(row[1]) for row in cursor.fetchall()}
    return {queue: by_name.get(f"{prefix}_{queue}", -1.0) for queue in queues}


def _fill_total(page: TaskPage, filters: TaskFilters, queues: list[str]) -> None:
    if filters.is_text_search:
        return  # a text search reads every row's params already once for the page; no second pass to count
    cap = COUNT_CAP
    if not filters.narrows_rows:
        cap = EXACT_TOTAL_ROWS
        estimates = _estimated_rows(queues)
        if all(value >= 0 for value in estimates.values()) and sum(estimates.values()) > EXACT_TOTAL_ROWS:
            page.total = round(sum(estimates.values()))
            page.total_is_estimate = True
            return
    clauses, where_params = _where(filters)
    where = (" where " + " and ".join(clauses)) if clauses else ""
    branches = []
    params: list[Any] = []
    for queue in queues:
        branches.append(f"(select 1 from {table('t', queue)} t{where} limit %s)")
        params.extend([*where_params, cap + 1])
    with _cursor() as cursor:
        cursor.execute(f"select count(*) from ({' union all '.join(branches)}) counted", params)
        count = int(cursor.fetchone()[0])
    if count > cap:
        page.total = cap
        page.total_is_lower_bound = True
    else:
        page.total = count


def task_names(queues: Sequence[str] | None = None, *, known: Iterable[str] = ()) -> list[str]:
    """Task names worth offering as filter choices, without scanning large tables.

    Small queues are read exactly; large ones contribute the most common names from the planner's
    statistics. ``known`` adds names the process knows from its registry and routes.
    """

    def run(chosen: list[str]) -> list[str]:
        names = set(known)
        estimates = _estimated_rows(chosen)
        small = [q for q in chosen if estimates[q] < SMALL_TABLE_ROWS]
        large = [q for q in chosen if estimates[q] >= SMALL_TABLE_ROWS]
        with _cursor() as cursor:
            if small:
                sql = " union ".join(f"(select distinct task_name from {table('t', q)})" for q in small)
                cursor.execute(sql, [])
                names.update(row[0] for row in cursor.fetchall())
            if large:
                cursor.execute(
                    "select most_common_vals::text::text[] from pg_stats "
                    "where schemaname = 'absurd' and attname = 'task_name' and tablename = any(%s)",
                    [[f"t_{q}" for q in large]],
                )
                for (values,) in cursor.fetchall():
                    names.update(values or [])
        return sorted(names)

    return over_queues(queues, run)


# --- one task ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    run_id: str
    attempt: int
    state: str
    claimed_by: str | None
    claim_expires_at: datetime.datetime | None
    available_at: datetime.datetime | None  # None: sleeping until an event, without a timeout
    wake_event: str | None
    event_payload: Any
    started_at: datetime.datetime | None
    completed_at: datetime.datetime | None
    failed_at: datetime.datetime | None
    result: Any
    failure_reason: Any
    created_at: datetime.datetime

    @property
    def finished_at(self) -> datetime.datetime | None:
        return self.completed_at or self.failed_at

    @property
    def duration(self) -> datetime.timedelta | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return max(self.finished_at - self.started_at, datetime.timedelta(0))

    @property
    def failure_name(self) -> str | None:
        return self.failure_reason.get("name") if isinstance(self.failure_reason, dict) else None

    @property
    def failure_message(self) -> str | None:
        if isinstance(self.failure_reason, dict):
            message = self.failure_reason.get("message")
            return None if message is None else str(message)
        return None if self.failure_reason is None else str(self.failure_reason)

    @property
    def failure_traceback(self) -> str | None:
        if isinstance(self.failure_reason, dict):
            value = self.failure_reason.get("traceback")
            return str(value) if value else None
        return None

    @property
    def is_claim_timeout(self) -> bool:
        return self.failure_name == "$ClaimTimeout"


@dataclass(frozen=True)
class Checkpoint:
    name: str
    state: Any
    status: str
    owner_run_id: str | None
    updated_at: datetime.datetime


@dataclass(frozen=True)
class Wait:
    run_id: str
    step_name: str
    event_name: str
    timeout_at: datetime.datetime | None
    created_at: datetime.datetime
    emitted: bool
    payload: Any
    emitted_at: datetime.datetime | None


@dataclass
class TaskDetail:
    queue: str
    task_id: str
    task_name: str
    params: Any
    headers: Any
    retry_strategy: Any
    max_attempts: int | None
    cancellation: Any
    enqueue_at: datetime.datetime
    first_started_at: datetime.datetime | None
    state: str
    attempts: int
    last_attempt_run: str | None
    completed_payload: Any
    cancelled_at: datetime.datetime | None
    idempotency_key: str | None
    runs: list[Run] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    waits: list[Wait] = field(default_factory=list)

    @property
    def last_run(self) -> Run | None:
        for run in self.runs:
            if run.run_id == self.last_attempt_run:
                return run
        return self.runs[-1] if self.runs else None

    @property
    def failure(self) -> Run | None:
        """The run whose failure ended the task, when it failed."""
        if self.state != "failed":
            return None
        failed = [run for run in self.runs if run.failure_reason is not None]
        return failed[-1] if failed else None

    @property
    def can_retry(self) -> bool:
        return self.state == "failed"

    @property
    def can_cancel(self) -> bool:
        return self.state in ACTIVE_STATES


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def task_detail(queue: str, task_id: uuid.UUID) -> TaskDetail | None:
    """Everything about one task, or None when the task (or its queue) does not exist."""

    def run(queues: list[str]) -> TaskDetail | None:
        if queue not in queues:
            return None
        with _cursor() as cursor:
            cursor.execute(
                "select t.task_name, t.params, t.headers, t.retry_strategy, t.max_attempts, t.cancellation, "
                "t.enqueue_at, t.first_started_at, t.state, t.attempts, t.last_attempt_run, "
                "t.completed_payload, t.cancelled_at, to_jsonb(t) ->> 'idempotency_key' "
                f"from {table('t', queue)} t where t.task_id = %s",
                [task_id],
            )
            row = cursor.fetchone()
            if row is None:
                return None
            detail = TaskDetail(
                queue=queue,
                task_id=str(task_id),
                task_name=row[0],
                params=load_json(row[1]),
                headers=load_json(row[2]),
                retry_strategy=load_json(row[3]),
                max_attempts=row[4],
                cancellation=load_json(row[5]),
                enqueue_at=row[6],
                first_started_at=row[7],
                state=row[8],
                attempts=row[9],
                last_attempt_run=_str_or_none(row[10]),
                completed_payload=load_json(row[11]),
                cancelled_at=row[12],
                idempotency_key=row[13],
            )
            cursor.execute(
                "select run_id, attempt, state, claimed_by, claim_expires_at, nullif(available_at, 'infinity'), "
                "wake_event, event_payload, started_at, completed_at, failed_at, result, failure_reason, created_at "
                f"from {table('r', queue)} where task_id = %s order by attempt, created_at, run_id",
                [task_id],
            )
            detail.runs = [
                Run(
                    run_id=str(r[0]),
                    attempt=r[1],
                    state=r[2],
                    claimed_by=r[3],
                    claim_expires_at=r[4],
                    available_at=r[5],
                    wake_event=r[6],
                    event_payload=load_json(r[7]),
                    started_at=r[8],
                    completed_at=r[9],
                    failed_at=r[10],
                    result=load_json(r[11]),
                    failure_reason=load_json(r[12]),
                    created_at=r[13],
                )
                for r in cursor.fetchall()
            ]
            cursor.execute(
                "select checkpoint_name, state, status, owner_run_id, updated_at "
                f"from {table('c', queue)} where task_id = %s order by updated_at, checkpoint_name",
                [task_id],
            )
            detail.checkpoints = [
                Checkpoint(
                    name=c[0], state=load_json(c[1]), status=c[2], owner_run_id=_str_or_none(c[3]), updated_at=c[4]
                )
                for c in cursor.fetchall()
            ]
            cursor.execute(
                "select w.run_id, w.step_name, w.event_name, nullif(w.timeout_at, 'infinity'), w.created_at, "
                "e.payload is not null, e.payload, case when e.payload is not null then e.emitted_at end "
                f"from {table('w', queue)} w left join {table('e', queue)} e on e.event_name = w.event_name "
                "where w.task_id = %s order by w.created_at, w.step_name",
                [task_id],
            )
            detail.waits = [
                Wait(
                    run_id=str(w[0]),
                    step_name=w[1],
                    event_name=w[2],
                    timeout_at=w[3],
                    created_at=w[4],
                    emitted=bool(w[5]),
                    payload=load_json(w[6]),
                    emitted_at=w[7],
                )
                for w in cursor.fetchall()
            ]
        return detail

    return over_queues([queue], run)


def find_task_queue(task_id: uuid.UUID) -> str | None:
    """The queue holding ``task_id`` (used to resolve admin-log links, which carry only the id)."""

    def run(queues: list[str]) -> str | None:
        if not queues:
            return None
        sql = " union all ".join(f"(select %s::text from {table('t', q)} where task_id = %s)" for q in queues)
        params: list[Any] = []
        for queue in queues:
            params.extend([queue, task_id])
        with _cursor() as cursor:
            cursor.execute(sql + " limit 1", params)
            row = cursor.fetchone()
        return row[0] if row else None

    return over_queues(None, run)


@dataclass(frozen=True)
class Event:
    queue: str
    name: str
    emitted: bool
    payload: Any
    emitted_at: datetime.datetime | None


def event(queue: str, name: str) -> Event | None:
    """An event row (emitted, or only awaited so far), or None when nobody emitted or awaited it."""

    def run(queues: list[str]) -> Event | None:
        if queue not in queues:
            return None
        with _cursor() as cursor:
            cursor.execute(
                f"select payload is not null, payload, emitted_at from {table('e', queue)} where event_name = %s",
                [name],
            )
            row = cursor.fetchone()
        if row is None:
            return None
        return Event(
            queue=queue,
            name=name,
            emitted=bool(row[0]),
            payload=load_json(row[1]),
            emitted_at=row[2] if row[0] else None,
        )

    return over_queues([queue], run)


def waiting_tasks(queue: str, event_name: str) -> list[tuple[str, str]]:
    """``(task_id, task_name)`` of the tasks of ``queue`` waiting for ``event_name``."""

    def run(queues: list[str]) -> list[tuple[str, str]]:
        if queue not in queues:
            return []
        with _cursor() as cursor:
            cursor.execute(
                f"select distinct w.task_id, t.task_name from {table('w', queue)} w "
                f"join {table('t', queue)} t on t.task_id = w.task_id where w.event_name = %s order by 1",
                [event_name],
            )
            return [(str(row[0]), row[1]) for row in cursor.fetchall()]

    return over_queues([queue], run)


# --- overview ---------------------------------------------------------------------------------


@dataclass
class QueueOverview:
    queue: str
    counts: dict[str, int]
    oldest_pending_at: datetime.datetime | None
    failed_runs_last_hour: int
    tasks_failed_last_hour: int
    now: datetime.datetime

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def oldest_pending_age(self) -> datetime.timedelta | None:
        if self.oldest_pending_at is None:
            return None
        return max(self.now - self.oldest_pending_at, datetime.timedelta(0))

    @property
    def state_counts(self) -> list[tuple[str, int]]:
        return [(state, self.counts.get(state, 0)) for state in STATES]


def overview() -> list[QueueOverview]:
    """Per queue: tasks by state, the oldest pending task, failures in the last hour."""

    def run(queues: list[str]) -> list[QueueOverview]:
        if not queues:
            return []
        with _cursor() as cursor:
            cursor.execute("select now()", [])
            now = cursor.fetchone()[0]
            by_queue = {
                q: QueueOverview(
                    queue=q,
                    counts={},
                    oldest_pending_at=None,
                    failed_runs_last_hour=0,
                    tasks_failed_last_hour=0,
                    now=now,
                )
                for q in queues
            }
            sql = " union all ".join(
                f"(select %s::text, state, count(*), min(enqueue_at) filter (where state = 'pending') "
                f"from {table('t', q)} group by state)"
                for q in queues
            )
            cursor.execute(sql, list(queues))
            for queue, state, count, oldest in cursor.fetchall():
                item = by_queue[queue]
                item.counts[state] = int(count)
                if oldest is not None:
                    item.oldest_pending_at = oldest
            sql = " union all ".join(
                f"(select %s::text, count(*), count(*) filter (where t.state = 'failed' "
                f"and t.last_attempt_run = r.run_id) from {table('r', q)} r "
                f"join {table('t', q)} t on t.task_id = r.task_id "
                "where r.state = 'failed' and r.failed_at >= %s::timestamptz - interval '1 hour')"
                for q in queues
            )
            params: list[Any] = []
            for queue in queues:
                params.extend([queue, now])
            cursor.execute(sql, params)
            for queue, runs, tasks in cursor.fetchall():
                by_queue[queue].failed_runs_last_hour = int(runs)
                by_queue[queue].tasks_failed_last_hour = int(tasks)
        return [by_queue[q] for q in queues]

    return over_queues(None, run)
