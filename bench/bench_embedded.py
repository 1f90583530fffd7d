"""Time the embedded PostgreSQL: cold start (initdb + start) and warm start (existing cluster).

Run: ``python bench/bench_embedded.py [runs]`` (default 3). Each figure is the time ``ensure_server``
takes until the server accepts a connection; the medians are printed.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from django_absurd_agents import embedded


def timed_start(data_dir: Path) -> tuple[float, embedded.EmbeddedServer]:
    started = time.perf_counter()
    server = embedded.ensure_server(data_dir)
    elapsed = time.perf_counter() - started
    assert server.owned, "a server was already running there"
    return elapsed, server


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    # World-searchable, so that under root the unprivileged server user can reach it without the /tmp fallback.
    scratch = Path(tempfile.mkdtemp(prefix="bench-embedded-"))
    os.chmod(scratch, 0o755)
    cold: list[float] = []
    warm: list[float] = []
    stop: list[float] = []
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
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def show(label: str, values: list[float]) -> None:
        runs_ms = ", ".join(f"{v * 1000:.0f}" for v in values)
        print(f"{label:<28} median {statistics.median(values) * 1000:6.0f} ms   (runs: {runs_ms})")

    print(f"embedded PostgreSQL from {embedded.bin_dir()}, euid {os.geteuid()}")
    show("cold start (initdb+start)", cold)
    show("warm start (existing data)", warm)
    show("stop (fast shutdown)", stop)


if __name__ == "__main__":
    main()
