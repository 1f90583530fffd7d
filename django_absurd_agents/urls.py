"""The app's public URLs: ``path("agents/", include("django_absurd_agents.urls"))``."""

from django.urls import URLPattern, URLResolver

app_name = "absurd_agents"

urlpatterns: list[URLPattern | URLResolver] = []
