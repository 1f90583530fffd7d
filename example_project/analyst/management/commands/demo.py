"""``manage.py demo`` (``make demo``): a durable agent run survives a worker killed mid-run.

The waits and the proof live in ``analyst.demo``, the worker processes in ``analyst.demo_workers``;
this command sets up, tells the story and prints the evidence.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from analyst import demo, demo_workers
from analyst.llm import describe_model
from analyst.market import COMPANIES
from analyst.reports import request_report, task_queue
from django_absurd_agents.conf import get as agent_settings
from django_absurd_agents.database import embedded_data_dir

SUPERUSER = ("admin", "admin")
QUESTION = "How is the business doing, and what should an investor watch?"


class Command(BaseCommand):
    help = (
        "Run a report task, SIGKILL its worker after the first model call is checkpointed, resume it in a "
        "second worker, and prove that no model call or side effect happened twice."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--company", default=COMPANIES[0], choices=COMPANIES)
        parser.add_argument(
            "--claim-timeout",
            type=int,
            default=3,
            help="Lease of the demo's workers in seconds: how soon a dead worker's task can be resumed (default 3).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        self.started = time.monotonic()
        claim_timeout: int = options["claim_timeout"]
        self.heading("django-absurd-agents demo: kill a worker mid-run, resume, pay for nothing twice")
        self.setup()

        workdir = Path(tempfile.mkdtemp(prefix="absurd-agents-demo-"))
        call_log = workdir / "calls.log"
        env = demo_workers.worker_env(call_log)
        workers: list[demo_workers.Worker] = []
        succeeded = False
        try:
            self.heading("Run")
            self.started = time.monotonic()
            report_request = request_report(options["company"], QUESTION)
            task_id = str(report_request.task_id)
            self.event(f"asked for a report on {options['company']}: task {task_id}")
            others = demo.other_unfinished_tasks(task_id)
            if others:
                self.event(
                    f"note: {demo.plural(others, 'other unfinished task')} in queue {task_queue()!r} will run in "
                    "the demo's workers too; the proof counts only this task's calls",
                    indent=True,
                )

            first = demo_workers.start_worker(1, claim_timeout=claim_timeout, workdir=workdir, env=env)
            workers.append(first)
            self.event(f"worker 1 started (pid {first.pid}), running the task")
            demo.wait_for(
                "worker 1 to checkpoint the first model call",
                lambda: demo.checkpoint_recorded(task_id, demo.FIRST_MODEL_STEP),
                timeout=120,
                workers=[first],
            )
            self.event("worker 1 checkpointed model call 1")
            at_kill = demo.wait_for(
                "worker 1 to checkpoint the tool calls of model call 1",
                lambda: demo.first_round_recorded(task_id),
                timeout=120,
                workers=[first],
            )
            first.kill()
            in_flight = f"model call {sum(s.label.startswith('model call') for s in at_kill.steps) + 1}"
            self.event(f"worker 1 killed with SIGKILL while {in_flight} was in flight")
            self.event(f"checkpoints before the kill: {demo.describe_steps(at_kill.steps)}", indent=True)

            names = {first.pid: "worker 1"}
            if at_kill.done:
                self.event(f"the task had already {at_kill.state} before the kill: the model is too fast to interrupt")
                progress = at_kill
            else:
                second = demo_workers.start_worker(2, claim_timeout=claim_timeout, workdir=workdir, env=env)
                workers.append(second)
                names[second.pid] = "worker 2"
                self.event(
                    f"worker 2 started (pid {second.pid}); it may claim the task once worker 1's lease runs out "
                    f"(claim timeout {claim_timeout} s) and the retry backoff has passed"
                )
                attempt = demo.wait_for(
                    "worker 2 to claim the task",
                    lambda: demo.attempt_started(task_id, 2),
                    timeout=120,
                    workers=[second],
                )
                self.event(
                    f"worker 2 claimed attempt {attempt}: it replays "
                    f"{demo.plural(len(at_kill.steps), 'checkpoint')} and carries on"
                )
                progress = demo.wait_for(
                    "the task to finish", lambda: demo.finished(task_id), timeout=300, workers=[second]
                )
                self.event(f"task {progress.state}")
                second.stop()

            proof = demo.collect_proof(task_id, call_log, names, killed_pid=first.pid)
            self.show_result(proof)
            succeeded = proof.ok and proof.progress.state == "completed"
            self.show_next(report_request.pk)
        except demo.DemoError as exc:
            raise CommandError(f"{exc}\nWorker logs: {workdir}") from exc
        finally:
            for worker in workers:
                if worker.process.poll() is None:
                    worker.kill()
        if not succeeded:
            raise CommandError(f"The proof did not hold (see above). Worker logs: {workdir}")
        shutil.rmtree(workdir, ignore_errors=True)

    def setup(self) -> None:
        self.heading("Setup")
        self.item("database", describe_database())
        call_command("migrate", verbosity=0, interactive=False)
        self.item("migrations", "applied")
        username, password = SUPERUSER
        users = get_user_model()._default_manager
        if users.filter(username=username).exists():
            self.item(
                "superuser", f"{username} exists already; left as it is (an earlier demo gave it password {password})"
            )
        else:
            users.create_superuser(username=username, email="admin@example.com", password=password)  # type: ignore[attr-defined]
            self.item("superuser", f"created {username} / {password} for the admin")
        self.item("model", describe_model())

    def heading(self, text: str) -> None:
        self.stdout.write("")
        self.stdout.write(self.style.MIGRATE_HEADING(text))

    def item(self, label: str, text: str) -> None:
        self.stdout.write(f"  {label:<11} {text}")

    def event(self, text: str, *, indent: bool = False) -> None:
        stamp = " " * 9 if indent else f"[{time.monotonic() - self.started:5.1f}s]"
        self.stdout.write(textwrap.fill(text, 100, initial_indent=f"  {stamp} ", subsequent_indent=" " * 12))

    def show_result(self, proof: demo.Proof) -> None:
        progress = proof.progress
        self.heading("Answer")
        answer = progress.answer or f"(no answer: the task {progress.state}: {progress.failure})"
        self.stdout.write(textwrap.fill(answer, 100, initial_indent="  ", subsequent_indent="  "))

        self.heading("Proof")
        for check in proof.checks:
            mark = (
                self.style.WARNING("•")
                if check.note
                else self.style.SUCCESS("✓")
                if check.ok
                else self.style.ERROR("✗")
            )
            first, *rest = textwrap.wrap(check.text, 96)
            self.stdout.write(f"  {mark} {first}")
            for line in rest:
                self.stdout.write(f"    {line}")
        self.stdout.write("  Checkpoints, in the order they were recorded:")
        width = max((len(step.label) for step in progress.steps), default=0)
        for number, step in enumerate(progress.steps, 1):
            self.stdout.write(f"    {number:>2}. {step.label:<{width}}  attempt {step.attempt}  {step.name}")
        self.stdout.write("  Attempts:")
        for run in progress.runs:
            self.stdout.write(f"    {run.attempt}. {run.outcome}")

    def show_next(self, request_pk: int) -> None:
        self.heading("Next")
        self.item("make serve", "runs the site and a worker, and replaces the worker if you kill it; Ctrl-C stops both")
        self.item("open", f"http://127.0.0.1:8000/reports/{request_pk}/ (this run's steps, attempt by attempt)")
        self.item("admin", f"http://127.0.0.1:8000/admin/ as {SUPERUSER[0]} / {SUPERUSER[1]}")
        self.stdout.write("")


def describe_database() -> str:
    config = connections[agent_settings().database_alias].settings_dict
    if os.environ.get("DATABASE_URL"):
        where = f"{config['HOST'] or 'localhost'}:{config['PORT'] or 5432}"
        return f"PostgreSQL at {where}, database {config['NAME']} (DATABASE_URL)"
    return f"embedded PostgreSQL in {embedded_data_dir()}, database {config['NAME']} (set DATABASE_URL to use your own)"
