"""Tasks across queues, newest first: the admin's task list and ``manage.py absurd_tasks``.

Newest first means by task id, descending. Absurd's ids are UUIDv7, so id order is spawn order (to the
millisecond; within one millisecond it is arbitrary), and each queue's primary key index serves "the
newest N tasks before this id" without reading the rest of the table, however large. Pages are cut
by keyset on the id. Totals are exact up to ``EXACT_TOTAL_ROWS`` tasks (unfiltered) or ``COUNT_CAP``
matches (filtered); past that, an unfiltered list shows the planner's estimate
(``pg_class.reltuples``) and a filtered one says "more than". A text search in params reads every
row (there is no index for it) and counts nothing.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from django_absurd_agents.tables import over_queues, rows, table
from django_absurd_agents.validation import parse_uuid

COUNT_CAP = 1_000
"""Filtered totals are counted exactly up to this many rows, then shown as "more than"."""

EXACT_TOTAL_ROWS = 20_000
"""Unfiltered totals are counted exactly while the queues are estimated to hold at most this many tasks
(an index-only count, a few milliseconds); above it the planner's estimate is shown instead."""

SMALL_TABLE_ROWS = 10_000
"""Below this many rows (estimated) a queue's task names are read exactly instead of from statistics."""


@dataclass(frozen=True)
class TaskFilters:
    """What a list is narrowed to; every field is optional (no queues or states: all of them)."""

    queues: tuple[str, ...] = ()
    states: tuple[str, ...] = ()
    task_name: str | None = None
    created_since: datetime.datetime | None = None
    created_before: datetime.datetime | None = None
    search: str | None = None

    @property
    def is_text_search(self) -> bool:
        return bool(self.search) and parse_uuid(self.search) is None

    @property
    def narrows_rows(self) -> bool:
        """Whether anything but the queues filters rows (then table estimates say nothing)."""
        return bool(self.states) or any(
            value not in (None, "") for value in (self.task_name, self.created_since, self.created_before, self.search)
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

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TaskRow:
        return cls(**{**row, "task_id": str(row["task_id"])})

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


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _where(filters: TaskFilters) -> tuple[list[str], list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if filters.states:
        clauses.append("t.state = any(%s::text[])")
        params.append(list(filters.states))
    for clause, value in (
        ("t.task_name = %s", filters.task_name),
        ("t.enqueue_at >= %s", filters.created_since),
        ("t.enqueue_at < %s", filters.created_before),
    ):
        if value is not None:
            clauses.append(clause)
            params.append(value)
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
    "r.state as last_run_state, r.started_at as last_run_started_at, "
    "coalesce(r.completed_at, r.failed_at, t.cancelled_at) as last_run_finished_at"
)


def _list_branch(queue: str, clauses: str) -> str:
    """One queue's part of a list statement: its tasks with their last run, then ``clauses`` (where, order, limit).

    Its first parameter is the queue's name.
    """
    return (
        f"(select %s::text as queue, {_LIST_COLUMNS} from {table('t', queue)} t "
        f"left join {table('r', queue)} r on r.run_id = t.last_attempt_run{clauses})"
    )


def _page_rows(
    queues: list[str], clauses: list[str], where_params: list[Any], direction: str, limit: int
) -> list[dict[str, Any]]:
    """Up to ``limit`` rows across ``queues``; each queue contributes its own index-ordered branch."""
    where = (" where " + " and ".join(clauses)) if clauses else ""
    branches: list[str] = []
    params: list[Any] = []
    for queue in queues:
        branches.append(_list_branch(queue, f"{where} order by t.task_id {direction} limit %s"))
        params.extend([queue, *where_params, limit])
    params.append(limit)
    return rows(f"select * from ({' union all '.join(branches)}) listed order by task_id {direction} limit %s", params)


def task_page(
    filters: TaskFilters,
    *,
    after: uuid.UUID | None = None,
    before: uuid.UUID | None = None,
    per_page: int = 50,
    with_total: bool = True,
    present: Sequence[str] | None = None,
) -> TaskPage:
    """One page of tasks across queues, newest first.

    ``after`` is the last id of the page before (gives the next page), ``before`` the first id of
    the page after (gives the previous page). ``present``: the catalog's queues, when already read
    (``tables.over_queues``).
    """

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
        fetched = _page_rows(queues, clauses, where_params, "asc" if backwards else "desc", per_page + 1)
        more = len(fetched) > per_page
        fetched = fetched[:per_page]
        if backwards:
            fetched.reverse()
        page = TaskPage(
            rows=[TaskRow.from_row(row) for row in fetched],
            has_next=more if not backwards else True,
            has_previous=(after is not None) if not backwards else more,
            queues=queues,
        )
        if with_total:
            _fill_total(page, filters, queues)
        return page

    return over_queues(filters.queues or None, run, present=present)


def _estimated_rows(queues: Iterable[str]) -> dict[str, float]:
    """The planner's row estimate of each queue's table (-1 when the table was never analysed).

    Like the planner, the density measured by the last ANALYZE is scaled to the table's current size,
    so a table that grew since is not under-counted. A partitioned queue's table holds no rows itself:
    its estimate is the sum of its partitions' (an empty partition never analysed counts 0).
    """
    names = [f"t_{queue}" for queue in queues]
    found = rows(
        "select p.relname, case when min(e.estimate) < 0 then -1 else sum(e.estimate) end as estimate "
        "from pg_class p join pg_namespace n on n.oid = p.relnamespace "
        "left join pg_inherits i on i.inhparent = p.oid join pg_class c on c.oid = coalesce(i.inhrelid, p.oid), "
        "lateral (select case when pg_relation_size(c.oid) = 0 then 0 when c.reltuples < 0 then -1 "
        "when c.relpages > 0 then c.reltuples / c.relpages "
        "* (pg_relation_size(c.oid) / current_setting('block_size')::float8) "
        "else c.reltuples end as estimate) e "
        "where n.nspname = 'absurd' and p.relname = any(%s) group by p.relname",
        [names],
    )
    by_name = {row["relname"]: float(row["estimate"]) for row in found}
    return {queue: by_name.get(f"t_{queue}", -1.0) for queue in queues}


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
    [counted] = rows(f"select count(*) as n from ({' union all '.join(branches)}) counted", params)
    count = int(counted["n"])
    if count > cap:
        page.total = cap
        page.total_is_lower_bound = True
    else:
        page.total = count


def task_names(
    queues: Sequence[str] | None = None, *, known: Iterable[str] = (), present: Sequence[str] | None = None
) -> list[str]:
    """Task names worth offering as filter choices, without scanning large tables.

    Small queues are read exactly; large ones contribute the most common names from the planner's
    statistics. ``known`` adds names the process knows from its registry and routes; ``present``
    is the catalog's queues, when already read (``tables.over_queues``).
    """

    def run(chosen: list[str]) -> list[str]:
        names = set(known)
        estimates = _estimated_rows(chosen)
        small = [q for q in chosen if estimates[q] < SMALL_TABLE_ROWS]
        large = [q for q in chosen if estimates[q] >= SMALL_TABLE_ROWS]
        if small:
            branches = [f"(select distinct task_name from {table('t', q)})" for q in small]
            names.update(row["task_name"] for row in rows(" union ".join(branches)))
        if large:
            parents = [f"t_{q}" for q in large]
            found = rows(  # a partitioned queue's statistics are its partitions' (autovacuum skips the parent)
                "select most_common_vals::text::text[] as names from pg_stats "
                "where schemaname = 'absurd' and attname = 'task_name' and (tablename = any(%s) or tablename in ("
                "select c.relname from pg_inherits i join pg_class c on c.oid = i.inhrelid "
                "join pg_class p on p.oid = i.inhparent "
                "where p.relnamespace = 'absurd'::regnamespace and p.relname = any(%s)))",
                [parents, parents],
            )
            for row in found:
                names.update(row["names"] or [])
        return sorted(names)

    return over_queues(queues, run, present=present)


def tasks_by_id(selected: Iterable[tuple[str, uuid.UUID]]) -> list[TaskRow]:
    """The list rows of the tasks ``selected`` as (queue, task id), newest first; missing ones left out.

    One statement: a branch per queue, each a primary key lookup. Queues missing from the catalog are
    skipped (a task of a dropped queue is gone).
    """
    by_queue: dict[str, list[uuid.UUID]] = {}
    for queue, task_id in selected:
        by_queue.setdefault(queue, []).append(task_id)

    def run(queues: list[str]) -> list[TaskRow]:
        if not queues:
            return []
        branches: list[str] = []
        params: list[Any] = []
        for queue in queues:
            branches.append(_list_branch(queue, " where t.task_id = any(%s::uuid[])"))
            params.extend([queue, by_queue[queue]])
        found = rows(f"select * from ({' union all '.join(branches)}) picked order by task_id desc", params)
        return [TaskRow.from_row(row) for row in found]

    return over_queues(list(by_queue), run) if by_queue else []


def matching_tasks(filters: TaskFilters, limit: int, *, page_size: int = 500) -> list[TaskRow]:
    """Up to ``limit`` tasks matching ``filters``, newest first, read a page at a time by keyset."""
    found: list[TaskRow] = []
    after: uuid.UUID | None = None
    while len(found) < limit:
        page = task_page(filters, after=after, per_page=min(page_size, limit - len(found)), with_total=False)
        found.extend(page.rows)
        if not page.has_next or not page.rows:
            break
        after = uuid.UUID(page.rows[-1].task_id)
    return found
