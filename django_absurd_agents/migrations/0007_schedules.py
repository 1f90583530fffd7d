"""The admin index entry of the schedules page: a proxy of ``AbsurdTask``, no table, no permission of its own."""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("absurd_agents", "0006_event_log")]

    operations = [
        migrations.CreateModel(
            name="AbsurdSchedule",
            fields=[],
            options={
                "verbose_name": "Absurd schedule",
                "verbose_name_plural": "Absurd schedules",
                "proxy": True,
                "default_permissions": (),
                "indexes": [],
                "constraints": [],
            },
            bases=("absurd_agents.absurdtask",),
        ),
    ]
