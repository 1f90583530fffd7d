"""Shared by the operations commands (``absurd_task``, ``absurd_tasks``, ``absurd_retry``, ...).

They read Absurd's tables through the read model the admin uses (``tables``, ``task_list``,
``task_records``) and change tasks through the client. What they add is the command line's side:
arguments checked before any SQL (a queue name, a task id), errors as ``CommandError`` naming the
fix, and values printed for a terminal.
"""

from __future__ import annotations

import datetime
import re
import uuid
from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.db import DatabaseError
from django.utils import timezone

from django_absurd_agents import conf, tables, validation
from django_absurd_agents.json_text import text_problem
from django_absurd_agents.task_list import TaskFilters, TaskRow, matching_tasks, tasks_by_id


def known_queues() -> list[str]:
    """The queues with their tables (a catalogued queue without them is left out); a CommandError without a schema."""
    try:
        if not tables.schema_installed():
            raise CommandError("There is no Absurd schema in this database. Run `manage.py migrate`.")
        return tables.list_queues()
    except DatabaseError as exc:
        raise CommandError(
            f"Cannot read the Absurd queues ({exc}). Is the schema installed? Run `manage.py migrate`."
        ) from exc


def checked_queue(name: str) -> str:
    """``name`` if it is a valid queue that exists, else a CommandError naming the queues there are."""
    problem = conf.queue_name_error(name)
    if problem:
        raise CommandError(problem)
    queues = known_queues()
    if name not in queues:
        raise CommandError(
            f"Queue {name!r} does not exist. Queues in the database: {', '.join(queues) or '(none)'}. "
            "Declare queues in ABSURD_AGENTS['QUEUES'] and run `manage.py migrate`."
        )
    return name


def queue_option(value: str | None) -> str | None:
    """A ``--queue`` value checked: None when the option was left out.

    An empty value is an error, never "every queue" or "the default queue": ``--queue "$UNSET"``
    must not widen a command to every queue.
    """
    if value is None:
        return None
    return checked_queue(queue_name_given(value))


def queue_name_given(value: str) -> str:
    """``value`` unless it is empty (or blank): then a CommandError, before any SQL."""
    if not value.strip():
        raise CommandError(
            "--queue needs a queue name (it was given an empty value, e.g. an unset shell variable). "
            "Name the queue, or leave --queue out."
        )
    return value


def task_id(value: str) -> uuid.UUID:
    """``value`` as a task id, or a CommandError naming it; checked before any SQL."""
    parsed = validation.parse_uuid(value)
    if parsed is None:
        raise CommandError(f"{value!r} is not a task id (a UUID such as 0190c3e2-8f4e-7c2a-9d1b-3f5e6a7b8c9d).")
    return parsed


def locate_task(identifier: uuid.UUID, queue: str | None = None) -> tuple[str, str]:
    """(queue, state) of a task, looked up in ``queue`` or else (``queue`` None) in every queue."""
    checked = queue_option(queue)
    if checked is None:
        known_queues()  # without a schema: the CommandError that names the fix
    return locate_checked(identifier, checked)


def locate_checked(identifier: uuid.UUID, checked: str | None) -> tuple[str, str]:
    """``locate_task`` once the queue (or the schema, for None) has been checked: one query per id."""
    located = tables.locate_task(identifier, checked)
    if located is not None:
        return located
    where = f"queue {checked!r}" if checked else f"any queue ({', '.join(known_queues()) or 'there are none'})"
    raise CommandError(f"Task {identifier} was not found in {where}.")


def timestamp(value: datetime.datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else "-"


def shortened(text: str, limit: int) -> str:
    if limit <= 0 or len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters; --full or --json shows everything)"


_SINCE_RE = re.compile(r"(\d+)\s*(s|m|min|h|d|w)", re.IGNORECASE)
_SINCE_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def since(value: str) -> datetime.timedelta:
    """``--since 90s``, ``30m``, ``1h``, ``2d``, ``1w`` as a timedelta; a CommandError otherwise, before any SQL."""
    match = _SINCE_RE.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None or int(match.group(1)) <= 0:
        raise CommandError(f"--since {value!r}: give an age such as 90s, 30m, 1h, 2d or 1w.")
    return datetime.timedelta(seconds=int(match.group(1)) * _SINCE_UNITS[match.group(2).lower()])


def add_selection_arguments(parser: CommandParser, *, states: tuple[str, ...], verb: str) -> None:
    """Several ids, or a filter, and a dry run: the selection ``absurd_retry`` and ``absurd_cancel`` share."""
    parser.add_argument("task_id", nargs="*", help=f"The id of each task to {verb} (or select them with a filter).")
    parser.add_argument("--queue", "-q", help="The tasks' queue (found automatically otherwise).")
    parser.add_argument(
        "--state",
        "-s",
        action="append",
        dest="states",
        choices=states,
        help=f"Filter: tasks in this state (repeatable; default {', '.join(states)}).",
    )
    parser.add_argument("--task-name", help="Filter: tasks with this task name.")
    parser.add_argument("--since", help="Filter: tasks created within this age (90s, 30m, 1h, 2d, 1w).")
    parser.add_argument(
        "--limit", type=int, default=1000, help="Filter: at most this many tasks, newest first (default 1000)."
    )
    parser.add_argument("--dry-run", action="store_true", help=f"List the tasks it would {verb}; change nothing.")


def filtered(options: dict[str, Any]) -> bool:
    """Whether a filter option (``--state``, ``--task-name``, ``--since``) was given."""
    return any(options.get(key) for key in ("states", "task_name", "since"))


def selected_tasks(options: dict[str, Any], states: tuple[str, ...]) -> list[TaskRow]:
    """The tasks named by id, or matched by the filter options (checked before any SQL)."""
    ids = [task_id(value) for value in options["task_id"]]
    if ids and filtered(options):
        raise CommandError("Give task ids or a filter (--state, --task-name, --since), not both.")
    if not ids and not filtered(options):
        raise CommandError("Give one or more task ids, or select tasks with --state, --task-name or --since.")
    if options["limit"] < 1:
        raise CommandError("--limit must be at least 1.")
    name = options.get("task_name")
    problem = text_problem(name) if name else None
    if problem:
        raise CommandError(f"--task-name: {problem}")
    age = since(options["since"]) if options.get("since") else None
    queue = queue_option(options["queue"])  # checked once, not once per id
    if ids:
        if queue is None:
            known_queues()  # without a schema: the CommandError that names the fix
        located = [(locate_checked(identifier, queue)[0], identifier) for identifier in dict.fromkeys(ids)]
        return tasks_by_id(located)
    filters = TaskFilters(
        queues=(queue,) if queue else tuple(known_queues()),
        states=tuple(options.get("states") or states),
        task_name=name or None,
        created_since=timezone.now() - age if age else None,
    )
    return matching_tasks(filters, options["limit"]) if filters.queues else []
