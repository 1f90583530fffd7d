"""``manage.py absurd_task <id>``: one task with its runs, checkpoints and waits."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from django_absurd_agents.management.commands import _ops


class Command(BaseCommand):
    help = (
        "Show a task with its runs (attempts), checkpoints (completed steps) and open waits. The queue is found "
        "automatically unless --queue is given. Shows params and step results: operators' eyes only."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("task_id", help="The task's id (a UUID).")
        parser.add_argument("--queue", "-q", help="Look only in this queue.")
        parser.add_argument("--json", action="store_true", help="Print everything as one JSON document.")
        parser.add_argument("--full", action="store_true", help="Do not shorten long JSON values.")

    def handle(self, *args: Any, **options: Any) -> None:
        identifier = _ops.task_id(options["task_id"])
        queue, _ = _ops.locate_task(identifier, options["queue"])
        dump = task_dump(queue, identifier)
        if options["json"]:
            self.stdout.write(_ops.dumps(dump))
        else:
            self.stdout.write(render(dump, limit=0 if options["full"] else 400))


def task_dump(queue: str, identifier: str) -> dict[str, Any]:
    """The task row, its runs (oldest first), checkpoints (in the order written) and waits, as plain data."""
    t, r, c, w, e = (_ops.table(prefix, queue) for prefix in "trcwe")
    [task] = _rows(
        f"select task_id::text, task_name, state, params, headers, retry_strategy, max_attempts, cancellation, "
        f"enqueue_at, first_started_at, attempts, last_attempt_run::text, completed_payload, cancelled_at, "
        f"idempotency_key from {t} where task_id = %s",
        [identifier],
    )
    task["queue"] = queue
    task["runs"] = _rows(
        f"select run_id::text, attempt, state, claimed_by, claim_expires_at, "
        # An event wait without a timeout sleeps until 'infinity', which Python datetimes cannot hold.
        f"nullif(available_at, 'infinity') as available_at, wake_event, event_payload, "
        f"started_at, completed_at, failed_at, result, failure_reason, created_at from {r} "
        f"where task_id = %s order by attempt, created_at",
        [identifier],
    )
    task["checkpoints"] = _rows(
        f"select checkpoint_name, state as value, status, owner_run_id::text, updated_at from {c} "
        f"where task_id = %s order by updated_at, checkpoint_name",
        [identifier],
    )
    task["waits"] = _rows(
        f"select w.run_id::text, w.step_name, w.event_name, nullif(w.timeout_at, 'infinity') as timeout_at, "
        f"w.created_at, e.emitted_at as event_emitted_at from {w} w "
        # A wait registers its event with a SQL NULL payload; an emitted event has a JSON value (maybe null).
        f"left join {e} e on e.event_name = w.event_name and e.payload is not null "
        f"where w.task_id = %s order by w.created_at",
        [identifier],
    )
    return task


_JSON_COLUMNS = {
    "params",
    "headers",
    "retry_strategy",
    "cancellation",
    "completed_payload",
    "event_payload",
    "result",
    "failure_reason",
    "value",
}


def _rows(query: str, params: list[Any]) -> list[dict[str, Any]]:
    with _ops.connection().cursor() as cursor:
        cursor.execute(query, params)
        names = [column.name for column in cursor.description]
        rows = cursor.fetchall()
    return [
        {name: _ops.as_json(value) if name in _JSON_COLUMNS else value for name, value in zip(names, row, strict=True)}
        for row in rows
    ]


def render(dump: dict[str, Any], *, limit: int) -> str:
    def value(data: Any) -> str:
        return _ops.shortened(_ops.dumps(data, indent=None), limit)

    lines = [
        f"Task {dump['task_id']}  {dump['task_name']}  [{dump['state']}]",
        f"  queue:        {dump['queue']}",
        f"  attempts:     {dump['attempts']} of {dump['max_attempts'] or 'unlimited'}",
        f"  enqueued:     {_ops.timestamp(dump['enqueue_at'])}",
        f"  first start:  {_ops.timestamp(dump['first_started_at'])}",
    ]
    if dump["cancelled_at"]:
        lines.append(f"  cancelled:    {_ops.timestamp(dump['cancelled_at'])}")
    if dump["idempotency_key"]:
        lines.append(f"  idempotency:  {dump['idempotency_key']}")
    if dump["retry_strategy"]:
        lines.append(f"  retry:        {value(dump['retry_strategy'])}")
    if dump["cancellation"]:
        lines.append(f"  cancellation: {value(dump['cancellation'])}")
    if dump["headers"]:
        lines.append(f"  headers:      {value(dump['headers'])}")
    lines.append(f"  params:       {value(dump['params'])}")
    if dump["state"] == "completed":
        lines.append(f"  result:       {value(dump['completed_payload'])}")

    lines.append("")
    lines.append(f"Runs ({len(dump['runs'])})")
    for run in dump["runs"]:
        lines.append(f"  #{run['attempt']} {run['run_id']} [{run['state']}]")
        lines.append(f"     created {_ops.timestamp(run['created_at'])}, started {_ops.timestamp(run['started_at'])}")
        if run["claimed_by"]:
            lines.append(f"     claimed by {run['claimed_by']} until {_ops.timestamp(run['claim_expires_at'])}")
        if run["state"] == "sleeping":
            if run["wake_event"]:
                timeout = f"times out {_ops.timestamp(run['available_at'])}" if run["available_at"] else "no timeout"
                lines.append(f"     waiting for event {run['wake_event']!r} ({timeout})")
            else:
                lines.append(f"     sleeping until {_ops.timestamp(run['available_at'])}")
        if run["completed_at"]:
            lines.append(f"     completed {_ops.timestamp(run['completed_at'])}")
        if run["failed_at"]:
            lines.append(f"     failed {_ops.timestamp(run['failed_at'])}: {value(run['failure_reason'])}")

    lines.append("")
    lines.append(f"Checkpoints ({len(dump['checkpoints'])})")
    for checkpoint in dump["checkpoints"]:
        lines.append(
            f"  {checkpoint['checkpoint_name']} [{checkpoint['status']}] {_ops.timestamp(checkpoint['updated_at'])}"
        )
        lines.append(f"     {value(checkpoint['value'])}")

    if dump["waits"]:
        lines.append("")
        lines.append(f"Waits ({len(dump['waits'])})")
        for wait in dump["waits"]:
            emitted = (
                f"emitted {_ops.timestamp(wait['event_emitted_at'])}" if wait["event_emitted_at"] else "not emitted yet"
            )
            timeout = f", times out {_ops.timestamp(wait['timeout_at'])}" if wait["timeout_at"] else ""
            lines.append(f"  step {wait['step_name']}: event {wait['event_name']!r} ({emitted}{timeout})")
    return "\n".join(lines)
