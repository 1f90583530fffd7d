"""Settings of the test suite: the embedded PostgreSQL, or any server in DATABASE_URL."""

import sys
from pathlib import Path

from django_absurd_agents import database_config

# The example project's app is tested too; worker processes started by tests import these settings,
# so the path is set here rather than in pytest's configuration.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "example_project"))

SECRET_KEY = "tests-only"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django_absurd_agents",
    "tests.testapp",
    "analyst",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
ROOT_URLCONF = "tests.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
DATABASES = {"default": database_config(name="absurd_agents_tests")}
ABSURD_AGENTS = {"QUEUES": ["agents", "other"], "CLAIM_TIMEOUT": 30}
# django.tasks (Django 6) or the django-tasks backport (Django 5.2): @task functions become Absurd tasks.
TASKS = {"default": {"BACKEND": "django_absurd_agents.backends.AbsurdTaskBackend"}}
STATIC_URL = "/static/"
