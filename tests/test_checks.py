"""System checks: each misconfiguration is reported by ``manage.py check`` with the fix."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.core.checks import Error, Warning
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.db import connection, connections
from django.db.backends.postgresql import psycopg_any
from django.db.migrations.loader import MigrationLoader
from django.test import override_settings

from django_absurd_agents import schema
from django_absurd_agents.checks import check_database, check_settings
from tests.schema_fakes import fake_version_sql

AddAlias = Callable[[str, dict[str, Any]], None]


@pytest.fixture
def add_alias() -> Iterator[AddAlias]:
    """Add a database alias for one test; it is closed and removed afterwards."""
    added: list[str] = []

    def add(alias: str, config: dict[str, Any]) -> None:
        complete = connections.configure_settings(
            {"default": copy.deepcopy(connections.settings["default"]), alias: config}
        )
        connections.settings[alias] = complete[alias]
        added.append(alias)

    yield add
    for alias in added:
        if hasattr(connections._connections, alias):
            connections[alias].close()
            del connections[alias]
        del connections.settings[alias]


def ids(messages: list[Error | Warning]) -> list[str]:
    return [message.id or "" for message in messages]


def fake_schema_version(version: str) -> None:
    """Make the installed schema report ``version``; the test's transaction rolls it back."""
    with connection.cursor() as cursor:
        cursor.execute(fake_version_sql(version).as_string(connection.connection))


@pytest.mark.django_db
def test_test_settings_pass_every_check() -> None:
    assert check_settings() == []
    assert check_database() == []
    assert check_database(databases=["default"]) == []
    call_command("check", databases=["default"])


def test_unknown_key_is_reported() -> None:
    with override_settings(ABSURD_AGENTS={"QUEUES": ["agents"], "CLAIM_TIMOUT": 30}):
        errors = check_settings()
    assert ids(errors) == ["absurd_agents.E005"]
    assert "'CLAIM_TIMOUT'" in errors[0].msg
    assert "CLAIM_TIMEOUT" in (errors[0].hint or "")


def test_queue_names_too_long_or_with_bad_characters() -> None:
    longest = "q" * 57
    config = {
        "QUEUES": [longest, "q" * 58, "Reports-EU"],
        "DEFAULT_QUEUE": longest,
        "TASK_ROUTES": {"summarise": "9lives", "analyse": "ok_queue"},
    }
    with override_settings(ABSURD_AGENTS=config):
        errors = check_settings()
    assert ids(errors) == ["absurd_agents.E003"] * 3
    messages = "\n".join(error.msg for error in errors)
    assert f"{'q' * 58!r} is longer than 57 bytes" in messages
    assert "'Reports-EU' may contain only lowercase letters, digits and underscores" in messages
    assert "'9lives' may contain only" in messages
    assert not any(error.msg.startswith(f"Queue name {longest!r} ") for error in errors)
    assert all("Rename the queue" in (error.hint or "") for error in errors)


def test_queue_name_counted_in_bytes_not_characters() -> None:
    with override_settings(ABSURD_AGENTS={"QUEUES": ["é" * 29]}):  # 29 characters, 58 bytes
        errors = check_settings()
    assert ids(errors) == ["absurd_agents.E003"]
    assert "longer than 57 bytes" in errors[0].msg


def test_check_command_stops_on_settings_errors() -> None:
    with override_settings(ABSURD_AGENTS={"QUEUES": ["Bad Name"]}), pytest.raises(SystemCheckError, match="E003"):
        call_command("check")


def test_database_alias_not_configured() -> None:
    with override_settings(ABSURD_AGENTS={"DATABASE_ALIAS": "absurd"}):
        errors = check_database()
    assert ids(errors) == ["absurd_agents.E001"]
    assert "'absurd', which is not in settings.DATABASES" in errors[0].msg
    assert "default" in (errors[0].hint or "")


def test_non_postgres_backend(add_alias: AddAlias) -> None:
    add_alias("lite", {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"})
    with override_settings(ABSURD_AGENTS={"DATABASE_ALIAS": "lite"}):
        errors = check_database()
    assert ids(errors) == ["absurd_agents.E001"]
    assert "sqlite backend; Absurd needs PostgreSQL" in errors[0].msg
    assert "django.db.backends.postgresql" in (errors[0].hint or "")


def test_psycopg2_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulates Django having picked psycopg2: the flag the postgresql backend sets at import.
    monkeypatch.setattr(psycopg_any, "is_psycopg3", False)
    errors = check_database()
    assert ids(errors) == ["absurd_agents.E002"]
    assert "psycopg2" in errors[0].msg
    assert "pip install 'psycopg[binary]>=3.2'" in (errors[0].hint or "")


@pytest.mark.django_db
def test_schema_version_mismatch_is_an_error_with_the_fix() -> None:
    fake_schema_version("0.4.0")
    errors = check_database(databases=["default"])
    assert ids(errors) == ["absurd_agents.E004"]
    assert f"Absurd schema 0.4.0; this code expects {schema.EXPECTED_VERSION}" in errors[0].msg
    assert "absurdctl migrate" in (errors[0].hint or "")
    # Only checks that are asked to touch the database look at the schema.
    assert check_database() == []
    with pytest.raises(SystemCheckError, match=r"absurd_agents\.E004"):
        call_command("check", databases=["default"])


@pytest.mark.django_db
def test_schema_version_mismatch_with_pending_migrations_lets_migrate_run() -> None:
    # A deploy whose new release brings an upgrade migration: ``migrate`` runs this check first,
    # so it must not stop the command that fixes the mismatch.
    fake_schema_version("0.4.0")
    [(_, latest)] = MigrationLoader(connection).graph.leaf_nodes("absurd_agents")
    with connection.cursor() as cursor:  # as if the deploy brought this migration: not applied yet
        cursor.execute("delete from django_migrations where app = 'absurd_agents' and name = %s", [latest])
    warnings = check_database(databases=["default"])
    assert ids(warnings) == ["absurd_agents.W004"]
    assert "manage.py migrate absurd_agents" in (warnings[0].hint or "")


def test_unreachable_database_is_reported(add_alias: AddAlias, django_db_blocker: Any) -> None:
    missing = {**connections.settings["default"], "NAME": "absurd_agents_no_such_database"}
    add_alias("missing", missing)
    with override_settings(ABSURD_AGENTS={"DATABASE_ALIAS": "missing"}), django_db_blocker.unblock():
        errors = check_database(databases=["missing"])
    assert ids(errors) == ["absurd_agents.E004"]
    assert "Cannot read the Absurd schema version from database 'missing'" in errors[0].msg
    assert "absurd_agents_no_such_database" in errors[0].msg
