"""``AbsurdAgent``: the wrapper of the Pydantic AI Absurd tutorial.

``AbsurdAgent(Agent("openai:gpt-5.2", name="analyst"), absurd)`` keeps the inner agent's model, tools,
output type and instructions and runs it with ``AbsurdDurability`` attached, so ``await agent.run(...)``
inside an ``@absurd.register_task`` handler checkpoints every model and tool call.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from pydantic_ai.agent import AbstractAgent, EventStreamHandler, WrapperAgent
from pydantic_ai.conversation import ConversationTypeAdapter
from pydantic_ai.exceptions import UserError
from pydantic_ai.messages import ModelMessage, ModelMessagesTypeAdapter
from pydantic_ai.models import Model, infer_model

from django_absurd_agents import jsonsafe
from django_absurd_agents.durability import AbsurdDurability, current_task_context


def _json_text(value: Any) -> str | bytes:
    return value if isinstance(value, str | bytes) else json.dumps(value)


def messages_from_json(history: Any) -> Sequence[ModelMessage]:
    """``message_history`` as given, or decoded when it is in its JSON form.

    A task's result is stored as JSON, so a task that returned ``result.all_messages()`` gives back a
    list of dicts: accept it (and the JSON text of ``all_messages_json()``) where a history is expected.
    """
    if isinstance(history, str | bytes):
        return ModelMessagesTypeAdapter.validate_json(history)
    if isinstance(history, list | tuple) and any(isinstance(message, dict) for message in history):
        return ModelMessagesTypeAdapter.validate_json(json.dumps(list(history), default=jsonsafe.plain_json))
    return history  # type: ignore[no-any-return]


class AbsurdAgent(WrapperAgent[Any, Any]):
    """A durable agent for Absurd tasks; outside a task it runs like the inner agent (`run_sync` included)."""

    def __init__(
        self,
        inner_agent: AbstractAgent[Any, Any],
        absurd: Any,
        *,
        name: str | None = None,
        models: Mapping[str, Model | str] | None = None,
        event_stream_handler: EventStreamHandler[Any] | None = None,
        event_log: bool = False,
    ) -> None:
        super().__init__(inner_agent)
        agent_name = name or inner_agent.name
        if not agent_name:
            raise UserError(
                "An AbsurdAgent needs a name: it prefixes every checkpoint step of the agent "
                "(`analyst__model.request`, ...), so it must be unique and stable across deploys. Pass it as "
                '`Agent(..., name="analyst")` or `AbsurdAgent(inner, absurd, name="analyst")`.'
            )
        if inner_agent.model is None:
            raise UserError(
                f"The agent {agent_name!r} has no model. A durable agent's model is fixed when it is built "
                '(models cannot be swapped at run time); pass one: `Agent("openai:gpt-5.2", name=...)`.'
            )
        self._absurd_name = agent_name
        self.absurd = absurd
        # A model name is built once here, so a run selects it by id like any registered instance.
        self._models = {
            key: infer_model(value) if isinstance(value, str) else value for key, value in (models or {}).items()
        }
        self.durability: AbsurdDurability[Any] = AbsurdDurability(
            models=self._models, event_stream_handler=event_stream_handler, name=agent_name, event_log=event_log
        )

    @property
    def name(self) -> str | None:
        return self._absurd_name

    @name.setter
    def name(self, value: str | None) -> None:
        raise UserError("The name of an AbsurdAgent prefixes its checkpoint steps; it is fixed at construction.")

    def _check_model(self, model: Any) -> None:
        if model is None or model is self.wrapped.model:
            return
        if isinstance(model, str) and model in self._models:
            return
        if isinstance(model, Model) and any(model is registered for registered in self._models.values()):
            return
        known = ", ".join(repr(key) for key in self._models) or "none"
        raise UserError(
            f"Model {model!r} was not registered with AbsurdAgent {self._absurd_name!r}. A durable agent's "
            "model is fixed at construction so that a resumed task calls the same model: register it with "
            f"`AbsurdAgent(inner, absurd, models={{'fast': ...}})` and select it by id (registered: {known})."
        )

    @asynccontextmanager
    async def iter(self, user_prompt: Any = None, **kwargs: Any) -> AsyncIterator[Any]:  # type: ignore[override]
        self._check_model(kwargs.get("model"))
        if kwargs.get("message_history") is not None:
            kwargs["message_history"] = messages_from_json(kwargs["message_history"])
        if isinstance(kwargs.get("conversation"), dict | str | bytes):
            kwargs["conversation"] = ConversationTypeAdapter.validate_json(_json_text(kwargs["conversation"]))
        kwargs["capabilities"] = [*(kwargs.get("capabilities") or ()), self.durability]
        async with self.wrapped.iter(user_prompt, **kwargs) as run:
            yield run

    def run_sync(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Outside a task, the plain agent's ``run_sync`` (no steps, no database); refused inside one."""
        if current_task_context() is not None:
            raise UserError(
                f"AbsurdAgent.run_sync() cannot be used inside an Absurd task (agent {self._absurd_name!r}): task "
                "handlers are async, so call `await agent.run(...)` there."
            )
        return super().run_sync(*args, **kwargs)

    def _refuse_stream_in_task(self, method: str) -> None:
        if current_task_context() is not None:
            raise UserError(
                f"AbsurdAgent.{method}() cannot be used inside an Absurd task: a stream cannot be replayed "
                "from checkpoints. Stream from the web layer with a plain agent, or pass "
                "`event_stream_handler=` to AbsurdAgent to receive the run's events inside the task."
            )

    def run_stream(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self._refuse_stream_in_task("run_stream")
        return super().run_stream(*args, **kwargs)

    def run_stream_events(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self._refuse_stream_in_task("run_stream_events")
        return super().run_stream_events(*args, **kwargs)
