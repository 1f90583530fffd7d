"""The database a benchmark works in: its own, on ``$DATABASE_URL``'s server or the embedded one.

Every bench script imports this (the scripts' folder is first on ``sys.path`` when they run), so a
benchmark never touches the database ``DATABASE_URL`` names, nor the test database.
"""

from __future__ import annotations

import contextlib
import os

import psycopg
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo


def database_url(name: str) -> str:
    """The URL of database ``name``, created when missing."""
    url = os.environ.get("DATABASE_URL")
    if not url:
        from django_absurd_agents.embedded import embedded_database_url

        return embedded_database_url(name)
    params = conninfo_to_dict(url)
    maintenance = make_conninfo("", **{**params, "dbname": "postgres"})
    with psycopg.connect(maintenance, autocommit=True) as admin, contextlib.suppress(errors.DuplicateDatabase):
        admin.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    return make_conninfo("", **{**params, "dbname": name})


def setup_django(url: str) -> None:
    """Configure Django with the test settings on ``url`` and migrate it."""
    os.environ["DATABASE_URL"] = url
    os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
