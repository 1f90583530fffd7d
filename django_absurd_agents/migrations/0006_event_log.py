"""The event log of tasks' agent runs (``AgentEvent``): see ``django_absurd_agents.event_log``."""

import django.db.models.functions.datetime
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("absurd_agents", "0005_conversation_store")]

    operations = [
        migrations.CreateModel(
            name="AgentEvent",
            fields=[
                ("offset", models.BigAutoField(primary_key=True, serialize=False)),
                ("task_id", models.UUIDField()),
                ("attempt", models.PositiveIntegerField()),
                (
                    "kind",
                    models.CharField(
                        help_text="pydantic-ai's event_kind (part_delta, function_tool_call, ...), or 'attempt'.",
                        max_length=64,
                    ),
                ),
                ("payload", models.JSONField()),
                (
                    "step",
                    models.TextField(
                        blank=True,
                        help_text="The checkpoint of the step that produced the event, for model events.",
                        null=True,
                    ),
                ),
                (
                    "position",
                    models.CharField(
                        blank=True,
                        help_text="Place of an event produced outside steps, so that a replay does not log it again.",
                        max_length=32,
                        null=True,
                    ),
                ),
                ("created", models.DateTimeField(db_default=django.db.models.functions.datetime.Now())),
            ],
            options={
                "default_permissions": (),
                "indexes": [models.Index(fields=["task_id", "offset"], name="absurd_event_task_offset")],
                "constraints": [
                    models.UniqueConstraint(
                        condition=models.Q(("position__isnull", False)),
                        fields=("task_id", "position"),
                        name="absurd_event_unique_position",
                    )
                ],
            },
        ),
    ]
