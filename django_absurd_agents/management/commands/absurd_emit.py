"""``manage.py absurd_emit <event>``: emit an event, waking the tasks that wait for it."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from django_absurd_agents import conf, task_records
from django_absurd_agents.client import absurd
from django_absurd_agents.exceptions import UnstorableJSON
from django_absurd_agents.json_text import loads_storable_json, text_problem
from django_absurd_agents.management.commands import _ops


class Command(BaseCommand):
    help = (
        "Emit an event on a queue: tasks waiting for it (ctx.await_event) wake up with the payload. The first "
        "emit of a name wins; later ones are ignored."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("event", help="The event name, e.g. approval:<task id>.")
        parser.add_argument("--payload", "-p", default="null", help="The payload as JSON (default null).")
        parser.add_argument("--queue", "-q", help=f"The queue (default {conf.get().default_queue}).")

    def handle(self, *args: Any, **options: Any) -> None:
        name = options["event"]
        if not name or not name.strip():
            raise CommandError("The event name cannot be empty.")
        problem = text_problem(name)
        if problem:
            raise CommandError(f"The event name cannot be stored: {problem}")
        try:
            payload = loads_storable_json(options["payload"])
        except UnstorableJSON as exc:
            raise CommandError(f"--payload cannot be stored: {exc}") from None
        except ValueError as exc:
            raise CommandError(
                f"--payload is not valid JSON: {exc}. Quote it for the shell: --payload '{{\"ok\": true}}'."
            ) from exc
        queue = _ops.queue_option(options["queue"]) or _ops.checked_queue(conf.get().default_queue)
        earlier = task_records.event(queue, name)
        try:
            absurd.emit_event_sync(name, payload, queue_name=queue)
        except ValueError as exc:  # the client's own checks, made before any SQL
            raise CommandError(f"The event was refused: {exc}") from exc
        if earlier is not None and earlier.emitted:
            self.stdout.write(
                f"Event {name!r} was already emitted on queue {queue} at {_ops.timestamp(earlier.emitted_at)}; "
                "the first payload is kept."
            )
        else:
            self.stdout.write(f"Emitted event {name!r} on queue {queue}.")
