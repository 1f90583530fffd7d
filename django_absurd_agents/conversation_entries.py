"""The stored log of conversations: one ``Entry`` per message, each pointing at the entry before it.

The log is a tree rather than a list. A branch leaves the old history stored (so the conversation can
go back to it), and a fork starts a new conversation that shares its source's entries instead of
copying them. So an entry belongs to no single conversation: it stays while some conversation's head
or branch reaches it, and goes (``sweep_entries``) when the last one that did is deleted.

Reading a history is one recursive query from its newest entry (``entry_chain``), and decoding it one
validation of a JSON array (``decode_messages``): the messages stay JSON text from Postgres to
pydantic's validator, which also keeps a stored history readable byte for byte.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from django.db import connections, models
from django.utils import timezone
from pydantic import ValidationError
from pydantic_ai.messages import ModelMessage, ModelMessagesTypeAdapter

from django_absurd_agents import conf
from django_absurd_agents.exceptions import CorruptHistory

if TYPE_CHECKING:
    from django_absurd_agents.conversation_models import Turn


class StoredEntry(NamedTuple):
    """One entry as ``entry_chain`` reads it: its message still JSON text, to be decoded with the others."""

    id: uuid.UUID
    parent_id: uuid.UUID | None
    kind: str
    message_json: str
    turn_id: uuid.UUID | None


class Entry(models.Model):
    """One message of a conversation's log, linked to the entry before it (pydantic-ai's ConversationEntry).

    Entries never change once written, and their ids are the ones the store's ``save`` returned, so a
    rating or billing row of yours can point at one. A turn's task links the entries it stored to its turn.
    """

    id: models.UUIDField[uuid.UUID, uuid.UUID] = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # The database keeps the links (no entry points at a deleted one); deleting is sweep_entries' job.
    parent: models.ForeignKey[Entry | None, Entry | None] = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.DO_NOTHING, related_name="children"
    )
    parent_id: uuid.UUID | None
    kind: models.CharField[str, str] = models.CharField(max_length=32, default="message")
    message: models.JSONField[Any, Any] = models.JSONField(
        help_text="One Pydantic AI message, in ModelMessagesTypeAdapter's JSON form."
    )
    turn: models.ForeignKey[Turn | None, Turn | None] = models.ForeignKey(
        "Turn", null=True, blank=True, on_delete=models.SET_NULL, related_name="entries"
    )
    turn_id: uuid.UUID | None
    created_at: models.DateTimeField[datetime, datetime] = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "conversation entry"
        verbose_name_plural = "conversation entries"

    def __str__(self) -> str:
        return f"Entry {self.pk}"


def database_alias() -> str:
    """The conversations' database: Absurd's (``ABSURD_AGENTS['DATABASE']``), so a turn commits with its task."""
    return conf.get().database_alias


def table(model: type[models.Model], using: str) -> str:
    """The quoted table name of ``model``, for the recursive queries Django's ORM cannot write."""
    return connections[using].ops.quote_name(model._meta.db_table)


_CHAIN_SQL = """
with recursive chain(id, parent_id, kind, message, turn_id, depth) as (
    select id, parent_id, kind, message::text, turn_id, 1 from {entry} where id = %(head)s
  union all
    select e.id, e.parent_id, e.kind, e.message::text, e.turn_id, c.depth + 1
    from {entry} e join chain c on e.id = c.parent_id
    where %(limit)s::int is null or c.depth < %(limit)s::int
)
select id, parent_id, kind, message, turn_id from chain order by depth desc
"""


def entry_chain(head_id: Any, *, limit: int | None = None, using: str | None = None) -> list[StoredEntry]:
    """The entries from the first one up to ``head_id`` (or its last ``limit``), oldest first, in one query.

    Raises ``LookupError`` when an entry of the chain is missing, which the store reads as a concurrent
    delete of the conversation.
    """
    if head_id is None or limit == 0:
        return []
    using = using or database_alias()
    with connections[using].cursor() as cursor:
        cursor.execute(_CHAIN_SQL.format(entry=table(Entry, using)), {"head": str(head_id), "limit": limit})
        rows = [StoredEntry(*row) for row in cursor.fetchall()]
    if not rows or (rows[0].parent_id is not None and (limit is None or len(rows) < limit)):
        raise LookupError(f"The history ending at entry {head_id} is incomplete: an entry of it was deleted.")
    return rows


