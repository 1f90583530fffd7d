"""``manage.py serve`` (``make serve``): the development server and a worker; a worker that dies is replaced.

The server is uvicorn serving ``example_project.asgi`` when uvicorn is installed (``make install``
installs it), so the live pages' event streams are coroutines on one event loop; otherwise Django's
``runserver`` (WSGI), where each open stream holds a thread.

Why a command and not two terminals: a newcomer should see a task spawned on a page get picked up
without knowing that a worker exists yet. Why it works the way it does:

* The site and the worker are separate processes, as in production, and each is a user of the
  embedded PostgreSQL (when ``DATABASE_URL`` is not set): the server runs while any of them does.
  So the tutorial's crash-and-resume works in here: ``kill -9`` the worker (its pid is printed), the
  site keeps its database, this command starts another worker, and that one resumes the task once
  the dead worker's lease runs out.
* A worker that keeps dying right after it starts (a broken task module, a bad setting) is not
  restarted forever: after ``MAX_QUICK_EXITS`` such exits in a row, everything stops with its status.
  If the web server exits, everything stops: a worker without a site is not what was asked for.
* Each child runs in a process group of its own, so Ctrl-C reaches only this process, which then
  stops each child exactly once the way it expects: SIGINT for the web server (its reloader and the
  server it restarts are in that group), SIGTERM for the worker (a graceful stop; a second signal
  would make it exit at once).
* On Linux the children get a parent-death signal, so even a ``kill -9`` of this command leaves
  neither a site nor a worker behind (and then no user of the embedded server either).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from django_absurd_agents.conf import get as agent_settings

STOP_TIMEOUT = 30.0
#: A worker that exits sooner than this after its start counts as a quick exit.
QUICK_EXIT = 10.0
MAX_QUICK_EXITS = 5
_PR_SET_PDEATHSIG = 1


@dataclass
class Child:
    """One child command, restartable; ``stop_signal`` is how it wants to be asked to stop."""

    name: str
    command: list[str]
    stop_signal: signal.Signals
    process: subprocess.Popen[bytes] | None = None
    started: float = field(default=0.0)

    def start(self, env: dict[str, str]) -> int:
        self.process = subprocess.Popen(self.command, env=env, process_group=0, preexec_fn=_die_with_parent())
        self.started = time.monotonic()
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Command(BaseCommand):
    help = "Run the development server and an Absurd worker; a worker that dies is replaced; Ctrl-C stops both."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("addrport", nargs="?", default="127.0.0.1:8000", help="Where the web server listens.")
        parser.add_argument("--noreload", action="store_true", help="Do not restart the web server on code changes.")

    def handle(self, *args: Any, **options: Any) -> None:
        call_command("migrate", verbosity=0, interactive=False)
        manage = str(Path(__file__).resolve().parents[3] / "manage.py")
        command, server_name = web_server(manage, options["addrport"], reload=not options["noreload"])
        site = Child("web server", command, signal.SIGINT)
        worker = Child("worker", [sys.executable, manage, "absurd_worker"], signal.SIGTERM)

        queues = ", ".join(agent_settings().all_queues)
        self.stdout.write(
            self.style.MIGRATE_HEADING(
                f"Serving http://{options['addrport']}/ ({server_name}) and a worker for queue(s) {queues}."
            )
        )
        self.stdout.write("The admin is at /admin/ (make demo creates admin / admin). Ctrl-C stops both.\n")

        previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        children = [site, worker]
        try:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            site.start(env)
            self.stdout.write(f"Worker started (pid {worker.start(env)}); kill it and another one takes over.")
            self.stderr.write(f"{self.supervise(site, worker, env)}; stopping the rest.")
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

    def supervise(self, site: Child, worker: Child, env: dict[str, str]) -> str:
        """Replace the worker whenever it exits; return why serving ends (the web server exited, or the
        worker keeps exiting at once)."""
        quick_exits = 0
        while True:
            exited = wait_for_any([site, worker])
            assert exited.process is not None
            status = exited.process.returncode
            if exited is site:
                return f"The web server exited with status {status}"
            quick_exits = quick_exits + 1 if time.monotonic() - worker.started < QUICK_EXIT else 0
            if quick_exits >= MAX_QUICK_EXITS:
                return f"The worker exited {quick_exits} times in a row right after starting (last status {status})"
            if quick_exits:
                time.sleep(2**quick_exits)  # Ctrl-C interrupts this too
            pid = worker.start(env)
            self.stderr.write(
                f"The worker exited with status {status}; started another (pid {pid}). "
                "Tasks the dead one held resume once its lease runs out (CLAIM_TIMEOUT)."
            )


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


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` giving the child SIGTERM when this process dies (Linux only; ``None`` elsewhere)."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
    except (OSError, AttributeError):  # a Python linked statically: no parent-death signal then
        prctl = None
    if prctl is None:
        return None
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)  # this process died before the signal was armed

    return arm


def wait_for_any(children: list[Child]) -> Child:
    """Block until one of ``children`` exits and return it.

    ``waitid(WNOWAIT)`` sleeps until a child exits without reaping it, so each Popen still collects its
    own status. A child that is not one of ours (some library's helper) is reaped and otherwise ignored.
    """
    while True:
        for child in children:
            if child.process is not None and child.process.poll() is not None:
                return child
        info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
        if info is not None and all(child.process is None or info.si_pid != child.process.pid for child in children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(info.si_pid, 0)


def _kill_all(children: list[Child]) -> None:
    for child in children:
        if child.process is not None and child.running():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.process.pid, signal.SIGKILL)


def stop_all(children: list[Child]) -> None:
    """Signal each running child's group once, then wait for all; SIGKILL what outlives the timeout."""
    running = [child for child in children if child.running()]
    for child in running:
        assert child.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.process.pid, child.stop_signal)
    deadline = time.monotonic() + STOP_TIMEOUT
    for child in running:
        assert child.process is not None
        try:
            child.process.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.process.pid, signal.SIGKILL)
            child.process.wait()
