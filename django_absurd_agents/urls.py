"""The app's public URLs: ``path("agents/", include("django_absurd_agents.urls"))``."""

from django.urls import URLPattern, URLResolver, path

from django_absurd_agents import agui, metrics, views, webhooks

app_name = "absurd_agents"

urlpatterns: list[URLPattern | URLResolver] = [
    path("tasks/<uuid:task_id>/events", views.task_events, name="task_events"),
    path("conversations/<uuid:conversation_id>/chat", views.conversation_chat, name="conversation_chat"),
    path("conversations/<uuid:conversation_id>/agui", agui.conversation_agui, name="conversation_agui"),
    path("hooks/<str:name>", webhooks.receive, name="webhook"),
    path("metrics", metrics.metrics_view, name="metrics"),
]
