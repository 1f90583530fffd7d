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


def test_the_package_exports_the_base_and_the_old_homes_still_work() -> None:
    from django_absurd_agents import AbsurdAgentsError as exported
    from django_absurd_agents import InvalidParams, TaskNotFound
    from django_absurd_agents.validation import TaskNotFound as old_home
    from django_absurd_agents.worker import WorkerError

    assert exported is AbsurdAgentsError
    assert old_home is TaskNotFound is exceptions.TaskNotFound
    assert InvalidParams is exceptions.InvalidParams and WorkerError is exceptions.WorkerError


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
