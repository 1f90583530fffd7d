"""A client shared by concurrent tasks opens one connection per event loop, not one per task that asks first."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from psycopg import AsyncConnection

from django_absurd_agents import absurd


@pytest.mark.django_db(transaction=True)
def test_concurrent_first_uses_open_one_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[AsyncConnection[Any]] = []
    real_connect = AsyncConnection.connect

    async def counting_connect(*args: Any, **kwargs: Any) -> AsyncConnection[Any]:
        conn = await real_connect(*args, **kwargs)
        opened.append(conn)
        return conn

    monkeypatch.setattr(AsyncConnection, "connect", counting_connect)
    client = absurd.for_queue("agents")

    async def fifty_tasks_start_at_once() -> set[int]:
        conns = await asyncio.gather(*(client.live_connection() for _ in range(50)))
        pids = set()
        for conn in conns:
            row = await (await conn.execute("select pg_backend_pid()")).fetchone()
            pids.add(row[0])
        await client.close()
        return pids

    pids = asyncio.run(fifty_tasks_start_at_once())
    assert len(pids) == 1
    assert len(opened) == 1  # before: 50 opened, 49 closed again at once (a burst against max_connections)
