"""Template filters of the task admin: stored JSON, durations and agent steps, the way a person reads them.

``{% load absurd_admin %}`` then ``{{ task.params|absurd_json }}``, ``{{ run.duration|absurd_duration }}``
or ``{{ step|absurd_step:forloop.counter }}``. A step's card is built here rather than in a template of
its own: a task page can hold hundreds of steps, and Django's template engine takes several times as
long to render them (56 ms for a page of 200 steps becomes about 120 ms).
"""

from __future__ import annotations

import datetime
from typing import Any

from django import template
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from django_absurd_agents.charts import Chart
from django_absurd_agents.json_text import pretty_json
from django_absurd_agents.steps import Step
from django_absurd_agents.timeline import Timeline

register = template.Library()


@register.filter
def absurd_json(value: Any) -> str:
    """Indented JSON, cut at 200,000 characters (the template escapes it)."""
    return pretty_json(value)


@register.filter
def absurd_duration(value: datetime.timedelta | None) -> str:
    """A duration the way a person reads it: "85 ms", "4.2 s", "3 min 5 s", "2 h 10 min", "3 d 4 h"."""
    if value is None:
        return ""
    seconds = value.total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s"


_JSON_BLOCK = '<div class="absurd-note">{}</div><pre class="absurd-json">{}</pre>'


def _model_html(step: Step) -> list[SafeString]:
    pieces = [format_html('<div class="absurd-thinking">{}</div>', text) for text in step.thinking]
    pieces.extend(format_html('<div class="absurd-text">{}</div>', text) for text in step.texts)
    pieces.extend(
        format_html(
            '<div>Calls tool <strong>{}</strong> with<pre class="absurd-json">{}</pre></div>',
            call.tool_name,
            pretty_json(call.args),
        )
        for call in step.tool_calls
    )
    if step.other_parts:
        pieces.append(format_html('<p class="absurd-note">Other parts: {}</p>', ", ".join(step.other_parts)))
    usage = "" if step.input_tokens is None else f" · {step.input_tokens} tokens in, {step.output_tokens} out"
    pieces.append(format_html('<p class="absurd-note">{}{}</p>', step.model_name or "", usage))
    return pieces


def _tool_html(step: Step) -> list[SafeString]:
    message = f": {step.message}" if step.message else ""
    pieces = [format_html("<div>Tool <strong>{}</strong> {}{}</div>", step.tool_name, step.outcome or "", message)]
    if step.call is not None:
        pieces.append(format_html(_JSON_BLOCK, "Arguments", pretty_json(step.call.args)))
    if step.has_result:
        pieces.append(format_html(_JSON_BLOCK, "Result" if step.returned else "Details", pretty_json(step.result)))
    return pieces


@register.filter
def absurd_step(step: Step, number: int) -> SafeString:
    """The step as a card: what the model said and asked for, what the tool got and gave, the stored JSON."""
    notes = [f"agent {step.agent}"] if step.agent else []
    notes.append(step.checkpoint.status)
    notes.append(timezone.localtime(step.checkpoint.updated_at).strftime("%H:%M:%S.%f"))
    if step.owner_attempt:
        notes.append(f"written by attempt {step.owner_attempt}")
    header = format_html(
        "<header><h3>{}. {}</h3>{}</header>",
        number,
        step.title,
        format_html_join("", '<span class="absurd-note">{}</span>', ((note,) for note in notes)),
    )
    body = _model_html(step) if step.kind == "model" else _tool_html(step) if step.kind == "tool" else []
    stored = format_html(
        '<details{}><summary>stored JSON</summary><pre class="absurd-json">{}</pre></details>',
        " open" if step.kind in {"step", "event"} else "",
        pretty_json(step.state),
    )
    css = f"absurd-step {step.kind}" + (" failure" if step.is_failure else "")
    return format_html('<section class="{}">{}</section>', css, mark_safe("".join([header, *body, stored])))


@register.filter
def absurd_worker(worker_id: str | None, workers: dict[str, dict[str, str]]) -> SafeString | str:
    """A run's worker: a link to its row in the worker list (with its status) when the row exists."""
    if not worker_id:
        return "—"
    link = (workers or {}).get(worker_id)
    if link is None:
        return worker_id
    return format_html(
        '<a href="{}" class="absurd-worker">{}</a> <span class="absurd-worker-status {}">{}</span>',
        link["url"],
        worker_id,
        link["status"],
        link["status"],
    )


@register.filter
def absurd_timeline(line: Timeline) -> SafeString | str:
    """A task's attempts as an inline SVG: a bar per attempt, a tick per checkpoint (``timeline.Timeline``).

    Built here rather than in a template for the same reason as a step's card: hundreds of marks.
    """
    if line.empty:
        return ""
    lanes = format_html_join(
        "\n",
        '<g class="lane {}"><text x="4" y="{}" class="label">{}</text>'
        '<rect x="{}" y="{}" width="{}" height="14" rx="3" class="bar {}"><title>{}</title></rect>'
        '{}<text x="{}" y="{}" class="end">{}</text></g>',
        (
            (
                lane.state,
                lane.y + 11,
                lane.label[:28],
                lane.x,
                lane.y,
                lane.width,
                lane.state,
                lane.title,
                format_html_join(
                    "",
                    '<line x1="{}" y1="{}" x2="{}" y2="{}" class="mark {}"><title>{}</title></line>',
                    ((m.x, lane.y - 2, m.x, lane.y + 16, m.kind, m.title) for m in lane.marks),
                ),
                min(lane.x + lane.width + 4, line.width - 80),
                lane.y + 11,
                lane.end_note,
            )
            for lane in line.lanes
        ),
    )
    ticks = format_html_join(
        "", '<text x="{}" y="{}" class="tick">{}</text>', ((x, line.height - 4, text) for x, text in line.ticks)
    )
    return format_html(
        '<svg xmlns="http://www.w3.org/2000/svg" class="absurd-timeline" id="absurd-timeline" viewBox="0 0 {} {}" '
        'width="{}" height="{}" role="img" aria-label="Timeline of the attempts">{}{}</svg>',
        line.width,
        line.height,
        line.width,
        line.height,
        lanes,
        ticks,
    )


@register.filter
def absurd_chart_bars(chart: Chart) -> SafeString:
    """The bars of an overview chart (``charts.Chart``) as SVG rects; a filter, as a day holds hundreds."""
    return format_html_join(
        "",
        '<rect x="{}" y="{}" width="{}" height="{}" class="{}"><title>{}</title></rect>',
        ((bar.x, bar.y, bar.width, bar.height, bar.series, bar.title) for bar in chart.bars),
    )
