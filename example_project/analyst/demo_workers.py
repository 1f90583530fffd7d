"""The demo's worker processes: the real ``manage.py absurd_worker``, each logging to a file of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from analyst.call_log import CALL_LOG_ENV
from analyst.reports import task_queue

MANAGE_PY = Path(__file__).resolve().parent.parent / "manage.py"


@dataclass
class Worker:
    number: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join("    " + line for line in text.splitlines()[-lines:]) or "    (empty)"

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye; the process's lease is simply left to run out."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, the worker's graceful stop; SIGKILL if it does not exit in time."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()


def start_worker(number: int, *, claim_timeout: int, workdir: Path, env: dict[str, str]) -> Worker:
    """``manage.py absurd_worker`` in a process of its own, its output in ``workdir/worker-N.log``."""
    log_path = workdir / f"worker-{number}.log"
    command = [
        sys.executable,
        str(MANAGE_PY),
        "absurd_worker",
        "--queue",
        task_queue(),
        "--claim-timeout",
        str(claim_timeout),
        "--worker-id",
        f"demo-worker-{number}",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    return Worker(number=number, process=process, log_path=log_path)


def worker_env(call_log: Path) -> dict[str, str]:
    """The demo's own environment (same settings, same database) plus the call log's path."""
    env = dict(os.environ)
    env[CALL_LOG_ENV] = str(call_log)
    env.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")
    env["PYTHONUNBUFFERED"] = "1"
    return env
