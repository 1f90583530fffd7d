"""Make a running attempt a task's last: the one failure Absurd 0.5.1 has no statement for.

``absurd.fail_run`` schedules another attempt while ``attempt < max_attempts``. Some failures must
be final: a task no worker knows after its grace period, a step whose side effect ran but whose
value cannot be recorded. Capping the task's ``max_attempts`` at the running attempt, then failing
the run, makes them so; ``retry_task`` raises the cap again, so a retry after the fix works.
"""

from __future__ import annotations

from psycopg import sql


def last_attempt_statement(queue: str) -> sql.Composed:
    """``update`` capping the task of run ``%s`` at that run's attempt, while it is the task's current, running run."""
    return sql.SQL(
        "update {tasks} t set max_attempts = r.attempt from {runs} r "
        "where r.run_id = %s and t.task_id = r.task_id and t.last_attempt_run = r.run_id and r.state = 'running'"
    ).format(tasks=sql.Identifier("absurd", f"t_{queue}"), runs=sql.Identifier("absurd", f"r_{queue}"))
