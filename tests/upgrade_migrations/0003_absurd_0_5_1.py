"""Upgrade the Absurd schema from 0.5.0 to 0.5.1: the migration docs/installation.md tells a maintainer to add.

It runs absurdctl's bundled ``0.5.0-0.5.1.sql`` on a database at 0.5.0 and leaves a database that
0001 installed at 0.5.1 alone. Absurd ships no downgrade scripts, so going back is a no-op that
leaves the newer schema in place.
"""

from typing import Any

from django.db import migrations

from django_absurd_agents import schema


def upgrade_absurd(apps: Any, schema_editor: Any) -> None:
    schema.upgrade(schema_editor.connection, "0.5.0", "0.5.1")


class Migration(migrations.Migration):
    atomic = True
    dependencies = [("absurd_agents", "0002_task_permissions")]
    operations = [migrations.RunPython(upgrade_absurd, migrations.RunPython.noop, elidable=False)]
