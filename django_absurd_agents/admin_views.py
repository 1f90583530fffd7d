"""Views of the Absurd admin: task list, task detail, overview, and the retry/cancel/emit actions.

They are served by ``AbsurdTaskAdmin.get_urls`` (``admin.py``), behind ``admin_site.admin_view`` (a
logged-in staff user), and each one checks its own permission first: params and results may hold
personal data, so a user without ``absurd_agents.view_absurdtask`` gets a 403 before any query runs.
Actions change nothing on GET: GET shows a confirmation page, the POST (CSRF-checked by Django's
middleware) acts, writes an entry to Django's admin log and redirects.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import messages
from django.contrib.admin.models import ADDITION, CHANGE, LogEntry
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import PermissionDenied
from django.db import DatabaseError, transaction
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.http import urlencode

from django_absurd_agents import admin_filters, conf, queries, sdk, steps
from django_absurd_agents.client import absurd, django_connection
from django_absurd_agents.management.commands import _ops
from django_absurd_agents.models import AbsurdTask

if TYPE_CHECKING:
    from django_absurd_agents.admin import AbsurdTaskAdmin

VIEW_PERM = "absurd_agents.view_absurdtask"
RETRY_PERM = "absurd_agents.retry_absurdtask"
CANCEL_PERM = "absurd_agents.cancel_absurdtask"
EMIT_PERM = "absurd_agents.emit_absurdevent"

TEMPLATE_DIR = "admin/absurd_agents"


def user_can(request: HttpRequest, *perms: str) -> bool:
    """Whether the request's user holds every one of ``perms`` (directly or through a group)."""
    user: Any = request.user
    return bool(user.has_perms(perms))


def require(request: HttpRequest, *perms: str) -> None:
    """403 unless the user holds every one of ``perms``."""
    if not user_can(request, *perms):
        raise PermissionDenied


def _base_context(model_admin: AbsurdTaskAdmin, request: HttpRequest, title: str) -> dict[str, Any]:
    opts = model_admin.opts
    return {
        **model_admin.admin_site.each_context(request),
        "opts": opts,
        "app_label": opts.app_label,
        "title": title,
        "list_url": reverse(f"{model_admin.admin_site.name}:absurd_agents_absurdtask_changelist"),
        "overview_url": reverse(f"{model_admin.admin_site.name}:absurd_agents_absurdtask_overview"),
        "emit_url": reverse(f"{model_admin.admin_site.name}:absurd_agents_absurdtask_emit"),
        "can_retry": user_can(request, RETRY_PERM),
        "can_cancel": user_can(request, CANCEL_PERM),
        "can_emit": user_can(request, EMIT_PERM),
    }


def task_url(model_admin: AbsurdTaskAdmin, queue: str, task_id: str, action: str | None = None) -> str:
    name = "absurd_agents_absurdtask_detail" if action is None else f"absurd_agents_absurdtask_{action}"
    return reverse(f"{model_admin.admin_site.name}:{name}", kwargs={"queue": queue, "task_id": task_id})


# --- task list ----------------------------------------------------------------------------------


def _warn_about_queues_without_tables(request: HttpRequest, catalog: list[tuple[str, bool]]) -> None:
    for name, has_tables in catalog:
        if not has_tables:
            messages.warning(
                request,
                f"Queue {name!r} is listed in absurd.queues but its tables are missing, so it is left out. "
                f"Create them with absurd.create_queue({name!r}), or delete its row from absurd.queues.",
            )


