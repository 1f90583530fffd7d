"""The agents' model: the offline scripted one by default, a real LLM when asked for.

* Default: ``analyst.scripted``'s ``FunctionModel``; no key, no network.
* ``EXAMPLE_MODEL=openai:gpt-5.2`` (any pydantic-ai model name) with the provider's key in the
  environment (``OPENAI_API_KEY``) uses that model instead; install its extra first
  (``pip install "pydantic-ai-slim[openai]"``).

Whichever model runs, ``CountedModel`` writes every response received to the call log
(``analyst.call_log``), as the tools write every call.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from pydantic_ai.messages import ModelMessage, ModelResponse
from pydantic_ai.models import Model, ModelRequestParameters, StreamedResponse, infer_model
from pydantic_ai.models.function import FunctionDef, FunctionModel
from pydantic_ai.models.wrapper import WrapperModel
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import RunContext

from analyst.call_log import log_call
from analyst.scripted import model_delay, streamed

MODEL_ENV = "EXAMPLE_MODEL"
SCRIPTED = "scripted"


def model_name() -> str:
    """The model chosen by ``EXAMPLE_MODEL``; ``scripted`` when unset."""
    return os.environ.get(MODEL_ENV, "").strip() or SCRIPTED


def describe_model() -> str:
    name = model_name()
    if name == SCRIPTED:
        return f"the offline scripted model, {model_delay():g} s a call (set {MODEL_ENV} to use a real LLM)"
    return f"{name} (from {MODEL_ENV})"


class CountedModel(WrapperModel):
    """Logs every response received from the wrapped model, numbered by its place in the run.

    A request cut short by a killed process never returns, so it is not logged: the log counts the
    answers the run used, and a resumed run must not need any of the recorded ones again.
    """

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        response = await super().request(messages, model_settings, model_request_parameters)
        log_call("model", str(_number(messages)))
        return response

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: RunContext[object] | None = None,
    ) -> AsyncIterator[StreamedResponse]:
        async with super().request_stream(messages, model_settings, model_request_parameters, run_context) as stream:
            yield stream
        log_call("model", str(_number(messages)))  # once the whole response was streamed


def _number(messages: list[ModelMessage]) -> int:
    return sum(isinstance(message, ModelResponse) for message in messages) + 1


def build_model(scripted: FunctionDef) -> Model:
    """The model ``EXAMPLE_MODEL`` names, else ``scripted`` as a ``FunctionModel``; counted either way."""
    name = model_name()
    if name == SCRIPTED:
        model_id = "scripted-" + scripted.__name__.removeprefix("scripted_")
        return CountedModel(FunctionModel(scripted, stream_function=streamed(scripted), model_name=model_id))
    return CountedModel(infer_model(name))
