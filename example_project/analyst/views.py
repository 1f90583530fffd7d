"""The analyst's pages: ask for a report, watch it being written, chat.

``ask``, ``status`` and the chat views are plain sync views, the way most Django code is written:
spawns happen on Django's own connection inside the request's transaction. ``report_progress`` is
the status page's data as JSON from an async view, to show that style too. The pages follow a running
task live through the app's Server-Sent Events view (``/agents/tasks/<id>/events``, read by
``static/analyst/live.js``) instead of refreshing.
"""

from __future__ import annotations

import uuid

from asgiref.sync import sync_to_async
from django.contrib.auth.decorators import login_required
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from analyst.forms import AskForm, ChatForm
from analyst.market import COMPANIES
from analyst.models import ReportRequest
from analyst.reports import Progress, load_progress, reports_for, request_report
from django_absurd_agents import absurd
from django_absurd_agents.models import Conversation, Turn

CHAT_AGENT = "analyst_chat"


def ask(request: HttpRequest) -> HttpResponse:
    form = AskForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        report_request = request_report(form.cleaned_data["company"], form.cleaned_data["question"])
        return redirect(report_request)
    recent = ReportRequest.objects.all()[:10]
    return render(request, "analyst/ask.html", {"form": form, "recent": recent})


def status(request: HttpRequest, pk: int) -> HttpResponse:
    report_request = get_object_or_404(ReportRequest, pk=pk)
    progress = load_progress(str(report_request.task_id)) if report_request.task_id else None
    context = {
        "report_request": report_request,
        "progress": progress,
        "reports": reports_for(str(report_request.task_id)) if report_request.task_id else [],
    }
    return render(request, "analyst/status.html", context)


async def report_progress(request: HttpRequest, pk: int) -> JsonResponse:
    """The status page's data as JSON, from an async view.

    The ORM and the progress API (``absurd.task_progress``) have async methods; ``reports_for`` is sync
    code, so it goes through ``sync_to_async`` like any other sync database code in an async view.
    """
    try:
        report_request = await ReportRequest.objects.aget(pk=pk)
    except ReportRequest.DoesNotExist:
        raise Http404("No such report request") from None
    task = await absurd.task_progress(report_request.task_id) if report_request.task_id else None
    if task is None:
        raise Http404("The report's task no longer exists")
    reports = await sync_to_async(reports_for)(task.task_id)
    data = Progress.of(task).as_json()
    data["reports"] = [{"id": r.pk, "title": r.title, "summary": r.summary} for r in reports]
    return JsonResponse(data)


def own_conversations(request: HttpRequest) -> QuerySet[Conversation]:
    """The user's conversations with the chat analyst: another user's id is a 404, not a leak."""
    mine: QuerySet[Conversation] = Conversation.objects.for_user(request.user)  # type: ignore[attr-defined]
    return mine.filter(agent=CHAT_AGENT)


@login_required(login_url="admin:login")
def chats(request: HttpRequest) -> HttpResponse:
    conversations = own_conversations(request)[:20]
    return render(request, "analyst/chats.html", {"conversations": conversations})


@login_required(login_url="admin:login")
@require_POST
def new_chat(request: HttpRequest) -> HttpResponse:
    conversation = Conversation.objects.create(agent=CHAT_AGENT, owner=request.user, title="Chat with the analyst")
    return redirect("analyst:chat", pk=conversation.pk)


@login_required(login_url="admin:login")
def chat(request: HttpRequest, pk: uuid.UUID) -> HttpResponse:
    """A conversation: each message sent is a turn, answered by a durable task; live.js streams the answer."""
    conversation = get_object_or_404(own_conversations(request), pk=pk)
    form = ChatForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        conversation.send(form.cleaned_data["message"])
        return redirect("analyst:chat", pk=conversation.pk)
    turns = list(Turn.objects.filter(conversation=conversation).order_by("sequence"))
    context = {"conversation": conversation, "turns": turns, "form": form, "companies": COMPANIES}
    return render(request, "analyst/chat.html", context)
