"""Arguments of the client's calls, checked before any SQL.

A statement that Postgres refuses inside ``transaction.atomic()`` aborts the caller's transaction
(every later query fails until the rollback). So the client refuses what Postgres would refuse (a
malformed id, a blank task name, ``max_attempts=0``) in Python first, and looks a task up with a plain
``SELECT`` before calling Absurd functions that raise for an unknown id (``tables.locate_sync``).
"""

from __future__ import annotations

import re
import uuid

from django_absurd_agents.exceptions import TaskNotFound, UnknownQueue
from django_absurd_agents.jsonsafe import InvalidParams, name_problem

_UUID_TEXT = re.compile(r"\{?[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}\}?", re.IGNORECASE)
"""What a person types as a task id; stricter than ``uuid.UUID``, which also takes ``+1900000-...``."""


def parse_uuid(value: object) -> uuid.UUID | None:
    """``value`` as a UUID when it is one (or its text, blanks around it ignored), else None."""
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str) or not _UUID_TEXT.fullmatch(value.strip()):
        return None
    return uuid.UUID(value.strip())


def task_uuid(task_id: object) -> uuid.UUID:
    """``task_id`` (a UUID or its text) as a UUID, or ``InvalidParams`` naming it (a ``ValueError``)."""
    parsed = parse_uuid(task_id)
    if parsed is not None:
        return parsed
    raise InvalidParams(f"{task_id!r} is not a task id: task ids are UUIDs such as '0190c3e2-7a1b-7c3d-...'.")


def _name(value: object, what: str) -> str:
    """``value`` if it can be a name (a non-blank string Postgres can store), else ``InvalidParams`` saying why."""
    problem = name_problem(value, what)
    if problem is not None:
        raise InvalidParams(problem)
    assert isinstance(value, str)
    return value


def task_name(name: object) -> str:
    return _name(name, "The task name")


def event_name(name: object) -> str:
    return _name(name, "The event name")


def idempotency_key(key: object) -> str | None:
    return None if key is None else _name(key, "The idempotency key")


def max_attempts(value: object, *, what: str = "max_attempts") -> int | None:
    """``value`` if it is a whole number of attempts (at least 1) or None; else ``InvalidParams``.

    Zero is refused, not read as "the default": a task that may run zero times cannot run.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParams(f"{what} must be a whole number of attempts (at least 1), not {value!r}.")
    if value < 1:
        default = (
            " Leave it out (None) for the default, ABSURD_AGENTS['DEFAULT_MAX_ATTEMPTS']."
            if what == "max_attempts"
            else ""
        )
        raise InvalidParams(
            f"{what} must be at least 1, not {value}: it counts the attempts, the first included.{default}"
        )
    return value


def unknown_queue(queue: str) -> UnknownQueue:
    return UnknownQueue(
        f"Queue {queue!r} does not exist in the database. Add it to ABSURD_AGENTS['QUEUES'] and run "
        "`manage.py migrate`, or use a queue that exists."
    )


def not_found(task_id: object, queue: str | None) -> TaskNotFound:
    where = f"queue {queue!r}" if queue else "any queue"
    return TaskNotFound(f"Task {task_id} was not found in {where}.")
