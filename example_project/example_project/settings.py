"""Settings of the example project: a small Django site with one durable agent, the analyst.

Everything here is what a real project would write; the only example-specific parts are the
``EXAMPLE_*`` environment variables: the model (``analyst/llm.py``), its pace (``analyst/scripted.py``)
and the call log ``make demo`` reads (``analyst/call_log.py``).
"""

import os
from pathlib import Path

from django_absurd_agents import database_config

BASE_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = BASE_DIR.parent

# The embedded PostgreSQL lives in the repository's .postgres/ wherever manage.py is run from, so
# `make demo`, `make serve` and a `manage.py shell` started in example_project/ share one server.
os.environ.setdefault("ABSURD_AGENTS_PGDATA", str(REPO_DIR / ".postgres"))

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-project-not-for-production")
DEBUG = os.environ.get("DJANGO_DEBUG", "1") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_absurd_agents",
    "analyst",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "example_project.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "example_project.wsgi.application"
ASGI_APPLICATION = "example_project.asgi.application"

# PostgreSQL from DATABASE_URL, else the embedded server of the [embedded] extra under .postgres/.
DATABASES = {"default": database_config(name="example_project")}

ABSURD_AGENTS = {
    "QUEUES": ["agents"],
    # A worker that dies mid-task is noticed within this many seconds; `make demo` passes 3.
    "CLAIM_TIMEOUT": 30,
    # The report pages are public, so anyone may follow a report task's events (analyst/access.py).
    "EVENTS_ACCESS": "analyst.access.can_read_events",
}

AUTH_PASSWORD_VALIDATORS: list[dict[str, str]] = []  # the demo superuser is admin/admin

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "django_absurd_agents": {"handlers": ["console"], "level": "INFO"},
        "analyst": {"handlers": ["console"], "level": "INFO"},
    },
}
