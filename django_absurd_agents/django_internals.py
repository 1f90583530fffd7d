"""Every use of Django's private API, in one place (checked against Django 5.2 and 6.1).

The ``django.tasks`` backend sends ``task_enqueued``/``task_started``/``task_finished`` like Django's
own backends. When the only receivers are Django's own loggers it calls them directly, skipping
``Signal.send``'s bookkeeping (and, for ``asend``, a thread hop per receiver): that is most of the
cost of an enqueue. Knowing the receivers needs ``Signal._live_receivers``.
"""

from __future__ import annotations

from typing import Any

from django.dispatch import Signal


def live_receivers(signal: Signal, sender: Any) -> tuple[list[Any], list[Any]]:
    """(sync receivers, async receivers) of ``signal`` for ``sender``.

    Private: ``Signal._live_receivers`` returns both lists since Django 5.0 (checked on 5.2 and 6.1).
    """
    sync_receivers, async_receivers = signal._live_receivers(sender)
    return list(sync_receivers), list(async_receivers)
