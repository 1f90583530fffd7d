"""The offline scripted models, ``scripted_analyst`` and ``scripted_chat``: functions for pydantic-ai's
``FunctionModel`` (built in ``analyst.llm``) that behave like a careful analyst.

They look up figures and news, save one report and answer. Each call takes ``EXAMPLE_MODEL_DELAY``
seconds (default 1.5), so a run takes as long as a real one: it thinks for a while, then streams its
text a word at a time (``streamed``; the agents log their events, which makes their requests
streamed). No key, no network.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar

from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionDef

from analyst.market import COMPANIES, mentioned_company

DELAY_ENV = "EXAMPLE_MODEL_DELAY"
DEFAULT_DELAY = 1.5


def model_delay() -> float:
    raw = os.environ.get(DELAY_ENV, "").strip()
    if not raw:
        return DEFAULT_DELAY
    try:
        delay = float(raw)
    except ValueError:
        raise ValueError(f"{DELAY_ENV} must be a number of seconds, like 1.5; it is {raw!r}.") from None
    return max(delay, 0.0)


THINKING_SHARE = 0.4
"""Of a streamed call's delay, the part spent before the first word; the rest paces the words."""

_thinking: ContextVar[float] = ContextVar("analyst_thinking_share", default=1.0)


async def think() -> None:
    """The scripted model's pause before it answers: the whole delay, or its thinking share when streamed."""
    await asyncio.sleep(model_delay() * _thinking.get())


def streamed(scripted: FunctionDef) -> Callable[[list[ModelMessage], AgentInfo], AsyncIterator[str | DeltaToolCalls]]:
    """``scripted`` as a stream: it thinks, then tool calls come out whole and text a word at a time."""

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        token = _thinking.set(THINKING_SHARE)
        try:
            response = await scripted(messages, info)  # type: ignore[misc]
        finally:
            _thinking.reset(token)
        for index, part in enumerate(response.parts):
            if isinstance(part, ToolCallPart):
                yield {
                    index: DeltaToolCall(
                        name=part.tool_name, json_args=part.args_as_json_str(), tool_call_id=part.tool_call_id
                    )
                }
            elif isinstance(part, TextPart):
                words = re.findall(r"\S+\s*", part.content)
                pause = model_delay() * (1 - THINKING_SHARE) / max(len(words), 1)
                for word in words:
                    await asyncio.sleep(pause)
                    yield word

    stream.__name__ = f"streamed_{scripted.__name__}"
    return stream


def _prompts(messages: list[ModelMessage]) -> list[str]:
    return [
        part.content
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, UserPromptPart) and isinstance(part.content, str)
    ]


def _this_turn(messages: list[ModelMessage]) -> list[ModelMessage]:
    """The messages since the latest user prompt: what the model has done for the current question."""
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if isinstance(message, ModelRequest) and any(isinstance(p, UserPromptPart) for p in message.parts):
            return messages[index:]
    return messages


def _returns(messages: list[ModelMessage]) -> dict[str, ToolReturnPart]:
    return {
        part.tool_name: part
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, ToolReturnPart)
    }


def _verdict(growth: float, margin: float) -> str:
    if growth < 0:
        return "under pressure: revenue is shrinking"
    if growth > 10 and margin > 10:
        return "strong: fast growth at a healthy margin"
    if margin < 0:
        return "speculative: fast growth, but still losing money"
    return "steady: modest growth, positive margin"


