"""The overview's pictures: runs started, completed and failed per minute and per hour, per queue.

Read with one statement per page (a branch per queue) over the runs of the last day, found by the
range of their ids (``run_id_floor``) and counted per minute and per hour in SQL. The geometry
(bars, axis labels) is computed here as plain numbers; the SVG markup is in the template
``admin/absurd_agents/_chart.html``, so the page needs no JavaScript and no CDN.
"""

from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass, field
from typing import Any

from django.utils import timezone

from django_absurd_agents.tables import over_queues, rows, table

SERIES = ("started", "completed", "failed")
RUN_SLACK = datetime.timedelta(days=1)
"""Runs created this long before a window are not read for it (see ``run_id_floor``)."""
WIDTH, HEIGHT = 600.0, 120.0
LEFT, BOTTOM, TOP = 34.0, 18.0, 8.0


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    series: str
    title: str


@dataclass
class Chart:
    """One chart: a slot per bucket, in each a bar per series, scaled to the largest count."""

    title: str
    bars: list[Bar] = field(default_factory=list)
    labels: list[tuple[float, str]] = field(default_factory=list)
    peak: int = 0
    totals: dict[str, int] = field(default_factory=dict)
    width: float = WIDTH
    height: float = HEIGHT
    left: float = LEFT
    base: float = HEIGHT - BOTTOM
    top: float = TOP

    @property
    def empty(self) -> bool:
        return self.peak == 0


@dataclass
class QueueCharts:
    queue: str
    per_minute: Chart
    per_hour: Chart


def run_id_floor(since: datetime.datetime) -> uuid.UUID:
    """The smallest UUIDv7 Absurd could give a run created at ``since - RUN_SLACK``.

    Run ids are UUIDv7 (``absurd.portable_uuidv7``), so ``run_id >= floor`` is a range of the primary
    key: the runs of the last day are read without scanning the table. A run created more than
    ``RUN_SLACK`` before the window (a task that slept over a day, then finished) is left out.
    """
    millis = int((since - RUN_SLACK).timestamp() * 1000)
    return uuid.UUID(int=max(millis, 0) << 80)


Counts = dict[tuple[str, datetime.datetime], int]


def run_counts(queues: list[str], now: datetime.datetime) -> dict[str, tuple[Counts, Counts]]:
    """Per queue: (series, minute) counts over the last hour and (series, hour) counts over the last day.

    One statement; each queue's branch aggregates with two grouping sets, so at most 60 + 24 rows per
    series come back, however many runs there were.
    """
    if not queues:
        return {}
    branches = [
        "(select %s::text as queue, v.series, "
        "case when v.at >= %s then date_trunc('minute', v.at) end as minute, "
        "date_trunc('hour', v.at) as hour, count(*) as n "
        f"from {table('r', q)} r cross join lateral (values ('started', r.started_at), "
        "('completed', r.completed_at), ('failed', r.failed_at)) v(series, at) "
        "where r.run_id >= %s and (r.started_at >= %s or r.completed_at >= %s or r.failed_at >= %s) and v.at >= %s "
        "group by grouping sets ((2, 3), (2, 4)))"
        for q in queues
    ]
    since = now - datetime.timedelta(days=1)
    hour_ago = now - datetime.timedelta(hours=1)
    params: list[Any] = []
    for queue in queues:
        params.extend([queue, hour_ago, run_id_floor(since), since, since, since, since])
    found: dict[str, tuple[Counts, Counts]] = {queue: ({}, {}) for queue in queues}
    for row in rows(" union all ".join(branches), params):
        minutes, hours = found[row["queue"]]
        if row["minute"] is not None:
            minutes[(row["series"], row["minute"])] = int(row["n"])
        elif row["hour"] is not None:
            hours[(row["series"], row["hour"])] = int(row["n"])
    return found


def _chart(title: str, buckets: list[datetime.datetime], counts: Counts) -> Chart:
    chart = Chart(title=title)
    chart.totals = {s: sum(counts.get((s, b), 0) for b in buckets) for s in SERIES}
    chart.peak = max((counts.get((s, b), 0) for s in SERIES for b in buckets), default=0)
    slot = (chart.width - chart.left) / max(len(buckets), 1)
    bar_width = max(slot / len(SERIES) - 0.4, 0.5)
    scale = (chart.base - chart.top) / chart.peak if chart.peak else 0.0
    for i, bucket in enumerate(buckets):
        x = chart.left + i * slot
        for j, series in enumerate(SERIES):
            value = counts.get((series, bucket), 0)
            if value:
                height = max(value * scale, 1.0)
                label = f"{timezone.localtime(bucket):%H:%M}: {value} {series}"
                chart.bars.append(
                    Bar(
                        round(x + j * (bar_width + 0.4), 1),
                        round(chart.base - height, 1),
                        round(bar_width, 1),
                        round(height, 1),
                        series,
                        label,
                    )
                )
    step = max(len(buckets) // 6, 1)
    chart.labels = [
        (round(chart.left + i * slot, 1), f"{timezone.localtime(bucket):%H:%M}")
        for i, bucket in enumerate(buckets)
        if i % step == 0
    ]
    return chart


def queue_charts(now: datetime.datetime) -> list[QueueCharts]:
    """Per queue: runs per minute over the last hour, and per hour over the last day."""

    def run(queues: list[str]) -> list[QueueCharts]:
        counts = run_counts(queues, now)
        minute = now.replace(second=0, microsecond=0)
        hour = minute.replace(minute=0)
        minutes = [minute - datetime.timedelta(minutes=m) for m in range(59, -1, -1)]
        hours = [hour - datetime.timedelta(hours=h) for h in range(23, -1, -1)]
        return [
            QueueCharts(
                queue=queue,
                per_minute=_chart("Per minute, last hour", minutes, counts[queue][0]),
                per_hour=_chart("Per hour, last day", hours, counts[queue][1]),
            )
            for queue in queues
        ]

    return over_queues(None, run)