def decode_messages(entries: Sequence[StoredEntry]) -> list[ModelMessage]:
    """Pydantic AI messages from stored entries, in one validation; ``CorruptHistory`` names the bad ones."""
    if not entries:
        return []
    try:
        return ModelMessagesTypeAdapter.validate_json("[" + ",".join(entry.message_json for entry in entries) + "]")
    except ValidationError as exc:
        raise CorruptHistory(_corruption(entries, exc)) from None


def _corruption(entries: Sequence[StoredEntry], exc: ValidationError) -> str:
    """Which turns (or entries) hold the messages that do not load, and what to do about it."""
    bad = [entry for entry in entries if not _loads(entry.message_json)] or list(entries)
    turn_model = Entry._meta.get_field("turn").related_model
    turns = sorted(
        turn_model._default_manager.using(database_alias())  # type: ignore[union-attr]
        .filter(pk__in={entry.turn_id for entry in bad if entry.turn_id})
        .values_list("sequence", flat=True)
    )
    where = f"turn {', '.join(map(str, turns))}" if turns else "entries " + ", ".join(str(e.id) for e in bad[:3])
    return (
        f"The stored messages of {where} do not load as Pydantic AI messages ({exc.errors()[0]['msg']}). They "
        "were edited by hand or written by an incompatible pydantic-ai version: repair those entries "
        "(Entry.message), then retry."
    )


def _loads(message_json: str) -> bool:
    try:
        ModelMessagesTypeAdapter.validate_json("[" + message_json + "]")
    except ValidationError:
        return False
    return True


def load_messages(value: list[Any]) -> list[ModelMessage]:
    """Pydantic AI messages from their JSON form as a list (bytes as base64, timestamps and all)."""
    return ModelMessagesTypeAdapter.validate_json(json.dumps(value)) if value else []


def chain_order(rows: Sequence[tuple[Any, Any, str, Any, Any]]) -> list[StoredEntry]:
    """``(id, parent_id, kind, message, turn_id)`` rows of one stretch of a log, in log order.

    A turn's entries are consecutive in the log: the first is the one whose parent is not among them.
    """
    by_parent = {row[1]: row for row in rows}
    ids = {row[0] for row in rows}
    current = next((parent for parent in by_parent if parent not in ids), None)
    ordered: list[StoredEntry] = []
    while current in by_parent:
        entry_id, parent_id, kind, message, turn_id = by_parent[current]
        ordered.append(StoredEntry(entry_id, parent_id, kind, json.dumps(message), turn_id))
        current = entry_id
    return ordered


_SWEEP_SQL = """
with recursive
doomed(id, parent_id) as (
    select id, parent_id from {entry} where id = any(%(start)s::uuid[])
  union
    select e.id, e.parent_id from {entry} e join doomed d on e.id = d.parent_id
),
below(id) as (
    select id from doomed
  union
    select e.id from {entry} e join below b on e.parent_id = b.id
),
tips(id) as (
    select head_id from {conversation} where head_id in (select id from below)
  union
    select branch.id::uuid from {conversation} c, jsonb_array_elements_text(c.branches) as branch(id)
    where c.branches ?| (select coalesce(array_agg(id::text), '{{}}') from below)
),
kept(id, parent_id) as (
    select e.id, e.parent_id from {entry} e join tips t on e.id = t.id
  union
    select e.id, e.parent_id from {entry} e join kept k on e.id = k.parent_id
)
delete from {entry} where id in (select id from below) and id not in (select id from kept)
"""


def sweep_entries(start: Sequence[Any], conversation_model: type[models.Model], using: str) -> int:
    """Delete the entries the histories ending at ``start`` reached, unless a conversation still reaches them.

    ``start`` is a deleted conversation's head and branches. Entries built on them (a fork's, say) are
    looked at too, and kept with their ancestors while some conversation's head or branch reaches them.
    One statement, so one snapshot; and since entries and heads are foreign keys, a fork committed
    meanwhile makes the delete fail rather than leave it pointing at nothing.
    """
    ids = [str(value) for value in start if value]
    if not ids:
        return 0
    with connections[using].cursor() as cursor:
        sql = _SWEEP_SQL.format(entry=table(Entry, using), conversation=table(conversation_model, using))
        cursor.execute(sql, {"start": ids})
        return cursor.rowcount
