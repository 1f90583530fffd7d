"""A minimal worker process for the engine's crash tests: ``python -m tests.worker_process TASK_ID``.

It works the default queue with ``work_batch`` until the task is finished (or a deadline passes),
so a test can kill it (``$CRASH_AT``) and start another one that resumes the task.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

import django


async def main(task_id: str, claim_timeout: int, deadline: float) -> int:
    import tests.agents  # noqa: F401  (registers the tasks)
    from django_absurd_agents import absurd

    while time.monotonic() < deadline:
        await absurd.work_batch(worker_id=f"test-{os.getpid()}", claim_timeout=claim_timeout)
        snapshot = await absurd.fetch_task_result(task_id)
        if snapshot is not None and snapshot.state in ("completed", "failed", "cancelled"):
            return 0
        await asyncio.sleep(0.05)
    return 3


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    django.setup()
    claim = int(os.environ.get("CLAIM_TIMEOUT", "30"))
    sys.exit(asyncio.run(main(sys.argv[1], claim, time.monotonic() + float(os.environ.get("DEADLINE", "60")))))
