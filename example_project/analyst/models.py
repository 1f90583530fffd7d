"""The analyst's own data, written by ordinary Django code on both sides of the queue.

``ReportRequest`` is written by the web request that asks for a report, in the same transaction as
the task it spawns: both exist or neither does. ``Report`` is written by the agent's ``save_report``
tool inside the task: it is the side effect that must happen exactly once even when the worker
running the task is killed and another one resumes it.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from django.db import models
from django.urls import reverse


class ReportRequest(models.Model):
    """Someone asked the analyst for a report; ``task_id`` is the Absurd task doing the work."""

    company: models.CharField[str, str] = models.CharField(max_length=100)
    question: models.TextField[str, str] = models.TextField()
    task_id: models.UUIDField[uuid.UUID | None, uuid.UUID | None] = models.UUIDField(null=True, blank=True, unique=True)
    created: models.DateTimeField[datetime, datetime] = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"{self.company}: {self.question[:60]}"

    def get_absolute_url(self) -> str:
        return reverse("analyst:status", args=[self.pk])


class Report(models.Model):
    """A report the analyst saved with its ``save_report`` tool.

    ``task_id`` is deliberately not unique: if a tool ran twice, the second row would show it.
    """

    task_id: models.UUIDField[uuid.UUID | str, uuid.UUID] = models.UUIDField(db_index=True)
    company: models.CharField[str, str] = models.CharField(max_length=100)
    title: models.CharField[str, str] = models.CharField(max_length=200)
    summary: models.TextField[str, str] = models.TextField()
    created: models.DateTimeField[datetime, datetime] = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return self.title
