"""Install Absurd's schema from the absurdctl package, or adopt one already at the same version."""

from typing import Any

from django.db import migrations

from django_absurd_agents import conf, schema


def forwards(apps: Any, schema_editor: Any) -> None:
    schema.install_or_adopt(schema_editor.connection)


def backwards(apps: Any, schema_editor: Any) -> None:
    if not conf.get().allow_schema_drop:
        raise RuntimeError(
            "Reversing this migration drops the 'absurd' schema and every task, run, checkpoint and event "
            'in it. Set ABSURD_AGENTS = {"ALLOW_SCHEMA_DROP": True} in settings to allow it, then run the '
            "command again."
        )
    schema.drop(schema_editor.connection)


class Migration(migrations.Migration):
    initial = True
    atomic = True
    dependencies: list[tuple[str, str]] = []
    operations = [migrations.RunPython(forwards, backwards, elidable=False)]
