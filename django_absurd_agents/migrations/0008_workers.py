"""The worker table: each ``absurd_worker`` process records itself (``worker_record.Worker``)."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("absurd_agents", "0007_schedules")]

    operations = [
        migrations.CreateModel(
            name="Worker",
            fields=[
                ("worker_id", models.CharField(max_length=255, primary_key=True, serialize=False)),
                ("host", models.CharField(max_length=255)),
                ("pid", models.PositiveIntegerField()),
                ("queues", models.JSONField(default=list)),
                ("concurrency", models.PositiveIntegerField()),
                ("version", models.CharField(max_length=64)),
                ("heartbeat_interval", models.FloatField()),
                ("started", models.DateTimeField()),
                ("last_heartbeat", models.DateTimeField(db_index=True)),
                ("tasks_in_flight", models.PositiveIntegerField(default=0)),
                ("tasks_done", models.PositiveBigIntegerField(default=0)),
                ("last_error", models.TextField(blank=True, default="")),
            ],
            options={"ordering": ["-started"], "default_permissions": ("view",)},
        ),
    ]
