"""The core of ``make demo``: a report task survives a worker killed with SIGKILL, and nothing is paid twice.

The story, told as it happens: ask for a report (the same ``request_report`` the website calls),
start a worker process (the real ``manage.py absurd_worker``, see ``analyst.demo_workers``), SIGKILL
it once the first model call and the tool calls it asked for are checkpointed (the second model call
is then in flight), start a second worker, and watch it resume. Then prove it from the records:

* the call log (``EXAMPLE_CALL_LOG``) shows every model response and tool call once, and says which
  worker process made it;
* the side-effecting ``save_report`` tool wrote exactly one ``Report`` row;
* the checkpoints, in order, each with the attempt that recorded it;
* the attempts: the first ended as ``$ClaimTimeout`` when the dead worker's lease ran out.

Everything that waits polls the database with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from analyst.call_log import Call, read_call_log
from analyst.demo_workers import Worker
from analyst.models import Report
from analyst.reports import Progress, Step, load_progress, task_queue
from django_absurd_agents.queue_overview import overview

FIRST_MODEL_STEP = "analyst__model.request_stream"  # streamed: the agent logs its events
POLL_SECONDS = 0.05


class DemoError(Exception):
    """The demo could not go on; the message says what happened and what to look at."""


def wait_for[T](what: str, check: Callable[[], T | None], timeout: float, workers: Sequence[Worker] = ()) -> T:
    """Poll ``check`` until it returns something other than None; fail after ``timeout`` seconds.

    A worker that exits while we wait is reported at once with the end of its log.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None:
            return value
        for worker in workers:
            if worker.process.poll() is not None:
                raise DemoError(
                    f"Worker {worker.number} exited with status {worker.process.returncode} while waiting for "
                    f"{what}. The end of its log ({worker.log_path}):\n{worker.tail()}"
                )
        if time.monotonic() > deadline:
            tails = "".join(f"\nWorker {w.number} ({w.log_path}):\n{w.tail()}" for w in workers)
            raise DemoError(f"Timed out after {timeout:.0f} s waiting for {what}.{tails}")
        time.sleep(POLL_SECONDS)


def checkpoint_recorded(task_id: str, name: str) -> bool | None:
    progress = load_progress(task_id)
    return True if progress is not None and any(step.name == name for step in progress.steps) else None


def other_unfinished_tasks(task_id: str) -> int:
    """Tasks of the queue, other than ours, that the demo's workers would also run."""
    queue = next((item for item in overview() if item.queue == task_queue()), None)
    unfinished = sum(queue.counts.get(state, 0) for state in ("pending", "running", "sleeping")) if queue else 0
    ours = load_progress(task_id)
    return unfinished - (ours is not None and not ours.done)


def attempt_started(task_id: str, attempt: int) -> int | None:
    """The attempt number once a run numbered ``attempt`` or later has been claimed by a worker."""
    progress = load_progress(task_id)
    runs = progress.runs if progress is not None else []
    return max((run.attempt for run in runs if run.attempt >= attempt and run.started_at is not None), default=None)


def first_round_recorded(task_id: str) -> Progress | None:
    """The progress once the first model call and every tool call it asked for are checkpointed.

    The worker is then waiting for the second model call, which takes seconds: a kill now lands
    mid-call, where a real crash hurts most, instead of racing the quick tool steps.
    """
    progress = load_progress(task_id)
    if progress is None:
        return None
    if progress.done:
        return progress
    steps = progress.steps
    first = next((i for i, step in enumerate(steps) if step.name == FIRST_MODEL_STEP), None)
    if first is None:
        return None
    asked = sum(
        isinstance(part, dict) and part.get("part_kind") == "tool-call"
        for part in (steps[first].state or {}).get("parts", [])
    )
    done = sum(tool_name(step) is not None for step in steps[first + 1 :])
    return progress if done >= asked else None


def finished(task_id: str) -> Progress | None:
    progress = load_progress(task_id)
    return progress if progress is not None and progress.done else None


@dataclass(frozen=True)
class Check:
    ok: bool
    text: str
    note: bool = False  # true and worth knowing, but not part of the claim


@dataclass(frozen=True)
class Proof:
    progress: Progress
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def times(count: int) -> str:
    return {1: "once", 2: "twice"}.get(count, f"{count} times")


def _who(pids: Iterable[int], names: dict[int, str]) -> str:
    return " and ".join(sorted({names.get(pid, f"pid {pid}") for pid in pids}))


def tool_name(step: Step) -> str | None:
    """The tool a checkpoint belongs to, or None for a model call or anything else."""
    label = step.label
    return label.removeprefix("tool ").split(" (call")[0] if label.startswith("tool ") else None


