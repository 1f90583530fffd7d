"""Run every benchmark one after another (``make bench``), so their figures come from one sitting.

Each benchmark is its own script with its own options; this only runs them in sequence with their
defaults and stops at the first that fails. Figures are printed, and copied by hand into
docs/benchmarks.md with the date and the machine.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

BENCHES = ["bench_spawn.py", "bench_engine.py", "bench_worker.py", "bench_admin.py", "bench_load.py", "bench_fleet.py"]


def main() -> int:
    here = Path(__file__).resolve().parent
    for name in BENCHES:
        script = here / name
        if not script.exists():
            continue
        print(f"\n=== {name} ===", flush=True)
        started = time.monotonic()
        code = subprocess.call([sys.executable, str(script)], cwd=here.parent)
        print(f"=== {name}: exit {code} after {time.monotonic() - started:.0f} s ===", flush=True)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
