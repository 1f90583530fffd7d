"""The task admin: the list of tasks across queues, a task's page, the overview, wired by ``get_urls``.

Absurd's tables are not Django models (one set of tables per queue, created and dropped at any time),
so ``AbsurdTask``, a model without a table, is registered only to give the admin an entry, a URL prefix
and permissions; ``get_urls`` serves the views of this ``ModelAdmin`` (and of ``AbsurdTaskActions``)
instead of the usual change list and change form, each behind ``admin_site.admin_view`` (a logged-in
staff user) and checking its own permission before any query runs.

The overview, the charts and a task's page are live: ``static/absurd_agents/admin_live.js`` fetches the
same URL again every few seconds (so the same permission check runs) and swaps the marked regions in
place; a task's page also follows the task's event log from ``GET /agents/tasks/<id>/events``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from functools import update_wrapper
from typing import Any

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, URLPattern, path, reverse
from django.utils import timezone
from django.utils.http import urlencode

from django_absurd_agents import conf
from django_absurd_agents.admin.base import (
    TEMPLATE_DIR,
    URL_PREFIX,
    AbsurdAdminBase,
    load_task,
    warn_about_queues_without_tables,
)
from django_absurd_agents.admin.bulk import AbsurdTaskBulkActions, bulk_choices
from django_absurd_agents.admin.filters import (
    CREATED_PRESETS,
    ListQuery,
    filter_group,
    hidden_params,
    list_query,
    querystring,
)
from django_absurd_agents.admin.permissions import VIEW_PERM, require, user_can
from django_absurd_agents.admin.worker_admin import worker_links
from django_absurd_agents.charts import queue_charts
from django_absurd_agents.client import absurd
from django_absurd_agents.models import AbsurdTask
from django_absurd_agents.queue_overview import overview
from django_absurd_agents.steps import decode_steps
from django_absurd_agents.tables import FINISHED_STATES, STATES, locate_task, queue_catalog
from django_absurd_agents.task_list import TaskPage, task_names, task_page
from django_absurd_agents.timeline import timeline
from django_absurd_agents.validation import parse_uuid

LIVE_HEADER = "X-Absurd-Live"
"""Sent by ``admin_live.js`` when it re-reads a page to refresh it in place."""


def is_live_refresh(request: HttpRequest) -> bool:
    """Whether the request is a live page's refresh rather than a person opening the page."""
    return LIVE_HEADER in request.headers


def task_events_url(task_id: str | uuid.UUID) -> str | None:
    """The task's event log as Server-Sent Events, or None where the app's URLs are not mounted."""
    try:
        return reverse("absurd_agents:task_events", kwargs={"task_id": task_id})
    except NoReverseMatch:
        return None


