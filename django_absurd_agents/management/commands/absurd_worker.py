"""``manage.py absurd_worker``: run the tasks of one or more queues (see ``django_absurd_agents.worker``)."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_absurd_agents import conf
from django_absurd_agents.exceptions import WorkerError
from django_absurd_agents.worker import Worker, WorkerConfig, discover_tasks

_LEVELS = {0: logging.WARNING, 1: logging.INFO}


class Command(BaseCommand):
    help = (
        "Claim and run Absurd tasks: every installed app's tasks.py and ABSURD_AGENTS['TASK_MODULES'] are imported "
        "first. SIGTERM/SIGINT stop gracefully; a second signal exits at once."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        settings = conf.get()
        parser.add_argument(
            "--queue",
            "-q",
            action="append",
            dest="queues",
            metavar="QUEUE",
            help="A queue to serve; repeat for several. "
            f"Default: every configured queue ({', '.join(settings.all_queues)}).",
        )
        parser.add_argument(
            "--concurrency",
            "-c",
            type=int,
            help=f"Tasks run at the same time, shared by the queues (default {settings.concurrency}).",
        )
        parser.add_argument(
            "--claim-timeout",
            type=int,
            help=f"Lease length in seconds; a dead worker's tasks resume after it (default {settings.claim_timeout}).",
        )
        parser.add_argument(
            "--poll-interval",
            type=float,
            help=f"Seconds between polls of an empty queue (default {settings.poll_interval:g}).",
        )
        parser.add_argument(
            "--shutdown-grace",
            type=float,
            help="Seconds in-flight tasks get to finish after SIGTERM before they are handed back "
            f"(default {settings.shutdown_grace:g}).",
        )
        parser.add_argument("--worker-id", help="Name recorded on claimed runs (default host:pid).")
        parser.add_argument("--burst", action="store_true", help="Run what is waiting, then exit 0.")
        parser.add_argument(
            "--schedule",
            action="store_true",
            help="Also spawn the due occurrences of ABSURD_AGENTS['SCHEDULES'] (any number of workers may).",
        )
        parser.add_argument("--max-tasks", type=int, help="Exit after claiming this many tasks (and finishing them).")
        parser.add_argument(
            "--heartbeat-file",
            help="A file rewritten with the Unix time every poll, for liveness probes "
            f"(default ABSURD_AGENTS['HEARTBEAT_FILE'] = {settings.heartbeat_file!r}).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        check_options(options)
        _configure_logging(options["verbosity"])
        try:
            config = WorkerConfig.from_settings(
                queues=options["queues"],
                concurrency=options["concurrency"],
                claim_timeout=options["claim_timeout"],
                poll_interval=options["poll_interval"],
                shutdown_grace=options["shutdown_grace"],
                worker_id=options["worker_id"],
                burst=options["burst"],
                schedule=options["schedule"],
                max_tasks=options["max_tasks"],
                heartbeat_file=options["heartbeat_file"],
            )
            discover_tasks()
            code = asyncio.run(Worker(config).run())
        except WorkerError as exc:
            raise CommandError(str(exc)) from exc
        if code:
            sys.exit(code)


def check_options(options: dict[str, Any]) -> None:
    """Refuse empty queue names before the worker is built (no SQL runs first); ``WorkerConfig`` checks the numbers."""
    for queue in options.get("queues") or ():
        if not isinstance(queue, str) or not queue.strip():
            raise CommandError(
                "--queue needs a queue name (it was given an empty value, e.g. an unset shell variable). "
                "Name the queue, or leave --queue out to serve every configured queue."
            )
    max_tasks = options.get("max_tasks")
    if max_tasks is not None and max_tasks < 1:
        raise CommandError(f"--max-tasks must be at least 1, not {max_tasks!r}.")


def _configure_logging(verbosity: int) -> None:
    """Show the worker's log at INFO on stderr unless the project's LOGGING already routes it."""
    logger = logging.getLogger("django_absurd_agents")
    if logger.hasHandlers():
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(_LEVELS.get(verbosity, logging.DEBUG))
