"""URLconf of the webhook tests: the app's public URLs under /agents/."""

from django.urls import include, path

urlpatterns = [path("agents/", include("django_absurd_agents.urls"))]
