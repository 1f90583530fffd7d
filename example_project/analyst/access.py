"""Who may follow a task's events live: ``ABSURD_AGENTS["EVENTS_ACCESS"]`` in the settings points here.

The report pages are public in this example (anyone may ask for a report and watch it being
written), so the events of a report's task are readable by anyone; everything else keeps the app's
rule (the conversation's owner, or a user who may view tasks in the admin).
"""

from __future__ import annotations

from django.http import HttpRequest

from analyst.models import ReportRequest
from django_absurd_agents.event_access import default_rule


async def can_read_events(request: HttpRequest, task_id: str) -> bool:
    if await ReportRequest.objects.filter(task_id=task_id).aexists():
        return True
    return await default_rule(request, task_id)
