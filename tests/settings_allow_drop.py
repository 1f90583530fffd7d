"""The test settings with ``ALLOW_SCHEMA_DROP``, for the subprocess that reverses the schema migration."""

from tests.settings import *  # noqa: F403
from tests.settings import ABSURD_AGENTS

ABSURD_AGENTS = {**ABSURD_AGENTS, "ALLOW_SCHEMA_DROP": True}
