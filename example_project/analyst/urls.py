from django.urls import path

from analyst import views

app_name = "analyst"

urlpatterns = [
    path("", views.ask, name="ask"),
    path("reports/<int:pk>/", views.status, name="status"),
    path("reports/<int:pk>.json", views.report_progress, name="progress"),
    path("chat/", views.chats, name="chats"),
    path("chat/new/", views.new_chat, name="new_chat"),
    path("chat/<uuid:pk>/", views.chat, name="chat"),
]
