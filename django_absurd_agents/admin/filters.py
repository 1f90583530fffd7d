"""The task list's query string: filters read from it, links that change it.

Everything here is parsed before any SQL runs, and nothing a user can type makes the page fail: a
date that does not exist (``2024-02-30``, month 13, hour 25, year 0) is ignored with a message, a state
that does not exist is ignored, and text no task can hold (a NUL character, which PostgreSQL's text
and jsonb refuse) matches nothing, with a message, instead of reaching the database.
"""

from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass, field
from typing import Any

from django.http import HttpRequest
from django.utils import timezone
from django.utils.dateparse import parse_date, parse_datetime
from django.utils.http import urlencode

from django_absurd_agents.exceptions import AbsurdAgentsError
from django_absurd_agents.tables import STATES
from django_absurd_agents.task_list import TaskFilters
from django_absurd_agents.validation import parse_uuid

CREATED_PRESETS: dict[str, tuple[str, datetime.timedelta | None]] = {
    "hour": ("Past hour", datetime.timedelta(hours=1)),
    "today": ("Today", None),
    "7d": ("Past 7 days", datetime.timedelta(days=7)),
    "30d": ("Past 30 days", datetime.timedelta(days=30)),
}

DATE_FORMATS = "YYYY-MM-DD or YYYY-MM-DD HH:MM"


class BadMoment(AbsurdAgentsError, ValueError):
    """A created_since / created_until value that is not a date, or a date that does not exist."""


def parse_moment(value: str | None, *, end_of_day: bool = False) -> datetime.datetime | None:
    """A date or datetime from the query string, aware in the current time zone (None when empty).

    ``end_of_day`` turns a date into the midnight after it. Raises ``BadMoment`` for text that is not
    a date, and for dates and times that do not exist.
    """
    if not value:
        return None
    try:
        # A date first: parse_datetime would read "2024-05-01" as its midnight, and "until" would lose the day.
        day = parse_date(value)
        if day is not None:
            if end_of_day and day == datetime.date.max:
                return None  # "until the last day there is": no bound at all
            moment = datetime.datetime.combine(day + datetime.timedelta(days=1 if end_of_day else 0), datetime.time())
        else:
            parsed = parse_datetime(value)
            if parsed is None:
                raise BadMoment("is not a date")
            moment = parsed
        if timezone.is_naive(moment):
            moment = timezone.make_aware(moment)
    except BadMoment:
        raise
    except (ValueError, OverflowError) as exc:  # well formed, but no such day or time (Feb 30, hour 25, year 0)
        raise BadMoment(f"is not a date that exists ({exc})") from exc
    return moment


@dataclass
class CreatedRange:
    since: datetime.datetime | None = None
    until: datetime.datetime | None = None
    problems: list[str] = field(default_factory=list)


def created_range(request: HttpRequest) -> CreatedRange:
    """The created filter: a preset, or created_since / created_until (each ignored, with a problem, if bad)."""
    preset = request.GET.get("created")
    if preset in CREATED_PRESETS:
        now = timezone.now()
        delta = CREATED_PRESETS[preset][1]
        if delta is None:
            local = timezone.localtime(now)
            return CreatedRange(since=local.replace(hour=0, minute=0, second=0, microsecond=0))
        return CreatedRange(since=now - delta)
    found = CreatedRange()
    for key, end_of_day in (("created_since", False), ("created_until", True)):
        try:
            moment = parse_moment(request.GET.get(key), end_of_day=end_of_day)
        except BadMoment as exc:
            value = request.GET.get(key)
            found.problems.append(f"The {key} filter {value!r} {exc}; write {DATE_FORMATS}. It is ignored.")
            continue
        if end_of_day:
            found.until = moment
        else:
            found.since = moment
    return found


UNMATCHABLE = "\x00"
"""PostgreSQL's text and jsonb cannot hold a NUL character, so no task name or params contain one."""


def unmatchable_filters(**values: str | None) -> list[str]:
    """A message for each text filter that no task can match (it contains a NUL character)."""
    return [
        f"The {label.replace('_', ' ')} filter contains a NUL character (\\u0000), which no task can hold, so "
        f"nothing matches. Remove it from the {label.replace('_', ' ')}."
        for label, value in values.items()
        if value and UNMATCHABLE in value
    ]


def querystring(request: HttpRequest, **changes: str | None) -> str:
    """The current query string with ``changes`` applied; any change drops the page cursors."""
    params: dict[str, str] = {key: str(value) for key, value in request.GET.items() if key not in {"after", "before"}}
    for key, value in changes.items():
        if value is None:
            params.pop(key, None)
        else:
            params[key] = value
    if "created" in changes:
        params.pop("created_since", None)
        params.pop("created_until", None)
    return "?" + urlencode(params) if params else "?"


def filter_group(request: HttpRequest, title: str, key: str, choices: list[tuple[str, str]]) -> dict[str, Any]:
    current = request.GET.get(key) or None
    links = [{"label": "All", "url": querystring(request, **{key: None}), "selected": current is None}]
    for value, label in choices:
        links.append({"label": label, "url": querystring(request, **{key: value}), "selected": current == value})
    return {"title": title, "links": links}


@dataclass
class ListQuery:
    """What the task list was asked for: its filters, the page cursor, and what was ignored and why."""

    filters: TaskFilters
    queue: str | None
    search: str | None
    unmatchable: bool
    problems: list[str]
    after: uuid.UUID | None
    before: uuid.UUID | None


def list_query(request: HttpRequest) -> ListQuery:
    queue = request.GET.get("queue") or None
    state = request.GET.get("state") or None
    task_name = request.GET.get("task_name") or None
    search = (request.GET.get("q") or "").strip() or None
    created = created_range(request)
    unmatchable = unmatchable_filters(search=search, task_name=task_name)
    filters = TaskFilters(
        queues=(queue,) if queue else (),
        states=(state,) if state in STATES else (),
        task_name=task_name,
        created_since=created.since,
        created_before=created.until,
        search=search,
    )
    return ListQuery(
        filters=filters,
        queue=queue,
        search=search,
        unmatchable=bool(unmatchable),
        problems=[*created.problems, *unmatchable],
        after=parse_uuid(request.GET.get("after")),
        before=parse_uuid(request.GET.get("before")),
    )


def hidden_params(request: HttpRequest, *dropped: str) -> list[tuple[str, str]]:
    """The query string's pairs but ``dropped``, for a form that changes the others."""
    return [(key, str(value)) for key, value in request.GET.items() if key not in dropped]
