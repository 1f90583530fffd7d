"""A task's timeline: one bar per attempt along time, each checkpoint a mark on its attempt's bar.

Computed from the runs and checkpoints ``task_records`` read for the task page (no query of its
own) as plain numbers in SVG units; the ``absurd_timeline`` template filter draws them. A crash and
resume shows as a first bar ending in a lease expiry (``$ClaimTimeout``), a gap, and a second bar
whose first marks are the replayed steps' successors.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field

from django.utils import timezone

from django_absurd_agents.steps import StepName, parse_step_name
from django_absurd_agents.task_records import TaskDetail

WIDTH = 720.0
LEFT = 150.0
ROW = 26.0
TOP = 8.0
AXIS = 18.0


@dataclass(frozen=True)
class Mark:
    x: float
    title: str
    kind: str


@dataclass(frozen=True)
class Lane:
    """One attempt: its bar (from claim to end), its checkpoints, and what ended it."""

    y: float
    label: str
    x: float
    width: float
    state: str
    title: str
    marks: list[Mark]
    end_note: str


@dataclass
class Timeline:
    lanes: list[Lane] = field(default_factory=list)
    ticks: list[tuple[float, str]] = field(default_factory=list)
    width: float = WIDTH
    height: float = 0.0
    left: float = LEFT

    @property
    def empty(self) -> bool:
        return not self.lanes


def _mark(x: float, name: str, at: str) -> Mark:
    """A checkpoint's tick, named for people: ``model request 2``, ``tool quote (the agent's own tools)``."""
    parsed = parse_step_name(name)
    kind = parsed.kind if parsed.kind in {"model", "tool"} else "step"
    return Mark(x, f"{_readable(name, parsed)} at {at}", kind)


def _readable(name: str, parsed: StepName) -> str:
    if parsed.kind == "model":
        return f"model request {parsed.number}"
    if parsed.kind == "tool":
        own = " (the agent's own tools)" if "<agent>" in name else ""
        return (
            f"tool {parsed.tool or 'call'} {parsed.number}{own}"
            if parsed.number > 1
            else f"tool {parsed.tool or 'call'}{own}"
        )
    return name


def timeline(task: TaskDetail, now: datetime.datetime) -> Timeline:
    """The attempts of ``task`` that started, on one time axis from the first claim to the last end."""
    runs = [run for run in sorted(task.runs, key=lambda r: r.attempt) if run.started_at is not None]
    result = Timeline()
    if not runs:
        return result
    ends = {run.run_id: run.finished_at or _open_end(run, now) for run in runs}
    start = min(run.started_at for run in runs if run.started_at)
    stop = max([*ends.values(), *(c.updated_at for c in task.checkpoints)])
    span = max((stop - start).total_seconds(), 0.001)
    scale = (result.width - result.left - 10) / span

    def x_of(moment: datetime.datetime) -> float:
        return round(result.left + max((moment - start).total_seconds(), 0.0) * scale, 1)

    by_run: dict[str, list[Mark]] = {run.run_id: [] for run in runs}
    for checkpoint in task.checkpoints:
        if checkpoint.owner_run_id in by_run:
            at = f"{timezone.localtime(checkpoint.updated_at):%H:%M:%S.%f}"[:-3]
            by_run[checkpoint.owner_run_id].append(_mark(x_of(checkpoint.updated_at), checkpoint.name, at))
    for index, run in enumerate(runs):
        assert run.started_at is not None
        x = x_of(run.started_at)
        result.lanes.append(
            Lane(
                y=TOP + index * ROW,
                label=f"Attempt {run.attempt}" + (f" · {run.claimed_by}" if run.claimed_by else ""),
                x=x,
                width=max(x_of(ends[run.run_id]) - x, 2.0),
                state=run.state,
                title=f"attempt {run.attempt}: {run.state}, claimed {timezone.localtime(run.started_at):%H:%M:%S}",
                marks=by_run[run.run_id],
                end_note=_end_note(run.state, run.failure_name),
            )
        )
    result.height = TOP + len(runs) * ROW + AXIS
    result.ticks = [
        (
            round(result.left + (result.width - result.left - 10) * i / 4, 1),
            f"{timezone.localtime(start + datetime.timedelta(seconds=span * i / 4)):%H:%M:%S}",
        )
        for i in range(4)
    ]
    return result


def _open_end(run: object, now: datetime.datetime) -> datetime.datetime:
    """Where the bar of an unfinished attempt ends: now (running), or its lease expiry if that is sooner."""
    expires = getattr(run, "claim_expires_at", None)
    return min(now, expires) if expires is not None and getattr(run, "state", "") != "running" else now


def _end_note(state: str, failure_name: str | None) -> str:
    if state == "failed":
        return "lease expired" if failure_name == "$ClaimTimeout" else (failure_name or "failed")
    if state == "sleeping":
        return "sleeping (waiting)"
    return state
