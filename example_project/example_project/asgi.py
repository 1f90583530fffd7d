"""ASGI entry point: ``uvicorn example_project.asgi:application`` (what ``make serve`` runs).

Under ASGI the async views run on the server's event loop without a thread hop: the live pages'
Server-Sent Events (``/agents/tasks/<id>/events``) are coroutines waiting on one shared ``LISTEN``
connection, not a thread each. With ``DEBUG`` on, static files are served too, as runserver does.
"""

import os

from django.conf import settings
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")

application = get_asgi_application()

if settings.DEBUG:
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    application = ASGIStaticFilesHandler(application)
