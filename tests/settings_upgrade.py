"""The test settings with the app's migrations plus an Absurd upgrade migration (see docs/installation.md).

``tests/upgrade_migrations`` is the app's migration chain as a later release would ship it after a
new absurdctl: the same 0001 and 0002, then a migration that runs absurdctl's upgrade script.
"""

from tests.settings import *  # noqa: F403

MIGRATION_MODULES = {"absurd_agents": "tests.upgrade_migrations"}
