"""Make an installed Absurd schema report another version, for the version-mismatch tests.

Only ``absurd.get_schema_version()`` is replaced; the schema itself always comes from absurdctl.
"""

from __future__ import annotations

from psycopg import sql

_REPLACE = "create or replace function {}.get_schema_version() returns text language sql as $$ select {} $$"


def fake_version_sql(version: str) -> sql.Composed:
    return sql.SQL(_REPLACE).format(sql.Identifier("absurd"), sql.Literal(version))
