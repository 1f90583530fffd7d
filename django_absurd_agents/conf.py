"""Settings of django-absurd-agents, read in one place.

Everything lives under one dict, ``settings.ABSURD_AGENTS``. Unknown keys are reported by a system
check (``absurd_agents.E005``) so that a typo does not silently fall back to a default.
"""

from __future__ import annotations

import datetime
import functools
import re
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed

DEFAULTS: dict[str, Any] = {
    # Database alias whose connection the Absurd client and the sync helpers use.
    "DATABASE_ALIAS": "default",
    # Queues created on ``migrate``; the first one is the default queue unless DEFAULT_QUEUE says otherwise.
    # An entry is a name, or a dict {"name", "storage": "unpartitioned" | "partitioned", "cleanup_ttl", ...}.
    "QUEUES": ["agents"],
    "DEFAULT_QUEUE": None,
    # Task name -> queue, so a web process spawns by name into the right queue without importing the task.
    "TASK_ROUTES": {},
    # Modules imported by ``absurd_worker`` besides every installed app's ``tasks`` module.
    "TASK_MODULES": [],
    "DEFAULT_MAX_ATTEMPTS": 5,
    # Exponential backoff so a failing task does not burn its attempts milliseconds apart.
    "RETRY_STRATEGY": {"kind": "exponential", "base_seconds": 2, "factor": 2, "max_seconds": 300},
    # Spawns whose JSON params are larger than this are refused before anything is written.
    "MAX_PARAMS_BYTES": 1_000_000,
    # Worker defaults (each has a command-line option).
    "CLAIM_TIMEOUT": 120,
    "CONCURRENCY": 10,
    "POLL_INTERVAL": 0.5,
    "SHUTDOWN_GRACE": 30.0,
    "HEARTBEAT_FILE": None,
    # Seconds between two refreshes of a worker's row in the worker table (the admin's worker list).
    "WORKER_HEARTBEAT": 5.0,
    # Name -> {"task", "cron", "params", "queue", "max_attempts"}: spawned by ``absurd_worker --schedule``.
    "SCHEDULES": {},
    # Cron of the built-in ``absurd_cleanup`` schedule (UTC); None turns it off.
    "CLEANUP_SCHEDULE": "17 3 * * *",
    # Seconds of missed occurrences a scheduler catches up on when it starts again.
    "SCHEDULE_CATCH_UP": 3600,
    # Seconds a task whose name no worker has registered is put back (no attempt used) before it fails
    # for good: a rolling deploy spawns tasks that only the new workers know.
    "UNKNOWN_TASK_GRACE": 900,
    # Times a run is handed back, without using an attempt, because its own database connection failed
    # (a restart, "too many clients") before such an error fails the attempt like any other.
    "MAX_CONNECTION_HANDBACKS": 20,
    # A libpq URL of a direct (not pooled) connection, for the worker's LISTEN session behind PgBouncer.
    "DIRECT_DATABASE_URL": None,
    # ``migrate absurd_agents zero`` drops the schema (and every task in it) only when this is True.
    "ALLOW_SCHEMA_DROP": False,
    # Hook name -> {"SECRET", "SCHEME", "EVENT", ...}: POST /agents/hooks/<name> emits an event (webhooks.py).
    "WEBHOOKS": {},
    # Who may read a task's event log over HTTP: None for the built-in rule (the view permission on
    # tasks, or owning the task's conversation), else a callable (or its dotted path) taking
    # (request, task_id) and returning a bool, or an awaitable of one (see docs/live-output.md).
    "EVENTS_ACCESS": None,
    # A secret a Prometheus scraper sends as "Authorization: Bearer <token>" to read GET /agents/metrics
    # without a login; None: only logged-in users with the view permission may read it.
    "METRICS_TOKEN": None,
}

QUEUE_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]*$")
"""Queue names become parts of table names (``absurd.t_<queue>``); keep them plain identifiers."""

MAX_QUEUE_NAME_BYTES = 57


def user_settings() -> dict[str, Any]:
    value = getattr(settings, "ABSURD_AGENTS", None) or {}
    if not isinstance(value, dict):
        return {}
    return value


def unknown_keys() -> list[str]:
    return sorted(set(user_settings()) - set(DEFAULTS))


def queue_name_error(name: object) -> str | None:
    """Why ``name`` cannot be a queue name, or None when it can."""
    if not isinstance(name, str) or not name:
        return f"Queue name {name!r} must be a non-empty string."
    if len(name.encode()) > MAX_QUEUE_NAME_BYTES:
        return f"Queue name {name!r} is longer than {MAX_QUEUE_NAME_BYTES} bytes."
    if not QUEUE_NAME_RE.match(name):
        return f"Queue name {name!r} may contain only lowercase letters, digits and underscores."
    return None


