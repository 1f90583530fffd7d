"""The app's views: a task's event log as Server-Sent Events, and a conversation's ``useChat`` endpoint.

Mounted with ``path("agents/", include("django_absurd_agents.urls"))``. Both are async views: under
ASGI their streams run on the server's event loop; under WSGI (``runserver``) they still stream, with
a thread per open stream (see ``sse.py``).
"""

from __future__ import annotations

import uuid

from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed
from django.http.response import HttpResponseBase

from django_absurd_agents import chat
from django_absurd_agents.event_access import may_read_events
from django_absurd_agents.sse import task_events_response


async def task_events(request: HttpRequest, task_id: uuid.UUID) -> HttpResponseBase:
    """``GET /agents/tasks/<task_id>/events``: the task's event log, live (see ``sse.py``)."""
    if request.method not in ("GET", "HEAD"):
        return HttpResponseNotAllowed(["GET"])
    # Access is decided before the task or its log is read: a stranger learns nothing, not even whether it exists.
    if not await may_read_events(request, str(task_id)):
        return HttpResponse("You may not read this task's events.", status=403, content_type="text/plain")
    return await task_events_response(request, str(task_id))


async def conversation_chat(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponseBase:
    """``POST``/``GET /agents/conversations/<id>/chat``: the Vercel AI ``useChat`` protocol (see ``chat.py``)."""
    if request.method == "POST":
        return await chat.post(request, conversation_id)
    if request.method == "GET":
        return await chat.get(request, conversation_id)
    return HttpResponseNotAllowed(["GET", "POST"])
