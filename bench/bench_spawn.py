"""Spawn throughput: the project's sync helper on Django's connection against raw absurd-sdk.

Run: ``.venv/bin/python bench/bench_spawn.py [--spawns 200] [--rounds 15] [--no-embedded]``.

Both sides spawn the same task with the same params sequentially, each spawn its own transaction:
``absurd.spawn_sync`` through Django's connection (autocommit, as in a view outside ``atomic``),
and ``absurd_sdk.Absurd(url).spawn`` on a connection of its own. Rounds alternate between the two
so that both see the same machine noise. Printed: each side's median, and the ratio, taken as the
median of the per-round ratios (a round's two halves run back to back, so a burst of load from
elsewhere on the machine spoils one ratio rather than one side's median). The goal is a ratio of
at least 0.8. The database is ``absurd_agents_bench`` on the server of ``$DATABASE_URL``,
else on the embedded server; it is created and migrated when missing. Unless ``--no-embedded`` is
given, ``bench/bench_embedded.py`` then times the embedded server's cold and warm starts.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchdb import database_url, setup_django

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATABASE = "absurd_agents_bench"
QUEUE = "agents"
PARAMS = {"question": "How did revenue move last quarter?", "customer_id": 4211, "tags": ["finance", "q3"]}


def empty_queue() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        for prefix in ("t", "r", "c", "e", "w"):
            cursor.execute(f'truncate absurd."{prefix}_{QUEUE}"')


def spawns_per_second(spawn: Callable[[], object], count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        spawn()
    return count / (time.perf_counter() - started)


def bench_spawns(url: str, count: int, rounds: int) -> tuple[list[float], list[float]]:
    from absurd_sdk import Absurd
    from django.db import connection

    from django_absurd_agents import absurd

    raw = Absurd(url, queue_name=QUEUE)

    def django_spawn() -> object:
        return absurd.spawn_sync("bench", PARAMS, queue=QUEUE)

    def raw_spawn() -> object:
        return raw.spawn("bench", PARAMS, queue=QUEUE)

    connection.ensure_connection()
    # Warm both connections and the server's plan caches before measuring.
    spawns_per_second(django_spawn, 50)
    spawns_per_second(raw_spawn, 50)
    through_django: list[float] = []
    through_raw: list[float] = []
    try:
        for round_number in range(rounds):
            # Alternate which side goes first, so that drift in the machine's load favours neither.
            sides = [(django_spawn, through_django), (raw_spawn, through_raw)]
            for spawn, results in sides if round_number % 2 == 0 else reversed(sides):
                empty_queue()
                results.append(spawns_per_second(spawn, count))
    finally:
        empty_queue()
        raw.close()
    return through_django, through_raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--spawns", type=int, default=200, help="spawns per round and side (default 200)")
    parser.add_argument("--rounds", type=int, default=15, help="rounds per side (default 15)")
    parser.add_argument("--no-embedded", action="store_true", help="skip the embedded server start times")
    args = parser.parse_args()

    url = database_url(DATABASE)
    setup_django(url)
    from django.db import connection

    through_django, through_raw = bench_spawns(url, args.spawns, args.rounds)
    django_median = statistics.median(through_django)
    raw_median = statistics.median(through_raw)
    ratio = statistics.median(d / r for d, r in zip(through_django, through_raw, strict=True))

    def runs(values: list[float]) -> str:
        return ", ".join(f"{value:.0f}" for value in values)

    major, minor = divmod(connection.pg_version, 10000)
    print(f"database {DATABASE} on {connection.settings_dict['HOST'] or 'localhost'}, PostgreSQL {major}.{minor}")
    print(f"sequential spawns, {args.rounds} rounds of {args.spawns}, spawns/s (median; runs)")
    print(f"  absurd.spawn_sync on Django's connection  {django_median:7.0f}   ({runs(through_django)})")
    print(f"  absurd_sdk.Absurd(url).spawn              {raw_median:7.0f}   ({runs(through_raw)})")
    verdict = "met" if ratio >= 0.8 else "MISSED"
    print(f"  ratio django/raw (median of rounds)       {ratio:7.2f}   (goal >= 0.8: {verdict})")
    sys.stdout.flush()

    if not args.no_embedded:
        print()
        embedded_bench = ROOT / "bench" / "bench_embedded.py"
        subprocess.run([sys.executable, str(embedded_bench)], check=True)


if __name__ == "__main__":
    main()
