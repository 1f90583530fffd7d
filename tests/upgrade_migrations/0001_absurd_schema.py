"""The app's own 0001, unchanged: a later release keeps its earlier migrations as they are."""

from importlib import import_module

Migration = import_module("django_absurd_agents.migrations.0001_absurd_schema").Migration
