"""``DATABASES = {"default": database_config()}``: a real server from DATABASE_URL, else the embedded one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from psycopg.conninfo import conninfo_to_dict

from django_absurd_agents.embedded import DATA_DIR_ENV, SETTINGS_ENV, default_data_dir, embedded_database_url


def database_config(
    *,
    env: str = "DATABASE_URL",
    name: str = "django_absurd_agents",
    data_dir: str | Path | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A Django ``DATABASES`` entry for PostgreSQL on psycopg 3.

    With ``$DATABASE_URL`` set (``postgresql://user:pass@host:5432/dbname``) that server is used.
    Otherwise the embedded PostgreSQL of the ``[embedded]`` extra is started (or found already
    running) in :func:`embedded_data_dir` and database ``name`` is created in it. ``overrides`` are
    merged into the returned dict (``CONN_MAX_AGE=60``, ``TEST={...}``).
    """
    url = os.environ.get(env)
    if not url:
        url = embedded_database_url(name, embedded_data_dir(data_dir))
    return {**url_to_config(url), **overrides}


def embedded_data_dir(data_dir: str | Path | None = None) -> Path:
    """Where the embedded PostgreSQL of :func:`database_config` keeps its cluster, first match wins:

    1. ``data_dir``, as given to ``database_config(data_dir=...)``;
    2. ``$ABSURD_AGENTS_PGDATA``;
    3. ``.postgres/`` in the settings module's project: the directory it is imported from, which is
       ``BASE_DIR`` (where ``manage.py`` is) in a ``startproject`` layout.

    Never the current directory: ``python mysite/manage.py runserver`` run from anywhere, its
    workers and its shell all find the same cluster.
    """
    chosen = Path(data_dir) if data_dir is not None else default_data_dir()
    if chosen is None:
        raise ImproperlyConfigured(
            f"database_config() cannot tell where the embedded PostgreSQL keeps its data: ${SETTINGS_ENV} is "
            f"not set. Pass database_config(data_dir=BASE_DIR / '.postgres'), set ${DATA_DIR_ENV}, or set "
            "DATABASE_URL to a PostgreSQL server of your own."
        )
    return chosen


def url_to_config(url: str) -> dict[str, Any]:
    params = conninfo_to_dict(url)
    config: dict[str, Any] = {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": params.pop("dbname", "") or "",
        "USER": params.pop("user", "") or "",
        "PASSWORD": params.pop("password", "") or "",
        "HOST": params.pop("host", "") or "",
        "PORT": str(params.pop("port", "") or ""),
        "OPTIONS": {key: value for key, value in params.items() if value is not None},
    }
    return config
