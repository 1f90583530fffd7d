"""Server-Sent Events of a task's event log: ``GET /agents/tasks/<task_id>/events``.

One SSE event per log entry: ``id:`` its offset, ``event:`` its kind (pydantic-ai's ``event_kind``,
``attempt`` for a marker, ``end`` for the last one, which has no id), ``data:`` its JSON. A browser's
``EventSource`` reconnects by itself and sends ``Last-Event-ID``; ``?after=<offset>`` does the same
for a first connection. While nothing happens a comment line keeps proxies from closing the stream.

Under ASGI the response is an async iterator on the server's event loop (the readers of a process
share one ``LISTEN`` connection). Under WSGI (``runserver``) it is a sync iterator that runs the same
reader in an event loop of its own, a thread per stream: a development convenience.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, StreamingHttpResponse
from django.http.response import HttpResponseBase

from django_absurd_agents.client import absurd
from django_absurd_agents.event_stream import END, LoggedEvent, follow, iterate_in_own_loop

KEEPALIVE_SECONDS = 15.0
RETRY_MILLISECONDS = 1000
"""How soon a browser reconnects after the stream broke (sent once, in the ``retry:`` field)."""


def encode(entry: LoggedEvent) -> str:
    data = json.dumps(entry.data, ensure_ascii=False, separators=(",", ":"))
    if entry.kind == END:  # no id: a reconnect resumes after the last real entry
        return f"event: {END}\ndata: {data}\n\n"
    return f"id: {entry.offset}\nevent: {entry.kind}\ndata: {data}\n\n"


def resume_offset(request: HttpRequest) -> int | HttpResponse | None:
    """The offset to resume after: ``Last-Event-ID`` first, then ``?after=``; a 400 response when malformed."""
    raw = request.headers.get("Last-Event-ID") or request.GET.get("after")
    if raw is None or raw == "":
        return None
    if not raw.isdigit():
        return HttpResponseBadRequest("Last-Event-ID and ?after= take an event offset, an integer >= 0.")
    return int(raw)


async def sse_lines(
    task_id: str, after: int | None, keepalive: float = KEEPALIVE_SECONDS, *, queue: str | None = None
) -> AsyncIterator[str]:
    """The stream's lines; ``queue``: the task's, when the view has located it (``event_stream.follow``)."""
    yield f"retry: {RETRY_MILLISECONDS}\n\n"
    async for entry in follow(task_id, after, keepalive=keepalive, queue=queue):
        yield ": keep-alive\n\n" if entry is None else encode(entry)


def streaming(request: HttpRequest, make: Callable[[], AsyncIterator[str]], content_type: str) -> StreamingHttpResponse:
    """A streaming response that streams under ASGI and WSGI alike (Django buffers the other kind of iterator)."""
    content: AsyncIterator[str] | Iterator[Any] = (
        make() if isinstance(request, ASGIRequest) else iterate_in_own_loop(make)
    )
    response = StreamingHttpResponse(content, content_type=content_type)
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    return response


async def task_events_response(request: HttpRequest, task_id: str) -> HttpResponseBase:
    """The SSE response for a task whose access was granted: 404 for an unknown task, 400 for a bad offset."""
    after = resume_offset(request)
    if isinstance(after, HttpResponse):
        return after
    try:
        located = await absurd.locate_task(task_id)
    finally:
        if not isinstance(request, ASGIRequest):  # this loop ends with the view (WSGI): close its connection
            await absurd.close()
    if located is None:
        return HttpResponse("No such task.", status=404, content_type="text/plain")
    queue = located[0]  # located once: the stream reads the task's state in this queue
    return streaming(request, lambda: sse_lines(task_id, after, queue=queue), "text/event-stream")