def task_list(model_admin: AbsurdTaskAdmin, request: HttpRequest) -> HttpResponse:
    require(request, VIEW_PERM)
    catalog = queries.queue_catalog()
    _warn_about_queues_without_tables(request, catalog)
    queues = [name for name, has_tables in catalog if has_tables]
    queue = request.GET.get("queue") or None
    state = request.GET.get("state") or None
    if state is not None and state not in queries.STATES:
        state = None
    task_name = request.GET.get("task_name") or None
    search = (request.GET.get("q") or "").strip() or None
    created = admin_filters.created_range(request)
    unmatchable = admin_filters.unmatchable_filters(search=search, task_name=task_name)
    for problem in [*created.problems, *unmatchable]:
        messages.warning(request, problem)
    filters = queries.TaskFilters(
        queue=queue,
        state=state,
        task_name=task_name,
        created_since=created.since,
        created_before=created.until,
        search=search,
    )
    missing_queue = queue is not None and queue not in queues
    after = queries.parse_uuid(request.GET.get("after"))
    before = queries.parse_uuid(request.GET.get("before"))
    if unmatchable:  # PostgreSQL would refuse the text; no task could match it anyway
        page = queries.TaskPage(rows=[], has_next=False, has_previous=False, total=0, queues=queues)
    else:
        page = queries.task_page(filters, after=after, before=before, per_page=model_admin.list_per_page)
    settings = conf.get()
    known_names = [*sdk.registry(absurd), *settings.task_routes]
    names = queries.task_names([queue] if queue and not missing_queue else None, known=known_names)
    if task_name and task_name not in names:
        names.append(task_name)
    group, qs = admin_filters.filter_group, admin_filters.querystring
    filter_groups = [
        group(request, "By queue", "queue", [(q, q) for q in queues]),
        group(request, "By state", "state", [(s, s) for s in queries.STATES]),
        group(request, "By task name", "task_name", [(n, n) for n in names]),
        group(request, "By created", "created", [(k, v[0]) for k, v in admin_filters.CREATED_PRESETS.items()]),
    ]
    context = {
        **_base_context(model_admin, request, "Absurd tasks"),
        "page": page,
        "total_text": f"{page.total:,}" if page.total is not None else None,
        "rows": [
            {
                "row": row,
                "url": task_url(model_admin, row.queue, row.task_id),
                "duration": steps.format_duration(row.last_run_duration),
            }
            for row in page.rows
        ],
        "queues": queues,
        "filters": filters,
        "filter_groups": filter_groups,
        "search": search or "",
        "missing_queue": queue if missing_queue else None,
        "created_since": request.GET.get("created_since", ""),
        "created_until": request.GET.get("created_until", ""),
        "hidden_params": [
            (key, value)
            for key, value in request.GET.items()
            if key not in {"q", "after", "before", "created_since", "created_until"}
        ],
        "date_hidden_params": [
            (key, value)
            for key, value in request.GET.items()
            if key not in {"after", "before", "created", "created_since", "created_until"}
        ],
        "next_url": qs(request, after=page.next_cursor) if page.next_cursor else None,
        "previous_url": qs(request, before=page.previous_cursor) if page.previous_cursor else None,
        "first_url": qs(request) if page.has_previous else None,
        "has_filters": filters.narrows_rows or queue is not None,
        "clear_url": "?",
    }
    return TemplateResponse(request, f"{TEMPLATE_DIR}/task_list.html", context)


# --- task detail --------------------------------------------------------------------------------


def _load_task(queue: str, task_id: uuid.UUID) -> queries.TaskDetail:
    detail = queries.task_detail(queue, task_id)
    if detail is None:
        if queue not in queries.list_queues():
            raise Http404(f"There is no queue {queue!r} (it may have been dropped).")
        raise Http404(f"There is no task {task_id} in queue {queue!r}.")
    return detail


