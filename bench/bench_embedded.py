"""Time the embedded PostgreSQL: cold start, warm start, stop, and how soon it stops after its last user.

Run: ``python bench/bench_embedded.py [runs]`` (default 3). The starts are the time ``ensure_server``
takes until the server accepts a connection: cold in an empty directory (``initdb`` first), warm on
an existing cluster. ``stop`` is an explicit fast shutdown. ``last user killed`` is the time from the
SIGKILL of the only process using the server until the postmaster and its supervisor are gone: the
supervisor gets its exclusive lock the moment the kernel drops the killed process's shared one.
The medians are printed.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from django_absurd_agents import embedded

ROOT = Path(__file__).resolve().parents[1]

USER = """
import sys
from django_absurd_agents.embedded import ensure_server
print(ensure_server(sys.argv[1]).pid, flush=True)
sys.stdin.read()
"""


def timed_start(data_dir: Path) -> tuple[float, embedded.EmbeddedServer]:
    started = time.perf_counter()
    server = embedded.ensure_server(data_dir)
    elapsed = time.perf_counter() - started
    assert server.owned, "a server was already running there"
    return elapsed, server


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


def timed_last_user(data_dir: Path) -> float:
    """SIGKILL a process that is the server's only user; time until no server process is left."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    user = subprocess.Popen(
        [sys.executable, "-c", USER, str(data_dir)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert user.stdout is not None and user.stdin is not None
    postmaster = int(user.stdout.readline())
    supervisor = int(Path(f"/proc/{postmaster}/stat").read_text().rpartition(")")[2].split()[1])
    killed = time.perf_counter()
    user.kill()
    deadline = killed + 30
    while not (gone(postmaster) and gone(supervisor)):
        assert time.perf_counter() < deadline, "the server outlived its last user by 30 s"
        time.sleep(0.001)
    elapsed = time.perf_counter() - killed
    user.wait()
    user.stdin.close()
    user.stdout.close()
    return elapsed


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    # World-searchable, so that under root the unprivileged server user can reach it without the /tmp fallback.
    scratch = Path(tempfile.mkdtemp(prefix="bench-embedded-"))
    os.chmod(scratch, 0o755)
    cold: list[float] = []
    warm: list[float] = []
    stop: list[float] = []
    last_user: list[float] = []
    try:
        for run in range(runs):
            data_dir = scratch / f"cold-{run}"
            elapsed, server = timed_start(data_dir)
            cold.append(elapsed)
            server.stop()
        warm_dir = scratch / "cold-0"
        for _ in range(runs):
            elapsed, server = timed_start(warm_dir)
            warm.append(elapsed)
            started = time.perf_counter()
            server.stop()
            stop.append(time.perf_counter() - started)
        for _ in range(runs):
            last_user.append(timed_last_user(warm_dir))
    finally:
        if embedded.find_server(scratch / "cold-0") is not None:
            embedded.main(["--data-dir", str(scratch / "cold-0"), "stop"])
        shutil.rmtree(scratch, ignore_errors=True)

    def show(label: str, values: list[float]) -> None:
        runs_ms = ", ".join(f"{v * 1000:.0f}" for v in values)
        print(f"{label:<28} median {statistics.median(values) * 1000:6.0f} ms   (runs: {runs_ms})")

    print(f"embedded PostgreSQL from {embedded.bin_dir()}, euid {os.geteuid()}")
    show("cold start (initdb+start)", cold)
    show("warm start (existing data)", warm)
    show("stop (fast shutdown)", stop)
    show("last user killed -> stopped", last_user)


if __name__ == "__main__":
    main()
