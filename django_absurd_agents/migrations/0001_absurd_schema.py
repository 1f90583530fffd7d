"""Install Absurd's schema from the absurdctl package, or adopt one already at the same version."""

from typing import Any

from django.db import migrations

from django_absurd_agents import conf, schema


def forwards(apps: Any, schema_editor: Any) -> None:
    schema.install_or_adopt(schema_editor.connection)


def backwards(apps: Any, schema_editor: Any) -> None:
    # ``migrate`` refuses earlier (schema.refuse_schema_drop on pre_migrate); this covers other callers.
    if not conf.get().allow_schema_drop:
        raise RuntimeError(schema.SCHEMA_DROP_REFUSED)
    schema.drop(schema_editor.connection)


class Migration(migrations.Migration):
    initial = True
    atomic = True
    operations = [migrations.RunPython(forwards, backwards, elidable=False)]
