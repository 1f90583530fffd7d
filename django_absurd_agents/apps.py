from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.db import connections
from django.db.models.signals import post_migrate, pre_migrate


class AbsurdAgentsConfig(AppConfig):
    name = "django_absurd_agents"
    label = "absurd_agents"
    verbose_name = "Absurd agents"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django_absurd_agents import checks  # noqa: F401  (registers the system checks)
        from django_absurd_agents.schema import refuse_schema_drop

        pre_migrate.connect(refuse_schema_drop, sender=self, dispatch_uid="absurd_agents_refuse_schema_drop")
        post_migrate.connect(provision_queues, sender=self, dispatch_uid="absurd_agents_provision_queues")


def provision_queues(sender: AppConfig, using: str, verbosity: int = 1, **kwargs: Any) -> None:
    """Create the queues declared in settings once the schema exists (``post_migrate``)."""
    from django_absurd_agents import conf, schema

    settings = conf.get()
    if using != settings.database_alias:
        return
    connection = connections[using]
    if schema.installed_version(connection) is None:
        return  # migrated backwards to zero, or the schema migration has not run on this alias
    created = schema.provision_queues(connection, settings.all_queues)
    if created and verbosity >= 1:
        print(f"  Created Absurd queue(s): {', '.join(created)}")
