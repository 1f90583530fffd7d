"""The installed absurd-sdk is one that ``sdk.py``'s private uses were checked against."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from django_absurd_agents import sdk


def release(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def test_the_installed_absurd_sdk_is_in_the_range_sdk_py_was_checked_against() -> None:
    installed = release(importlib.metadata.version("absurd-sdk"))
    lowest, below = sdk.CHECKED_RANGE
    assert lowest <= installed < below, (
        f"absurd-sdk {'.'.join(map(str, installed))} is outside the range django_absurd_agents/sdk.py was "
        f"checked against ({sdk.CHECKED_RANGE}): check each private use there and in sync_client.py, "
        "then widen CHECKED_RANGE and pyproject.toml's dependency."
    )


def test_pyproject_declares_the_checked_range() -> None:
    pyproject = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    (declared,) = [d for d in pyproject["project"]["dependencies"] if d.startswith("absurd-sdk")]
    lowest, below = sdk.CHECKED_RANGE
    assert declared == f"absurd-sdk>={'.'.join(map(str, lowest))},<{'.'.join(map(str, below))}"
