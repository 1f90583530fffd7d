"""The analyst agent and the Absurd task that runs it.

The agent is an ordinary Pydantic AI ``Agent`` wrapped in ``AbsurdAgent``: inside the task every
model request and every tool call is a checkpointed step, so a worker killed halfway leaves the
completed steps recorded and the next worker replays them instead of paying for them again. The
``save_report`` tool writes a row (a side effect); it runs once however often the task is resumed.

Workers import this module (every installed app's ``tasks`` module); web processes spawn the task
by name and never need to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from absurd_sdk import AsyncTaskContext
from pydantic_ai import Agent, ModelRetry, RunContext

from analyst.llm import build_model, log_call
from analyst.market import COMPANIES, FIGURES, NEWS, Figures, Headline, find_company
from analyst.models import Report
from django_absurd_agents import AbsurdAgent, absurd

from analyst.reports import TASK_NAME

INSTRUCTIONS = """\
You are a careful equity analyst. For the company in the request:
1. call company_figures and recent_news;
2. call save_report exactly once, with a short title and a summary of three to five sentences that
   ends with a one-line verdict;
3. answer the user's question in a few sentences and mention the report's number.
Use only the figures and news the tools return."""


@dataclass
class ReportDeps:
    """What the tools need besides their arguments: which task (and so which report) they serve."""

    task_id: str
    company: str


inner = Agent(build_model(), name="analyst", deps_type=ReportDeps, instructions=INSTRUCTIONS)


@inner.tool_plain
def company_figures(company: str) -> Figures:
    """Revenue, growth, operating margin and net cash of a listed company over the last four quarters."""
    log_call("tool", "company_figures")
    found = find_company(company)
    if found is None:
        raise ModelRetry(f"No figures for {company!r}. Known companies: {', '.join(COMPANIES)}.")
    return FIGURES[found]


@inner.tool_plain
def recent_news(company: str) -> list[Headline]:
    """The latest headlines about a company, newest first, each with its sentiment."""
    log_call("tool", "recent_news")
    found = find_company(company)
    return list(NEWS.get(found, [])) if found else []


@inner.tool
async def save_report(ctx: RunContext[ReportDeps], title: str, summary: str) -> dict[str, Any]:
    """Save the finished report so people can read it later. Call it exactly once."""
    report = await Report.objects.acreate(
        task_id=ctx.deps.task_id, company=ctx.deps.company, title=title[:200], summary=summary
    )
    log_call("tool", "save_report")
    return {"report_id": report.pk, "title": report.title, "summary": report.summary}


analyst = AbsurdAgent(inner, absurd)


def build_prompt(company: str, question: str) -> str:
    return f"Company: {company}\nQuestion: {question}"


@absurd.register_task(name=TASK_NAME)
async def write_report(params: dict[str, Any], ctx: AsyncTaskContext) -> dict[str, Any]:
    """Run the analyst on one report request; the answer becomes the task's result."""
    deps = ReportDeps(task_id=str(ctx.task_id), company=params["company"])
    result = await analyst.run(build_prompt(params["company"], params["question"]), deps=deps)
    return {"answer": result.output}
