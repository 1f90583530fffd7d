"""pytest plugin of django-absurd-agents, loaded automatically once the package is installed (entry point ``pytest11``).

* After every test that uses pytest-django's ``transactional_db`` (also through
  ``@pytest.mark.django_db(transaction=True)`` or ``live_server``) and after every
  ``TransactionTestCase``, Absurd's tables are emptied, as Django empties the models' tables.
* ``absurd_eager``: spawns in the test run their task at once (:class:`~django_absurd_agents.testing.eager_tasks`).
* ``absurd_run_tasks``: :func:`~django_absurd_agents.testing.run_tasks`, with the transactional database.

Disable it with ``-p no:django_absurd_agents``. The helpers themselves live in
``django_absurd_agents.testing`` and need no pytest.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

_TRANSACTIONAL_FIXTURES = {"transactional_db", "live_server", "django_db_serialized_rollback"}


def _uses_transactional_db(request: pytest.FixtureRequest) -> bool:
    if _TRANSACTIONAL_FIXTURES & set(request.fixturenames):
        return True
    marker = request.node.get_closest_marker("django_db")
    if marker is not None and (marker.kwargs.get("transaction") or (len(marker.args) > 1 and marker.args[1])):
        return True
    instance = getattr(request, "instance", None)
    if instance is None:
        return False
    from django.test import TestCase, TransactionTestCase

    return isinstance(instance, TransactionTestCase) and not isinstance(instance, TestCase)


@pytest.fixture(autouse=True)
def _absurd_clean_queues(request: pytest.FixtureRequest) -> Iterator[None]:
    """Empty Absurd's tables after a test that committed to the database (set up first, so torn down last)."""
    if not request.config.pluginmanager.hasplugin("django") or not _uses_transactional_db(request):
        yield
        return
    blocker = request.getfixturevalue("django_db_blocker")
    yield
    from django.test.testcases import DatabaseOperationForbidden  # type: ignore[attr-defined]

    from django_absurd_agents.testing import clean_queues

    with blocker.unblock(), contextlib.suppress(DatabaseOperationForbidden):  # a test limited to other databases
        clean_queues()


@pytest.fixture
def absurd_eager(transactional_db: Any) -> Iterator[Any]:
    """Spawns run their task at once, in-process; ``absurd_eager.ran`` lists what ran."""
    from django_absurd_agents.testing import eager_tasks

    with eager_tasks() as eager:
        yield eager


@pytest.fixture
def absurd_run_tasks(transactional_db: Any) -> Callable[..., Any]:
    """``run_tasks`` (what is due on the queues runs in-process), for tests that spawn and then run."""
    from django_absurd_agents.testing import run_tasks

    return run_tasks