def task_detail(model_admin: AbsurdTaskAdmin, request: HttpRequest, queue: str, task_id: uuid.UUID) -> HttpResponse:
    require(request, VIEW_PERM)
    detail = _load_task(queue, task_id)
    rendered = steps.render_steps(detail.checkpoints)
    attempts = {run.run_id: run.attempt for run in detail.runs}
    for step in rendered:
        step.owner_attempt = attempts.get(step.checkpoint.owner_run_id or "")
    context = {
        **_base_context(model_admin, request, f"{detail.task_name} {detail.task_id}"),
        "task": detail,
        "steps": rendered,
        "step_cards": [step.html(index) for index, step in enumerate(rendered, start=1)],
        "params_json": steps.pretty_json(detail.params),
        "headers_json": steps.pretty_json(detail.headers) if detail.headers is not None else None,
        "retry_strategy_json": steps.pretty_json(detail.retry_strategy) if detail.retry_strategy else None,
        "cancellation_json": steps.pretty_json(detail.cancellation) if detail.cancellation else None,
        "result_json": steps.pretty_json(detail.completed_payload) if detail.state == "completed" else None,
        "failure": detail.failure,
        "runs": [
            {
                "run": run,
                "duration": steps.format_duration(run.duration),
                "event_payload_json": steps.pretty_json(run.event_payload) if run.event_payload is not None else None,
                "failure_json": steps.pretty_json(run.failure_reason) if run.failure_reason is not None else None,
            }
            for run in detail.runs
        ],
        "waits": [
            {
                "wait": wait,
                "payload_json": steps.pretty_json(wait.payload) if wait.emitted else None,
                "emit_url": task_url(model_admin, queue, detail.task_id, "emit_task")
                + "?"
                + urlencode({"event_name": wait.event_name}),
            }
            for wait in detail.waits
        ],
        "retry_url": task_url(model_admin, queue, detail.task_id, "retry"),
        "cancel_url": task_url(model_admin, queue, detail.task_id, "cancel"),
        "emit_task_url": task_url(model_admin, queue, detail.task_id, "emit_task"),
    }
    return TemplateResponse(request, f"{TEMPLATE_DIR}/task_detail.html", context)


def log_entry_redirect(model_admin: AbsurdTaskAdmin, request: HttpRequest, object_id: str) -> HttpResponse:
    """Admin-log links carry only the task id: find its queue and go to the task."""
    require(request, VIEW_PERM)
    task_id = queries.parse_uuid(object_id)
    queue = queries.find_task_queue(task_id) if task_id is not None else None
    if task_id is None or queue is None:
        raise Http404(f"There is no task {object_id} in any queue (it may have been cleaned up).")
    return HttpResponseRedirect(task_url(model_admin, queue, str(task_id)))


# --- overview -----------------------------------------------------------------------------------


def overview(model_admin: AbsurdTaskAdmin, request: HttpRequest) -> HttpResponse:
    require(request, VIEW_PERM)
    _warn_about_queues_without_tables(request, queries.queue_catalog())
    list_url = reverse(f"{model_admin.admin_site.name}:absurd_agents_absurdtask_changelist")
    items = []
    for item in queries.overview():
        items.append(
            {
                "queue": item,
                "oldest_pending_age": steps.format_duration(item.oldest_pending_age),
                "url": list_url + "?" + urlencode({"queue": item.queue}),
                "states": [
                    {
                        "state": state,
                        "count": count,
                        "url": list_url + "?" + urlencode({"queue": item.queue, "state": state}),
                    }
                    for state, count in item.state_counts
                ],
            }
        )
    context = {
        **_base_context(model_admin, request, "Absurd overview"),
        "items": items,
        "states": queries.STATES,
    }
    return TemplateResponse(request, f"{TEMPLATE_DIR}/overview.html", context)


# --- actions ------------------------------------------------------------------------------------


def _log(request: HttpRequest, *, object_id: str | None, object_repr: str, flag: int, message: str) -> None:
    LogEntry.objects.create(
        user_id=request.user.pk,
        content_type_id=ContentType.objects.get_for_model(AbsurdTask, for_concrete_model=False).pk,
        object_id=object_id,
        object_repr=object_repr[:200],
        action_flag=flag,
        change_message=message,
    )


def _repr(detail: queries.TaskDetail) -> str:
    return f"{detail.task_name} {detail.task_id}"


def _db_error(exc: DatabaseError) -> str:
    cause = exc.__cause__
    text = getattr(getattr(cause, "diag", None), "message_primary", None) or str(exc)
    return str(text).strip()


class RetryForm(forms.Form):
    mode = forms.ChoiceField(
        choices=[
            ("in_place", "Retry this task in place, with more attempts"),
            ("new", "Spawn a new task with the same params"),
        ],
        initial="in_place",
        widget=forms.RadioSelect,
    )
    extra_attempts = forms.IntegerField(
        min_value=1,
        max_value=1000,
        initial=1,
        help_text="In place: how many attempts to add. New task: its max attempts.",
    )


