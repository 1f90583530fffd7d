from django.contrib import admin

from analyst.models import Report, ReportRequest


@admin.register(ReportRequest)
class ReportRequestAdmin(admin.ModelAdmin):
    list_display = ["company", "question", "task_id", "created"]
    search_fields = ["company", "question", "task_id"]
    readonly_fields = ["task_id", "created"]


@admin.register(Report)
class ReportAdmin(admin.ModelAdmin):
    list_display = ["title", "company", "task_id", "created"]
    search_fields = ["title", "company", "task_id"]
    readonly_fields = ["task_id", "created"]