class AbsurdTaskAdmin(AbsurdTaskBulkActions):
    """Tasks of every queue: list, detail, overview and the retry/cancel/emit actions."""

    def get_urls(self) -> list[URLPattern]:  # type: ignore[override]
        def wrap(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
            def wrapper(*args: Any, **kwargs: Any) -> HttpResponse:
                return self.admin_site.admin_view(view)(*args, **kwargs)

            wrapper.model_admin = self  # type: ignore[attr-defined]
            return update_wrapper(wrapper, view)

        task = "<path:queue>/<uuid:task_id>"  # path: Absurd accepts "/" in queue names
        return [
            path("", wrap(self.changelist_view), name=f"{URL_PREFIX}_changelist"),
            path("overview/", wrap(self.overview_view), name=f"{URL_PREFIX}_overview"),
            path("overview/charts/", wrap(self.charts_view), name=f"{URL_PREFIX}_charts"),
            path("emit/", wrap(self.emit_view), name=f"{URL_PREFIX}_emit"),
            path("bulk/", wrap(self.bulk_view), name=f"{URL_PREFIX}_bulk"),
            path(f"{task}/", wrap(self.task_view), name=f"{URL_PREFIX}_detail"),
            path(f"{task}/retry/", wrap(self.retry_view), name=f"{URL_PREFIX}_retry"),
            path(f"{task}/cancel/", wrap(self.cancel_view), name=f"{URL_PREFIX}_cancel"),
            path(f"{task}/emit/", wrap(self.emit_view), name=f"{URL_PREFIX}_emit_task"),
            # Admin-log entries link here with the task id only.
            path("<path:object_id>/change/", wrap(self.change_view), name=f"{URL_PREFIX}_change"),
        ]

    def changelist_view(self, request: HttpRequest, extra_context: dict[str, Any] | None = None) -> HttpResponse:
        require(request, VIEW_PERM)
        catalog = queue_catalog()  # read once: the page, the filters and the warnings all use it
        warn_about_queues_without_tables(request, catalog)
        queues = [name for name, has_tables in catalog if has_tables]
        query = list_query(request)
        for problem in query.problems:
            messages.warning(request, problem)
        if query.unmatchable:  # PostgreSQL would refuse the text; no task could match it anyway
            page = TaskPage(rows=[], has_next=False, has_previous=False, total=0, queues=queues)
        else:
            page = task_page(
                query.filters, after=query.after, before=query.before, per_page=self.list_per_page, present=queues
            )
        missing_queue = query.queue if query.queue is not None and query.queue not in queues else None
        context = {
            **self.page_context(request, "Absurd tasks"),
            **self._filter_context(request, query, queues, missing_queue),
            **self._page_links(request, page),
            "page": page,
            "total_text": f"{page.total:,}" if page.total is not None else None,
            "rows": [{"row": row, "url": self.task_url(row.queue, row.task_id)} for row in page.rows],
            "queues": queues,
            "missing_queue": missing_queue,
            "has_filters": query.filters.narrows_rows or query.queue is not None,
            "clear_url": "?",
            "bulk_choices": bulk_choices(request),
            "bulk_url": self.page_url("bulk"),
            **(extra_context or {}),
        }
        return TemplateResponse(request, f"{TEMPLATE_DIR}/task_list.html", context)

    def _filter_context(
        self, request: HttpRequest, query: ListQuery, queues: list[str], missing_queue: str | None
    ) -> dict[str, Any]:
        known = [*absurd.registry, *conf.get().task_routes]
        names = task_names([query.queue] if query.queue and not missing_queue else None, known=known, present=queues)
        task_name = query.filters.task_name
        if task_name and task_name not in names:
            names.append(task_name)
        group = filter_group
        presets = [(key, label) for key, (label, _) in CREATED_PRESETS.items()]
        return {
            "filters": query.filters,
            "filter_groups": [
                group(request, "By queue", "queue", [(q, q) for q in queues]),
                group(request, "By state", "state", [(s, s) for s in STATES]),
                group(request, "By task name", "task_name", [(n, n) for n in names]),
                group(request, "By created", "created", presets),
            ],
            "search": query.search or "",
            "created_since": request.GET.get("created_since", ""),
            "created_until": request.GET.get("created_until", ""),
            "hidden_params": hidden_params(request, "q", "after", "before", "created_since", "created_until"),
            "date_hidden_params": hidden_params(
                request, "after", "before", "created", "created_since", "created_until"
            ),
        }

    def _page_links(self, request: HttpRequest, page: TaskPage) -> dict[str, str | None]:
        qs = querystring
        return {
            "next_url": qs(request, after=page.next_cursor) if page.next_cursor else None,
            "previous_url": qs(request, before=page.previous_cursor) if page.previous_cursor else None,
            "first_url": qs(request) if page.has_previous else None,
        }

    def task_view(self, request: HttpRequest, queue: str, task_id: uuid.UUID) -> HttpResponse:
        require(request, VIEW_PERM)
        detail = load_task(queue, task_id)
        emit_url = self.task_url(queue, detail.task_id, "emit_task")
        claimed_by = {run.claimed_by for run in detail.runs if run.claimed_by}
        context = {
            **self.page_context(request, f"{detail.task_name} {detail.task_id}"),
            "task": detail,
            "steps": decode_steps(detail.checkpoints, {run.run_id: run.attempt for run in detail.runs}),
            "failure": detail.failure,
            "waits": [
                {"wait": wait, "emit_url": f"{emit_url}?{urlencode({'event_name': wait.event_name})}"}
                for wait in detail.waits
            ],
            "retry_url": self.task_url(queue, detail.task_id, "retry"),
            "cancel_url": self.task_url(queue, detail.task_id, "cancel"),
            "emit_task_url": emit_url,
            "workers": worker_links(request, claimed_by, self.admin_site.name),
            "timeline": timeline(detail, timezone.now()),
            "finished": detail.state in FINISHED_STATES,  # the live refresh stops
            "events_url": task_events_url(detail.task_id),
        }
        return TemplateResponse(request, f"{TEMPLATE_DIR}/task_detail.html", context)

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        """Admin-log links carry only the task id: find its queue and go to the task."""
        require(request, VIEW_PERM)
        task_id = parse_uuid(object_id)
        located = locate_task(task_id) if task_id is not None else None
        if task_id is None or located is None:
            raise Http404(f"There is no task {object_id} in any queue (it may have been cleaned up).")
        return HttpResponseRedirect(self.task_url(located[0], task_id))

    def overview_view(self, request: HttpRequest) -> HttpResponse:
        require(request, VIEW_PERM)
        if not is_live_refresh(request):  # said once, when the page is opened; a refresh shows only the table
            warn_about_queues_without_tables(request, queue_catalog())
        list_url = self.page_url("changelist")
        items = [
            {
                "queue": item,
                "url": f"{list_url}?{urlencode({'queue': item.queue})}",
                "states": [
                    {
                        "state": state,
                        "count": count,
                        "url": f"{list_url}?{urlencode({'queue': item.queue, 'state': state})}",
                    }
                    for state, count in item.state_counts
                ],
            }
            for item in overview()
        ]
        context = {**self.page_context(request, "Absurd overview"), "items": items, "states": STATES}
        return TemplateResponse(request, f"{TEMPLATE_DIR}/overview.html", context)

    def charts_view(self, request: HttpRequest) -> HttpResponse:
        """Runs over time per queue (``charts``), with each queue's depth and oldest waiting task."""
        require(request, VIEW_PERM)
        queues = overview()
        charts = {item.queue: item for item in queue_charts(queues[0].now)} if queues else {}
        items = [{"queue": item, "charts": charts.get(item.queue)} for item in queues]
        context = {**self.page_context(request, "Runs over time"), "items": items}
        return TemplateResponse(request, f"{TEMPLATE_DIR}/charts.html", context)


class AbsurdOverviewAdmin(AbsurdAdminBase):
    """A second entry on the admin index, leading to the overview (guarded by the task view permission)."""

    def has_module_permission(self, request: HttpRequest) -> bool:
        return user_can(request, VIEW_PERM)

    def get_urls(self) -> list[URLPattern]:  # type: ignore[override]
        task_admin = self.admin_site.get_model_admin(AbsurdTask)
        assert isinstance(task_admin, AbsurdTaskAdmin)
        name = f"{self.opts.app_label}_{self.opts.model_name}_changelist"
        return [path("", self.admin_site.admin_view(task_admin.overview_view), name=name)]
