"""Conversations in Django models: the web side, on the models and their querysets.

- ``Conversation``: who talks to which agent. It is also the record pydantic-ai's ``ConversationStore``
  keeps for a conversation (see ``conversation_store``): the newest entry of its log, the usage so far,
  the deferred tool calls it waits on, its revision. Its owner is the store's ``scope``.
- ``Entry``: one stored message, pointing at the entry before it. The log is a tree, not a list:
  a branch leaves the old history stored, and a fork shares its source's entries instead of copying
  them, so entries belong to no single conversation and are deleted when nothing reaches them.
- ``Turn``: one prompt sent with ``Conversation.send()``, answered by one Absurd task. The task
  itself (the worker side) lives in ``conversations``; everything here runs in web processes.

The models live in this module, imported by ``models``, so that the code that sends, waits, retries
and reads history sits with the models it works on, with no import going back the other way.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid
from datetime import datetime
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import DatabaseError, models, transaction
from django.db.models import Max
from django.db.models.signals import post_delete, pre_delete
from django.dispatch import receiver
from django.utils import timezone
from pydantic import TypeAdapter
from pydantic_ai.messages import ModelMessage
from pydantic_ai.tools import DeferredToolRequests, DeferredToolResults

from django_absurd_agents.client import absurd
from django_absurd_agents.conversation_entries import (
    Entry,
    chain_order,
    database_alias,
    decode_messages,
    entry_chain,
    sweep_entries,
)
from django_absurd_agents.exceptions import TurnTimeout
from django_absurd_agents.tables import FINISHED_STATES

logger = logging.getLogger("django_absurd_agents.conversations")

TURN_TASK = "absurd_agents.turn"
"""The Absurd task name of every conversation turn; route it with ``TASK_ROUTES``."""

DEFERRED_REQUESTS: TypeAdapter[DeferredToolRequests] = TypeAdapter(DeferredToolRequests)
DEFERRED_RESULTS: TypeAdapter[DeferredToolResults] = TypeAdapter(DeferredToolResults)

STORE_FIELDS = frozenset(
    {"key", "revision", "head", "usage", "deferred_tool_requests", "branches", "forked_from", "forked_at"}
)
"""Fields only the store writes, guarded by the revision; ``Conversation.save()`` leaves them alone."""


def new_revision() -> str:
    """A fresh revision token (opaque; the store compares revisions for equality only)."""
    return str(uuid.uuid4())


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
    """A chat with one agent: its owner, its stored log of messages, and the turns sent to it."""

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
        max_length=200, blank=True, help_text="Name of the chat agent (register_chat_agent) that answers turns."
    )
    title: models.CharField[str, str] = models.CharField(max_length=200, blank=True)
    metadata: models.JSONField[Any, Any] = models.JSONField(default=dict, blank=True, encoder=DjangoJSONEncoder)
    created_at: models.DateTimeField[datetime, datetime] = models.DateTimeField(auto_now_add=True)
    # Not auto_now: the store writes the time of each save, and editing a title is not activity.
    updated_at: models.DateTimeField[datetime, datetime] = models.DateTimeField(
        default=timezone.now, help_text="Last activity: a message sent or stored."
    )
    key: models.CharField[str, str] = models.CharField(
        max_length=255,
        unique=True,
        editable=False,
        help_text="The conversation_id of pydantic-ai's Conversation: str(id), unless the store created it "
        "under an id that is not a UUID.",
    )
    revision: models.CharField[str, str] = models.CharField(max_length=64, default=new_revision, editable=False)
    head: models.ForeignKey[Entry | None, Entry | None] = models.ForeignKey(
        "Entry", null=True, blank=True, on_delete=models.DO_NOTHING, related_name="+", editable=False
    )
    head_id: uuid.UUID | None
    usage: models.JSONField[Any, Any] = models.JSONField(
        default=dict, blank=True, help_text="Usage of every run of the conversation (pydantic-ai RunUsage)."
    )
    deferred_tool_requests: models.JSONField[Any, Any] = models.JSONField(
        null=True, blank=True, help_text="The tool calls the conversation waits on (DeferredToolRequests)."
    )
    branches: models.JSONField[Any, Any] = models.JSONField(
        default=list, blank=True, help_text="Last entries of the histories the conversation left, oldest first."
    )
    forked_from: models.CharField[str | None, str | None] = models.CharField(max_length=255, null=True, blank=True)
    forked_at: models.UUIDField[uuid.UUID | None, uuid.UUID | None] = models.UUIDField(null=True, blank=True)

    objects = ConversationQuerySet.as_manager()
    turns: models.Manager[Turn]

    class Meta:
        ordering = ["-updated_at"]
        # Migration 0005 also makes a GIN index on branches (absurd_conv_branches), for the question a
        # delete asks: which other conversations still reach its entries through a branch. It is raw SQL
        # there because GinIndex would require django.contrib.postgres in INSTALLED_APPS.
        indexes = [models.Index(fields=["owner", "-updated_at"], name="absurd_conv_owner_recent")]

    def __str__(self) -> str:
        return self.title or f"Conversation with {self.agent or 'an agent'} ({str(self.pk)[:8]})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        """Save the fields an application edits; never the store's, which only the store writes.

        A form or the admin that loaded the conversation before a worker stored a turn would
        otherwise write the old head and revision back, and silently drop that turn from the log.
        """
        if not self.key:
            self.key = str(self.pk)
        if not self._state.adding and kwargs.get("update_fields") is None and not kwargs.get("force_insert"):
            kwargs["update_fields"] = [
                field.name
                for field in self._meta.concrete_fields
                if not field.primary_key and field.name not in STORE_FIELDS
            ]
        super().save(*args, **kwargs)

    def send(self, prompt: str = "", *, deferred_tool_results: DeferredToolResults | None = None) -> Turn:
        """Queue ``prompt`` as the next turn and spawn its task, inside the caller's transaction.

        The conversation row is locked while the sequence number is chosen, so two concurrent sends get
        consecutive numbers instead of a unique-constraint error. ``deferred_tool_results`` answers the
        tool calls the conversation waits on (see ``pending_tool_requests()``); the prompt may then be empty.
        """
        results = _checked_send(self, prompt, deferred_tool_results)
        alias = database_alias()
        with transaction.atomic(using=alias):
            locked = Conversation.objects.using(alias).select_for_update().only("pk").get(pk=self.pk)
            last = Turn.objects.using(alias).filter(conversation=locked).aggregate(last=Max("sequence"))["last"]
            turn_id = uuid.uuid4()
            queue = absurd.resolve_queue(TURN_TASK)
            spawned = absurd.spawn_sync(TURN_TASK, {"turn_id": str(turn_id)}, idempotency_key=str(turn_id))
            turn = Turn.objects.using(alias).create(
                id=turn_id,
                conversation=locked,
                sequence=(last or 0) + 1,
                prompt=prompt,
                deferred_tool_results=results,
                queue=queue,
                task_id=spawned["task_id"],
            )
            now = timezone.now()
            Conversation.objects.using(alias).filter(pk=locked.pk).update(updated_at=now)
            self.updated_at = now
        turn.conversation = self
        return turn

    async def asend(self, prompt: str = "", *, deferred_tool_results: DeferredToolResults | None = None) -> Turn:
        """``send()`` for async views (it runs on Django's connection, in the caller's transaction)."""
        return await sync_to_async(self.send)(prompt, deferred_tool_results=deferred_tool_results)

    def messages(self) -> list[ModelMessage]:
        """The stored history as Pydantic AI messages, oldest first: what the next turn continues."""
        alias = database_alias()
        head = Conversation.objects.using(alias).filter(pk=self.pk).values_list("head_id", flat=True).first()
        return decode_messages(entry_chain(head, using=alias))

    async def amessages(self) -> list[ModelMessage]:
        return await sync_to_async(self.messages)()

    def pending_tool_requests(self) -> DeferredToolRequests | None:
        """The tool calls the conversation waits on (as stored when this instance was loaded), if any.

        Answer them with ``requests.build_results(...)`` and ``send(deferred_tool_results=...)``.
        """
        if self.deferred_tool_requests is None:
            return None
        return DEFERRED_REQUESTS.validate_json(json.dumps(self.deferred_tool_requests))


def _checked_send(
    conversation: Conversation, prompt: str, results: DeferredToolResults | None
) -> dict[str, Any] | None:
    """The stored form of ``results``, once the send is known to make sense; nothing is written before."""
    if not isinstance(prompt, str) or (not prompt.strip() and results is None):
        raise ValueError("A turn's prompt must be a non-empty string (or pass deferred_tool_results=).")
    if results is not None and not isinstance(results, DeferredToolResults):
        raise ValueError(
            "deferred_tool_results must be a DeferredToolResults: build it with "
            "conversation.pending_tool_requests().build_results(approvals=..., calls=...)."
        )
    if conversation.pk is None or conversation._state.adding:
        raise ValueError("Save the conversation before sending to it: Conversation.objects.create(agent=...).")
    if not conversation.agent:
        raise ValueError(
            f"Conversation {conversation.pk} names no agent to answer it: set its `agent` to the name of a chat "
            "agent registered with register_chat_agent() before sending."
        )
    return None if results is None else DEFERRED_RESULTS.dump_python(results, mode="json")


@receiver(post_delete, sender=Conversation, dispatch_uid="absurd_agents_conversation_post_delete")
def _sweep_deleted_conversation(sender: type[Conversation], instance: Conversation, using: str, **kwargs: Any) -> None:
    """However a conversation goes (the store, the admin, a deleted owner), its unreachable entries go too."""
    sweep_entries([instance.head_id, *(instance.branches or [])], Conversation, using)


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
    prompt: models.TextField[str, str] = models.TextField(blank=True)
    deferred_tool_results: models.JSONField[Any, Any] = models.JSONField(
        null=True, blank=True, help_text="Answers to the tool calls the conversation waited on (DeferredToolResults)."
    )
    state: models.CharField[str, str] = models.CharField(max_length=16, choices=State.choices, default=State.PENDING)
    queue: models.CharField[str, str] = models.CharField(max_length=57, help_text="Absurd queue of the turn's task.")
    task_id: models.UUIDField[uuid.UUID | str, uuid.UUID] = models.UUIDField(
        unique=True, help_text="The Absurd task that produces (or produced) this turn."
    )
    output: models.JSONField[Any, Any] = models.JSONField(null=True, blank=True)
    usage: models.JSONField[Any, Any] = models.JSONField(null=True, blank=True)
    error: models.TextField[str, str] = models.TextField(blank=True)
    created_at: models.DateTimeField[datetime, datetime] = models.DateTimeField(auto_now_add=True)
    started_at: models.DateTimeField[datetime | None, datetime | None] = models.DateTimeField(null=True, blank=True)
    finished_at: models.DateTimeField[datetime | None, datetime | None] = models.DateTimeField(null=True, blank=True)
    updated_at: models.DateTimeField[datetime, datetime] = models.DateTimeField(auto_now=True)

    entries: models.Manager[Entry]

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
        """The messages this turn stored, as Pydantic AI objects (empty until it completes)."""
        rows = (
            Entry.objects.using(database_alias())
            .filter(turn=self)
            .values_list("id", "parent_id", "kind", "message", "turn")
        )
        return decode_messages(chain_order(list(rows)))

    def wait(self, timeout: float = 60.0) -> Turn:
        """Block until the turn is completed, failed or cancelled; refreshes and returns ``self``.

        Polls the row (20 ms, backing off to 1 s); ``TurnTimeout`` names the likely cause.
        """
        deadline = time.monotonic() + timeout
        for delay in _poll_delays():
            self.refresh_from_db(using=database_alias())
            if self.is_terminal or self.reconcile():
                return self
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timeout(timeout)
            time.sleep(min(delay, remaining))
        raise AssertionError("unreachable")

    async def await_result(self, timeout: float = 60.0) -> Turn:
        """``wait()`` for async code."""
        deadline = time.monotonic() + timeout
        for delay in _poll_delays():
            await self.arefresh_from_db(using=database_alias())
            if self.is_terminal or await sync_to_async(self.reconcile)():
                return self
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timeout(timeout)
            await asyncio.sleep(min(delay, remaining))
        raise AssertionError("unreachable")

    def _timeout(self, timeout: float) -> TurnTimeout:
        return TurnTimeout(
            f"Turn {self.sequence} of conversation {self.conversation_id} is still {self.state} after {timeout} s. "
            "Is a worker running for its queue? Start one with `python manage.py absurd_worker`, or wait longer."
        )

    def retry(self) -> Turn:
        """Run a failed or cancelled turn again, with a new task, inside the caller's transaction.

        It runs on the conversation as stored when it runs, so its answer joins the end of the log.
        """
        alias = database_alias()
        with transaction.atomic(using=alias):
            locked = Turn.objects.using(alias).select_for_update().get(pk=self.pk)
            if locked.state not in (Turn.State.FAILED, Turn.State.CANCELLED):
                raise ValueError(
                    f"Turn {locked.sequence} is {locked.state}: only a failed or cancelled turn can be retried."
                )
            queue = absurd.resolve_queue(TURN_TASK)
            spawned = absurd.spawn_sync(
                TURN_TASK, {"turn_id": str(locked.pk)}, idempotency_key=f"{locked.pk}:after:{locked.task_id}"
            )
            values: dict[str, Any] = {
                "state": Turn.State.PENDING,
                "queue": queue,
                "task_id": uuid.UUID(str(spawned["task_id"])),
                "output": None,
                "usage": None,
                "error": "",
                "started_at": None,
                "finished_at": None,
                "updated_at": timezone.now(),
            }
            Turn.objects.using(alias).filter(pk=locked.pk).update(**values)
        for field, value in values.items():
            setattr(self, field, value)
        return self

    def cancel(self) -> Turn:
        """Cancel a pending or running turn; the turns queued behind it go on without it."""
        alias = database_alias()
        with transaction.atomic(using=alias):
            locked = Turn.objects.using(alias).select_for_update().get(pk=self.pk)
            if locked.is_terminal:
                raise ValueError(f"Turn {locked.sequence} is already {locked.state}.")
            locked.cancel_absurd_task()
            locked.finish(Turn.State.CANCELLED, "Cancelled.")
            locked.release(Turn.State.CANCELLED)
        self.refresh_from_db(using=alias)
        return self

    def reconcile(self) -> bool:
        """Record an end the turn's task could not report (its worker died on the last attempt, or the task
        was cancelled from the admin), and release the turns behind it. Returns whether the turn is finished.
        """
        if self.is_terminal:
            return True
        snapshot = absurd.fetch_task_result_sync(self.task_id, queue_name=self.queue)
        if snapshot is None:
            state, error = Turn.State.FAILED, f"Its Absurd task {self.task_id} is gone from queue {self.queue!r}."
        elif snapshot.state == "failed":
            state, error = Turn.State.FAILED, _failure_text(snapshot.failure)
        elif snapshot.state == "cancelled":
            state, error = Turn.State.CANCELLED, "Its Absurd task was cancelled."
        elif snapshot.state == "completed":
            # The task stores the answer before it completes; a completed task without one skipped the turn.
            self.refresh_from_db(using=database_alias())
            if self.is_terminal:
                return True
            state, error = Turn.State.FAILED, "Its Absurd task completed without storing the answer."
        else:
            return False
        if self.finish(state, error):
            self.release(state)
        else:
            self.refresh_from_db(using=database_alias())
        return self.is_terminal

    def finish(self, state: str, error: str) -> bool:
        """Record an end on this turn while it is unfinished and still has this task; whether it was recorded."""
        now = timezone.now()
        changed = (
            Turn.objects.using(database_alias())
            .filter(pk=self.pk, task_id=self.task_id, state__in=UNFINISHED)
            .update(state=state, error=error, finished_at=now, updated_at=now)
        )
        if changed:
            self.state, self.error, self.finished_at, self.updated_at = state, error, now, now
        return bool(changed)

    def release(self, state: str) -> None:
        """Emit the turn's ``turn-done`` event, waking a turn queued behind it (the first emit wins)."""
        payload = {"turn_id": str(self.pk), "state": state}
        absurd.emit_event_sync(done_event(self.task_id), payload, queue_name=self.queue)

    def cancel_absurd_task(self) -> None:
        snapshot = absurd.fetch_task_result_sync(self.task_id, queue_name=self.queue)
        if snapshot is not None and snapshot.state not in FINISHED_STATES:
            absurd.cancel_task_sync(self.task_id, queue_name=self.queue)


