"""What a worker serves and how: ``WorkerConfig``, read from ``ABSURD_AGENTS`` and the command line, checked.

Out-of-range values are refused here, before anything connects: a claim timeout of years or a poll
interval of ``inf`` would leave a worker alive, with a fresh heartbeat, that never runs anything.
"""

from __future__ import annotations

import importlib
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from django.utils.module_loading import autodiscover_modules

from django_absurd_agents import conf
from django_absurd_agents.worker_log import one_line

MAX_CONCURRENCY = 10_000
MAX_CLAIM_TIMEOUT = 86_400
MAX_POLL_INTERVAL = 3_600.0


class WorkerError(Exception):
    """A configuration problem that keeps the worker from starting; the message names the fix."""


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
        max_tasks: int | None = None,
        heartbeat_file: str | None = None,
        connections: int | None = None,
    ) -> WorkerConfig:
        settings = conf.get()
        config = cls(
            queues=tuple(dict.fromkeys(queues or ())) or settings.all_queues,
            concurrency=settings.concurrency if concurrency is None else concurrency,
            claim_timeout=settings.claim_timeout if claim_timeout is None else claim_timeout,
            poll_interval=settings.poll_interval if poll_interval is None else poll_interval,
            shutdown_grace=settings.shutdown_grace if shutdown_grace is None else shutdown_grace,
            worker_id=worker_id or f"{socket.gethostname()}:{os.getpid()}",
            burst=burst,
            max_tasks=max_tasks,
            heartbeat_file=heartbeat_file or settings.heartbeat_file,
            connections=connections or 0,
        )
        config.validate()
        return config

    def validate(self) -> None:
        for queue in self.queues:
            problem = conf.queue_name_error(queue)
            if problem:
                raise WorkerError(problem)
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise WorkerError(f"Concurrency must be between 1 and {MAX_CONCURRENCY}, not {self.concurrency}.")
        if self.claim_timeout < 1:
            # Absurd treats 0 as "no lease at all": a crashed worker's tasks would never be resumed.
            raise WorkerError(f"The claim timeout must be at least 1 second, not {self.claim_timeout}.")
        if self.claim_timeout > MAX_CLAIM_TIMEOUT:
            # A lease of years means a crashed worker's tasks are never resumed.
            raise WorkerError(
                f"The claim timeout must be at most {MAX_CLAIM_TIMEOUT} seconds (one day), not {self.claim_timeout}: "
                "a crashed worker's tasks wait that long to be resumed; keep it a few times your longest step."
            )
        if not 0 < self.poll_interval <= MAX_POLL_INTERVAL:  # also refuses NaN
            raise WorkerError(
                f"The poll interval must be a number of seconds above 0 and at most {MAX_POLL_INTERVAL:g}, "
                f"not {self.poll_interval}."
            )
        if not 0 <= self.shutdown_grace <= MAX_CLAIM_TIMEOUT:
            raise WorkerError(
                f"The shutdown grace period must be between 0 and {MAX_CLAIM_TIMEOUT} seconds, "
                f"not {self.shutdown_grace}."
            )
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
    from django_absurd_agents.extras import missing_provider
    from django_absurd_agents.registry import load_resolvers

    try:
        autodiscover_modules("tasks")
    except ImportError as exc:
        raise WorkerError(missing_provider(exc, "Importing the apps' tasks modules") or str(exc)) from exc
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
