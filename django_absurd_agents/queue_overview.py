"""How every queue is doing: tasks by state, the oldest pending task, the failures of the last hour."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from django_absurd_agents.tables import STATES, first_row, over_queues, rows, table


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


def _count_states(by_queue: dict[str, QueueOverview]) -> None:
    branches = [
        f"(select %s::text as queue, state, count(*) as n, min(enqueue_at) filter (where state = 'pending') "
        f"as oldest_pending_at from {table('t', q)} group by state)"
        for q in by_queue
    ]
    for row in rows(" union all ".join(branches), list(by_queue)):
        item = by_queue[row["queue"]]
        item.counts[row["state"]] = int(row["n"])
        if row["oldest_pending_at"] is not None:
            item.oldest_pending_at = row["oldest_pending_at"]


def _count_failures(by_queue: dict[str, QueueOverview], now: datetime.datetime) -> None:
    branches = [
        f"(select %s::text as queue, count(*) as runs, count(*) filter (where t.state = 'failed' "
        f"and t.last_attempt_run = r.run_id) as tasks from {table('r', q)} r "
        f"join {table('t', q)} t on t.task_id = r.task_id "
        "where r.state = 'failed' and r.failed_at >= %s::timestamptz - interval '1 hour')"
        for q in by_queue
    ]
    params: list[Any] = []
    for queue in by_queue:
        params.extend([queue, now])
    for row in rows(" union all ".join(branches), params):
        by_queue[row["queue"]].failed_runs_last_hour = int(row["runs"])
        by_queue[row["queue"]].tasks_failed_last_hour = int(row["tasks"])


def overview_of(queues: list[str]) -> list[QueueOverview]:
    """:func:`overview` of ``queues``, which exist: for a caller already inside ``over_queues``."""
    if not queues:
        return []
    now = first_row("select now() as now")["now"]  # type: ignore[index]
    by_queue = {
        q: QueueOverview(
            queue=q, counts={}, oldest_pending_at=None, failed_runs_last_hour=0, tasks_failed_last_hour=0, now=now
        )
        for q in queues
    }
    _count_states(by_queue)
    _count_failures(by_queue, now)
    return [by_queue[q] for q in queues]


def overview() -> list[QueueOverview]:
    """Per queue, in the catalog's order: tasks by state, the oldest pending task, failures in the last hour."""
    return over_queues(None, overview_of)
