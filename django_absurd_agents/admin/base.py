"""What every page of the task admin shares: its permissions, its page context, links to tasks."""

from __future__ import annotations

import uuid
from typing import Any

from django.contrib import admin, messages
from django.http import Http404, HttpRequest
from django.urls import NoReverseMatch, reverse

from django_absurd_agents.admin.permissions import (
    CANCEL_PERM,
    EMIT_PERM,
    RETRY_PERM,
    VIEW_PERM,
    WORKER_VIEW_PERM,
    user_can,
)
from django_absurd_agents.tables import list_queues
from django_absurd_agents.task_records import TaskDetail, task_detail

TEMPLATE_DIR = "admin/absurd_agents"
URL_PREFIX = "absurd_agents_absurdtask"
"""The URL names of every page start with it (``admin:absurd_agents_absurdtask_detail``...): bookmarks,
links in alerts and the admin log depend on them."""


class ReadOnlyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """An admin whose rows are written by the app, never by hand: nothing to add, change or delete."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class AbsurdAdminBase(ReadOnlyAdmin):
    """A read-only admin of something that is not a table, seen with the task view permission."""

    list_per_page = 50

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return user_can(request, VIEW_PERM)

    def page_url(self, name: str, **kwargs: Any) -> str:
        """The URL of the task admin's page ``name`` (``changelist``, ``overview``, ``emit``, ...)."""
        return reverse(f"{self.admin_site.name}:{URL_PREFIX}_{name}", kwargs=kwargs or None)

    def task_url(self, queue: str, task_id: str | uuid.UUID, action: str = "detail") -> str:
        return self.page_url(action, queue=queue, task_id=str(task_id))

    def page_context(self, request: HttpRequest, title: str) -> dict[str, Any]:
        opts = self.opts
        return {
            **self.admin_site.each_context(request),
            "opts": opts,
            "app_label": opts.app_label,
            "title": title,
            "list_url": self.page_url("changelist"),
            "overview_url": self.page_url("overview"),
            "charts_url": self.page_url("charts"),
            "emit_url": self.page_url("emit"),
            "can_retry": user_can(request, RETRY_PERM),
            "can_cancel": user_can(request, CANCEL_PERM),
            "can_emit": user_can(request, EMIT_PERM),
            "workers_url": self._workers_url(request),
            "schedules_url": self._schedules_url(),
        }

    def _schedules_url(self) -> str | None:
        try:
            return reverse(f"{self.admin_site.name}:absurd_agents_absurdschedule_changelist")
        except NoReverseMatch:  # a site that does not register the schedules' admin
            return None

    def _workers_url(self, request: HttpRequest) -> str | None:
        if not user_can(request, WORKER_VIEW_PERM):
            return None
        try:
            return reverse(f"{self.admin_site.name}:absurd_agents_worker_changelist")
        except NoReverseMatch:
            return None


def load_task(queue: str, task_id: uuid.UUID) -> TaskDetail:
    """The task, or a 404 saying whether the task or its whole queue is missing."""
    detail = task_detail(queue, task_id)
    if detail is None:
        if queue not in list_queues():
            raise Http404(f"There is no queue {queue!r} (it may have been dropped).")
        raise Http404(f"There is no task {task_id} in queue {queue!r}.")
    return detail


def warn_about_queues_without_tables(request: HttpRequest, catalog: list[tuple[str, bool]]) -> None:
    for name, has_tables in catalog:
        if not has_tables:
            messages.warning(
                request,
                f"Queue {name!r} is listed in absurd.queues but its tables are missing, so it is left out. "
                f"Create them with absurd.create_queue({name!r}), or delete its row from absurd.queues.",
            )
