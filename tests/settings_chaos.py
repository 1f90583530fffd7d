"""Settings of the chaos run (``bench/chaos.py``) and the load bench (``bench/bench_load.py``).

The test settings, trimmed to the apps a worker needs (so that a restarted worker starts fast), with
the chaos tasks loaded through ``TASK_MODULES`` the way a project lists its own modules. Both scripts
point ``DATABASE_URL`` at a database of their own before anything imports this module.
"""

from tests.settings import *  # noqa: F403
from tests.settings import ABSURD_AGENTS

INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "django_absurd_agents"]
MIDDLEWARE = []
ROOT_URLCONF = "tests.settings_chaos"
urlpatterns: list[object] = []  # no admin here, so none of the test suite's URLs
ABSURD_AGENTS = {**ABSURD_AGENTS, "QUEUES": ["agents"], "TASK_MODULES": ["tests.chaos_tasks", "tests.worker_tasks"]}
