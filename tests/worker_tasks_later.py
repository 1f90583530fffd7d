"""A task only a later release registers: the rolling-deploy test starts its second worker with this module."""

from __future__ import annotations

from typing import Any

from django_absurd_agents import absurd


@absurd.register_task(name="worker_deployed_later")
async def deployed_later(params: Any, ctx: Any) -> dict[str, bool]:
    return {"ran": True}