def prove(
    progress: Progress,
    calls: list[Call],
    reports: int,
    worker_names: dict[int, str],
    killed_pid: int | None = None,
) -> Proof:
    """Compare what was paid for and done (the call log, Report rows) with what was checkpointed.

    The claims: every model response was paid for once; every step recorded by an attempt was not
    run again by a later one; the side-effecting ``save_report`` ran once and wrote one row. A step
    the killed worker finished but had not yet recorded is run again by the next attempt: that is
    reported as a note, because it is how checkpoints work, not a broken promise.
    """
    checks: list[Check] = []
    model_steps = [step for step in progress.steps if step.label.startswith("model call")]
    pids_by_number: dict[str, list[int]] = defaultdict(list)
    for call in calls:
        if call.kind == "model":
            pids_by_number[call.name].append(call.pid)
    numbers = sorted(pids_by_number, key=int)
    repeated = [number for number in numbers if len(pids_by_number[number]) > 1]
    if repeated:
        checks.append(Check(False, f"model call(s) {', '.join(repeated)} were paid for more than once"))
    elif len(numbers) != len(model_steps):
        checks.append(Check(False, f"{plural(len(numbers), 'model response')} paid for, {len(model_steps)} recorded"))
    else:
        groups: dict[str, list[str]] = defaultdict(list)
        for number in numbers:
            groups[_who(pids_by_number[number], worker_names)].append(number)
        by_whom = "; ".join(
            f"{'call' if len(n) == 1 else 'calls'} {', '.join(n)} by {who}" for who, n in groups.items()
        )
        checks.append(Check(True, f"each of the {len(numbers)} model calls was paid for once: {by_whom}"))

    if killed_pid is not None and progress.runs:
        first_attempt = progress.runs[0].attempt
        before = [step for step in progress.steps if step.attempt == first_attempt]
        later = [call for call in calls if call.pid != killed_pid]
        rerun = []
        for step in before:
            tool = tool_name(step)
            if tool is None:
                number = step.label.removeprefix("model call ")
                if any(call.kind == "model" and call.name == number for call in later):
                    rerun.append(step.label)
            elif sum(call.kind == "tool" and call.name == tool for call in later) > sum(
                tool_name(other) == tool and other.attempt != first_attempt for other in progress.steps
            ):
                rerun.append(step.label)
        listed = ", ".join(step.label for step in before)
        if rerun:
            text = f"recorded before the kill but run again: {', '.join(rerun)}"
        elif len(before) == 1:
            text = f"{listed}, recorded before the kill, was replayed from its checkpoint, not run again"
        else:
            text = f"{listed}, recorded before the kill, were replayed from their checkpoints, not run again"
        checks.append(Check(bool(before) and not rerun, text))

    tool_steps = Counter(tool for step in progress.steps if (tool := tool_name(step)))
    tool_calls = Counter(call.name for call in calls if call.kind == "tool")
    for tool in sorted(set(tool_steps) | set(tool_calls)):
        ran, recorded = tool_calls[tool], tool_steps[tool]
        where = _who((c.pid for c in calls if c.kind == "tool" and c.name == tool), worker_names)
        if tool == "save_report":
            checks.append(
                Check(
                    ran == recorded == reports == 1,
                    f"save_report, the side effect, ran {times(ran)} ({where}) "
                    f"and wrote {plural(reports, 'Report row')}",
                )
            )
        elif ran == recorded:
            checks.append(Check(True, f"{tool} ran {times(ran)} ({where})"))
        elif ran == recorded + 1 and any(c.kind == "tool" and c.name == tool and c.pid == killed_pid for c in calls):
            checks.append(
                Check(
                    True,
                    f"{tool} ran {times(ran)} ({where}): the kill came after it ran and before its result "
                    "was recorded, so the next attempt ran it again. A step is final once checkpointed; "
                    "a tool cut short runs again, so make tools safe to retry.",
                    note=True,
                )
            )
        else:
            checks.append(Check(False, f"{tool} ran {times(ran)} ({where}) for {recorded} recorded calls"))
    return Proof(progress=progress, checks=checks)


def collect_proof(task_id: str, call_log: Path, worker_names: dict[int, str], killed_pid: int | None = None) -> Proof:
    progress = load_progress(task_id)
    if progress is None:
        raise DemoError(f"Task {task_id} is gone from queue {task_queue()!r}.")
    reports = Report.objects.filter(task_id=task_id).count()
    return prove(progress, read_call_log(call_log, task_id), reports, worker_names, killed_pid)


def describe_steps(steps: list[Step]) -> str:
    return ", ".join(step.label for step in steps) or "none"
