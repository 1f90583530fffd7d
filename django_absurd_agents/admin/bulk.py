"""Bulk actions of the task list: retry or cancel the selected tasks together.

The list posts the selected tasks (``<task id>:<queue>``) and the action's name here. The first POST
shows one confirmation page (which tasks the action applies to, which it leaves alone and why); the
second, carrying ``confirm``, acts on each task in its own transaction and writes one admin-log
entry per task, as the single-task actions do. The action's permission is checked on top of the view
permission before any query; a GET changes nothing and goes back to the list.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from django import forms
from django.contrib import messages
from django.db import DatabaseError, transaction
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse

from django_absurd_agents.admin.actions import AbsurdTaskActions, log_action, refusal, retry_and_log, task_label
from django_absurd_agents.admin.base import TEMPLATE_DIR
from django_absurd_agents.admin.forms import BulkRetryForm, CancelForm
from django_absurd_agents.admin.permissions import CANCEL_PERM, RETRY_PERM, VIEW_PERM, require, user_can
from django_absurd_agents.client import absurd
from django_absurd_agents.tables import ACTIVE_STATES, connection
from django_absurd_agents.task_list import TaskRow, tasks_by_id
from django_absurd_agents.validation import parse_uuid

MAX_SELECTED = 500
"""At most this many tasks in one bulk action (a page of the list holds 50)."""


@dataclass(frozen=True)
class BulkAction:
    name: str
    permission: str
    label: str
    applies_to: tuple[str, ...]
    refusal: str


BULK_ACTIONS = {
    "retry": BulkAction("retry", RETRY_PERM, "Retry the selected failed tasks", ("failed",), "only failed tasks"),
    "cancel": BulkAction(
        "cancel", CANCEL_PERM, "Cancel the selected tasks", ACTIVE_STATES, "only pending, running or sleeping tasks"
    ),
}


def bulk_choices(request: HttpRequest) -> list[tuple[str, str]]:
    """The bulk actions this user may take, for the list's action menu (empty: no checkboxes)."""
    return [(action.name, action.label) for action in BULK_ACTIONS.values() if user_can(request, action.permission)]


def selection(values: list[str]) -> list[tuple[str, uuid.UUID]]:
    """``(queue, task id)`` of each well-formed ``<task id>:<queue>`` value, in order, without repeats."""
    picked: dict[tuple[str, uuid.UUID], None] = {}
    for value in values[: MAX_SELECTED * 2]:
        task_text, _, queue = value.partition(":")
        task_id = parse_uuid(task_text)
        if task_id is not None and queue:
            picked[(queue, task_id)] = None
    return list(picked)[:MAX_SELECTED]


class AbsurdTaskBulkActions(AbsurdTaskActions):
    def bulk_view(self, request: HttpRequest) -> HttpResponse:
        require(request, VIEW_PERM)
        action = BULK_ACTIONS.get(request.POST.get("bulk_action", "")) if request.method == "POST" else None
        if action is None:
            return HttpResponseRedirect(self.page_url("changelist"))
        require(request, VIEW_PERM, action.permission)
        selected = selection(request.POST.getlist("task"))
        if not selected:
            messages.warning(request, "Select one or more tasks first.")
            return HttpResponseRedirect(self.page_url("changelist"))
        tasks = tasks_by_id(selected)
        applicable = [task for task in tasks if task.state in action.applies_to]
        confirmed = "confirm" in request.POST
        form: forms.Form
        if action.name == "retry":
            form = BulkRetryForm(request.POST if confirmed else None)
        else:
            form = CancelForm(request.POST if confirmed else None)
        if confirmed and form.is_valid() and applicable:
            self._apply(request, action, applicable, form)
            return HttpResponseRedirect(self.page_url("changelist"))
        context = {
            **self.page_context(request, f"{action.label[:1].upper()}{action.label[1:]}"),
            "action": action,
            "form": form,
            "applicable": [{"row": task, "url": self.task_url(task.queue, task.task_id)} for task in applicable],
            "skipped": [
                {"row": task, "url": self.task_url(task.queue, task.task_id)}
                for task in tasks
                if task.state not in action.applies_to
            ],
            "missing": len(selected) - len(tasks),
        }
        return TemplateResponse(request, f"{TEMPLATE_DIR}/bulk_confirm.html", context)

    def _apply(self, request: HttpRequest, action: BulkAction, tasks: list[TaskRow], form: forms.Form) -> None:
        done, refused = 0, []
        for task in tasks:
            try:
                with transaction.atomic(using=connection().alias):
                    if action.name == "retry":
                        data = form.cleaned_data
                        spawn_new, extra = data["mode"] == "new", int(data["extra_attempts"])
                        retry_and_log(request, task, spawn_new, extra, note="bulk action")
                    else:
                        absurd.cancel_task_sync(task.task_id, queue_name=task.queue)
                        log_action(
                            request, task.task_id, task_label(task), f"Cancelled (was {task.state}; bulk action)."
                        )
            except DatabaseError as exc:
                refused.append(f"{task.task_id}: {refusal(exc)}")
            else:
                done += 1
        verb = "retried" if action.name == "retry" else "cancelled"
        messages.success(request, f"{done} task{'s' if done != 1 else ''} {verb}.")
        if refused:
            messages.error(request, f"Absurd refused {len(refused)}: " + "; ".join(refused))