def _summary(figures: dict[str, object], news: list[dict[str, str]]) -> tuple[str, str]:
    company = str(figures["company"])
    growth = float(str(figures["revenue_growth_pct"]))
    margin = float(str(figures["operating_margin_pct"]))
    cash = float(str(figures["net_cash_musd"]))
    verdict = _verdict(growth, margin)
    cash_text = f"net cash of ${cash:,.0f}M" if cash >= 0 else f"net debt of ${-cash:,.0f}M"
    lines = [
        f"{company} ({figures['sector']}) made ${float(str(figures['revenue_musd'])):,.0f}M of revenue over the "
        f"last four quarters, {growth:+.1f}% year on year, at an operating margin of {margin:.1f}%, with {cash_text}.",
    ]
    if news:
        lines.append("Recent news: " + "; ".join(f"{item['headline']} ({item['sentiment']})" for item in news) + ".")
    lines.append(f"Verdict: {verdict}.")
    return f"{company}: {verdict.split(':')[0]}, {growth:+.1f}% revenue growth", " ".join(lines)


def _look_up(company: str) -> ModelResponse:
    """Both lookups at once, as a model asks for parallel tool calls."""
    return ModelResponse(
        parts=[ToolCallPart("company_figures", {"company": company}), ToolCallPart("recent_news", {"company": company})]
    )


async def scripted_analyst(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Look up the figures and the news, save one report, then answer; like a model, it only reads messages."""
    await think()
    returns = _returns(messages)
    prompt = next(iter(_prompts(messages)), "")
    match = re.search(r"^Company:\s*(.+)$", prompt, re.MULTILINE)
    company = match.group(1).strip() if match else prompt.strip()

    if "company_figures" not in returns:
        return _look_up(company)
    figures = returns["company_figures"].model_response_object()
    if "error" in figures:
        return ModelResponse(parts=[TextPart(f"I could not find figures for {company}: {figures['error']}")])

    if "save_report" not in returns:
        news_part = returns.get("recent_news")
        news = news_part.model_response_object().get("return_value", []) if news_part else []
        title, summary = _summary(figures, news)
        return ModelResponse(parts=[ToolCallPart("save_report", {"title": title, "summary": summary})])

    saved = returns["save_report"].model_response_object()
    return ModelResponse(
        parts=[TextPart(f'I saved report #{saved.get("report_id")}, "{saved.get("title")}". {saved.get("summary")}')]
    )


async def scripted_chat(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Chat about the company the question names, or the one the conversation was about; it reads the history."""
    await think()
    prompts = _prompts(messages)
    company = next((found for text in reversed(prompts) if (found := mentioned_company(text))), None)
    if company is None:
        return ModelResponse(
            parts=[
                TextPart(
                    f"I follow {', '.join(COMPANIES[:-1])} and {COMPANIES[-1]}. Ask me about one of them, "
                    f'for example "How is {COMPANIES[0].split()[0]} doing?"'
                )
            ]
        )
    returns = _returns(_this_turn(messages))
    if "company_figures" not in returns:
        return _look_up(company)
    figures = returns["company_figures"].model_response_object()
    news_part = returns.get("recent_news")
    news = news_part.model_response_object().get("return_value", []) if news_part else []
    if len(prompts) > 1 and mentioned_company(prompts[-1]) is None:  # a follow-up on the same company
        return ModelResponse(parts=[TextPart(f"Still on {company}. What I would watch: {_watch(figures, news)}.")])
    _, summary = _summary(figures, news)
    return ModelResponse(parts=[TextPart(f"{summary} Want the same for another company?")])


def _watch(figures: dict[str, object], news: list[dict[str, str]]) -> str:
    growth = float(str(figures["revenue_growth_pct"]))
    margin = float(str(figures["operating_margin_pct"]))
    cash = float(str(figures["net_cash_musd"]))
    points = []
    if growth < 0:
        points.append(f"whether revenue stops shrinking ({growth:+.1f}% a year)")
    else:
        points.append(f"whether {growth:.1f}% revenue growth holds up")
    if margin < 0:
        points.append(f"when the operating margin ({margin:.1f}%) turns positive")
    if cash < 0:
        points.append(f"the net debt of ${-cash:,.0f}M and what refinancing it costs")
    points += [f'the follow-up to "{item["headline"]}"' for item in news if item.get("sentiment") == "negative"]
    return "; ".join(points)
