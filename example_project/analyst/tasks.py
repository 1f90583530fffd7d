"""The analyst's agents and the Absurd tasks that run them.

Both agents are ordinary Pydantic AI ``Agent`` objects wrapped in ``AbsurdAgent``: inside a task every
model request and every tool call is a checkpointed step, so a worker killed halfway leaves the
completed steps recorded and the next worker replays them instead of paying for them again.

* ``analyst`` writes reports (task ``write_report``). Its ``save_report`` tool writes a row, a side
  effect that happens once however often the task is resumed.
* ``analyst_chat`` answers the chat page through the conversation API: each message is a turn, and
  each turn is a durable task of its own (``absurd_agents.turn``) that sees the conversation so far.

Workers import this module (every installed app's ``tasks`` module is imported by
``absurd_worker``); web processes spawn by task name and never need to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from absurd_sdk import AsyncTaskContext
from pydantic_ai import Agent, ModelRetry, RunContext

from analyst.call_log import log_call
from analyst.llm import build_model
from analyst.market import COMPANIES, FIGURES, NEWS, Figures, Headline, find_company
from analyst.models import Report
from analyst.reports import TASK_NAME
from analyst.scripted import scripted_analyst, scripted_chat
from django_absurd_agents import AbsurdAgent, absurd
from django_absurd_agents.conversations import register_chat_agent

REPORT_INSTRUCTIONS = """\
You are a careful equity analyst. For the company in the request:
1. call company_figures and recent_news;
2. call save_report exactly once, with a short title and a summary of three to five sentences that
   ends with a one-line verdict;
3. answer the user's question in a few sentences and mention the report's number.
Use only the figures and news the tools return."""

CHAT_INSTRUCTIONS = f"""\
You are an equity analyst chatting with an investor. You follow these companies: {", ".join(COMPANIES)}.
Look up figures and news with your tools before you talk about a company; keep answers short and use
only what the tools return. For anything else, say which companies you follow."""


@dataclass
class ReportDeps:
    """What ``save_report`` needs besides its arguments: which task (and so which report) it serves."""

    task_id: str
    company: str


def company_figures(company: str) -> Figures:
    """Revenue, growth, operating margin and net cash of a listed company over the last four quarters."""
    found = find_company(company)
    log_call("tool", "company_figures")
    if found is None:
        raise ModelRetry(f"No figures for {company!r}. Known companies: {', '.join(COMPANIES)}.")
    return FIGURES[found]


def recent_news(company: str) -> list[Headline]:
    """The latest headlines about a company, newest first, each with its sentiment."""
    found = find_company(company)
    headlines = list(NEWS.get(found, [])) if found else []
    log_call("tool", "recent_news")
    return headlines


async def save_report(ctx: RunContext[ReportDeps], title: str, summary: str) -> dict[str, Any]:
    """Save the finished report so people can read it later. Call it exactly once."""
    report = await Report.objects.acreate(
        task_id=ctx.deps.task_id, company=ctx.deps.company, title=title[:200], summary=summary
    )
    log_call("tool", "save_report")
    return {"report_id": report.pk, "title": report.title, "summary": report.summary}


analyst = AbsurdAgent(
    Agent(
        build_model(scripted_analyst),
        name="analyst",
        deps_type=ReportDeps,
        instructions=REPORT_INSTRUCTIONS,
        tools=[company_figures, recent_news, save_report],
    ),
    absurd,
    event_log=True,  # the status page streams the run's events live (docs/live-output.md)
)

analyst_chat = register_chat_agent(
    AbsurdAgent(
        Agent(
            build_model(scripted_chat),
            name="analyst_chat",
            instructions=CHAT_INSTRUCTIONS,
            tools=[company_figures, recent_news],
        ),
        absurd,
        event_log=True,  # the chat page streams each answer as it is written
    )
)


def build_prompt(company: str, question: str) -> str:
    return f"Company: {company}\nQuestion: {question}"


@absurd.register_task(name=TASK_NAME)
async def write_report(params: dict[str, Any], ctx: AsyncTaskContext) -> dict[str, Any]:
    """Run the analyst on one report request; its answer becomes the task's result."""
    deps = ReportDeps(task_id=str(ctx.task_id), company=params["company"])
    result = await analyst.run(build_prompt(params["company"], params["question"]), deps=deps)
    return {"answer": result.output}
