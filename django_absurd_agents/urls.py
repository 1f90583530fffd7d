"""The app's public URLs: ``path("agents/", include("django_absurd_agents.urls"))``."""

from django.urls import URLPattern, URLResolver, path

from django_absurd_agents import webhooks

app_name = "absurd_agents"

urlpatterns: list[URLPattern | URLResolver] = [
    path("hooks/<str:name>", webhooks.receive, name="webhook"),
]
