"""``DATABASES = {"default": database_config()}``: a real server from DATABASE_URL, else the embedded one."""

from __future__ import annotations

import os
from typing import Any

from psycopg.conninfo import conninfo_to_dict


def database_config(
    *, env: str = "DATABASE_URL", name: str = "django_absurd_agents", **overrides: Any
) -> dict[str, Any]:
    """A Django ``DATABASES`` entry for PostgreSQL on psycopg 3.

    With ``$DATABASE_URL`` set (``postgresql://user:pass@host:5432/dbname``) that server is used.
    Otherwise the embedded PostgreSQL of the ``[embedded]`` extra is started (or found already
    running) under ``.postgres/`` and database ``name`` is created in it. ``overrides`` are merged
    into the returned dict (``CONN_MAX_AGE=60``, ``TEST={...}``).
    """
    url = os.environ.get(env)
    if not url:
        from django_absurd_agents.embedded import embedded_database_url

        url = embedded_database_url(name)
    return {**url_to_config(url), **overrides}


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
