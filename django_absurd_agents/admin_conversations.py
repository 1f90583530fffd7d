"""Admin of conversations: who talks to which agent, and the transcript of each conversation.

The transcript is built from the conversation's stored entries (the log ``DjangoConversationStore``
keeps), read as JSON rather than as Pydantic AI objects, so a history that the installed Pydantic AI
cannot load (written by a newer version, say) still renders.
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.template.loader import render_to_string
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString, mark_safe

from django_absurd_agents.conversation_entries import entry_chain
from django_absurd_agents.models import Conversation, Turn
from django_absurd_agents.steps import TranscriptEntry, transcript_entries

TRANSCRIPT_TEMPLATE = "admin/absurd_agents/conversation/transcript.html"


def task_url(turn: Turn) -> str | None:
    """The admin page of the turn's Absurd task, when the task admin is installed."""
    try:
        return reverse("admin:absurd_agents_absurdtask_detail", args=(turn.queue, str(turn.task_id)))
    except NoReverseMatch:
        return None


def task_link(turn: Turn) -> SafeString:
    url = task_url(turn)
    if url is None:
        return format_html('<span class="absurd-mono">{}</span>', turn.task_id)
    return format_html('<a class="absurd-mono" href="{}">{}</a>', url, turn.task_id)


def _sections(conversation: Conversation) -> list[tuple[Any, list[Any]]]:
    """The conversation's history as (turn id, stored messages) runs of consecutive entries.

    Entries saved through the store rather than by a turn have no turn id. An incomplete history (an
    entry deleted by hand) shows what can still be read rather than failing the page.
    """
    head = Conversation.objects.filter(pk=conversation.pk).values_list("head_id", flat=True).first()
    try:
        chain = entry_chain(head)
    except LookupError:
        return []
    sections: list[tuple[Any, list[Any]]] = []
    for entry in chain:
        if not sections or sections[-1][0] != entry.turn_id:
            sections.append((entry.turn_id, []))
        sections[-1][1].append(json.loads(entry.message_json))
    return sections


def _item(turn: Turn | None, stored: list[Any]) -> dict[str, Any]:
    entries = transcript_entries(stored)
    if turn is not None and turn.prompt and not any(entry.kind == "user" for entry in entries):
        entries.insert(0, TranscriptEntry("user", text=turn.prompt))
    return {
        "turn": turn,
        "entries": entries,
        "task_url": task_url(turn) if turn is not None else None,
        "usage": (turn.usage if turn is not None else None) or {},
    }


def render_transcript(conversation: Conversation) -> str:
    """The transcript from the stored entries, in log order; turns that stored nothing (pending, running,
    failed, cancelled) are shown between them by their sequence, with their prompt and state."""
    turns = {turn.pk: turn for turn in Turn.objects.filter(conversation=conversation).order_by("sequence")}
    sections = _sections(conversation)
    logged = {turn_id for turn_id, _ in sections}
    unlogged = [turn for turn in turns.values() if turn.pk not in logged]
    items: list[dict[str, Any]] = []
    for turn_id, stored in sections:
        turn = turns.get(turn_id)
        while turn is not None and unlogged and unlogged[0].sequence < turn.sequence:
            items.append(_item(unlogged.pop(0), []))
        items.append(_item(turn, stored))
    items.extend(_item(turn, []) for turn in unlogged)
    return render_to_string(TRANSCRIPT_TEMPLATE, {"turns": items})


class ConversationAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("__str__", "owner", "agent", "turn_count", "last_activity")
    list_filter = ("agent",)
    list_select_related = ("owner",)
    search_fields = ("title", f"owner__{get_user_model().USERNAME_FIELD}")
    fields = ("title", "agent", "owner", "metadata", "id", "key", "created_at", "updated_at", "transcript")
    readonly_fields = ("id", "key", "agent", "owner", "created_at", "updated_at", "transcript")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Conversation]:
        return super().get_queryset(request).annotate(turn_count=Count("turns"))

    @admin.display(description="Turns", ordering="turn_count")
    def turn_count(self, obj: Any) -> int:
        return int(obj.turn_count)

    @admin.display(description="Last activity", ordering="updated_at")
    def last_activity(self, obj: Conversation) -> Any:
        return obj.updated_at

    @admin.display(description="Transcript")
    def transcript(self, obj: Conversation) -> SafeString:
        if obj.pk is None:
            return mark_safe("")
        return mark_safe(render_transcript(obj))  # the template escapes every stored value

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # conversations are started by the application, with an owner and an agent


class TurnAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("__str__", "conversation", "state", "prompt_start", "created_at", "finished_at", "task")
    list_filter = ("state",)
    list_select_related = ("conversation",)
    search_fields = ("prompt", "conversation__title")
    readonly_fields = [field.name for field in Turn._meta.fields] + ["task"]
    actions = ("retry_turns", "cancel_turns")

    @admin.display(description="Prompt")
    def prompt_start(self, obj: Turn) -> str:
        return obj.prompt if len(obj.prompt) <= 80 else obj.prompt[:79] + "…"

    @admin.display(description="Absurd task")
    def task(self, obj: Turn) -> SafeString:
        return task_link(obj)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # a turn is created by Conversation.send(), together with its task

    @admin.action(description="Retry the selected failed or cancelled turns", permissions=["change"])
    def retry_turns(self, request: HttpRequest, queryset: QuerySet[Turn]) -> None:
        retried = 0
        for turn in queryset.filter(state__in=(Turn.State.FAILED, Turn.State.CANCELLED)):
            turn.retry()
            retried += 1
        self.message_user(request, f"{retried} turn(s) queued again.", messages.SUCCESS)

    @admin.action(description="Cancel the selected unfinished turns", permissions=["change"])
    def cancel_turns(self, request: HttpRequest, queryset: QuerySet[Turn]) -> None:
        cancelled = 0
        for turn in queryset.filter(state__in=(Turn.State.PENDING, Turn.State.RUNNING)):
            turn.cancel()
            cancelled += 1
        self.message_user(request, f"{cancelled} turn(s) cancelled.", messages.SUCCESS)


admin.site.register(Conversation, ConversationAdmin)
admin.site.register(Turn, TurnAdmin)
