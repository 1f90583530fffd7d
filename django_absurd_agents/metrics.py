"""``GET /agents/metrics``: Prometheus's text format, read from Absurd's tables and the worker table.

Open to a user holding ``absurd_agents.view_absurdtask``, or to a scraper sending
``Authorization: Bearer <ABSURD_AGENTS["METRICS_TOKEN"]>`` (compared in constant time); anyone
else gets 403 before any query of the tasks. Each scrape reads the queue catalog once, then one
statement per family (a branch per queue; steps, their durations and tokens share one), and the
worker table; nothing is kept in the process, so every web process answers the same. Counts over
time are gauges over a window (``WINDOW``, the last hour): rows are deleted by ``absurd_cleanup``,
so totals since the start could go down and would not be counters anyway. For the same reason step
durations are a ``_sum``/``_count`` pair of gauges, not a histogram, whose buckets Prometheus
expects to only grow.

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
from django_absurd_agents.event_access import VIEW_PERMISSION
from django_absurd_agents.queue_overview import QueueOverview, overview_of
from django_absurd_agents.tables import over_queues, rows, table
from django_absurd_agents.worker_record import Worker

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
    return bool(user is not None and user.is_authenticated and user.has_perm(VIEW_PERMISSION))


@dataclass
class RunCounts:
    started: int = 0
    completed: int = 0
    failed: int = 0
    claim_latency_sum: float = 0.0


@dataclass
class StepCounts:
    """One kind of step in one queue over the window: how many, and how long those with a known start took."""

    written: int = 0
    seconds_sum: float = 0.0
    timed: int = 0


Tokens = dict[tuple[str, str], int]
"""(queue, direction) -> tokens, direction being ``input`` or ``output``."""


@dataclass
class Snapshot:
    queues: list[QueueOverview]
    runs: dict[str, RunCounts]
    steps: dict[tuple[str, str], StepCounts]
    tokens: Tokens
    replayed_tokens: Tokens
    workers: Counter[str] = field(default_factory=Counter)


def _window_params(queues: list[str], window: datetime.timedelta) -> list[Any]:
    """``queue, window, run id floor`` for each queue's branch, in the order the branches read them."""
    floor = run_id_floor(timezone.now() - window)
    params: list[Any] = []
    for queue in queues:
        params.extend([queue, window, floor])
    return params


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
    return {
        row["queue"]: RunCounts(int(row["started"]), int(row["completed"]), int(row["failed"]), float(row["latency"]))
        for row in rows(" union all ".join(branches), _window_params(queues, window))
    }


_KIND = (
    "case when c.checkpoint_name ~ '__model\\.request' then 'model' "
    "when c.checkpoint_name ~ '\\.call_tool' then 'tool' else 'other' end"
)


def _tokens(alias: str, direction: str) -> str:
    """The summed ``usage.<direction>_tokens`` of checkpoints ``alias`` (pydantic-ai's ModelResponse), numbers only."""
    usage = f"{alias}.state->'usage'->'{direction}_tokens'"
    return f"coalesce(sum(case when jsonb_typeof({usage}) = 'number' then ({usage})::text::numeric end), 0)"


def recent_steps(
    queues: list[str], window: datetime.timedelta = WINDOW
) -> tuple[dict[tuple[str, str], StepCounts], Tokens]:
    """Per (queue, kind): checkpoints written within ``window`` and their durations; per (queue, direction): tokens.

    Absurd records when a checkpoint was written, not when its step began. A step's duration is
    therefore the time since the latest of: the previous checkpoint written by the same run, and the
    run's last claim (``started_at``, moved by every claim, a wake-up from a sleep included). It
    covers the task's own code between two steps too, which in an agent run is little next to a
    model request or a tool call. A step with no such start (none found) is written but not timed.

    The checkpoints are reached through the runs created within ``window`` plus a day (a range of the
    runs' primary key, see ``run_id_floor``) that were not finished before the window, then the
    checkpoints' primary key, run by run (a lateral subquery: as a plain join the planner would
    rather read the checkpoint table whole). All of a run's checkpoints are read, the older ones only
    to find the start of the first step in the window.
    """
    if not queues:
        return {}, {}
    branches = [
        "(select s.queue, s.kind, count(*) as n, "
        f"{_tokens('s', 'input')} as input_tokens, {_tokens('s', 'output')} as output_tokens, "
        "coalesce(sum(s.seconds), 0) as seconds_sum, count(s.seconds) as timed from "
        f"(select %s::text as queue, {_KIND} as kind, c.state, c.updated_at, w.since, "
        "extract(epoch from c.updated_at - greatest(c.previous, "
        "case when r.started_at <= c.updated_at then r.started_at end)) as seconds "
        f"from (select now() - %s::interval as since) w cross join {table('r', q)} r cross join lateral "
        "(select c.checkpoint_name, c.state, c.updated_at, "
        "lag(c.updated_at) over (order by c.updated_at, c.checkpoint_name) as previous "
        f"from {table('c', q)} c where c.task_id = r.task_id and c.owner_run_id = r.run_id) c "
        "where r.run_id >= %s and r.started_at is not null "
        "and coalesce(r.completed_at, r.failed_at, 'infinity'::timestamptz) >= w.since) s "
        "where s.updated_at >= s.since group by 1, 2)"
        for q in queues
    ]
    steps: dict[tuple[str, str], StepCounts] = {}
    tokens: Tokens = {}
    for row in rows(" union all ".join(branches), _window_params(queues, window)):
        steps[(row["queue"], row["kind"])] = StepCounts(int(row["n"]), float(row["seconds_sum"]), int(row["timed"]))
        if row["kind"] == "model":
            tokens[(row["queue"], "input")] = int(row["input_tokens"])
            tokens[(row["queue"], "output")] = int(row["output_tokens"])
    return steps, tokens


