"""Placeholder: filled in by the change that introduces it (kept empty so the migration chain is fixed)."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("absurd_agents", "0004_absurd_overview")]
    operations = []  # type: ignore[var-annotated]
