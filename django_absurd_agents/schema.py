"""The Absurd schema in the project's database: install, adopt, upgrade, provision queues.

The SQL itself always comes from the installed ``absurdctl`` package (``BUNDLED_SCHEMA_SQL`` and
``BUNDLED_MIGRATIONS``); this repository never carries a copy of it.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import absurdctl
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import CommandError
from django.db import DatabaseError, transaction
from django.db.backends.base.base import BaseDatabaseWrapper

from django_absurd_agents import conf
from django_absurd_agents.exceptions import QueueStorageError, SchemaVersionError
from django_absurd_agents.tables import fetch

EXPECTED_VERSION: str = absurdctl.ABSURD_SCHEMA_TARGET_VERSION
"""The schema version this release of the app installs and its code expects."""

LOCK_KEY = 0x61627375726421  # "absurd!"
"""The PostgreSQL advisory lock key that serialises every change to the schema in one database.

Held for a whole ``migrate`` run (:func:`migration_lock`, taken by the app's ``migrate`` command),
and inside it again by the schema install or upgrade and by queue provisioning (:func:`lock_schema`).
A session that holds an advisory lock gets it again at once, so the nested uses never wait on their
own run; they still serialise callers that bypass the command (another app's ``migrate`` command
listed before this app, a ``MigrationExecutor`` driven by hand).
"""


SCHEMA_DROP_REFUSED = (
    "Reversing the migration absurd_agents.0001_absurd_schema drops the 'absurd' schema and every task, run, "
    'checkpoint and event in it. Set ABSURD_AGENTS = {"ALLOW_SCHEMA_DROP": True} in settings to allow it, then '
    "run the command again."
)


_ABSURD_RELATIONS_SQL = (
    "select count(*) as value from pg_class c join pg_namespace n on n.oid = c.relnamespace where n.nspname = 'absurd'"
)


def _value(cursor: Any, statement: str, params: list[Any] | None = None) -> Any:
    """The column ``value`` of the one row ``statement`` returns."""
    return fetch(cursor, statement, params or [])[0]["value"]


def installed_version(connection: BaseDatabaseWrapper) -> str | None:
    """``absurd.get_schema_version()``, or None when no Absurd schema is installed."""
    with connection.cursor() as cursor:
        if not _value(cursor, "select to_regprocedure('absurd.get_schema_version()') is not null as value"):
            return None
        return str(_value(cursor, "select absurd.get_schema_version() as value"))


def lock_schema(connection: BaseDatabaseWrapper) -> None:
    """Take :data:`LOCK_KEY` until the current transaction ends (call it inside one)."""
    with connection.cursor() as cursor:
        cursor.execute("select pg_advisory_xact_lock(%s)", [LOCK_KEY])


@contextlib.contextmanager
def migration_lock(connection: BaseDatabaseWrapper, *, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold :data:`LOCK_KEY` at session level for the whole block: one ``migrate`` at a time per database.

    Taken before Django reads which migrations are applied, so a second deploy migrating at the same
    moment waits, then plans against what the first one did instead of applying it again. ``on_wait``
    is called once when another session holds the lock. A no-op on databases other than PostgreSQL.
    The lock ends with the session too, so a killed ``migrate`` never leaves it behind.
    """
    if connection.vendor != "postgresql":
        yield
        return
    with connection.cursor() as cursor:
        if not _value(cursor, "select pg_try_advisory_lock(%s) as value", [LOCK_KEY]):
            if on_wait is not None:
                on_wait()
            cursor.execute("select pg_advisory_lock(%s)", [LOCK_KEY])
    session = connection.connection
    try:
        yield
    finally:
        # Unlock only on the session that locked: a closed or replaced one released it already.
        if connection.connection is session and not session.closed:
            with contextlib.suppress(DatabaseError), connection.cursor() as cursor:
                cursor.execute("select pg_advisory_unlock(%s)", [LOCK_KEY])


def install_or_adopt(connection: BaseDatabaseWrapper) -> str:
    """Install the bundled schema, or adopt one already there at the same version.

    Returns what happened ("installed" or "adopted"). Runs inside the migration's transaction, so a
    failure halfway leaves nothing behind, and under :data:`LOCK_KEY`, so a concurrent install
    commits first and this one then adopts it.
    """
    lock_schema(connection)
    version = installed_version(connection)
    if version is None:
        with connection.cursor() as cursor:
            if _value(cursor, _ABSURD_RELATIONS_SQL):  # a schema 'absurd' of something else (an empty one is reused)
                raise SchemaVersionError(
                    "A schema named 'absurd' exists but holds no Absurd installation "
                    "(absurd.get_schema_version() is missing). Rename or drop that schema, then run migrate again."
                )
            cursor.execute(absurdctl.BUNDLED_SCHEMA_SQL)
        return "installed"
    if version != EXPECTED_VERSION:
        raise SchemaVersionError(
            f"The database already has Absurd schema version {version}, but django-absurd-agents installs "
            f"{EXPECTED_VERSION}. Upgrade it with absurdctl (`absurdctl migrate`) or install the release of "
            f"django-absurd-agents that matches {version}, then run migrate again."
        )
    return "adopted"


def upgrade(connection: BaseDatabaseWrapper, from_version: str, to_version: str) -> str:
    """Run absurdctl's bundled upgrade script ``<from>-<to>.sql`` when the database is at ``from_version``.

    A database already at ``to_version`` or past it is left alone: fresh installs run 0001 with the
    newest bundled SQL, so every upgrade migration after it finds the schema current.
    """
    lock_schema(connection)
    version = installed_version(connection)
    if version is not None and _version_key(version) >= _version_key(to_version):
        return "current"
    if version != from_version:
        raise SchemaVersionError(
            f"Cannot upgrade Absurd from {version} to {to_version}: this migration expects {from_version}. "
            "Run absurdctl's upgrade scripts up to that version first (`absurdctl migrate`)."
        )
    script = absurdctl.BUNDLED_MIGRATIONS.get(f"{from_version}-{to_version}.sql")
    if script is None:
        raise SchemaVersionError(
            f"The installed absurdctl has no upgrade script {from_version}-{to_version}.sql; "
            "install the absurdctl version this release of django-absurd-agents pins."
        )
    with connection.cursor() as cursor:
        cursor.execute(script)
    return "upgraded"


def _version_key(version: str) -> tuple[int, ...]:
    """``"0.5.1"`` -> ``(0, 5, 1)``; a suffix after the numbers (``"0.6.0rc1"``) is ignored."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def refuse_schema_drop(sender: Any, plan: Any = None, **kwargs: Any) -> None:
    """``pre_migrate`` receiver: stop a plan that unapplies 0001 before any of it runs.

    The check inside 0001 alone comes too late: ``migrate absurd_agents zero`` unapplies the app's
    later migrations first, each in its own transaction, and would drop their tables (conversations)
    before reaching 0001 and refusing.
    """
    if conf.get().allow_schema_drop:
        return
    for migration, backwards in plan or ():
        if backwards and (migration.app_label, migration.name) == ("absurd_agents", "0001_absurd_schema"):
            raise CommandError(SCHEMA_DROP_REFUSED)


def drop(connection: BaseDatabaseWrapper) -> None:
    with connection.cursor() as cursor:
        cursor.execute("drop schema if exists absurd cascade")


def _stored_modes(cursor: Any) -> dict[str, str]:
    found = fetch(cursor, "select queue_name, storage_mode from absurd.queues")
    return {str(row["queue_name"]): str(row["storage_mode"]) for row in found}


def _mismatches(stored: dict[str, str], specs: Iterable[Any]) -> list[QueueStorageError]:
    return [
        QueueStorageError(spec.name, spec.storage, stored[spec.name])
        for spec in specs
        if spec.storage is not None and spec.name in stored and stored[spec.name] != spec.storage
    ]


def storage_mismatches(connection: BaseDatabaseWrapper, settings: Any) -> list[QueueStorageError]:
    """Declared queues whose storage mode (``QUEUES`` entry ``storage``) differs from the database's."""
    with connection.cursor() as cursor:
        if not _value(cursor, "select to_regclass('absurd.queues') is not null as value"):
            return []
        return _mismatches(_stored_modes(cursor), settings.queue_specs)


def provision_queues(connection: BaseDatabaseWrapper, queues: Iterable[str]) -> list[str]:
    """Create the missing queues with their declared storage, write their declared policy; returns those created.

    Every queue is checked first: a problem in ``QUEUES`` is refused before any SQL, a storage mode the
    database has otherwise before any change. A partitioned queue's weekly partitions are topped up
    (``absurd.ensure_partitions``), so each deploy leaves the weeks ahead ready. :data:`LOCK_KEY`, held
    until the transaction ends, keeps two deploys that migrate at once from racing on the catalog; the
    second one waits, then finds the queues present.
    """
    settings = conf.get()
    if settings.queue_problems:
        raise ImproperlyConfigured(" ".join(settings.queue_problems))
    specs = [settings.queue_spec(queue) for queue in queues]
    created: list[str] = []
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        lock_schema(connection)
        present = _stored_modes(cursor)
        mismatches = _mismatches(present, specs)
        if mismatches:
            raise mismatches[0]
        for spec in specs:
            if spec.name not in present:
                cursor.execute("select absurd.create_queue(%s, %s)", [spec.name, spec.storage_to_create])
                created.append(spec.name)
            if spec.policy:
                cursor.execute("select absurd.set_queue_policy(%s, %s::jsonb)", [spec.name, json.dumps(spec.policy)])
            if present.get(spec.name, spec.storage_to_create) == "partitioned":
                cursor.execute("select absurd.ensure_partitions(%s)", [spec.name])
    return created