def replayed_tokens(queues: list[str], window: datetime.timedelta = WINDOW) -> Tokens:
    """Per (queue, direction): tokens that runs claimed within ``window`` replayed instead of paying again.

    A run of a later attempt (``attempt > 1``) loads the task's checkpoints when it is claimed, and
    each model request checkpointed by an earlier attempt's run comes back from the database instead
    of from the model. Counted once per such run: a request replayed by the second and the third
    attempt was saved twice. Reached through the runs' primary key (runs created within ``window``
    plus a day), then, run by run, the checkpoints' (by task) and the runs' again (the checkpoint's
    owner): a lateral subquery, as in ``recent_steps``, so the checkpoint table is never read whole.
    """
    if not queues:
        return {}
    branches = [
        f"(select %s::text as queue, {_tokens('c', 'input')} as input_tokens, "
        f"{_tokens('c', 'output')} as output_tokens "
        f"from {table('r', q)} r cross join lateral (select c.state from {table('c', q)} c "
        f"join {table('r', q)} o on o.run_id = c.owner_run_id "
        "where c.task_id = r.task_id and c.owner_run_id <> r.run_id and o.attempt < r.attempt "
        "and c.checkpoint_name ~ '__model\\.request') c "
        "where r.started_at >= now() - %s::interval and r.run_id >= %s and r.attempt > 1)"
        for q in queues
    ]
    tokens: Tokens = {}
    for row in rows(" union all ".join(branches), _window_params(queues, window)):
        tokens[(row["queue"], "input")] = int(row["input_tokens"])
        tokens[(row["queue"], "output")] = int(row["output_tokens"])
    return tokens


def snapshot() -> Snapshot:
    """Everything one scrape shows: one statement per family over every queue, one catalog read."""

    def read(queues: list[str]) -> Snapshot:
        steps, tokens = recent_steps(queues)
        return Snapshot(
            queues=overview_of(queues),
            runs=recent_runs(queues),
            steps=steps,
            tokens=tokens,
            replayed_tokens=replayed_tokens(queues),
        )

    found = over_queues(None, read)
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
    yield from step_families(found, window)
    workers = GaugeMetricFamily("absurd_workers", "Workers by status (alive, silent, gone).", labels=["status"])
    for status in ("alive", "silent", "gone"):
        workers.add_metric([status], found.workers.get(status, 0))
    yield workers


def step_families(found: Snapshot, window: str) -> Iterator[Any]:
    """Steps by kind, their durations, and the model tokens paid and replayed."""
    from prometheus_client.core import GaugeMetricFamily

    labels = ["queue", "kind"]
    steps = GaugeMetricFamily("absurd_steps", f"Checkpoints written {window}, by kind.", labels=labels)
    since = (
        "since the run's previous checkpoint or its last claim, whichever is later "
        "(Absurd records when a step ended, not when it began)"
    )
    seconds = GaugeMetricFamily(
        "absurd_step_duration_seconds_sum",
        f"Seconds the steps checkpointed {window} took, summed by kind; a step's duration counts {since}.",
        labels=labels,
    )
    timed = GaugeMetricFamily(
        "absurd_step_duration_seconds_count",
        f"Steps checkpointed {window} with a known start, by kind (divide the _sum by it for the mean).",
        labels=labels,
    )
    for (queue, kind), counts in sorted(found.steps.items()):
        steps.add_metric([queue, kind], counts.written)
        seconds.add_metric([queue, kind], counts.seconds_sum)
        timed.add_metric([queue, kind], counts.timed)
    yield from (steps, seconds, timed)
    directions = ["queue", "direction"]
    tokens = GaugeMetricFamily(
        "absurd_model_tokens", f"Tokens of model requests checkpointed {window}.", labels=directions
    )
    for (queue, direction), count in sorted(found.tokens.items()):
        tokens.add_metric([queue, direction], count)
    replayed = GaugeMetricFamily(
        "absurd_model_tokens_replayed",
        f"Tokens of model requests that runs claimed {window} replayed from an earlier attempt's checkpoint "
        "instead of paying for them again (once per replaying run).",
        labels=directions,
    )
    for (queue, direction), count in sorted(found.replayed_tokens.items()):
        replayed.add_metric([queue, direction], count)
    yield from (tokens, replayed)


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
