"""``GET /agents/metrics``: Prometheus's text format, read from Absurd's tables and the worker table.

Open to a user holding ``absurd_agents.view_absurdtask``, or to a scraper sending
``Authorization: Bearer <ABSURD_AGENTS["METRICS_TOKEN"]>`` (compared in constant time); anyone
else gets 403 before any query of the tasks. Each scrape reads the database once per family,
nothing is kept in the process, so every web process answers the same. Counts over time are
gauges over a window (``WINDOW``, the last hour): rows are deleted by ``absurd_cleanup``, so totals
since the start could go down and would not be counters anyway.

Needs ``prometheus-client`` (``pip install "django-absurd-agents[metrics]"``); without it the
endpoint answers 501 saying so.
"""

from __future__ import annotations

import datetime
import hmac
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.http import require_GET

from django_absurd_agents import conf
from django_absurd_agents.charts import run_id_floor
from django_absurd_agents.queue_overview import QueueOverview, overview
from django_absurd_agents.tables import over_queues, rows, table
from django_absurd_agents.worker_record import Worker

VIEW_PERM = "absurd_agents.view_absurdtask"
WINDOW = datetime.timedelta(hours=1)
"""Runs and steps are counted over this window, ending at the scrape."""


def allowed(request: HttpRequest) -> bool:
    """The bearer token when one is configured and sent, else the user's view permission."""
    token = conf.get().metrics_token
    header = request.headers.get("Authorization", "")
    given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
    if token and given and hmac.compare_digest(given.encode(), str(token).encode()):
        return True
    user: Any = getattr(request, "user", None)
    return bool(user is not None and user.is_authenticated and user.has_perm(VIEW_PERM))


@dataclass
class RunCounts:
    started: int = 0
    completed: int = 0
    failed: int = 0
    claim_latency_sum: float = 0.0


@dataclass
class Snapshot:
    queues: list[QueueOverview]
    runs: dict[str, RunCounts]
    steps: dict[tuple[str, str], int]
    tokens: dict[tuple[str, str], int]
    workers: Counter[str] = field(default_factory=Counter)


def recent_runs(queues: list[str], window: datetime.timedelta = WINDOW) -> dict[str, RunCounts]:
    """Per queue: runs started, completed and failed within ``window``, and their summed claim latency."""
    if not queues:
        return {}
    branches = [
        f"(select %s::text as queue, count(*) filter (where r.started_at >= since) as started, "
        "count(*) filter (where r.completed_at >= since) as completed, "
        "count(*) filter (where r.failed_at >= since) as failed, "
        "coalesce(sum(extract(epoch from r.started_at - r.available_at)) filter "
        "(where r.started_at >= since and r.available_at is not null), 0) as latency "
        f"from {table('r', q)} r, (select now() - %s::interval as since) w "
        "where r.run_id >= %s and (r.started_at >= since or r.completed_at >= since or r.failed_at >= since))"
        for q in queues
    ]
    floor = run_id_floor(timezone.now() - window)
    params: list[Any] = []
    for queue in queues:
        params.extend([queue, window, floor])
    return {
        row["queue"]: RunCounts(int(row["started"]), int(row["completed"]), int(row["failed"]), float(row["latency"]))
        for row in rows(" union all ".join(branches), params)
    }


