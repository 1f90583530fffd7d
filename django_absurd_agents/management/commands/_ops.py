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

from django.core.management.base import CommandError
from django.db import DatabaseError

from django_absurd_agents import conf, tables


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


_UUID_RE = re.compile(r"\{?[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}\}?", re.IGNORECASE)


def task_id(value: str) -> uuid.UUID:
    """``value`` as a task id, or a CommandError naming it; checked before any SQL."""
    if not isinstance(value, str) or not _UUID_RE.fullmatch(value.strip()):
        raise CommandError(f"{value!r} is not a task id (a UUID such as 0190c3e2-8f4e-7c2a-9d1b-3f5e6a7b8c9d).")
    return uuid.UUID(value.strip())


def locate_task(identifier: uuid.UUID, queue: str | None = None) -> tuple[str, str]:
    """(queue, state) of a task, looked up in ``queue`` or else (``queue`` None) in every queue."""
    checked = queue_option(queue)
    if checked is None:
        known_queues()  # without a schema: the CommandError that names the fix
    located = tables.locate_task(identifier, checked)
    if located is not None:
        return located
    where = f"queue {queue!r}" if queue else f"any queue ({', '.join(known_queues()) or 'there are none'})"
    raise CommandError(f"Task {identifier} was not found in {where}.")


def timestamp(value: datetime.datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else "-"


def shortened(text: str, limit: int) -> str:
    if limit <= 0 or len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters; --full or --json shows everything)"
