"""The app's own 0002, unchanged."""

from importlib import import_module

Migration = import_module("django_absurd_agents.migrations.0002_task_permissions").Migration
