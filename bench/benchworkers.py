"""Worker processes a benchmark starts: ``manage.py absurd_worker`` subprocesses, their CPU time, their stop.

The load and fleet benches both run several real workers on one queue and need the same three
things: start them and wait until each has written its heartbeat file, read their CPU seconds from
``/proc``, and stop them with SIGTERM (SIGKILL after ``stop_timeout``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """CPU seconds of ``pid`` (utime + stime), and of its exited children when asked."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / TICK


class WorkerProcesses:
    """``count`` ``absurd_worker`` processes on ``queue``, each with ``concurrency`` slots."""

    def __init__(
        self,
        count: int,
        queue: str,
        concurrency: int,
        base: Path,
        *,
        cwd: Path,
        env: dict[str, str],
        options: tuple[str, ...] = (),
        start_timeout: float = 60.0,
        stop_timeout: float = 30.0,
    ) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []
        self.stop_timeout = stop_timeout
        beats = [base / f"worker-{i}.beat" for i in range(count)]
        for beat in beats:
            command = [sys.executable, "-m", "django", "absurd_worker", "--queue", queue]
            command += ["--concurrency", str(concurrency), *options, "--heartbeat-file", str(beat), "-v", "0"]
            self.processes.append(subprocess.Popen(command, cwd=cwd, env=env))
        deadline = time.monotonic() + start_timeout
        while not all(beat.exists() for beat in beats):
            if any(p.poll() is not None for p in self.processes) or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("a worker did not start")
            time.sleep(0.05)

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