UNFINISHED = (Turn.State.PENDING, Turn.State.RUNNING)


def done_event(task_id: Any) -> str:
    """The event a turn's task emits when the turn ends, awaited by the next turn of its conversation."""
    return f"turn-done:{task_id}"


def _poll_delays() -> itertools.chain[float]:
    return itertools.chain((0.02, 0.05, 0.1, 0.2, 0.5), itertools.repeat(1.0))


def _failure_text(failure: Any) -> str:
    if isinstance(failure, dict):
        name, message = failure.get("name"), failure.get("message")
        if name or message:
            return f"{name}: {message}" if name and message else str(name or message)
    return json.dumps(failure) if failure is not None else "unknown error"


@receiver(pre_delete, sender=Turn, dispatch_uid="absurd_agents_turn_pre_delete")
def _abandon_deleted_turn(sender: type[Turn], instance: Turn, **kwargs: Any) -> None:
    """Deleting an unfinished turn (or its conversation) cancels its task and releases the turns behind it.

    In a savepoint: a missing queue or task must not make the delete fail, the rows are going anyway.
    """
    if instance.is_terminal:
        return
    try:
        with transaction.atomic(using=database_alias()):
            instance.cancel_absurd_task()
            instance.release(Turn.State.CANCELLED)
    except DatabaseError:
        logger.warning("Could not cancel the task %s of deleted turn %s", instance.task_id, instance.pk, exc_info=True)
