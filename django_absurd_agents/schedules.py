"""Scheduled agent runs: ``ABSURD_AGENTS["SCHEDULES"]``, spawned by ``absurd_worker --schedule``.

Each due occurrence of a schedule is spawned with the idempotency key
``schedule:<name>:<occurrence>``, so however many workers run with ``--schedule``, Absurd keeps one
task per occurrence: the second spawn of a key returns the first task. A scheduler that was down
catches up on the occurrences of the last ``SCHEDULE_CATCH_UP`` seconds (an hour by default), the
latest ``MAX_CATCH_UP`` of them per schedule at most, so a long outage never floods the queue.

A built-in schedule runs ``absurd_cleanup`` (``CLEANUP_SCHEDULE``, daily at 03:17 UTC by default;
``None`` turns it off).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from asgiref.sync import sync_to_async
from cronsim import CronSim, CronSimError

from django_absurd_agents import conf
from django_absurd_agents.client import ProjectAbsurd, absurd
from django_absurd_agents.exceptions import ScheduleError

logger = logging.getLogger("django_absurd_agents.worker")

CLEANUP_TASK = "absurd_agents.cleanup"
CLEANUP_SCHEDULE_NAME = "absurd-cleanup"
MAX_CATCH_UP = 10
"""Missed occurrences spawned per schedule when a scheduler comes back, the latest ones."""
_TICK_CAP = 30.0


@dataclass(frozen=True)
class Schedule:
    name: str
    task: str
    cron: str
    params: Any = None
    queue: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def occurrences(self, after: datetime, until: datetime) -> list[datetime]:
        """Occurrences in ``(after, until]``, in UTC."""
        found: list[datetime] = []
        for moment in CronSim(self.cron, after.astimezone(UTC)):
            if moment > until:
                break
            found.append(moment)
        return found

    def next_after(self, moment: datetime) -> datetime:
        """The first occurrence strictly after ``moment``, in UTC."""
        return next(CronSim(self.cron, moment.astimezone(UTC)))

    def last_due(self, moment: datetime) -> datetime | None:
        """The latest occurrence at or before ``moment`` (the one a scheduler spawns last), in UTC.

        None when there was none in the last 50 years, as far back as cronsim looks (a 29 February
        that is also a Monday, say).
        """
        # cronsim's reverse walk yields moments strictly before its start; a microsecond later makes
        # ``moment`` itself count when it is an occurrence, as it does in ``occurrences(after, moment)``.
        return next(CronSim(self.cron, moment.astimezone(UTC) + timedelta(microseconds=1), reverse=True), None)

    @property
    def key_prefix(self) -> str:
        """What every occurrence's idempotency key starts with: ``schedule:<name>:``."""
        return f"schedule:{self.name}:"

    def key(self, occurrence: datetime) -> str:
        return f"{self.key_prefix}{occurrence.astimezone(UTC).isoformat()}"

    def occurrence_of(self, key: str) -> datetime | None:
        """The occurrence an idempotency key of this schedule was spawned for; None for any other key."""
        if not key.startswith(self.key_prefix):
            return None
        try:
            return datetime.fromisoformat(key.removeprefix(self.key_prefix))
        except ValueError:
            return None


def settings_entries() -> dict[str, Any]:
    """Name -> entry of every schedule in settings, plus the built-in cleanup one unless it is off."""
    settings = conf.get()
    entries: dict[str, Any] = dict(settings.schedules)
    if settings.cleanup_schedule:
        entries.setdefault(CLEANUP_SCHEDULE_NAME, {"task": CLEANUP_TASK, "cron": settings.cleanup_schedule})
    return entries


def parse(name: str, entry: Any) -> Schedule:
    """One entry of ``settings_entries()`` as a ``Schedule``; ``ScheduleError`` names what is wrong and the fix."""
    where = f"ABSURD_AGENTS['SCHEDULES'][{name!r}]"
    if not isinstance(entry, dict) or not isinstance(entry.get("task"), str) or not entry["task"]:
        raise ScheduleError(f"{where} must be a dict with a 'task' name and a 'cron' expression.")
    unknown = set(entry) - {"task", "cron", "params", "queue", "max_attempts"}
    if unknown:
        raise ScheduleError(f"{where} has unknown keys {sorted(unknown)}: use task, cron, params, queue, max_attempts.")
    cron = entry.get("cron")
    try:
        CronSim(str(cron), datetime.now(UTC))
    except CronSimError as exc:
        raise ScheduleError(f"{where}: {cron!r} is not a cron expression ({exc}); e.g. '0 6 * * *'.") from exc
    options = {"max_attempts": entry["max_attempts"]} if "max_attempts" in entry else {}
    return Schedule(name, entry["task"], str(cron), entry.get("params"), entry.get("queue"), options)


def configured() -> list[Schedule]:
    """The schedules in settings, plus the built-in cleanup one; ``ScheduleError`` names a bad entry."""
    return [parse(name, entry) for name, entry in settings_entries().items()]


async def spawn_due(app: ProjectAbsurd, schedules: list[Schedule], after: datetime, now: datetime) -> int:
    """Spawn the occurrences of ``(after, now]`` (the latest ``MAX_CATCH_UP`` each); returns how many were new."""
    created = 0
    for schedule in schedules:
        for occurrence in schedule.occurrences(after, now)[-MAX_CATCH_UP:]:
            spawned = await app.spawn(
                schedule.task,
                schedule.params,
                queue=schedule.queue,
                idempotency_key=schedule.key(occurrence),
                **schedule.options,
            )
            if spawned["created"]:
                created += 1
                logger.info(
                    "schedule %s: spawned %s for %s (task %s)",
                    schedule.name,
                    schedule.task,
                    occurrence.isoformat(),
                    spawned["task_id"],
                )
    return created


async def run_scheduler(app: ProjectAbsurd, stop: asyncio.Event) -> None:
    """Spawn due occurrences until ``stop`` is set: at each next occurrence, and at least every 30 s."""
    schedules = configured()
    if not schedules:
        logger.info("--schedule: no schedule is configured (ABSURD_AGENTS['SCHEDULES']).")
        return
    window = timedelta(seconds=conf.get().schedule_catch_up)
    after = datetime.now(UTC) - window
    logger.info("Scheduling %s.", ", ".join(f"{s.name} ({s.cron} -> {s.task})" for s in schedules))
    while not stop.is_set():
        now = datetime.now(UTC)
        try:
            await spawn_due(app, schedules, after, now)
        except Exception as exc:  # the database is away: the same window is tried again next tick
            logger.warning("Scheduler: could not spawn due occurrences (%s); retrying.", exc)
        else:
            after = now
        upcoming = min(schedule.next_after(now) for schedule in schedules)
        wait = min(_TICK_CAP, max((upcoming - datetime.now(UTC)).total_seconds(), 0.05))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), wait)


@absurd.register_task(name=CLEANUP_TASK)
async def cleanup(params: Any, ctx: Any) -> str:
    """The built-in schedule's task: ``manage.py absurd_cleanup``, its report as the result."""
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    await sync_to_async(call_command)("absurd_cleanup", stdout=out)
    return out.getvalue().strip()
