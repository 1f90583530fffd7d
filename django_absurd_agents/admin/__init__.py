"""The Django admin over Absurd: tasks, runs, checkpoints and events of every queue; conversations.

``task_admin`` holds the task admin's pages and ``actions`` its retry, cancel and emit views, all
methods of one ``ModelAdmin`` wired by its ``get_urls``; ``worker_admin`` lists the workers;
``schedule_admin`` lists the schedules with the last task each spawned; ``filters``
reads the task list's query string; the HTML is in ``templates/admin/absurd_agents/`` and the
``absurd_admin`` template filters.
The conversations' admin is ``django_absurd_agents.admin_conversations``.
"""

from __future__ import annotations

import uuid

from django.contrib import admin
from django.urls import reverse

from django_absurd_agents import admin_conversations  # noqa: F401  (registers Conversation and Turn)
from django_absurd_agents.admin.schedule_admin import AbsurdScheduleAdmin
from django_absurd_agents.admin.task_admin import AbsurdOverviewAdmin, AbsurdTaskAdmin
from django_absurd_agents.admin.worker_admin import WorkerAdmin
from django_absurd_agents.models import AbsurdOverview, AbsurdSchedule, AbsurdTask, Worker

__all__ = ["AbsurdOverviewAdmin", "AbsurdScheduleAdmin", "AbsurdTaskAdmin", "WorkerAdmin", "task_admin_url"]

admin.site.register(AbsurdTask, AbsurdTaskAdmin)
admin.site.register(AbsurdOverview, AbsurdOverviewAdmin)
admin.site.register(AbsurdSchedule, AbsurdScheduleAdmin)
admin.site.register(Worker, WorkerAdmin)


def task_admin_url(queue: str, task_id: str | uuid.UUID) -> str:
    """The admin URL of a task, for links from other pages (e.g. a conversation's admin)."""
    return reverse("admin:absurd_agents_absurdtask_detail", kwargs={"queue": queue, "task_id": str(task_id)})
