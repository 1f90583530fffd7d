"""A bare worker process for the conversation tests: ``python -m tests.chat_worker``.

It imports the chat agents of ``tests.chat_agents`` and runs ``work_batch`` on one queue until the
file named by ``$WORKER_STOP_FILE`` exists, its parent process goes away, or ``$WORKER_LIFETIME``
seconds pass. ``$WORKER_CLAIM_TIMEOUT`` is the lease, so a killed worker's turn resumes quickly.
``$WORKER_READY_FILE`` is written once the worker is about to poll.
"""

from __future__ import annotations

import asyncio
import os
import time

import django


async def serve() -> None:
    from django_absurd_agents import absurd

    client = absurd.for_queue(os.environ.get("WORKER_QUEUE", "agents"))
    claim_timeout = int(os.environ.get("WORKER_CLAIM_TIMEOUT", "3"))
    stop_file = os.environ["WORKER_STOP_FILE"]
    ready_file = os.environ.get("WORKER_READY_FILE")
    if ready_file:
        await client.live_connection()
        with open(ready_file, "w") as f:
            f.write(str(os.getpid()))
    deadline = time.monotonic() + float(os.environ.get("WORKER_LIFETIME", "120"))
    parent = os.getppid()
    worker_id = f"chat-worker:{os.getpid()}"
    try:
        while not os.path.exists(stop_file) and os.getppid() == parent and time.monotonic() < deadline:
            tasks = await client.claim_tasks(batch_size=1, claim_timeout=claim_timeout, worker_id=worker_id)
            if not tasks:
                await asyncio.sleep(0.05)
                continue
            for task in tasks:
                await client.run_claimed(task, claim_timeout)
    finally:
        await client.close()


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    django.setup()
    import tests.chat_agents  # noqa: F401  (registers the chat agents and the turn task)

    asyncio.run(serve())


if __name__ == "__main__":
    main()
