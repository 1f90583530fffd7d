"""Every exception of the app derives from ``AbsurdAgentsError`` and from what callers caught before."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import django_absurd_agents
from django_absurd_agents import exceptions
from django_absurd_agents.exceptions import AbsurdAgentsError

NOT_IMPORTED = {
    # Run as a script by the launcher (it imports nothing of the package); its one exception is
    # raised and caught inside its own signal handling.
    "django_absurd_agents.embedded_supervisor",
}


def app_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for module_info in pkgutil.walk_packages(django_absurd_agents.__path__, "django_absurd_agents."):
        if module_info.name in NOT_IMPORTED or ".migrations." in module_info.name:
            continue
        module = importlib.import_module(module_info.name)
        for name, value in vars(module).items():
            own = inspect.isclass(value) and value.__module__.startswith("django_absurd_agents.")
            if own and issubclass(value, BaseException):
                found[f"{value.__module__}.{name}"] = value
    return found


def test_every_exception_of_the_app_derives_from_the_base() -> None:
    found = app_exceptions()
    assert "django_absurd_agents.exceptions.TaskNotFound" in found  # the walk found them
    strays = sorted(name for name, cls in found.items() if not issubclass(cls, AbsurdAgentsError))
    assert strays == [], f"derive these from AbsurdAgentsError (django_absurd_agents.exceptions): {strays}"


@pytest.mark.parametrize(
    ("name", "builtin"),
    [
        ("TaskNotFound", LookupError),
        ("UnknownQueue", ValueError),
        ("InvalidParams", ValueError),
        ("UnrecordableStepResult", TypeError),
        ("TurnTimeout", TimeoutError),
        ("EmbeddedPostgresError", RuntimeError),
    ],
)
def test_exceptions_stay_what_callers_caught_before(name: str, builtin: type[BaseException]) -> None:
    cls = getattr(exceptions, name)
    assert issubclass(cls, builtin) and issubclass(cls, AbsurdAgentsError)


OLD_HOMES = {
    # Where each exception was defined before ``exceptions`` gathered them; importing from there still works.
    "TaskNotFound": "validation",
    "UnknownQueue": "validation",
    "InvalidParams": "jsonsafe",
    "UnstorableJSON": "json_text",
    "TransactionNotCommitted": "testing",
    "UnrecordableStepResult": "jsonsafe",
    "UnrecordableTaskResult": "execution",
    "UnknownTask": "execution",
    "SwallowedSuspension": "execution",
    "WorkerError": "worker_config",
    "ScheduleError": "schedules",
    "CorruptHistory": "conversation_entries",
    "UnknownChatAgent": "conversations",
    "StaleConversation": "conversations",
    "TurnTimeout": "conversation_models",
    "TurnFailed": "chat",
    "SchemaVersionError": "schema",
    "QueueStorageError": "schema",
    "EmbeddedPostgresError": "embedded_os",
}


@pytest.mark.parametrize(("name", "module"), sorted(OLD_HOMES.items()))
def test_the_old_homes_still_work(name: str, module: str) -> None:
    old_home = importlib.import_module(f"django_absurd_agents.{module}")
    assert getattr(old_home, name, None) is getattr(exceptions, name)


def test_the_package_exports_the_base() -> None:
    from django_absurd_agents import AbsurdAgentsError as exported
    from django_absurd_agents import InvalidParams, TaskNotFound

    assert exported is AbsurdAgentsError
    assert TaskNotFound is exceptions.TaskNotFound and InvalidParams is exceptions.InvalidParams


def test_nothing_dead_is_left_in_the_module() -> None:
    """Each exception in ``exceptions`` is raised somewhere in the app (``LeaseLost`` was not)."""
    from pathlib import Path

    sources = "\n".join(
        path.read_text()
        for path in Path(django_absurd_agents.__file__).parent.rglob("*.py")
        if path.name != "exceptions.py"
    )
    names = [name for name, value in vars(exceptions).items() if inspect.isclass(value) and name != "AbsurdAgentsError"]
    unused = [name for name in names if name not in sources]
    assert unused == []
