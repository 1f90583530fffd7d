"""Who may see and do what in the task admin: four permissions on ``AbsurdTask``, checked per request.

Task params and results may hold personal data, so every page checks the view permission before any
query runs, and every action its own permission on top of it.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied
from django.http import HttpRequest

from django_absurd_agents.event_access import VIEW_PERMISSION

VIEW_PERM = VIEW_PERMISSION
"""Defined once, in ``event_access``: the event log's rule grants what the task pages need."""
RETRY_PERM = "absurd_agents.retry_absurdtask"
CANCEL_PERM = "absurd_agents.cancel_absurdtask"
EMIT_PERM = "absurd_agents.emit_absurdevent"
WORKER_VIEW_PERM = "absurd_agents.view_worker"
"""The worker list's own permission (``Worker`` is a model with a table; its only permission is view)."""


def user_can(request: HttpRequest, *perms: str) -> bool:
    """Whether the request's user holds every one of ``perms`` (directly or through a group)."""
    user: Any = request.user
    return bool(user.has_perms(perms))


def require(request: HttpRequest, *perms: str) -> None:
    """403 unless the user holds every one of ``perms``."""
    if not user_can(request, *perms):
        raise PermissionDenied
