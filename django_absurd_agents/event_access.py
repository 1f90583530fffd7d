"""Who may read a task's event log over HTTP, decided before the task or its log is read.

The built-in rule: an active user with the view permission on Absurd tasks (``absurd_agents.view_absurdtask``,
what the admin's task pages need), or the owner of the conversation whose turn the task is. A project
replaces it with ``ABSURD_AGENTS["EVENTS_ACCESS"]``: a callable, or its dotted path, taking the request
and the task id (a string) and returning a bool (sync callables run in a thread, so they may use the ORM;
async ones are awaited).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest
from django.utils.module_loading import import_string

from django_absurd_agents import conf

VIEW_PERMISSION = "absurd_agents.view_absurdtask"


def configured_rule() -> Callable[..., Any] | None:
    rule = conf.user_settings().get("EVENTS_ACCESS")
    if rule is None:
        return None
    if isinstance(rule, str):
        try:
            rule = import_string(rule)
        except ImportError as exc:
            raise ImproperlyConfigured(f"ABSURD_AGENTS['EVENTS_ACCESS'] = {rule!r} cannot be imported: {exc}") from exc
    if not callable(rule):
        raise ImproperlyConfigured(
            "ABSURD_AGENTS['EVENTS_ACCESS'] must be a callable (or its dotted path) taking (request, task_id) and "
            f"returning a bool; it is {rule!r}."
        )
    return rule


async def may_read_events(request: HttpRequest, task_id: str) -> bool:
    """Whether the request's user may read the event log of task ``task_id``."""
    rule = configured_rule()
    if rule is None:
        return await default_rule(request, task_id)
    if inspect.iscoroutinefunction(rule):
        result = await rule(request, task_id)
    else:
        result = await sync_to_async(rule)(request, task_id)
        if inspect.isawaitable(result):
            result = await result
    return bool(result)


async def _active_user(request: HttpRequest) -> Any:
    """The request's user when logged in and active, else None."""
    user = await request.auser()
    return user if user.is_authenticated and user.is_active else None


async def may_read_any(request: HttpRequest) -> bool:
    """False when the rule refuses this request every log (the built-in rule, an anonymous or inactive user).

    Lets a view refuse such a request before it reads anything to learn which task is asked for.
    """
    return configured_rule() is not None or await _active_user(request) is not None


async def default_rule(request: HttpRequest, task_id: str) -> bool:
    user = await _active_user(request)
    if user is None:
        return False
    if await user.ahas_perm(VIEW_PERMISSION):
        return True
    return await owns_turn_of(user, task_id)


async def owns_turn_of(user: Any, task_id: str) -> bool:
    """Whether ``task_id`` is the task of a turn of one of ``user``'s conversations."""
    from django_absurd_agents.models import Turn

    alias = conf.get().database_alias
    return await Turn.objects.using(alias).filter(task_id=task_id, conversation__owner=user).aexists()
