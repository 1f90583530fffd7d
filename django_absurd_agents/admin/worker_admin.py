"""The worker list: one row per ``absurd_worker`` process, as it last reported itself (read-only).

Rows are written by the workers themselves (``worker_record``); here they are only shown, with a
status read from the age of the last heartbeat: alive, silent (a few heartbeats missed) or gone. The
list refreshes its rows in place while it is open, so a worker that starts or dies shows up without a
reload.
The model's only permission is ``absurd_agents.view_worker``; nobody adds, changes or deletes a row
from the admin.
"""

from __future__ import annotations

import datetime

from django.contrib import admin
from django.http import HttpRequest
from django.urls import NoReverseMatch, reverse
from django.utils import timezone

from django_absurd_agents.admin.base import ReadOnlyAdmin
from django_absurd_agents.admin.permissions import WORKER_VIEW_PERM, user_can
from django_absurd_agents.templatetags.absurd_admin import absurd_duration
from django_absurd_agents.worker_record import Worker

STATUS_HELP = {
    "alive": "reported within the last few heartbeats",
    "silent": "missed a few heartbeats: busy, stalled or cut off",
    "gone": "silent for many heartbeats: it crashed or was killed; the row is pruned later",
}


DETAIL_FIELDS: tuple[str, ...] = (
    "worker_id",
    "host",
    "pid",
    "queues",
    "concurrency",
    "version",
    "heartbeat_interval",
    "started",
    "last_heartbeat",
    "status_text",
    "tasks_in_flight",
    "tasks_done",
    "last_error",
)


class WorkerAdmin(ReadOnlyAdmin):
    """Workers, alive or not: read-only, under the model's view permission."""

    list_display = [
        "worker_id",
        "host",
        "pid",
        "queue_names",
        "concurrency",
        "version",
        "started",
        "heartbeat",
        "tasks_in_flight",
        "tasks_done",
        "error",
    ]
    list_filter = ["host"]
    search_fields = ["worker_id", "host"]
    ordering = ["-started"]
    list_per_page = 100
    fields = readonly_fields = DETAIL_FIELDS
    change_list_template = "admin/absurd_agents/worker_change_list.html"
    """Django's list, its rows re-read every few seconds in place (``static/absurd_agents/admin_live.js``)."""

    @admin.display(description="queues")
    def queue_names(self, worker: Worker) -> str:
        return ", ".join(str(name) for name in worker.queues or [])

    @admin.display(description="last heartbeat", ordering="last_heartbeat")
    def heartbeat(self, worker: Worker) -> str:
        return status_text(worker)

    @admin.display(description="status")
    def status_text(self, worker: Worker) -> str:
        return f"{status_text(worker)}: {STATUS_HELP[worker.status]}"

    @admin.display(description="last error")
    def error(self, worker: Worker) -> str:
        text = worker.last_error or ""
        return text if len(text) <= 120 else f"{text[:119]}…"


def status_text(worker: Worker) -> str:
    """``alive, 2.1 s ago``: the status and the age of the last heartbeat."""
    age = absurd_duration(max(timezone.now() - worker.last_heartbeat, datetime.timedelta(0)))
    return f"{worker.status}, {age} ago"


def worker_links(request: HttpRequest, worker_ids: set[str], site_name: str) -> dict[str, dict[str, str]]:
    """The admin page and status of each worker of ``worker_ids`` whose row exists, for a user who may see it.

    One primary-key lookup; nothing at all without ``view_worker``.
    """
    if not worker_ids or not user_can(request, WORKER_VIEW_PERM):
        return {}
    links: dict[str, dict[str, str]] = {}
    for worker in Worker.objects.filter(worker_id__in=worker_ids).only(
        "worker_id", "last_heartbeat", "heartbeat_interval"
    ):
        try:
            url = reverse(f"{site_name}:absurd_agents_worker_change", args=[worker.worker_id])
        except NoReverseMatch:  # the worker admin is not registered on this site
            return {}
        links[worker.worker_id] = {"url": url, "status": worker.status}
    return links