STORAGE_MODES = ("unpartitioned", "partitioned")

POLICY_KEYS: dict[str, str] = {
    "cleanup_ttl": "interval",
    "cleanup_limit": "count",
    "partition_lookahead": "interval",
    "partition_lookback": "interval",
}
"""The columns of ``absurd.queues`` a QUEUES entry may set, and the kind of value each takes."""

PARTITION_ONLY_KEYS = frozenset({"partition_lookahead", "partition_lookback"})

_INTERVAL_UNIT = r"(?:second|minute|hour|day|week|month|year)s?"
_INTERVAL_RE = re.compile(rf"^\s*\d+\s*{_INTERVAL_UNIT}(?:\s+\d+\s*{_INTERVAL_UNIT})*\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class QueueSpec:
    """One queue as declared in ``QUEUES``: how Absurd stores it and the policy ``migrate`` writes.

    ``storage`` is None when the entry does not say (a plain name): the queue is created unpartitioned
    and an existing one is taken as it is. ``policy`` holds only the keys the entry gave, as Postgres
    takes them (intervals as text): a key left out keeps whatever ``absurd.queues`` holds, Absurd's
    default or a value set by hand.
    """

    name: str
    storage: str | None = None
    policy: dict[str, str | int] = field(default_factory=dict)

    @property
    def storage_to_create(self) -> str:
        return self.storage or "unpartitioned"


def interval_text(value: object) -> str | None:
    """``value`` as interval text Postgres reads (``"30 days"``), or None when it is not one.

    A ``datetime.timedelta`` or a text of ``<number> <unit>`` pairs (seconds up to years); checked here,
    so a typo is refused by ``manage.py check`` rather than by Postgres in the middle of ``migrate``.
    """
    if isinstance(value, datetime.timedelta):
        if value < datetime.timedelta(0):
            return None
        parts = [(value.days, "days"), (value.seconds, "seconds"), (value.microseconds, "microseconds")]
        return " ".join(f"{amount} {unit}" for amount, unit in parts if amount) or "0 seconds"
    if isinstance(value, str) and _INTERVAL_RE.match(value):
        return value.strip()
    return None


def _policy_value(name: str, key: str, value: object) -> tuple[str | int | None, str | None]:
    """``(value as stored, None)``, or ``(None, why it is refused)``."""
    if POLICY_KEYS[key] == "count":
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value, None
        return None, f"QUEUES entry {name!r}: {key} must be a whole number of at least 1, not {value!r}."
    text = interval_text(value)
    if text is None:
        return None, (
            f'QUEUES entry {name!r}: {key} {value!r} is not an interval. Write it as "30 days", "12 hours", '
            '"2 weeks 3 days" or a datetime.timedelta.'
        )
    return text, None


def parse_queue_entry(entry: object) -> tuple[QueueSpec | None, list[str]]:
    """One ``QUEUES`` entry as a :class:`QueueSpec`, with the problems found (empty when it is valid)."""
    if isinstance(entry, str):
        return QueueSpec(entry), []  # a bad name is reported with the other names (absurd_agents.E003)
    if not isinstance(entry, dict):
        return None, [f"QUEUES entry {entry!r} must be a queue name or a dict with a 'name' key."]
    name = entry.get("name")
    problem = queue_name_error(name)
    if problem:
        return None, [f"QUEUES entry {entry!r}: {problem} Give the dict a 'name' key."]
    assert isinstance(name, str)
    problems: list[str] = []
    unknown = sorted(set(entry) - {"name", "storage", *POLICY_KEYS})
    if unknown:
        problems.append(
            f"QUEUES entry {name!r} has unknown key(s) {', '.join(map(repr, unknown))}. "
            f"Valid keys: name, storage, {', '.join(POLICY_KEYS)}."
        )
    storage = entry.get("storage")
    if storage is not None and storage not in STORAGE_MODES:
        problems.append(f"QUEUES entry {name!r}: storage {storage!r} is not one of 'unpartitioned', 'partitioned'.")
    policy: dict[str, str | int] = {}
    for key in POLICY_KEYS:
        if key not in entry:
            continue
        if key in PARTITION_ONLY_KEYS and storage != "partitioned":
            problems.append(
                f'QUEUES entry {name!r}: {key} applies to partitioned queues only. Add "storage": '
                '"partitioned" (a new queue) or remove the key.'
            )
            continue
        value, problem = _policy_value(name, key, entry[key])
        if problem:
            problems.append(problem)
        elif value is not None:
            policy[key] = value
    return QueueSpec(name, storage if storage in STORAGE_MODES else None, policy), problems


def parse_queues(entries: object) -> tuple[tuple[QueueSpec, ...], tuple[str, ...]]:
    """Every valid entry of ``QUEUES`` as a spec, and every problem (each names its fix)."""
    if isinstance(entries, str) or not isinstance(entries, list | tuple):
        return (), (f"QUEUES must be a list of queue names or dicts, not {entries!r}.",)
    specs: dict[str, QueueSpec] = {}
    problems: list[str] = []
    for entry in entries:
        spec, found = parse_queue_entry(entry)
        problems.extend(found)
        if spec is None:
            continue
        if spec.name in specs:
            if specs[spec.name] != spec:
                problems.append(f"Queue {spec.name!r} is listed twice in QUEUES, differently. Keep one entry.")
            continue
        specs[spec.name] = spec
    return tuple(specs.values()), tuple(problems)


@dataclass(frozen=True)
class AgentsSettings:
    database_alias: str
    queues: tuple[str, ...]
    default_queue: str
    task_routes: dict[str, str]
    task_modules: tuple[str, ...]
    default_max_attempts: int
    retry_strategy: dict[str, Any] | None
    max_params_bytes: int
    claim_timeout: int
    concurrency: int
    poll_interval: float
    shutdown_grace: float
    heartbeat_file: str | None
    worker_heartbeat: float
    schedules: dict[str, Any]
    cleanup_schedule: str | None
    schedule_catch_up: float
    unknown_task_grace: float
    max_connection_handbacks: int
    direct_database_url: str | None
    allow_schema_drop: bool
    metrics_token: str | None = None
    queue_specs: tuple[QueueSpec, ...] = ()
    """The declared queues with their storage and policy (``queues`` holds their names)."""
    queue_problems: tuple[str, ...] = ()
    """What is wrong in ``QUEUES``; reported by ``manage.py check`` (E006) and refused by ``migrate``."""

    def queue_spec(self, name: str) -> QueueSpec:
        """The declared spec of ``name``; a queue only routed to, or the default one, says nothing but its name."""
        for spec in self.queue_specs:
            if spec.name == name:
                return spec
        return QueueSpec(name)

    @property
    def all_queues(self) -> tuple[str, ...]:
        """Declared queues, plus the default queue and every routed queue, in a stable order."""
        seen = dict.fromkeys([*self.queues, self.default_queue, *self.task_routes.values()])
        return tuple(seen)

    def queue_for(self, task_name: str) -> str:
        return self.task_routes.get(task_name, self.default_queue)


@functools.cache
def get() -> AgentsSettings:
    """The effective settings: defaults overlaid with ``settings.ABSURD_AGENTS`` (cached; tests'
    ``override_settings`` clears the cache)."""
    return _build()


def _clear_cache(*, setting: str, **kwargs: Any) -> None:
    if setting == "ABSURD_AGENTS":
        get.cache_clear()


setting_changed.connect(_clear_cache, dispatch_uid="absurd_agents_conf_cache")


def _build() -> AgentsSettings:
    merged = {**DEFAULTS, **user_settings()}
    specs, queue_problems = parse_queues(merged["QUEUES"] or [])
    queues = tuple(spec.name for spec in specs)
    default_queue = merged["DEFAULT_QUEUE"] or (queues[0] if queues else "agents")
    return AgentsSettings(
        database_alias=merged["DATABASE_ALIAS"],
        queues=queues or (default_queue,),
        default_queue=default_queue,
        task_routes=dict(merged["TASK_ROUTES"] or {}),
        task_modules=tuple(merged["TASK_MODULES"] or ()),
        default_max_attempts=int(merged["DEFAULT_MAX_ATTEMPTS"]),
        retry_strategy=merged["RETRY_STRATEGY"],
        max_params_bytes=int(merged["MAX_PARAMS_BYTES"]),
        claim_timeout=int(merged["CLAIM_TIMEOUT"]),
        concurrency=int(merged["CONCURRENCY"]),
        poll_interval=float(merged["POLL_INTERVAL"]),
        shutdown_grace=float(merged["SHUTDOWN_GRACE"]),
        heartbeat_file=merged["HEARTBEAT_FILE"],
        worker_heartbeat=float(merged["WORKER_HEARTBEAT"]),
        schedules=dict(merged["SCHEDULES"] or {}),
        cleanup_schedule=merged["CLEANUP_SCHEDULE"] or None,
        schedule_catch_up=float(merged["SCHEDULE_CATCH_UP"]),
        unknown_task_grace=float(merged["UNKNOWN_TASK_GRACE"]),
        max_connection_handbacks=int(merged["MAX_CONNECTION_HANDBACKS"]),
        direct_database_url=merged["DIRECT_DATABASE_URL"] or None,
        allow_schema_drop=bool(merged["ALLOW_SCHEMA_DROP"]),
        metrics_token=merged["METRICS_TOKEN"] or None,
        queue_specs=specs or (QueueSpec(default_queue),),
        queue_problems=queue_problems,
    )
