"""Conversations become pydantic-ai's ConversationStore: a log of entries, one per message.

Each conversation's completed turns' messages (``Turn.new_messages``, in sequence order) become a chain
of ``Entry`` rows linked to their turn; the conversation's head points at the last one, its usage is the
sum of its turns', its ``key`` (the store's conversation_id) is its id. Messages a turn held without
being completed (only possible by hand) are kept too, as a branch the conversation left. Then
``Turn.new_messages`` goes.

Migrating back puts each turn's messages back on the turn; entries saved through the store without a
turn have no turn to go back to and are dropped with the entry table.
"""

import uuid

import django.db.models.deletion
import django.utils.timezone
from django.db import migrations, models

import django_absurd_agents.conversation_models

KEY_HELP = (
    "The conversation_id of pydantic-ai's Conversation: str(id), unless the store created it under an id that is "
    "not a UUID."
)


def _add_usage(total, usage):
    """RunUsage JSON summed field by field (``details`` too), without importing today's pydantic-ai."""
    for name, value in (usage or {}).items():
        if isinstance(value, dict):
            total[name] = _add_usage(dict(total.get(name) or {}), value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            total[name] = (total.get(name) or 0) + value
    return total


def _chain(Entry, turn, messages, parent):
    """Entries for ``messages`` of ``turn`` after ``parent``; returns them and the last one's id."""
    rows = []
    for message in messages if isinstance(messages, list) else [messages]:
        row = Entry(
            id=uuid.uuid4(),
            parent_id=parent,
            message=message,
            turn_id=turn.pk,
            created_at=turn.finished_at or turn.updated_at,
        )
        rows.append(row)
        parent = row.id
    return rows, parent


def forward(apps, schema_editor):
    alias = schema_editor.connection.alias
    Conversation = apps.get_model("absurd_agents", "Conversation")
    Turn = apps.get_model("absurd_agents", "Turn")
    Entry = apps.get_model("absurd_agents", "Entry")
    for conversation in Conversation.objects.using(alias).order_by("pk").iterator():
        head, rows, branches = None, [], []
        usage: dict = {}
        for turn in Turn.objects.using(alias).filter(conversation_id=conversation.pk).order_by("sequence"):
            if turn.new_messages in (None, []):
                continue
            if turn.state == "completed":
                chained, head = _chain(Entry, turn, turn.new_messages, head)
                usage = _add_usage(usage, turn.usage)
            else:  # not part of the history, but kept: the history it would have continued, as a branch
                chained, tip = _chain(Entry, turn, turn.new_messages, head)
                branches.append(str(tip))
            rows.extend(chained)
        Entry.objects.using(alias).bulk_create(rows, batch_size=500)
        Conversation.objects.using(alias).filter(pk=conversation.pk).update(
            key=str(conversation.pk), revision=str(uuid.uuid4()), head_id=head, usage=usage, branches=branches
        )
    # Fire the deferred foreign-key checks now: the ALTER TABLEs below refuse tables with pending ones.
    schema_editor.execute("SET CONSTRAINTS ALL IMMEDIATE")
    schema_editor.execute("SET CONSTRAINTS ALL DEFERRED")


def backward(apps, schema_editor):
    alias = schema_editor.connection.alias
    Turn = apps.get_model("absurd_agents", "Turn")
    Entry = apps.get_model("absurd_agents", "Entry")
    for turn in Turn.objects.using(alias).filter(entries__isnull=False).distinct().iterator():
        rows = {row.parent_id: row for row in Entry.objects.using(alias).filter(turn_id=turn.pk)}
        ids = {row.id for row in rows.values()}
        current = next((parent for parent in rows if parent not in ids), None)
        messages = []
        while current in rows:
            messages.append(rows[current].message)
            current = rows[current].id
        Turn.objects.using(alias).filter(pk=turn.pk).update(new_messages=messages)
    schema_editor.execute("SET CONSTRAINTS ALL IMMEDIATE")
    schema_editor.execute("SET CONSTRAINTS ALL DEFERRED")


class Migration(migrations.Migration):
    dependencies = [("absurd_agents", "0004_absurd_overview")]

    operations = [
        migrations.CreateModel(
            name="Entry",
            fields=[
                ("id", models.UUIDField(default=uuid.uuid4, editable=False, primary_key=True, serialize=False)),
                ("kind", models.CharField(default="message", max_length=32)),
                (
                    "message",
                    models.JSONField(help_text="One Pydantic AI message, in ModelMessagesTypeAdapter's JSON form."),
                ),
                ("created_at", models.DateTimeField(default=django.utils.timezone.now)),
                (
                    "parent",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.DO_NOTHING,
                        related_name="children",
                        to="absurd_agents.entry",
                    ),
                ),
                (
                    "turn",
                    models.ForeignKey(
                        blank=True,
                        null=True,
                        on_delete=django.db.models.deletion.SET_NULL,
                        related_name="entries",
                        to="absurd_agents.turn",
                    ),
                ),
            ],
            options={"verbose_name": "conversation entry", "verbose_name_plural": "conversation entries"},
        ),
        migrations.AddField(
            model_name="conversation",
            name="key",
            field=models.CharField(editable=False, help_text=KEY_HELP, max_length=255, null=True, unique=True),
        ),
        migrations.AddField(
            model_name="conversation",
            name="revision",
            field=models.CharField(
                default=django_absurd_agents.conversation_models.new_revision, editable=False, max_length=64
            ),
        ),
        migrations.AddField(
            model_name="conversation",
            name="head",
            field=models.ForeignKey(
                blank=True,
                editable=False,
                null=True,
                on_delete=django.db.models.deletion.DO_NOTHING,
                related_name="+",
                to="absurd_agents.entry",
            ),
        ),
        migrations.AddField(
            model_name="conversation",
            name="usage",
            field=models.JSONField(
                blank=True, default=dict, help_text="Usage of every run of the conversation (pydantic-ai RunUsage)."
            ),
        ),
        migrations.AddField(
            model_name="conversation",
            name="deferred_tool_requests",
            field=models.JSONField(
                blank=True, help_text="The tool calls the conversation waits on (DeferredToolRequests).", null=True
            ),
        ),
        migrations.AddField(
            model_name="conversation",
            name="branches",
            field=models.JSONField(
                blank=True, default=list, help_text="Last entries of the histories the conversation left, oldest first."
            ),
        ),
        migrations.AddField(
            model_name="conversation",
            name="forked_from",
            field=models.CharField(blank=True, max_length=255, null=True),
        ),
        migrations.AddField(
            model_name="conversation",
            name="forked_at",
            field=models.UUIDField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="turn",
            name="deferred_tool_results",
            field=models.JSONField(
                blank=True,
                help_text="Answers to the tool calls the conversation waited on (DeferredToolResults).",
                null=True,
            ),
        ),
        migrations.AlterField(
            model_name="conversation",
            name="agent",
            field=models.CharField(
                blank=True, help_text="Name of the chat agent (register_chat_agent) that answers turns.", max_length=200
            ),
        ),
        migrations.AlterField(
            model_name="conversation",
            name="updated_at",
            field=models.DateTimeField(
                default=django.utils.timezone.now, help_text="Last activity: a message sent or stored."
            ),
        ),
        migrations.AlterField(model_name="turn", name="prompt", field=models.TextField(blank=True)),
        migrations.RunPython(forward, backward),
        migrations.AlterField(
            model_name="conversation",
            name="key",
            field=models.CharField(editable=False, help_text=KEY_HELP, max_length=255, unique=True),
        ),
        migrations.RemoveField(model_name="turn", name="new_messages"),
        # Raw SQL: GinIndex would require django.contrib.postgres in INSTALLED_APPS.
        migrations.RunSQL(
            "CREATE INDEX absurd_conv_branches ON absurd_agents_conversation USING gin (branches)",
            "DROP INDEX IF EXISTS absurd_conv_branches",
        ),
    ]
