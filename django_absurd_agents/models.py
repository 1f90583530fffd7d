"""Models of django-absurd-agents.

The Absurd tables themselves (``absurd.t_<queue>`` and friends) belong to Absurd's schema, not to
Django: they are read with SQL. ``AbsurdTask`` has no table of its own; it carries the permissions
that guard the admin's views and actions, so they can be granted to groups like any other.

``Conversation``, ``Entry`` and ``Turn`` keep chat histories between durable runs: the entries are the
log pydantic-ai's ``ConversationStore`` keeps (``DjangoConversationStore``), and each turn is one Absurd
task that continues it (see ``conversation_models`` and ``conversations``).
"""

from __future__ import annotations

from django.db import models

# Conversations live in a module of their own, with the code that works on them; imported here so that
# Django registers them and ``from django_absurd_agents.models import Conversation`` goes on working.
from django_absurd_agents.conversation_models import Conversation, Entry, Turn  # noqa: F401


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


class AbsurdOverview(AbsurdTask):
    """The admin index entry of the overview page (no table; guarded by ``view_absurdtask``)."""

    class Meta:
        proxy = True
        default_permissions = ()
        verbose_name = verbose_name_plural = "Absurd overview"
