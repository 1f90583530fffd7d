"""``manage.py serve`` (``make serve``): the development server and a worker, started and stopped together.

The server is uvicorn serving ``example_project.asgi`` when uvicorn is installed (``make install``
installs it), so the live pages' event streams are coroutines on one event loop; otherwise Django's
``runserver`` (WSGI), where each open stream holds a thread.

Why a command and not two terminals: a newcomer should see a task spawned on a page get picked up
without knowing that a worker exists yet. Why this process stays in charge:

* With no ``DATABASE_URL`` the embedded PostgreSQL was started by this process when the settings
  were loaded, so this process owns it and both children find it running and share it. It stops
  when this process exits, which is after both children have.
* Each child runs in a process group of its own, so Ctrl-C reaches only this process, which then
  stops each child exactly once the way it expects: SIGINT for the web server (its reloader and the
  server it restarts are in that group), SIGTERM for the worker (a graceful stop; a second signal
  would make it exit at once).
* If either child exits, the other is stopped too: a site without a worker would leave every task
  pending without saying why.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from django_absurd_agents.conf import get as agent_settings

STOP_TIMEOUT = 30.0


class Command(BaseCommand):
    help = "Run the development server and an Absurd worker together; Ctrl-C stops both."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("addrport", nargs="?", default="127.0.0.1:8000", help="Where the web server listens.")
        parser.add_argument("--noreload", action="store_true", help="Do not restart the web server on code changes.")

    def handle(self, *args: Any, **options: Any) -> None:
        call_command("migrate", verbosity=0, interactive=False)
        manage = str(Path(__file__).resolve().parents[3] / "manage.py")
        runserver, server_name = web_server(manage, options["addrport"], reload=not options["noreload"])
        worker = [sys.executable, manage, "absurd_worker"]

        queues = ", ".join(agent_settings().all_queues)
        self.stdout.write(
            self.style.MIGRATE_HEADING(
                f"Serving http://{options['addrport']}/ ({server_name}) and a worker for queue(s) {queues}."
            )
        )
        self.stdout.write("The admin is at /admin/ (make demo creates admin / admin). Ctrl-C stops both.\n")

        previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        children: list[tuple[str, subprocess.Popen[bytes], signal.Signals]] = []
        try:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            children.append(("web server", subprocess.Popen(runserver, env=env, process_group=0), signal.SIGINT))
            children.append(("worker", subprocess.Popen(worker, env=env, process_group=0), signal.SIGTERM))
            self.stderr.write(f"{wait_for_any(children)}; stopping the rest.")
        except StopServing:
            pass
        finally:
            # A second Ctrl-C while the children stop kills them instead of waiting.
            for sig in previous:
                signal.signal(sig, lambda signum, frame: _kill_all(children))
            stop_all(children)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.stdout.write("Stopped.")


def web_server(manage: str, addrport: str, *, reload: bool) -> tuple[list[str], str]:
    """The web server's command: uvicorn on the ASGI application if installed, else runserver."""
    if importlib.util.find_spec("uvicorn") is None:
        command = [sys.executable, manage, "runserver", addrport]
        return ([*command, "--noreload"] if not reload else command), "runserver, WSGI"
    host, _, port = addrport.rpartition(":")
    command = [
        sys.executable, "-m", "uvicorn", "example_project.asgi:application",
        "--app-dir", str(Path(manage).parent), "--host", host or "127.0.0.1", "--port", port,
        # Open event streams are closed at Ctrl-C instead of holding the server up.
        "--timeout-graceful-shutdown", "2", "--log-level", "warning",
    ]  # fmt: skip
    if reload:
        command += ["--reload", "--reload-dir", str(Path(manage).parent)]
    return command, "uvicorn, ASGI"


class StopServing(Exception):
    """Raised by the SIGINT/SIGTERM handler, so that a blocking wait is interrupted."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise StopServing


def wait_for_any(children: list[tuple[str, subprocess.Popen[bytes], signal.Signals]]) -> str:
    """Block until some child of this process exits; say which.

    ``waitid(WNOWAIT)`` sleeps until a child exits without reaping it, so each Popen still collects its
    own status. Any child counts, including an embedded PostgreSQL that died: the site cannot work then.
    """
    while True:
        for name, process, _ in children:
            if process.poll() is not None:
                return f"The {name} exited with status {process.returncode}"
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
        if info is not None and all(info.si_pid != process.pid for _, process, _ in children):
            return f"Process {info.si_pid} (the embedded PostgreSQL?) exited"


def _kill_all(children: list[tuple[str, subprocess.Popen[bytes], signal.Signals]]) -> None:
    for _, process, _ in children:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


def stop_all(children: list[tuple[str, subprocess.Popen[bytes], signal.Signals]]) -> None:
    """Signal each running child's group once, then wait for all; SIGKILL what outlives the timeout."""
    running = [(process, sig) for _, process, sig in children if process.poll() is None]
    for process, sig in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
    deadline = time.monotonic() + STOP_TIMEOUT
    for process, _ in running:
        try:
            process.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
