"""Durable Pydantic AI agent runs for Django, on Postgres alone, through Absurd.

Names are exported lazily so that ``settings.py`` can import ``database_config`` before Django is
set up.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from django_absurd_agents.agent import AbsurdAgent
    from django_absurd_agents.client import ProjectAbsurd, absurd
    from django_absurd_agents.conversation_store import DjangoConversationStore
    from django_absurd_agents.conversations import register_chat_agent
    from django_absurd_agents.database import database_config
    from django_absurd_agents.durability import AbsurdDurability
    from django_absurd_agents.exceptions import (
        AbsurdAgentsError,
        InvalidParams,
        TaskNotFound,
        UnknownQueue,
        UnrecordableStepResult,
    )
    from django_absurd_agents.external_events import (
        fail_external_event,
        fail_external_event_sync,
        resolve_external_event,
        resolve_external_event_sync,
    )

__all__ = [
    "AbsurdAgent",
    "AbsurdAgentsError",
    "AbsurdDurability",
    "DjangoConversationStore",
    "InvalidParams",
    "ProjectAbsurd",
    "TaskNotFound",
    "UnknownQueue",
    "UnrecordableStepResult",
    "absurd",
    "database_config",
    "fail_external_event",
    "fail_external_event_sync",
    "register_chat_agent",
    "resolve_external_event",
    "resolve_external_event_sync",
]

_EXPORTS = {
    "AbsurdAgent": "django_absurd_agents.agent",
    "AbsurdAgentsError": "django_absurd_agents.exceptions",
    "AbsurdDurability": "django_absurd_agents.durability",
    "DjangoConversationStore": "django_absurd_agents.conversation_store",
    "InvalidParams": "django_absurd_agents.exceptions",
    "ProjectAbsurd": "django_absurd_agents.client",
    "TaskNotFound": "django_absurd_agents.exceptions",
    "UnknownQueue": "django_absurd_agents.exceptions",
    "UnrecordableStepResult": "django_absurd_agents.exceptions",
    "absurd": "django_absurd_agents.client",
    "database_config": "django_absurd_agents.database",
    "fail_external_event": "django_absurd_agents.external_events",
    "fail_external_event_sync": "django_absurd_agents.external_events",
    "register_chat_agent": "django_absurd_agents.conversations",
    "resolve_external_event": "django_absurd_agents.external_events",
    "resolve_external_event_sync": "django_absurd_agents.external_events",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value
