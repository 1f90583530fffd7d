"""The Django admin over Absurd: tasks, runs, checkpoints and events of every queue.

Absurd's tables are not Django models (one set of tables per queue, created and dropped at any time),
so ``AbsurdTask``, a model without a table, is registered only to give the admin an entry, a URL
prefix and permissions; its ``get_urls`` serves the views of ``admin_views`` instead of the usual
change list and change form.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from functools import update_wrapper
from typing import Any

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.urls import URLPattern, path

from django_absurd_agents import admin_views, models
from django_absurd_agents.models import AbsurdTask


class AbsurdTaskAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Tasks of every queue: list, detail, overview and the retry/cancel/emit actions."""

    list_per_page = 50

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return admin_views.user_can(request, admin_views.VIEW_PERM)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def _wrap(self, view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            return view(self, request, *args, **kwargs)

        wrapped = self.admin_site.admin_view(update_wrapper(wrapper, view))
        wrapped.model_admin = self  # type: ignore[attr-defined]
        return wrapped

    def get_urls(self) -> list[URLPattern]:  # type: ignore[override]
        prefix = "absurd_agents_absurdtask"
        task = "<path:queue>/<uuid:task_id>"  # path: Absurd accepts "/" in queue names
        return [
            path("", self._wrap(admin_views.task_list), name=f"{prefix}_changelist"),
            path("overview/", self._wrap(admin_views.overview), name=f"{prefix}_overview"),
            path("emit/", self._wrap(admin_views.emit), name=f"{prefix}_emit"),
            path(f"{task}/", self._wrap(admin_views.task_detail), name=f"{prefix}_detail"),
            path(f"{task}/retry/", self._wrap(admin_views.retry), name=f"{prefix}_retry"),
            path(f"{task}/cancel/", self._wrap(admin_views.cancel), name=f"{prefix}_cancel"),
            path(f"{task}/emit/", self._wrap(admin_views.emit), name=f"{prefix}_emit_task"),
            # Admin-log entries link here with the task id only.
            path("<path:object_id>/change/", self._wrap(admin_views.log_entry_redirect), name=f"{prefix}_change"),
        ]


admin.site.register(AbsurdTask, AbsurdTaskAdmin)


class AbsurdOverviewAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """A second entry on the admin index, leading to the overview (guarded by the task view permission)."""

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return admin_views.user_can(request, admin_views.VIEW_PERM)

    def has_module_permission(self, request: HttpRequest) -> bool:
        return admin_views.user_can(request, admin_views.VIEW_PERM)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_urls(self) -> list[URLPattern]:  # type: ignore[override]
        task_admin = self.admin_site.get_model_admin(AbsurdTask)

        def overview(request: HttpRequest) -> HttpResponse:
            return admin_views.overview(task_admin, request)  # type: ignore[arg-type]

        info = (self.opts.app_label, self.opts.model_name)
        return [path("", self.admin_site.admin_view(overview), name="{}_{}_changelist".format(*info))]


_overview_model = getattr(models, "AbsurdOverview", None)
if _overview_model is not None:
    admin.site.register(_overview_model, AbsurdOverviewAdmin)


def task_admin_url(queue: str, task_id: str | uuid.UUID) -> str:
    """The admin URL of a task, for links from other pages (e.g. a conversation's admin)."""
    from django.urls import reverse

    return reverse("admin:absurd_agents_absurdtask_detail", kwargs={"queue": queue, "task_id": str(task_id)})


from django_absurd_agents import admin_conversations  # noqa: E402,F401
