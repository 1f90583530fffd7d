"""Models of django-absurd-agents.

The Absurd tables themselves (``absurd.t_<queue>`` and friends) belong to Absurd's schema, not to
Django: they are read with SQL. ``AbsurdTask`` has no table of its own; it carries the permissions
that guard the admin's views and actions, so they can be granted to groups like any other.
"""

from __future__ import annotations

from django.db import models


class AbsurdTask(models.Model):
    """Permissions over Absurd tasks (no table: the tasks live in Absurd's schema)."""

    class Meta:
        managed = False
        default_permissions = ("view",)
        permissions = [
            ("retry_absurdtask", "Can retry Absurd tasks"),
            ("cancel_absurdtask", "Can cancel Absurd tasks"),
            ("emit_absurdevent", "Can emit Absurd events"),
        ]
        verbose_name = "Absurd task"
