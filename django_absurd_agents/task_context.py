"""Checks on the task context handed to handlers registered with ``absurd.register_task``.

absurd-sdk's ``ctx.step(name, fn)`` calls ``fn()`` and only then awaits what it returned, and writes
the value with plain ``json.dumps``. So a plain ``def`` runs its side effect before the step fails
("object ... can't be used in 'await' expression"), and a value Postgres refuses (a NUL character,
``NaN``) fails the step after its body ran; either way every attempt of the task runs the side effect
again. Here, on the context object of each execution:

* ``step`` refuses a plain function before calling it, and checks the value before it is written;
* ``complete_step`` checks the value before it is written;
* ``emit_event`` checks the payload (as ``absurd.emit_event`` does) before any SQL.

A step whose body has run but whose value cannot be recorded fails the task without another
attempt (:func:`make_last_attempt`), so the side effect happens once, not once per attempt.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from absurd_sdk import AsyncTaskContext, StepHandle

from django_absurd_agents import conf, jsonsafe, sdk
from django_absurd_agents.attempts import last_attempt_statement
from django_absurd_agents.exceptions import UnrecordableStepResult

logger = logging.getLogger("django_absurd_agents.worker")

_CHECKED = "_absurd_agents_checked"

_ASYNC_FIX = (
    "ctx.step awaits what the function returns and records that value, so the function must be async: "
    "write `async def {name}() -> ...`, or wrap a blocking function with asgiref's `sync_to_async({name})` "
    "to run it in a thread (the ORM works there)."
)


def _unwrapped(fn: Any) -> Any:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def is_plain_function(fn: Any) -> bool:
    """Whether calling ``fn`` certainly runs its body at once instead of returning an awaitable.

    Async functions (also behind ``functools.partial``, ``sync_to_async``, or an object with an async
    ``__call__``) are not. A lambda is not judged: ``lambda: send(order)`` is how an async call with
    arguments is usually passed, so its result is checked when it is called instead.
    """
    target = _unwrapped(fn)
    if inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(target):
        return False
    if getattr(target, "__name__", None) == "<lambda>":
        return False
    if inspect.isfunction(target) or inspect.ismethod(target) or inspect.isbuiltin(target) or inspect.isclass(target):
        return True
    if not callable(target):
        return False  # absurd-sdk's own call raises "not callable", with nothing run
    return not inspect.iscoroutinefunction(type(target).__call__)


async def make_last_attempt(ctx: AsyncTaskContext) -> None:
    """Make the running attempt the task's last, so the error about to be raised fails it for good.

    Absurd 0.5.1 has no non-retryable failure: ``absurd.fail_run`` schedules another attempt while
    ``attempt < max_attempts``. Capping ``max_attempts`` at this run's attempt (only while this run is
    still the task's current, running one) is what makes the failure final; ``retry_task`` raises the
    cap again, so a retry after the fix works as usual. The claimed row's ``max_attempts`` is updated
    too: the worker and conversation turns read it to tell a final failure.
    """
    task = sdk.claimed_task(ctx)
    try:
        await sdk.task_connection(ctx).execute(last_attempt_statement(sdk.queue_name(ctx)), (task["run_id"],))
    except Exception as exc:  # the failure is recorded anyway; it is then retried like any other
        logger.warning("Could not make attempt %s of task %s its last: %s", task.get("attempt"), ctx.task_id, exc)
        return
    task["max_attempts"] = task.get("attempt")


def _unrecordable(step: str, problem: str) -> UnrecordableStepResult:
    return UnrecordableStepResult(
        f"The step {step!r} returned a value that cannot be recorded: {problem} The step's function has run; "
        "the task fails now, without another attempt that would run it again. Fix the code, then retry the task: "
        "it resumes after the last recorded step."
    )


def check_context(ctx: AsyncTaskContext) -> AsyncTaskContext:
    """Install the checks on ``ctx`` (once); returns it. Instance attributes, so the class is untouched."""
    if ctx.__dict__.get(_CHECKED):
        return ctx
    step, complete_step, emit_event = ctx.step, ctx.complete_step, ctx.emit_event

    async def checked_step(name: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        if is_plain_function(fn):
            label = getattr(_unwrapped(fn), "__name__", None) or "fn"
            raise TypeError(
                f"ctx.step({name!r}, {label}): {label} is a plain function, refused before it ran. "
                + _ASYNC_FIX.format(name=label)
            )

        async def body() -> Any:
            result = fn()
            if not inspect.isawaitable(result):
                await make_last_attempt(ctx)
                raise TypeError(
                    f"ctx.step({name!r}, ...): the function returned {type(result).__name__}, not an awaitable, so "
                    "it ran synchronously; its effect is done and is not recorded, and the task fails now without "
                    "another attempt that would repeat it. " + _ASYNC_FIX.format(name="fn")
                )
            value = await result
            problem = jsonsafe.recordable_problem(value)
            if problem is not None:
                await make_last_attempt(ctx)
                raise _unrecordable(name, problem)
            return value

        return await step(name, body)

    async def checked_complete_step(handle: StepHandle, value: Any) -> Any:
        if not handle.done:
            problem = jsonsafe.recordable_problem(value)
            if problem is not None:
                await make_last_attempt(ctx)
                raise _unrecordable(handle.name, problem)
        return await complete_step(handle, value)

    async def checked_emit_event(event_name: str, payload: Any = None) -> None:
        problem = jsonsafe.name_problem(event_name, "The event name")
        if problem is not None:
            raise jsonsafe.InvalidParams(problem)
        # As absurd.emit_event: Django's usual values (UUID, datetime, Decimal) go in as their JSON strings.
        text = jsonsafe.encode(payload, what="Event payload", limit=conf.get().max_params_bytes)
        await emit_event(event_name, json.loads(text))

    ctx.__dict__.update(
        {
            "step": checked_step,
            "complete_step": checked_complete_step,
            "emit_event": checked_emit_event,
            _CHECKED: True,
        }
    )
    return ctx
