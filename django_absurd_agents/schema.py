"""The Absurd schema in the project's database: install, adopt, upgrade, provision queues.

The SQL itself always comes from the installed ``absurdctl`` package (``BUNDLED_SCHEMA_SQL`` and
``BUNDLED_MIGRATIONS``); this repository never carries a copy of it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import absurdctl
from django.db import transaction
from django.db.backends.base.base import BaseDatabaseWrapper

EXPECTED_VERSION: str = absurdctl.ABSURD_SCHEMA_TARGET_VERSION
"""The schema version this release of the app installs and its code expects."""

# Serialises queue provisioning when two deploys run ``migrate`` at the same moment.
_PROVISION_LOCK_KEY = 0x61627375726421  # "absurd!"


SCHEMA_DROP_REFUSED = (
    "Reversing the migration absurd_agents.0001_absurd_schema drops the 'absurd' schema and every task, run, "
    'checkpoint and event in it. Set ABSURD_AGENTS = {"ALLOW_SCHEMA_DROP": True} in settings to allow it, then '
    "run the command again."
)


class SchemaVersionError(RuntimeError):
    pass


def installed_version(connection: BaseDatabaseWrapper) -> str | None:
    """``absurd.get_schema_version()``, or None when no Absurd schema is installed."""
    with connection.cursor() as cursor:
        cursor.execute("select to_regprocedure('absurd.get_schema_version()') is not null")
        if not cursor.fetchone()[0]:
            return None
        cursor.execute("select absurd.get_schema_version()")
        return str(cursor.fetchone()[0])


def install_or_adopt(connection: BaseDatabaseWrapper) -> str:
    """Install the bundled schema, or adopt one already there at the same version.

    Returns what happened ("installed" or "adopted"). Runs inside the migration's transaction, so a
    failure halfway leaves nothing behind.
    """
    version = installed_version(connection)
    if version is None:
        with connection.cursor() as cursor:
            cursor.execute("select exists(select 1 from pg_namespace where nspname = 'absurd')")
            if cursor.fetchone()[0]:
                cursor.execute(
                    "select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace "
                    "where n.nspname = 'absurd'"
                )
                if cursor.fetchone()[0]:
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
    from django.core.management.base import CommandError

    from django_absurd_agents import conf

    if conf.get().allow_schema_drop:
        return
    for migration, backwards in plan or ():
        if backwards and (migration.app_label, migration.name) == ("absurd_agents", "0001_absurd_schema"):
            raise CommandError(SCHEMA_DROP_REFUSED)


def drop(connection: BaseDatabaseWrapper) -> None:
    with connection.cursor() as cursor:
        cursor.execute("drop schema if exists absurd cascade")


def provision_queues(connection: BaseDatabaseWrapper, queues: Iterable[str]) -> list[str]:
    """Create the missing queues; returns the ones created.

    A transaction-level advisory lock keeps two deploys that migrate at once from racing on the
    catalog; the second one waits, then finds the queues present.
    """
    created: list[str] = []
    with transaction.atomic(using=connection.alias), connection.cursor() as cursor:
        cursor.execute("select pg_advisory_xact_lock(%s)", [_PROVISION_LOCK_KEY])
        cursor.execute("select queue_name from absurd.queues")
        present = {row[0] for row in cursor.fetchall()}
        for queue in queues:
            if queue not in present:
                cursor.execute("select absurd.create_queue(%s)", [queue])
                created.append(queue)
    return created
