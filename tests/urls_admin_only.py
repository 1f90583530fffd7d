"""A project that mounts the admin but not the app's own URLs (``django_absurd_agents.urls``)."""

from django.contrib import admin
from django.urls import path

urlpatterns = [path("admin/", admin.site.urls)]
