"""``migrate``, one run at a time per database: Django's own command under a PostgreSQL advisory lock.

Two deploys that run ``migrate`` at the same moment would both plan the same migrations from the same
``django_migrations`` table, and the second would fail on what the first created (the
``django_migrations`` table itself, ``schema "absurd" already exists``, a duplicate table). This
command holds ``schema.LOCK_KEY`` on the target database for the whole run, taken before Django reads
which migrations are applied: the second run waits, then finds nothing left to do.

An app's command overrides Django's one of the same name (as ``django.contrib.staticfiles`` does with
``runserver``); if another app listed *before* this one in ``INSTALLED_APPS`` also overrides
``migrate``, that one runs instead, and only the Absurd schema install and queue provisioning stay
serialised (they take the same lock inside their own transactions).
"""

from __future__ import annotations

from typing import Any

from django.core.management.commands.migrate import Command as DjangoMigrateCommand
from django.db import connections

from django_absurd_agents import schema


class Command(DjangoMigrateCommand):
    def handle(self, *args: Any, **options: Any) -> None:
        connection = connections[options["database"]]

        def waiting() -> None:
            if options["verbosity"] >= 1:
                self.stdout.write("Waiting for another migrate on this database to finish...", self.style.NOTICE)

        with schema.migration_lock(connection, on_wait=waiting):
            super().handle(*args, **options)
