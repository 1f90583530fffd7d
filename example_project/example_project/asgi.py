"""ASGI entry point: ``uvicorn example_project.asgi:application``.

Under ASGI the async view (``analyst.views.report_progress``) runs on the server's event loop
without a thread hop; under runserver (WSGI) Django runs it in a loop of its own.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "example_project.settings")

application = get_asgi_application()
