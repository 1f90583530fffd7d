"""Settings of the fleet benchmark's workers (``bench/bench_fleet.py``): the chaos settings on the ``fleet`` queue.

The bench sets ``DATABASE_URL`` to its own database and puts ``bench/`` on ``PYTHONPATH`` before the
workers import this, so ``fleet_tasks`` is found the way a project's ``TASK_MODULES`` entry is.
"""

from tests.settings_chaos import *  # noqa: F403
from tests.settings_chaos import ABSURD_AGENTS

ABSURD_AGENTS = {**ABSURD_AGENTS, "QUEUES": ["fleet"], "TASK_MODULES": ["fleet_tasks"]}
