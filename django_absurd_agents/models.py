"""Models of django-absurd-agents.

The Absurd tables themselves (``absurd.t_<queue>`` and friends) belong to Absurd's schema, not to
Django: they are read with SQL. ``AbsurdTask`` has no table of its own; it carries the permissions
that guard the admin's views and actions, so they can be granted to groups like any other.

``Conversation``, ``Entry`` and ``Turn`` keep chat histories between durable runs: the entries are the
log pydantic-ai's ``ConversationStore`` keeps (``DjangoConversationStore``), and each turn is one Absurd
task that continues it (see ``conversation_models`` and ``conversations``).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from django.db import models

# Conversations live in a module of their own, with the code that works on them; imported here so that
# Django registers them and ``from django_absurd_agents.models import Conversation`` goes on working.
from django_absurd_agents.conversation_models import Conversation, Entry, Turn  # noqa: F401
from django_absurd_agents.worker_record import Worker  # noqa: F401


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


class AbsurdSchedule(AbsurdTask):
    """The admin index entry of the schedules page (no table: schedules live in settings; ``view_absurdtask``)."""

    class Meta:
        proxy = True
        default_permissions = ()
        verbose_name = "Absurd schedule"
        verbose_name_plural = "Absurd schedules"


from django.db.models.functions import Now  # noqa: E402  (kept next to the one model that uses it)


class AgentEvent(models.Model):
    """One entry of a task's event log: an event of its agent runs, or an ``attempt`` marker.

    Written by the worker while the task runs (``django_absurd_agents.event_log``), read by
    ``absurd.stream_events()`` and the Server-Sent Events view (``django_absurd_agents.event_stream``).
    ``offset`` only grows; within a task the entries are in the order their events happened.
    """

    offset: models.BigAutoField = models.BigAutoField(primary_key=True)
    task_id: models.UUIDField[uuid.UUID | str, uuid.UUID] = models.UUIDField()
    attempt: models.PositiveIntegerField[int, int] = models.PositiveIntegerField()
    kind: models.CharField[str, str] = models.CharField(
        max_length=64, help_text="pydantic-ai's event_kind (part_delta, function_tool_call, ...), or 'attempt'."
    )
    payload: models.JSONField[Any, Any] = models.JSONField()
    step: models.TextField[str | None, str | None] = models.TextField(
        null=True, blank=True, help_text="The checkpoint of the step that produced the event, for model events."
    )
    position: models.CharField[str | None, str | None] = models.CharField(
        max_length=32,
        null=True,
        blank=True,
        help_text="Place of an event produced outside steps, so that a replay does not log it again.",
    )
    created: models.DateTimeField[datetime, datetime] = models.DateTimeField(db_default=Now())

    class Meta:
        default_permissions = ()
        indexes = [models.Index(fields=["task_id", "offset"], name="absurd_event_task_offset")]
        constraints = [
            models.UniqueConstraint(
                fields=["task_id", "position"],
                condition=models.Q(position__isnull=False),
                name="absurd_event_unique_position",
            )
        ]

    def __str__(self) -> str:
        return f"{self.kind} #{self.offset} of task {self.task_id}"
