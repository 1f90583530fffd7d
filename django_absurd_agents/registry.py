"""Task name -> registration, as absurd-sdk keeps it, plus names found when a worker claims them.

``ProjectAbsurd`` keeps its registrations here instead of absurd-sdk's plain dict. A client and its
``for_queue`` clones share one store; each clone's view knows the queue it claims from. When a clone
is asked for a name nobody registered, the ``RESOLVERS`` are asked first, with that queue, before
the name counts as unknown: the ``django.tasks`` backend (``backends.py``) resolves ``@task``
functions by their import path there, so a ``@task`` runs on whichever of its queues it was
enqueued, without a registration per queue. Spawning never resolves (only clones' views do, and
spawns go through the project's client), so a web process imports nothing by name.
"""

from __future__ import annotations

from collections import UserDict
from collections.abc import Callable
from importlib import import_module
from typing import Any

Registration = dict[str, Any]

RESOLVERS: list[Callable[[str, str], Registration | None]] = []
"""Functions of (task name, queue) returning a registration for a name nobody registered, or None."""


class TaskRegistry(UserDict[str, Registration]):
    """Registrations by task name; ``for_queue`` gives a view on the same store for one queue."""

    def __init__(self, store: dict[str, Registration] | None = None, queue: str | None = None) -> None:
        super().__init__()
        if store is not None:
            self.data = store  # shared with the registry this view was made from
        self.queue = queue

    def for_queue(self, queue: str) -> TaskRegistry:
        return TaskRegistry(self.data, queue)

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        found = self.data.get(name)
        if found is None and self.queue is not None:
            for resolve in RESOLVERS:
                found = resolve(name, self.queue)
                if found is not None:
                    break
        return default if found is None else found


def load_resolvers() -> None:
    """Import the ``django.tasks`` backend when ``settings.TASKS`` uses it, so this process runs ``@task`` functions.

    A worker imports installed apps' ``tasks`` modules, which need not define any ``@task``; without
    this, the backend module (and its resolver) would be loaded only by the first ``@task`` import.
    """
    from django.conf import settings

    backends = getattr(settings, "TASKS", None) or {}
    if any(str(config.get("BACKEND", "")).startswith(__package__ + ".") for config in backends.values()):
        import_module(f"{__package__}.backends")
