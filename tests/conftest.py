from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import OperationalError, connection


def database_url() -> str:
    """A libpq URL of the test database, for worker subprocesses."""
    from psycopg.conninfo import make_conninfo

    params = connection.get_connection_params()
    keep = {k: v for k, v in params.items() if k in {"dbname", "user", "password", "host", "port"} and v}
    return make_conninfo("", **keep)


@pytest.fixture
def worker_env(transactional_db: Any) -> dict[str, str]:
    """Environment for a subprocess that must use the test database."""
    env = dict(os.environ)
    env["DATABASE_URL"] = database_url()
    env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    return env


@pytest.fixture
def clean_queues(transactional_db: Any) -> None:
    """For tests that commit through the client's own connection: a transactional database.

    Absurd's tables are emptied after the test by the shipped pytest plugin
    (``django_absurd_agents.pytest_plugin``, ``testing.clean_queues``), as after every transactional test.
    """


@pytest.fixture
async def project_absurd(transactional_db: Any, clean_queues: None) -> Any:
    """The project-wide ``absurd`` client, its connection for this test's event loop closed afterwards."""
    from django_absurd_agents import absurd

    yield absurd
    await absurd.close()


@pytest.fixture(scope="session", autouse=True)
def _drop_stray_sessions(django_db_setup: Any, django_db_blocker: Any) -> Iterator[None]:
    """Before the test database is destroyed, end sessions that killed workers left behind."""
    yield
    with django_db_blocker.unblock():
        try:
            cursor = connection.cursor()
        except OperationalError:  # no test used the database, so none was created: nothing to end
            return
        with cursor:
            cursor.execute(
                "select pg_terminate_backend(pid) from pg_stat_activity "
                "where datname = current_database() and pid <> pg_backend_pid()"
            )
