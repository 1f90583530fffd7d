"""What a web process does, run through PgBouncer: ``python -m tests.pgbouncer_client`` with ``DATABASE_URL`` on it.

Spawns in a transaction, reads results, emits an event, cancels, and renders the admin's task list
and a task page as a superuser; prints a JSON summary for the test to check.
"""

from __future__ import annotations

import json
import os
import sys

import django


def main() -> int:
    from django.contrib.auth.models import User
    from django.db import transaction
    from django.test import Client

    from django_absurd_agents import absurd

    with transaction.atomic():
        spawned = absurd.spawn_sync("worker_record", {"sleep": 0}, idempotency_key=sys.argv[1])
        repeat = absurd.spawn_sync("worker_record", {"sleep": 0}, idempotency_key=sys.argv[1])
    cancelled = absurd.spawn_sync("worker_approval", {})["task_id"]
    absurd.cancel_task_sync(cancelled)
    absurd.emit_event_sync(f"approval:{sys.argv[2]}", {"approved": True})
    user, _ = User.objects.get_or_create(username="pgbouncer-admin", defaults={"is_staff": True, "is_superuser": True})
    client = Client()
    client.force_login(user)
    listing = client.get("/admin/absurd_agents/absurdtask/")
    detail = client.get(f"/admin/absurd_agents/absurdtask/agents/{spawned['task_id']}/")
    snapshot = absurd.fetch_task_result_sync(cancelled)
    print(
        json.dumps(
            {
                "task_id": spawned["task_id"],
                "created": [spawned["created"], repeat["created"]],
                "cancelled_state": snapshot.state if snapshot else None,
                "admin": [listing.status_code, detail.status_code],
                "listed": spawned["task_id"] in listing.content.decode(),
            }
        )
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    django.setup()
    sys.exit(main())
