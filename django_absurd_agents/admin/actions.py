"""The task admin's actions: retry, cancel and emit, as ``ModelAdmin`` views.

None changes anything on GET: GET shows a confirmation page, the POST (CSRF-checked by Django's
middleware) acts through the client on Django's connection, writes an entry to Django's admin log and
redirects. Each checks its own permission on top of the view permission, before any query runs.
"""

from __future__ import annotations

import uuid
from typing import Any, Protocol

from django import forms
from django.contrib import messages
from django.contrib.admin.models import ADDITION, CHANGE, LogEntry
from django.contrib.contenttypes.models import ContentType
from django.db import DatabaseError, transaction
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse

from django_absurd_agents import conf
from django_absurd_agents.admin.base import TEMPLATE_DIR, AbsurdAdminBase, load_task
from django_absurd_agents.admin.forms import CancelForm, EmitForm, RetryForm
from django_absurd_agents.admin.permissions import CANCEL_PERM, EMIT_PERM, RETRY_PERM, VIEW_PERM, require
from django_absurd_agents.client import absurd
from django_absurd_agents.models import AbsurdTask
from django_absurd_agents.tables import connection, list_queues
from django_absurd_agents.task_records import TaskDetail, event, waiting_tasks


def log_action(request: HttpRequest, object_id: str | None, object_repr: str, message: str, flag: int = CHANGE) -> None:
    """An entry in Django's admin log, linked to the task (``object_id``) when there is one."""
    LogEntry.objects.create(
        user_id=request.user.pk,
        content_type_id=ContentType.objects.get_for_model(AbsurdTask, for_concrete_model=False).pk,
        object_id=object_id,
        object_repr=object_repr[:200],
        action_flag=flag,
        change_message=message,
    )


class RetriedTask(Protocol):
    """What a retry needs of a task: a task page's ``TaskDetail`` or a list row's ``TaskRow``."""

    @property
    def queue(self) -> str: ...
    @property
    def task_id(self) -> Any: ...
    @property
    def task_name(self) -> str: ...
    @property
    def attempts(self) -> int: ...


def task_label(task: RetriedTask) -> str:
    return f"{task.task_name} {task.task_id}"


def retry_and_log(
    request: HttpRequest, task: RetriedTask, spawn_new: bool, extra: int, note: str = ""
) -> tuple[Any, int]:
    """Retry ``task`` (in place, or as a new task) and record it in the admin log; returns (result, max attempts).

    The one retry of the admin: the task page's action and the bulk action both go through it; ``note``
    marks the log entries of the bulk action.
    """
    max_attempts = extra if spawn_new else task.attempts + extra
    result = absurd.retry_task_sync(task.task_id, max_attempts=max_attempts, spawn_new=spawn_new, queue_name=task.queue)
    if not spawn_new:
        suffix = f" ({note})" if note else ""
        log_action(
            request,
            task.task_id,
            task_label(task),
            f"Retried in place: attempt {result['attempt']} of {max_attempts}{suffix}.",
        )
        return result, max_attempts
    new_id = str(result["task_id"])
    suffix = f"; {note}" if note else ""
    log_action(
        request, task.task_id, task_label(task), f"Retried as new task {new_id} (max attempts {max_attempts}{suffix})."
    )
    spawned = f"Spawned as a retry of task {task.task_id}."
    log_action(request, new_id, f"{task.task_name} {new_id}", spawned, flag=ADDITION)
    return result, max_attempts


def refusal(exc: DatabaseError) -> str:
    """What PostgreSQL (Absurd's functions) said when it refused an action."""
    text = getattr(getattr(exc.__cause__, "diag", None), "message_primary", None) or str(exc)
    return str(text).strip()