def recent_steps(
    queues: list[str], window: datetime.timedelta = WINDOW
) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
    """Per (queue, kind): checkpoints written within ``window``; per (queue, direction): tokens of model requests."""
    if not queues:
        return {}, {}
    branches = [
        "(select %s::text as queue, case when c.checkpoint_name ~ '__model\\.request' then 'model' "
        "when c.checkpoint_name ~ '\\.call_tool' then 'tool' else 'other' end as kind, count(*) as n, "
        "coalesce(sum(case when jsonb_typeof(c.state->'usage'->'input_tokens') = 'number' "
        "then (c.state->'usage'->>'input_tokens')::numeric end), 0) as input_tokens, "
        "coalesce(sum(case when jsonb_typeof(c.state->'usage'->'output_tokens') = 'number' "
        "then (c.state->'usage'->>'output_tokens')::numeric end), 0) as output_tokens "
        f"from {table('c', queue)} c where c.updated_at >= now() - %s::interval group by 2)"
        for queue in queues
    ]
    params: list[Any] = []
    for queue in queues:
        params.extend([queue, window])
    steps: dict[tuple[str, str], int] = {}
    tokens: dict[tuple[str, str], int] = {}
    for row in rows(" union all ".join(branches), params):
        steps[(row["queue"], row["kind"])] = int(row["n"])
        if row["kind"] == "model":
            tokens[(row["queue"], "input")] = int(row["input_tokens"])
            tokens[(row["queue"], "output")] = int(row["output_tokens"])
    return steps, tokens


def snapshot() -> Snapshot:
    def run(queues: list[str]) -> Snapshot:
        steps, tokens = recent_steps(queues)
        return Snapshot(queues=overview(), runs=recent_runs(queues), steps=steps, tokens=tokens)

    found = over_queues(None, run)
    found.workers.update(worker.status for worker in Worker.objects.only("last_heartbeat", "heartbeat_interval"))
    return found


def families(found: Snapshot) -> Iterator[Any]:
    """The metric families of one scrape."""
    from prometheus_client.core import GaugeMetricFamily

    window = f"in the last {int(WINDOW.total_seconds())} s"
    tasks = GaugeMetricFamily("absurd_tasks", "Tasks by queue and state.", labels=["queue", "state"])
    oldest = GaugeMetricFamily(
        "absurd_oldest_pending_age_seconds", "Age of the oldest pending task (0: none).", labels=["queue"]
    )
    for item in found.queues:
        for state, count in item.state_counts:
            tasks.add_metric([item.queue, state], count)
        age = item.oldest_pending_age
        oldest.add_metric([item.queue], age.total_seconds() if age else 0.0)
    yield tasks
    yield oldest
    runs = {
        name: GaugeMetricFamily(f"absurd_runs_{name}", f"Runs {name} {window}.", labels=["queue"])
        for name in ("started", "completed", "failed")
    }
    latency = GaugeMetricFamily(
        "absurd_claim_latency_seconds_sum",
        f"Seconds between a run becoming available and being claimed, summed over the runs started {window}.",
        labels=["queue"],
    )
    for item in found.queues:
        counts = found.runs.get(item.queue, RunCounts())
        for name, family in runs.items():
            family.add_metric([item.queue], getattr(counts, name))
        latency.add_metric([item.queue], counts.claim_latency_sum)
    yield from runs.values()
    yield latency
    steps = GaugeMetricFamily("absurd_steps", f"Checkpoints written {window}, by kind.", labels=["queue", "kind"])
    for (queue, kind), count in sorted(found.steps.items()):
        steps.add_metric([queue, kind], count)
    yield steps
    tokens = GaugeMetricFamily(
        "absurd_model_tokens", f"Tokens of model requests checkpointed {window}.", labels=["queue", "direction"]
    )
    for (queue, direction), count in sorted(found.tokens.items()):
        tokens.add_metric([queue, direction], count)
    yield tokens
    workers = GaugeMetricFamily("absurd_workers", "Workers by status (alive, silent, gone).", labels=["status"])
    for status in ("alive", "silent", "gone"):
        workers.add_metric([status], found.workers.get(status, 0))
    yield workers


class _Collector:
    def __init__(self, found: Snapshot) -> None:
        self.found = found

    def collect(self) -> Iterator[Any]:
        return families(self.found)


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    if not allowed(request):
        return HttpResponse("Forbidden: log in with the view permission, or send the metrics token.\n", status=403)
    try:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    except ImportError:
        return HttpResponse(
            'prometheus-client is not installed: pip install "django-absurd-agents[metrics]"\n', status=501
        )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(snapshot()))  # type: ignore[arg-type]
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
