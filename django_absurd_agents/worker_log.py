"""The worker's log: a banner at start, one line when a task starts and one when it ends.

Lines carry the task's name, id, queue, attempt, duration and outcome, never params or results
(``tests/test_security.py`` checks it); ``extra["absurd_task"]`` has the same fields for handlers
that want them structured.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from absurd_sdk import ClaimedTask

from django_absurd_agents.reconnect import is_transient

if TYPE_CHECKING:
    from django_absurd_agents.worker_config import WorkerConfig

logger = logging.getLogger("django_absurd_agents.worker")


def log_start(task: ClaimedTask, queue: str) -> None:
    logger.info(
        "task %s name=%s id=%s queue=%s attempt=%s",
        "retry" if task["attempt"] > 1 else "start",
        task["task_name"],
        task["task_id"],
        queue,
        attempt_label(task),
        extra=extra(task, queue, "started"),
    )


def log_end(task: ClaimedTask, queue: str, outcome: str, error: BaseException | None, duration: float) -> None:
    """One line saying how an execution ended, at the level the outcome deserves."""
    args: tuple[Any, ...] = (task["task_name"], task["task_id"], queue, attempt_label(task), duration)
    fields = extra(task, queue, outcome, duration)
    common = "name=%s id=%s queue=%s attempt=%s duration=%.3fs"
    if outcome == "completed":
        logger.info("task completed " + common, *args, extra=fields)
    elif outcome == "failed":
        max_attempts = task.get("max_attempts")
        if max_attempts is None or task["attempt"] < max_attempts:
            logger.warning("task failed " + common + ", will be retried: %s", *args, one_line(error), extra=fields)
        else:
            logger.error(
                "task failed " + common + ", no attempts left: %s",
                *args,
                one_line(error),
                exc_info=error,
                extra=fields,
            )
    elif outcome in ("unknown", "handed back"):
        pass  # execution.py logged why the run went back to the queue, and when it runs again
    elif outcome == "misrouted":
        logger.error("task failed " + common + ": %s", *args, one_line(error), extra=fields)
    elif outcome == "suspended":
        logger.info("task suspended " + common + " (sleeping or waiting for an event)", *args, extra=fields)
    elif outcome == "cancelled":
        logger.info("task cancelled " + common, *args, extra=fields)
    elif outcome == "lost":
        logger.warning("task lost " + common + ": its run was failed elsewhere (lease expired?)", *args, extra=fields)
    else:
        logger.warning("task %s " + common, outcome, *args, extra=fields)


def log_unrecorded(task: ClaimedTask, queue: str, exc: BaseException, duration: float, claim_timeout: int) -> None:
    """The execution ended with an error its outcome could not be written after (the database went away)."""
    connection_lost = is_transient(exc)
    logger.log(
        logging.WARNING if connection_lost else logging.ERROR,
        "task unrecorded name=%s id=%s queue=%s attempt=%s duration=%.3fs: the database failed while it "
        "ran (%s); it runs again once its lease expires (at most %ds).",
        task["task_name"],
        task["task_id"],
        queue,
        attempt_label(task),
        duration,
        one_line(exc),
        claim_timeout,
        exc_info=None if connection_lost else exc,
        extra=extra(task, queue, "unrecorded"),
    )


def log_banner(config: WorkerConfig, registry: Mapping[str, dict[str, Any]]) -> None:
    """What the worker serves, which tasks it knows, and queues nothing is registered for."""
    served = set(config.queues)
    by_queue: dict[str, list[str]] = {q: [] for q in config.queues}
    elsewhere: list[str] = []
    for name, registration in sorted(registry.items()):
        if registration["queue"] in served:
            by_queue[registration["queue"]].append(name)
        else:
            elsewhere.append(f"{name} ({registration['queue']})")
    tasks = "; ".join(f"{q}: {', '.join(names) or '(none)'}" for q, names in by_queue.items())
    logger.info(
        "Worker %s serving queue(s) %s with %d slot(s) (up to %d database connections per queue), "
        "claim timeout %ds, poll every %gs%s. Tasks: %s.",
        config.worker_id,
        ", ".join(config.queues),
        config.concurrency,
        config.execution_connections + 1,
        config.claim_timeout,
        config.poll_interval,
        ", burst mode" if config.burst else "",
        tasks,
    )
    if elsewhere:
        logger.info("Registered for queues this worker does not serve: %s.", ", ".join(elsewhere))
    for queue, names in by_queue.items():
        if not names:
            logger.warning(
                "No task is registered for queue %r in this process: every task claimed from it will fail as "
                "unknown. Register tasks in an installed app's tasks.py or list their modules in "
                "ABSURD_AGENTS['TASK_MODULES'].",
                queue,
            )


def attempt_label(task: ClaimedTask) -> str:
    max_attempts = task.get("max_attempts")
    return f"{task['attempt']}/{max_attempts}" if max_attempts else str(task["attempt"])


def extra(task: ClaimedTask, queue: str, outcome: str, duration: float | None = None) -> dict[str, Any]:
    """Structured fields for log handlers that want them (never params or results)."""
    return {
        "absurd_task": {
            "name": task["task_name"],
            "id": str(task["task_id"]),
            "run_id": str(task["run_id"]),
            "queue": queue,
            "attempt": task["attempt"],
            "max_attempts": task.get("max_attempts"),
            "outcome": outcome,
            "duration": duration,
        }
    }


def one_line(exc: BaseException | None) -> str:
    if exc is None:
        return "no error recorded"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