class AbsurdTaskActions(AbsurdAdminBase):
    def confirm_page(
        self,
        request: HttpRequest,
        action: str,
        task: TaskDetail | None,
        form: forms.Form,
        *,
        title: str,
        button: str,
        running: bool = False,
    ) -> HttpResponse:
        context = {
            **self.page_context(request, title),
            "action": action,
            "task": task,
            "task_url": self.task_url(task.queue, task.task_id) if task else None,
            "form": form,
            "button": button,
            "running": running,
        }
        return TemplateResponse(request, f"{TEMPLATE_DIR}/confirm_action.html", context)

    def retry_view(self, request: HttpRequest, queue: str, task_id: uuid.UUID) -> HttpResponse:
        require(request, VIEW_PERM, RETRY_PERM)
        detail = load_task(queue, task_id)
        form = RetryForm(request.POST if request.method == "POST" else None)
        if not detail.can_retry:
            messages.error(request, f"Only a failed task can be retried; this one is {detail.state}.")
            return HttpResponseRedirect(self.task_url(queue, detail.task_id))
        if request.method == "POST" and form.is_valid():
            spawn_new = form.cleaned_data["mode"] == "new"
            try:
                with transaction.atomic(using=connection().alias):
                    result, _ = retry_and_log(request, detail, spawn_new, int(form.cleaned_data["extra_attempts"]))
            except DatabaseError as exc:
                form.add_error(None, f"Absurd refused the retry: {refusal(exc)}")
            else:
                return self._retried(request, detail, result, spawn_new)
        title = f"Retry {detail.task_name}"
        return self.confirm_page(request, "retry", detail, form, title=title, button="Yes, retry")

    def _retried(self, request: HttpRequest, detail: TaskDetail, result: Any, spawn_new: bool) -> HttpResponse:
        if not spawn_new:
            messages.success(request, f"Task {detail.task_id} will run again (attempt {result['attempt']}).")
            return HttpResponseRedirect(self.task_url(detail.queue, detail.task_id))
        new_id = str(result["task_id"])
        messages.success(request, f"Spawned task {new_id} as a retry of {detail.task_id}.")
        return HttpResponseRedirect(self.task_url(detail.queue, new_id))

    def cancel_view(self, request: HttpRequest, queue: str, task_id: uuid.UUID) -> HttpResponse:
        require(request, VIEW_PERM, CANCEL_PERM)
        detail = load_task(queue, task_id)
        if not detail.can_cancel:
            messages.error(
                request, f"Only a pending, running or sleeping task can be cancelled; this one is {detail.state}."
            )
            return HttpResponseRedirect(self.task_url(queue, detail.task_id))
        form = CancelForm(request.POST if request.method == "POST" else None)
        if request.method == "POST" and form.is_valid():
            try:
                with transaction.atomic(using=connection().alias):
                    absurd.cancel_task_sync(detail.task_id, queue_name=queue)
            except DatabaseError as exc:
                form.add_error(None, f"Absurd refused the cancellation: {refusal(exc)}")
            else:
                log_action(request, detail.task_id, task_label(detail), f"Cancelled (was {detail.state}).")
                messages.success(request, f"Task {detail.task_id} is cancelled.")
                return HttpResponseRedirect(self.task_url(queue, detail.task_id))
        title, button = f"Cancel {detail.task_name}", "Yes, cancel the task"
        return self.confirm_page(
            request, "cancel", detail, form, title=title, button=button, running=detail.state == "running"
        )

    def emit_view(
        self, request: HttpRequest, queue: str | None = None, task_id: uuid.UUID | None = None
    ) -> HttpResponse:
        require(request, VIEW_PERM, EMIT_PERM)
        detail = load_task(queue, task_id) if queue is not None and task_id is not None else None
        queues = list_queues()
        if request.method == "POST":
            form = EmitForm(request.POST, queues=queues)
        else:
            form = EmitForm(initial=self._emit_initial(request, queue, detail), queues=queues)
        if request.method == "POST" and form.is_valid():
            event_queue, name = form.cleaned_data["queue"], form.cleaned_data["event_name"]
            before = event(event_queue, name)
            waiting = waiting_tasks(event_queue, name)
            try:
                with transaction.atomic(using=connection().alias):
                    absurd.emit_event_sync(name, form.cleaned_data["payload"], queue_name=event_queue)
            except DatabaseError as exc:
                form.add_error(None, f"Absurd refused the event: {refusal(exc)}")
            except ValueError as exc:  # the client's own checks (params limits, queue names), before any SQL
                form.add_error(None, f"The event was refused: {exc}")
            else:
                ignored = before is not None and before.emitted
                return self._emitted(request, detail, event_queue, name, waiting, ignored)
        title = "Emit an event" if detail is None else f"Emit an event for {detail.task_name}"
        return self.confirm_page(request, "emit", detail, form, title=title, button="Emit the event")

    def _emit_initial(self, request: HttpRequest, queue: str | None, detail: TaskDetail | None) -> dict[str, Any]:
        initial = {"queue": queue or request.GET.get("queue") or conf.get().default_queue}
        if request.GET.get("event_name"):
            initial["event_name"] = request.GET["event_name"]
        elif detail is not None and detail.waits:
            initial["event_name"] = detail.waits[0].event_name
        return initial

    def _emitted(
        self,
        request: HttpRequest,
        detail: TaskDetail | None,
        queue: str,
        name: str,
        waiting: list[tuple[str, str]],
        ignored: bool,
    ) -> HttpResponse:
        if ignored:
            note = "it had been emitted before, so this emit was ignored (the first emit wins)"
            messages.warning(request, f"Event {name!r} on queue {queue!r}: {note}.")
        else:
            note = f"woke {len(waiting)} waiting task(s)"
            messages.success(request, f"Emitted {name!r} on queue {queue!r}; {note}.")
        message = f"Emitted event {name!r} on queue {queue!r}: {note}."
        if detail is not None:
            log_action(request, detail.task_id, task_label(detail), message)
            return HttpResponseRedirect(self.task_url(detail.queue, detail.task_id))
        log_action(request, None, f"event {name} on {queue}", message)
        if len(waiting) == 1:
            return HttpResponseRedirect(self.task_url(queue, waiting[0][0]))
        return HttpResponseRedirect(self.page_url("changelist"))
