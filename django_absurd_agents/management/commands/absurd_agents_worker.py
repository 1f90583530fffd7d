"""``manage.py absurd_agents_worker``: ``absurd_worker`` under a name no other app ships (django-absurd has one)."""

from django_absurd_agents.management.commands.absurd_worker import Command as WorkerCommand


class Command(WorkerCommand):
    help = WorkerCommand.help + " (The same as absurd_worker, under a name that no other app's command shadows.)"