class EmitForm(forms.Form):
    queue = forms.ChoiceField()
    event_name = forms.CharField(max_length=1000, widget=forms.TextInput(attrs={"size": 80}))
    payload = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 6, "cols": 80, "spellcheck": "false"}),
        initial="{}",
        help_text="JSON. The first emit of an event name wins; later emits of the same name are ignored.",
    )

    def __init__(self, *args: Any, queues: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["queue"].choices = [(q, q) for q in queues]  # type: ignore[attr-defined]

    def clean_event_name(self) -> str:
        name = str(self.cleaned_data["event_name"]).strip()
        if not name:
            raise forms.ValidationError("Give the event a name.")
        return name

    def clean_payload(self) -> Any:
        text = self.cleaned_data["payload"]
        try:
            return _ops.loads_storable_json(text)
        except _ops.UnstorableJSON as exc:
            raise forms.ValidationError(f"This JSON cannot be stored: {exc}") from exc
        except ValueError as exc:
            raise forms.ValidationError(f"This is not JSON: {exc}.") from exc


def _confirm(
    model_admin: AbsurdTaskAdmin,
    request: HttpRequest,
    *,
    title: str,
    action: str,
    task: queries.TaskDetail | None,
    form: forms.Form | None,
    button: str,
    extra: dict[str, Any] | None = None,
) -> HttpResponse:
    context = {
        **_base_context(model_admin, request, title),
        "action": action,
        "task": task,
        "task_url": task_url(model_admin, task.queue, task.task_id) if task else None,
        "form": form,
        "button": button,
        **(extra or {}),
    }
    return TemplateResponse(request, f"{TEMPLATE_DIR}/confirm_action.html", context)


def retry(model_admin: AbsurdTaskAdmin, request: HttpRequest, queue: str, task_id: uuid.UUID) -> HttpResponse:
    require(request, VIEW_PERM, RETRY_PERM)
    detail = _load_task(queue, task_id)
    form = RetryForm(request.POST if request.method == "POST" else None)
    if not detail.can_retry:
        messages.error(request, f"Only a failed task can be retried; this one is {detail.state}.")
        return HttpResponseRedirect(task_url(model_admin, queue, detail.task_id))
    if request.method == "POST" and form.is_valid():
        spawn_new = form.cleaned_data["mode"] == "new"
        extra = int(form.cleaned_data["extra_attempts"])
        max_attempts = extra if spawn_new else detail.attempts + extra
        try:
            with transaction.atomic(using=django_connection().alias):
                result = absurd.retry_task_sync(
                    detail.task_id, max_attempts=max_attempts, spawn_new=spawn_new, queue_name=queue
                )
        except DatabaseError as exc:
            form.add_error(None, f"Absurd refused the retry: {_db_error(exc)}")
        else:
            if spawn_new:
                new_id = str(result["task_id"])
                _log(
                    request,
                    object_id=detail.task_id,
                    object_repr=_repr(detail),
                    flag=CHANGE,
                    message=f"Retried as new task {new_id} (max attempts {max_attempts}).",
                )
                _log(
                    request,
                    object_id=new_id,
                    object_repr=f"{detail.task_name} {new_id}",
                    flag=ADDITION,
                    message=f"Spawned as a retry of task {detail.task_id}.",
                )
                messages.success(request, f"Spawned task {new_id} as a retry of {detail.task_id}.")
                return HttpResponseRedirect(task_url(model_admin, queue, new_id))
            _log(
                request,
                object_id=detail.task_id,
                object_repr=_repr(detail),
                flag=CHANGE,
                message=f"Retried in place: attempt {result['attempt']} of {max_attempts}.",
            )
            messages.success(request, f"Task {detail.task_id} will run again (attempt {result['attempt']}).")
            return HttpResponseRedirect(task_url(model_admin, queue, detail.task_id))
    return _confirm(
        model_admin,
        request,
        title=f"Retry {detail.task_name}",
        action="retry",
        task=detail,
        form=form,
        button="Yes, retry",
    )


class CancelForm(forms.Form):
    """Nothing to fill in: the POST itself (with its CSRF token) is the confirmation."""


def cancel(model_admin: AbsurdTaskAdmin, request: HttpRequest, queue: str, task_id: uuid.UUID) -> HttpResponse:
    require(request, VIEW_PERM, CANCEL_PERM)
    detail = _load_task(queue, task_id)
    if not detail.can_cancel:
        messages.error(
            request, f"Only a pending, running or sleeping task can be cancelled; this one is {detail.state}."
        )
        return HttpResponseRedirect(task_url(model_admin, queue, detail.task_id))
    form = CancelForm(request.POST if request.method == "POST" else None)
    if request.method == "POST" and form.is_valid():
        try:
            with transaction.atomic(using=django_connection().alias):
                absurd.cancel_task_sync(detail.task_id, queue_name=queue)
        except DatabaseError as exc:
            form.add_error(None, f"Absurd refused the cancellation: {_db_error(exc)}")
        else:
            _log(
                request,
                object_id=detail.task_id,
                object_repr=_repr(detail),
                flag=CHANGE,
                message=f"Cancelled (was {detail.state}).",
            )
            messages.success(request, f"Task {detail.task_id} is cancelled.")
            return HttpResponseRedirect(task_url(model_admin, queue, detail.task_id))
    return _confirm(
        model_admin,
        request,
        title=f"Cancel {detail.task_name}",
        action="cancel",
        task=detail,
        form=form,
        button="Yes, cancel the task",
        extra={"running": detail.state == "running"},
    )


def emit(
    model_admin: AbsurdTaskAdmin,
    request: HttpRequest,
    queue: str | None = None,
    task_id: uuid.UUID | None = None,
) -> HttpResponse:
    require(request, VIEW_PERM, EMIT_PERM)
    detail = _load_task(queue, task_id) if queue is not None and task_id is not None else None
    queues = queries.list_queues()
    if request.method == "POST":
        form = EmitForm(request.POST, queues=queues)
    else:
        initial = {"queue": queue or request.GET.get("queue") or conf.get().default_queue}
        if request.GET.get("event_name"):
            initial["event_name"] = request.GET["event_name"]
        elif detail is not None and detail.waits:
            initial["event_name"] = detail.waits[0].event_name
        form = EmitForm(initial=initial, queues=queues)
    if request.method == "POST" and form.is_valid():
        event_queue = form.cleaned_data["queue"]
        name = form.cleaned_data["event_name"]
        payload = form.cleaned_data["payload"]
        before = queries.event(event_queue, name)
        waiting = queries.waiting_tasks(event_queue, name)
        try:
            with transaction.atomic(using=django_connection().alias):
                absurd.emit_event_sync(name, payload, queue_name=event_queue)
        except DatabaseError as exc:
            form.add_error(None, f"Absurd refused the event: {_db_error(exc)}")
        except ValueError as exc:  # the client's own checks (params limits, queue names), before any SQL
            form.add_error(None, f"The event was refused: {exc}")
        else:
            if before is not None and before.emitted:
                note = "it had been emitted before, so this emit was ignored (the first emit wins)"
                messages.warning(request, f"Event {name!r} on queue {event_queue!r}: {note}.")
            else:
                note = f"woke {len(waiting)} waiting task(s)"
                messages.success(request, f"Emitted {name!r} on queue {event_queue!r}; {note}.")
            message = f"Emitted event {name!r} on queue {event_queue!r}: {note}."
            if detail is not None:
                _log(request, object_id=detail.task_id, object_repr=_repr(detail), flag=CHANGE, message=message)
                return HttpResponseRedirect(task_url(model_admin, detail.queue, detail.task_id))
            _log(request, object_id=None, object_repr=f"event {name} on {event_queue}", flag=CHANGE, message=message)
            if len(waiting) == 1:
                return HttpResponseRedirect(task_url(model_admin, event_queue, waiting[0][0]))
            return HttpResponseRedirect(reverse(f"{model_admin.admin_site.name}:absurd_agents_absurdtask_changelist"))
    return _confirm(
        model_admin,
        request,
        title="Emit an event" if detail is None else f"Emit an event for {detail.task_name}",
        action="emit",
        task=detail,
        form=form,
        button="Emit the event",
    )
