"""The schedules page: every configured schedule, when it runs next and last, and the last task it spawned.

``AbsurdSchedule`` is a model without a table, registered to give the admin index an entry; the page
is this ``ModelAdmin``'s change list, served by ``get_urls``. Schedules live in settings, so nothing
is added, changed or deleted here. The task view permission guards it, as task params show here.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils import timezone

from django_absurd_agents import conf
from django_absurd_agents.admin.base import TEMPLATE_DIR, AbsurdAdminBase
from django_absurd_agents.admin.permissions import VIEW_PERM, require, user_can
from django_absurd_agents.schedule_overview import schedule_rows


class AbsurdScheduleAdmin(AbsurdAdminBase):
    """The admin index entry "Absurd schedules" and its one page."""

    def has_module_permission(self, request: HttpRequest) -> bool:
        return user_can(request, VIEW_PERM)

    def get_urls(self) -> list[URLPattern]:  # type: ignore[override]
        name = f"{self.opts.app_label}_{self.opts.model_name}_changelist"
        return [path("", self.admin_site.admin_view(self.changelist_view), name=name)]

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        require(request, VIEW_PERM)
        now = timezone.now()
        items = [
            {
                "schedule": row,
                "task_url": self.task_url(row.last_spawn.queue, row.last_spawn.task_id) if row.last_spawn else None,
            }
            for row in schedule_rows(now)
        ]
        context = {
            **self.page_context(request, "Absurd schedules"),
            "items": items,
            "now": now,
            "catch_up": conf.get().schedule_catch_up,
            **(extra_context or {}),
        }
        return TemplateResponse(request, f"{TEMPLATE_DIR}/schedule_list.html", context)
