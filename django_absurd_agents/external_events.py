"""Durable waits for external events (``RequestInput``/``AskUser`` answers, tool approvals).

Inside a task, pydantic-ai's ``wait_for_external_event`` goes through ``AbsurdEventWaiter``: it makes a
token naming the queue and an event unique to the task and the wait, hands it to ``ask`` in a step,
and suspends the task on ``ctx.await_event``, holding no worker, until somebody resolves the token:

    resolve_external_event_sync(token, payload)     # from a sync view, a command, the admin
    await resolve_external_event(token, payload)    # from async code

The token, the answer ``ask`` gave and the outcome of the wait are all checkpoints, so a replay makes
no second token, does not call ``ask`` again and returns the same outcome.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import absurd_sdk
from absurd_sdk import AsyncTaskContext
from pydantic import JsonValue
from pydantic_ai.durable_exec import ExternalEventError, ExternalEventWaiter
from pydantic_ai.exceptions import UserError

from django_absurd_agents import sdk
from django_absurd_agents.client import absurd

TOKEN_PREFIX = "absurd-event"


def make_token(queue: str, event_name: str) -> str:
    return f"{TOKEN_PREFIX}:{queue}:{event_name}"


def parse_token(token: str) -> tuple[str, str]:
    """``(queue, event name)`` of a token handed out by ``AbsurdEventWaiter``."""
    prefix, _, rest = token.partition(":")
    queue, _, event_name = rest.partition(":")
    if prefix != TOKEN_PREFIX or not queue or not event_name:
        raise UserError(
            f"{token!r} is not a resume token of a durable Absurd run. Pass the token exactly as the "
            "run's `ask` callback received it."
        )
    return queue, event_name


class AbsurdEventWaiter(ExternalEventWaiter):
    """Maps pydantic-ai's external-event wait onto Absurd steps and ``ctx.await_event``."""

    def __init__(self, ctx: AsyncTaskContext, agent_name: str) -> None:
        self._ctx = ctx
        self._prefix = f"{agent_name}__external_event.{{}}"

    async def wait(
        self,
        name: str,
        *,
        ask: Callable[[str], Awaitable[JsonValue]],
        timeout: timedelta | None,
    ) -> JsonValue:
        ctx = self._ctx
        step = self._prefix.format(name)

        async def new_token() -> str:
            return make_token(sdk.queue_name(ctx), f"external:{ctx.task_id}:{uuid.uuid4().hex}")

        token = await ctx.step(f"{step}.token", new_token)
        answer = await ctx.step(f"{step}.ask", lambda: ask(token))
        if answer is not None:
            return answer

        outcome_step = await ctx.begin_step(f"{step}.outcome")
        if outcome_step.done:
            outcome = outcome_step.state
        else:
            _, event_name = parse_token(token)
            seconds = None if timeout is None else max(1, int(timeout.total_seconds()))
            try:
                event = await ctx.await_event(event_name, step_name=step, timeout=seconds)
            except absurd_sdk.TimeoutError:
                event = {"ok": False, "reason": f"No resolution arrived within {timeout}."}
            outcome = await ctx.complete_step(outcome_step, _outcome(event))
        assert isinstance(outcome, dict)
        if not outcome.get("ok"):
            raise ExternalEventError(str(outcome.get("reason")))
        return outcome.get("payload")


def _outcome(event: Any) -> dict[str, Any]:
    if isinstance(event, dict) and "ok" in event:
        return event
    return {"ok": True, "payload": event}  # emitted by hand (absurdctl emit-event): the payload as is


def resolve_external_event_sync(token: str, payload: Any) -> None:
    """Resume the durable run waiting on ``token`` with ``payload``, on Django's connection.

    Inside ``transaction.atomic()`` the answer is delivered only if the transaction commits. For a
    ``RequestInput`` wait the payload is the JSON form of ``DeferredToolResults``, e.g.
    ``{"approvals": {"<tool_call_id>": True}}``. The first resolution wins; later ones are ignored.
    """
    queue, event_name = parse_token(token)
    absurd.emit_event_sync(event_name, {"ok": True, "payload": payload}, queue_name=queue)


def fail_external_event_sync(token: str, reason: str) -> None:
    """End the wait on ``token`` without an answer: the run sees ``ExternalEventError(reason)``."""
    queue, event_name = parse_token(token)
    absurd.emit_event_sync(event_name, {"ok": False, "reason": reason}, queue_name=queue)


async def resolve_external_event(token: str, payload: Any) -> None:
    """Async counterpart of ``resolve_external_event_sync`` (on the client's own connection)."""
    queue, event_name = parse_token(token)
    await absurd.emit_event(event_name, {"ok": True, "payload": payload}, queue_name=queue)


async def fail_external_event(token: str, reason: str) -> None:
    """Async counterpart of ``fail_external_event_sync``."""
    queue, event_name = parse_token(token)
    await absurd.emit_event(event_name, {"ok": False, "reason": reason}, queue_name=queue)
