"""System checks: ``manage.py check`` reports misconfiguration before a worker or a view trips on it."""

from __future__ import annotations

from typing import Any

from django.core.checks import Error, Tags, Warning, register
from django.core.exceptions import ImproperlyConfigured
from django.db import DatabaseError, connections

from django_absurd_agents import conf, schema, webhooks


@register(Tags.compatibility)
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Error | Warning]:
    errors: list[Error | Warning] = []
    for key in conf.unknown_keys():
        errors.append(
            Error(
                f"Unknown key {key!r} in settings.ABSURD_AGENTS.",
                hint=f"Valid keys: {', '.join(sorted(conf.DEFAULTS))}. Check the spelling.",
                id="absurd_agents.E005",
            )
        )
    settings = conf.get()
    for queue_problem in settings.queue_problems:
        errors.append(Error(queue_problem, hint="See the QUEUES row in docs/installation.md.", id="absurd_agents.E006"))
    for queue in settings.all_queues:
        problem = conf.queue_name_error(queue)
        if problem:
            errors.append(
                Error(
                    problem,
                    hint="Rename the queue in ABSURD_AGENTS (QUEUES, DEFAULT_QUEUE or TASK_ROUTES).",
                    id="absurd_agents.E003",
                )
            )
    return errors


@register(Tags.database)
def check_database(app_configs: Any = None, databases: Any = None, **kwargs: Any) -> list[Error | Warning]:
    settings = conf.get()
    alias = settings.database_alias
    if alias not in connections.settings:
        return [
            Error(
                f"ABSURD_AGENTS['DATABASE_ALIAS'] is {alias!r}, which is not in settings.DATABASES.",
                hint="Set DATABASE_ALIAS to one of: " + ", ".join(connections.settings) + ".",
                id="absurd_agents.E001",
            )
        ]
    connection = connections[alias]
    if connection.vendor != "postgresql":
        return [
            Error(
                f"Database {alias!r} uses the {connection.vendor} backend; Absurd needs PostgreSQL.",
                hint="Set ENGINE to 'django.db.backends.postgresql' (database_config() does this).",
                id="absurd_agents.E001",
            )
        ]
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    if not is_psycopg3:
        return [
            Error(
                "Django is using psycopg2; django-absurd-agents needs psycopg 3.",
                hint="pip uninstall psycopg2 psycopg2-binary && pip install 'psycopg[binary]>=3.2'",
                id="absurd_agents.E002",
            )
        ]
    # The schema check needs a live database, which Django runs only for ``check --database``
    # and ``migrate``; skip it otherwise so ``check`` works offline.
    if not databases or alias not in databases:
        return []
    try:
        version = schema.installed_version(connection)
    except DatabaseError as exc:
        return [
            Error(
                f"Cannot read the Absurd schema version from database {alias!r}: {exc}",
                hint="Check that the database server runs and DATABASES is right.",
                id="absurd_agents.E004",
            )
        ]
    if version is None:
        return []
    if version == schema.EXPECTED_VERSION:
        return _storage_mismatches(connection)
    # ``migrate`` runs these checks before migrating: while this app has unapplied migrations (an
    # upgrade migration among them), an error here would stop the very command that fixes it.
    if _unapplied_migrations(connection):
        return [
            Warning(
                f"The database has Absurd schema {version}; this code expects {schema.EXPECTED_VERSION}.",
                hint="Run `manage.py migrate absurd_agents`: its unapplied migrations upgrade the schema.",
                id="absurd_agents.W004",
            )
        ]
    return [
        Error(
            f"The database has Absurd schema {version}; this code expects {schema.EXPECTED_VERSION}.",
            hint="Install the django-absurd-agents release whose absurdctl pin matches the database, or upgrade "
            "the schema with `absurdctl migrate` to the version this code expects (see docs/installation.md, "
            "Upgrading Absurd).",
            id="absurd_agents.E004",
        )
    ]


def _storage_mismatches(connection: Any) -> list[Error | Warning]:
    """A declared queue stored otherwise in the database: Absurd cannot convert a queue's storage."""
    return [
        Error(str(mismatch), hint=mismatch.hint, id="absurd_agents.E007")
        for mismatch in schema.storage_mismatches(connection, conf.get())
    ]


def _unapplied_migrations(connection: Any) -> list[str]:
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    targets = executor.loader.graph.leaf_nodes("absurd_agents")
    plan = executor.migration_plan(targets)
    return [migration.name for migration, backwards in plan if migration.app_label == "absurd_agents" and not backwards]


@register(Tags.compatibility)
def check_webhooks(app_configs: Any = None, **kwargs: Any) -> list[Error | Warning]:
    errors: list[Error | Warning] = []
    try:
        names = list(webhooks.hooks())
    except ImproperlyConfigured as exc:
        return [Error(str(exc), id="absurd_agents.E030")]
    for name in names:
        try:
            webhooks.hook(name)
        except ImproperlyConfigured as exc:
            errors.append(Error(str(exc), hint="See docs/webhooks.md.", id="absurd_agents.E030"))
    return errors


@register(Tags.compatibility)
def check_peer_apps(app_configs: Any = None, **kwargs: Any) -> list[Error | Warning]:
    """django-absurd in the same project: both migrate the ``absurd`` schema and ship ``absurd_worker``."""
    from django.apps import apps
    from django.core.management import find_commands, get_commands

    errors: list[Error | Warning] = []
    if apps.is_installed("django_absurd"):
        errors.append(
            Error(
                "django-absurd and django-absurd-agents are both installed: each installs Absurd's schema with a "
                "migration of its own, so in one database the second `migrate` fails (the schema already exists), "
                "and their Absurd versions differ.",
                hint="Use one of them per project: django-absurd-agents runs django.tasks @task functions too "
                "(TASKS BACKEND 'django_absurd_agents.backends.AbsurdTaskBackend'). To keep both, give them separate "
                "databases with a router (allow_migrate) and ABSURD_AGENTS['DATABASE_ALIAS'], then silence this "
                "check (SILENCED_SYSTEM_CHECKS = ['absurd_agents.E040']). See docs/installation.md.",
                id="absurd_agents.E040",
            )
        )
    ours = apps.get_app_config("absurd_agents")
    winners = get_commands()
    for command in find_commands(f"{ours.path}/management"):
        owner = winners.get(command)
        if owner not in (None, ours.name):
            errors.append(
                Warning(
                    f"`manage.py {command}` runs the command of {owner!r}, not django-absurd-agents' own: Django "
                    "picks the app listed first in INSTALLED_APPS.",
                    hint=f"List 'django_absurd_agents' before {owner!r} in INSTALLED_APPS to get ours"
                    + (
                        ", or run `manage.py absurd_agents_worker`, which is always ours."
                        if command == "absurd_worker"
                        else "."
                    ),
                    id="absurd_agents.W040",
                )
            )
    return errors
