"""Models of django-absurd-agents.

The Absurd tables themselves (``absurd.t_<queue>`` and friends) belong to Absurd's schema, not to
Django: they are read with SQL. ``AbsurdTask`` has no table of its own; it carries the permissions
that guard the admin's views and actions, so they can be granted to groups like any other.

``Conversation`` and ``Turn`` keep chat histories between durable runs: each turn is one Absurd task,
and the completed turns' messages are the history the next turn's agent run starts from (see
``django_absurd_agents.conversations``).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.db.models.signals import pre_delete
from django.dispatch import receiver

if TYPE_CHECKING:
    from pydantic_ai.messages import ModelMessage


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


class ConversationQuerySet(models.QuerySet["Conversation"]):
    def for_user(self, user: Any) -> ConversationQuerySet:
        """The conversations ``user`` owns; none for an anonymous user.

        Views reach a conversation through this, so a guessed id of someone else's conversation is
        a 404 rather than a leak: ``get_object_or_404(Conversation.objects.for_user(request.user), pk=pk)``.
        """
        if user is None or not getattr(user, "is_authenticated", False):
            return self.none()
        return self.filter(owner=user)


class Conversation(models.Model):
    """A chat with one agent: an ordered list of turns whose completed messages are the history."""

    id: models.UUIDField[uuid.UUID, uuid.UUID] = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner: models.ForeignKey[Any, Any] = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="agent_conversations",
        db_index=False,  # the (owner, -updated_at) index serves lookups by owner
    )
    agent: models.CharField[str, str] = models.CharField(
        max_length=200, help_text="Name of the chat agent (register_chat_agent) that answers."
    )
    title: models.CharField[str, str] = models.CharField(max_length=200, blank=True)
    metadata: models.JSONField[Any, Any] = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder)
    created_at: models.DateTimeField[datetime, datetime] = models.DateTimeField(auto_now_add=True)
    updated_at: models.DateTimeField[datetime, datetime] = models.DateTimeField(
        auto_now=True, help_text="Last activity: a message sent or answered."
    )

    objects = ConversationQuerySet.as_manager()
    turns: models.Manager[Turn]

    class Meta:
        ordering = ["-updated_at"]
        indexes = [models.Index(fields=["owner", "-updated_at"], name="absurd_conv_owner_recent")]

    def __str__(self) -> str:
        return self.title or f"Conversation with {self.agent} ({str(self.pk)[:8]})"

    def send(self, prompt: str) -> Turn:
        """Queue ``prompt`` as the next turn and spawn its task, inside the caller's transaction."""
        from django_absurd_agents.conversations import send

        return send(self, prompt)

    async def asend(self, prompt: str) -> Turn:
        """``send()`` for async views."""
        from django_absurd_agents.conversations import asend

        return await asend(self, prompt)

    def messages(self) -> list[ModelMessage]:
        """The Pydantic AI messages of the completed turns, in order: the history the next turn sees."""
        from django_absurd_agents.conversations import history

        return history(self)

    async def amessages(self) -> list[ModelMessage]:
        from django_absurd_agents.conversations import ahistory

        return await ahistory(self)


class Turn(models.Model):
    """One prompt of a conversation and the agent's answer to it, produced by one Absurd task."""

    class State(models.TextChoices):
        PENDING = "pending", "Pending"
        RUNNING = "running", "Running"
        COMPLETED = "completed", "Completed"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    TERMINAL_STATES = frozenset({State.COMPLETED, State.FAILED, State.CANCELLED})

    id: models.UUIDField[uuid.UUID, uuid.UUID] = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # No index of its own: the unique (conversation, sequence) index serves every lookup by conversation.
    conversation: models.ForeignKey[Conversation, Conversation] = models.ForeignKey(
        Conversation, on_delete=models.CASCADE, related_name="turns", db_index=False
    )
    conversation_id: uuid.UUID
    sequence: models.PositiveIntegerField[int, int] = models.PositiveIntegerField()
    prompt: models.TextField[str, str] = models.TextField()
    state: models.CharField[str, str] = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    queue: models.CharField[str, str] = models.CharField(max_length=57, help_text="Absurd queue of the turn's task.")
    task_id: models.UUIDField[uuid.UUID | str, uuid.UUID] = models.UUIDField(
        unique=True, help_text="The Absurd task that produces (or produced) this turn."
    )
    new_messages: models.JSONField[Any, Any] = models.JSONField(
        null=True, blank=True, help_text="The turn's messages, in Pydantic AI's ModelMessagesTypeAdapter JSON form."
    )
    output: models.JSONField[Any, Any] = models.JSONField(null=True, blank=True)
    usage: models.JSONField[Any, Any] = models.JSONField(null=True, blank=True)
    error: models.TextField[str, str] = models.TextField(blank=True)
    created_at: models.DateTimeField[datetime, datetime] = models.DateTimeField(auto_now_add=True)
    started_at: models.DateTimeField[datetime | None, datetime | None] = models.DateTimeField(null=True, blank=True)
    finished_at: models.DateTimeField[datetime | None, datetime | None] = models.DateTimeField(null=True, blank=True)
    updated_at: models.DateTimeField[datetime, datetime] = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["conversation_id", "sequence"]
        constraints = [
            models.UniqueConstraint(fields=["conversation", "sequence"], name="absurd_turn_unique_sequence"),
        ]

    def __str__(self) -> str:
        return f"Turn {self.sequence} of {self.conversation_id}"

    @property
    def is_terminal(self) -> bool:
        return self.state in self.TERMINAL_STATES

    def model_messages(self) -> list[ModelMessage]:
        """This turn's messages as Pydantic AI objects (empty until it completes)."""
        from django_absurd_agents.conversations import load_messages

        return load_messages(self.new_messages or [])

    def wait(self, timeout: float = 60.0) -> Turn:
        """Block until the turn is completed, failed or cancelled; refreshes and returns ``self``."""
        from django_absurd_agents.conversations import wait_for_turn

        return wait_for_turn(self, timeout)

    async def await_result(self, timeout: float = 60.0) -> Turn:
        """``wait()`` for async code."""
        from django_absurd_agents.conversations import await_turn

        return await await_turn(self, timeout)

    def retry(self) -> Turn:
        """Run a failed or cancelled turn again, with a new task, inside the caller's transaction."""
        from django_absurd_agents.conversations import retry_turn

        return retry_turn(self)

    def cancel(self) -> Turn:
        """Cancel a pending or running turn; the turns queued behind it go on without it."""
        from django_absurd_agents.conversations import cancel_turn

        return cancel_turn(self)

    def reconcile(self) -> bool:
        """Record on the turn an end its task could not report (a worker killed on the last attempt)."""
        from django_absurd_agents.conversations import reconcile_turn

        return reconcile_turn(self)


@receiver(pre_delete, sender=Turn, dispatch_uid="absurd_agents_turn_pre_delete")
def _abandon_deleted_turn(sender: type[Turn], instance: Turn, **kwargs: Any) -> None:
    """Deleting an unfinished turn (or its conversation) cancels its task and releases the turns behind it."""
    if instance.state in Turn.TERMINAL_STATES:
        return
    from django_absurd_agents.conversations import abandon_turn

    abandon_turn(instance)


class AbsurdOverview(AbsurdTask):
    """The admin index entry of the overview page (no table; guarded by ``view_absurdtask``)."""

    class Meta:
        proxy = True
        default_permissions = ()
        verbose_name = verbose_name_plural = "Absurd overview"
