"""The call log of the example: one line per model response and per tool call, in the file named by
``EXAMPLE_CALL_LOG``, each with the process and the Absurd task it was made for. ``make demo`` reads
it to prove that a killed worker's completed calls were not paid for again.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from absurd_sdk import get_current_context

CALL_LOG_ENV = "EXAMPLE_CALL_LOG"


@dataclass(frozen=True)
class Call:
    kind: str  # "model" or "tool"
    name: str  # the model call's number in the run, or the tool's name
    pid: int
    task_id: str = "-"  # the Absurd task the call was made for; "-" outside a task


def log_call(kind: str, name: str) -> None:
    """Append one call to ``$EXAMPLE_CALL_LOG`` (nothing when unset).

    One ``write`` of one line to a file opened for appending: lines of concurrent processes do not
    interleave, and a line written before a SIGKILL is in the file.
    """
    path = os.environ.get(CALL_LOG_ENV)
    if not path:
        return
    ctx = get_current_context()
    task_id = str(ctx.task_id) if ctx is not None else "-"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{kind} {name} {os.getpid()} {task_id}\n".encode())
    finally:
        os.close(fd)


def read_call_log(path: str | Path, task_id: str | None = None) -> list[Call]:
    """The calls logged in ``path``, only those made for ``task_id`` when given."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    calls = []
    for line in text.splitlines():
        kind, name, pid, task = line.split(" ")
        if task_id is None or task == str(task_id):
            calls.append(Call(kind=kind, name=name, pid=int(pid), task_id=task))
    return calls
