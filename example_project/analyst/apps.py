from django.apps import AppConfig


class AnalystConfig(AppConfig):
    name = "analyst"
    verbose_name = "Analyst"
    default_auto_field = "django.db.models.BigAutoField"
