"""What a worker serves and how: ``WorkerConfig``, read from ``ABSURD_AGENTS`` and the command line, checked.

Out-of-range values are refused here, before anything connects: a claim timeout of years or a poll
interval of ``inf`` would leave a worker alive, with a fresh heartbeat, that never runs anything.
"""

from __future__ import annotations

import importlib
import math
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.utils.module_loading import autodiscover_modules

from django_absurd_agents import conf, schedules
from django_absurd_agents.exceptions import WorkerError
from django_absurd_agents.extras import missing_provider
from django_absurd_agents.registry import load_resolvers
from django_absurd_agents.worker_log import one_line

MAX_CONCURRENCY = 10_000
MAX_CLAIM_TIMEOUT = 7 * 86_400  # a week: a lease longer than that is a typo, and a crash would wait as long
MAX_POLL_INTERVAL = 3_600.0
MAX_SHUTDOWN_GRACE = 86_400.0

# (field, setting, what it is, lowest, highest, lowest excluded): values outside these make a worker that
# looks alive (fresh heartbeat) but never runs anything, e.g. a lease of 95 years or an infinite poll.
_RANGES: tuple[tuple[str, str, str, float, float, bool], ...] = (
    ("concurrency", "CONCURRENCY", "a whole number of tasks", 1, MAX_CONCURRENCY, False),
    # Absurd treats a claim timeout of 0 as "no lease at all": a crashed worker's tasks would never resume.
    ("claim_timeout", "CLAIM_TIMEOUT", "a whole number of seconds", 1, MAX_CLAIM_TIMEOUT, False),
    ("poll_interval", "POLL_INTERVAL", "a number of seconds", 0, MAX_POLL_INTERVAL, True),
    ("shutdown_grace", "SHUTDOWN_GRACE", "a number of seconds", 0, MAX_SHUTDOWN_GRACE, False),
)


def check_ranges(values: dict[str, Any], given: set[str]) -> None:
    """Refuse out-of-range numbers, naming the option (``given``) or the setting they came from."""
    for name, setting, kind, lowest, highest, above in _RANGES:
        value = values[name]
        source = f"--{name.replace('_', '-')}" if name in given else f"ABSURD_AGENTS[{setting!r}]"
        bound = f"above {lowest:g}" if above else f"at least {lowest:g}"
        if kind.startswith("a whole") and (isinstance(value, bool) or not isinstance(value, int)):
            raise WorkerError(f"{source} must be {kind}, not {value!r}.")
        finite = isinstance(value, int | float) and math.isfinite(value)
        low_ok = finite and (value > lowest if above else value >= lowest)
        if not (low_ok and value <= highest):
            raise WorkerError(f"{source} must be {kind} {bound} and at most {highest:g}, not {value!r}.")


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker serves and how; ``from_settings`` fills the gaps from ``ABSURD_AGENTS``."""

    queues: tuple[str, ...]
    concurrency: int
    claim_timeout: int
    poll_interval: float
    shutdown_grace: float
    worker_id: str
    burst: bool = False
    schedule: bool = False
    """Also spawn the due occurrences of ``ABSURD_AGENTS["SCHEDULES"]`` (``schedules.py``)."""
    max_tasks: int | None = None
    heartbeat_file: str | None = None
    connections: int = 0
    """Database connections per queue for running tasks; 0 means one per 4 slots, at most 8."""

    @classmethod
    def from_settings(
        cls,
        *,
        queues: Iterable[str] | None = None,
        concurrency: int | None = None,
        claim_timeout: int | None = None,
        poll_interval: float | None = None,
        shutdown_grace: float | None = None,
        worker_id: str | None = None,
        burst: bool = False,
        schedule: bool = False,
        max_tasks: int | None = None,
        heartbeat_file: str | None = None,
        connections: int | None = None,
    ) -> WorkerConfig:
        settings = conf.get()
        given = {"concurrency": concurrency, "claim_timeout": claim_timeout, "poll_interval": poll_interval,
                 "shutdown_grace": shutdown_grace}  # fmt: skip
        numbers: dict[str, Any] = {
            name: getattr(settings, name) if value is None else value for name, value in given.items()
        }
        check_ranges(numbers, {name for name, value in given.items() if value is not None})
        config = cls(
            queues=tuple(dict.fromkeys(queues or ())) or settings.all_queues,
            worker_id=worker_id or f"{socket.gethostname()}:{os.getpid()}",
            burst=burst,
            schedule=schedule,
            max_tasks=max_tasks,
            heartbeat_file=heartbeat_file or settings.heartbeat_file,
            connections=connections or 0,
            **numbers,
        )
        config.validate()
        return config

    def validate(self) -> None:
        for queue in self.queues:
            problem = conf.queue_name_error(queue)
            if problem:
                raise WorkerError(problem)
        check_ranges({name: getattr(self, name) for name, *_ in _RANGES}, {name for name, *_ in _RANGES})
        if self.schedule:
            try:
                schedules.configured()
            except schedules.ScheduleError as exc:
                raise WorkerError(str(exc)) from exc
        if self.max_tasks is not None and self.max_tasks < 1:
            raise WorkerError(f"--max-tasks must be at least 1, not {self.max_tasks}.")
        if self.connections < 0:
            raise WorkerError(f"The number of connections cannot be negative ({self.connections}).")

    @property
    def execution_connections(self) -> int:
        """Connections per queue that running tasks share (opened only as load needs them).

        A task writes its checkpoints and outcome through one connection, and psycopg runs one
        query at a time per connection, so a single connection caps a queue at a few hundred
        short tasks a second whatever the concurrency (bench/bench_worker.py). Slow agent runs
        need few; a small pool keeps short tasks from queueing behind each other's writes.
        """
        return self.connections or min(8, max(1, -(-self.concurrency // 4)))


def discover_tasks(extra_modules: Iterable[str] | None = None) -> None:
    """Import every installed app's ``tasks`` module and the modules in ``TASK_MODULES``.

    Registration happens at import time (``@absurd.register_task``), so a worker that did not import
    the module would claim the task and fail it as unknown.
    """
    try:
        autodiscover_modules("tasks")
    except ImportError as exc:
        hint = missing_provider(exc, "Importing the apps' tasks modules")
        if hint is None:
            raise  # the whole traceback: the import that failed is in the project's code
        raise WorkerError(hint) from exc
    load_resolvers()  # @task functions of the django.tasks backend run here too (backends.py)
    modules = conf.get().task_modules if extra_modules is None else tuple(extra_modules)
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise WorkerError(
                missing_provider(exc, f"Importing {module!r} from ABSURD_AGENTS['TASK_MODULES']")
                or f"Cannot import {module!r} from ABSURD_AGENTS['TASK_MODULES']: {exc}. "
                "Fix the dotted path or remove the entry."
            ) from exc


def misconfigured(exc: BaseException) -> WorkerError:
    alias = conf.get().database_alias
    return WorkerError(
        f"The database refused the worker's connection: {one_line(exc)}. No retry can fix this: correct "
        f"DATABASES[{alias!r}] (NAME, USER, PASSWORD, HOST) or DATABASE_URL, or ABSURD_AGENTS['DATABASE_ALIAS']."
    )
