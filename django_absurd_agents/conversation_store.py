"""``DjangoConversationStore``: pydantic-ai's ``ConversationStore`` on this app's models.

pydantic-ai keeps a conversation as a record (where its history ends, its usage, the deferred tool
calls it waits on, its scope and revision) and a log of entries, one per message, each pointing at the
one before it. Its ``ConversationStore`` base class does the work (which messages are new, branches,
forks, scopes, conflicts) on five storage primitives; this module implements them on Django models:

- the record is a ``Conversation`` row, the same row the admin, ``send()`` and the turns use;
- each entry is an ``Entry`` row, its ``parent`` a foreign key, so the database itself refuses an
  entry or a head that points at nothing;
- ``scope`` is the conversation's owner: ``str(user.pk)``. Override ``owner_of`` and ``scope_of`` to
  spell scopes another way; they must stay users, since the owner is a foreign key to the user model.

Every primitive runs on Django's connection for the configured alias through ``sync_to_async``, so
the store never blocks an event loop, and sync code (``async_to_sync(store.save)(...)``) writes in
its own thread's connection, inside its transaction. A write is one transaction: the revision check
is an ``UPDATE ... WHERE revision = <expected>``, so of two concurrent saves of one conversation one
waits on the other's row lock, then finds the revision changed and raises ``ConversationConflict``;
nothing of the loser is written.

``delete`` deletes the ``Conversation`` row like any other delete (its turns' tasks are cancelled),
and with it every entry no remaining conversation reaches (``conversation_entries.sweep_entries``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any, cast

from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import IntegrityError, connections, transaction
from pydantic import TypeAdapter
from pydantic_ai.conversation_store import (
    ConversationConflict,
    ConversationEntry,
    ConversationRecord,
    ConversationStore,
)
from pydantic_ai.exceptions import UserError
from pydantic_ai.messages import ModelMessagesTypeAdapter
from pydantic_ai.usage import RunUsage

from django_absurd_agents import conf
from django_absurd_agents.conversation_entries import Entry, decode_messages, entry_chain, load_messages
from django_absurd_agents.conversation_models import DEFERRED_REQUESTS, Conversation
from django_absurd_agents.jsonsafe import find_problem

USAGE: TypeAdapter[RunUsage] = TypeAdapter(RunUsage)


def _uuid(value: str | None) -> uuid.UUID | None:
    """``value`` as a UUID, or None when it is not one (no row can have that id then)."""
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except (ValueError, TypeError, AttributeError):
        return None


class DjangoConversationStore(ConversationStore):
    """pydantic-ai's ``ConversationStore`` on ``Conversation`` and ``Entry`` rows.

    ``load`` / ``save`` a conversation around each run::

        store = DjangoConversationStore()
        conversation = await store.load(conversation_id, scope=str(user.pk))
        result = await agent.run(prompt, conversation=conversation)
        await store.save(result)

    Args:
        agent: The ``agent`` written on the conversations this store creates, so that
            ``Conversation.send()`` knows which chat agent answers them. Optional.
        using: The database alias; by default ``ABSURD_AGENTS["DATABASE_ALIAS"]``.
    """

    def __init__(self, *, agent: str = "", using: str | None = None) -> None:
        self.agent = agent
        self._using = using

    @property
    def using(self) -> str:
        return self._using or conf.get().database_alias

    def scope_of(self, owner_id: Any) -> str | None:
        """The scope of conversations owned by the user with pk ``owner_id`` (None: no owner)."""
        return None if owner_id is None else str(owner_id)

    def owner_of(self, scope: str) -> Any:
        """The pk of the user ``scope`` names; ``ValueError`` when it names none (``scope_of`` must give it back)."""
        pk_field = get_user_model()._meta.pk
        assert pk_field is not None
        try:
            owner = pk_field.to_python(scope)
        except ValidationError:
            owner = None
        if owner is None or self.scope_of(owner) != scope:
            raise ValueError(
                f"Scope {scope!r} is not a user id: a DjangoConversationStore's scope is the conversation's owner, "
                "str(user.pk). Override owner_of() and scope_of() to name owners another way."
            )
        return owner

    async def read_record(self, conversation_id: str) -> ConversationRecord | None:
        return await sync_to_async(self.read_record_sync)(conversation_id)

    async def read_records(self, *, scope: str | None = None, limit: int | None = None) -> Sequence[ConversationRecord]:
        return await sync_to_async(self._db_read_records)(scope, limit)

    async def write_record(
        self,
        record: ConversationRecord,
        *,
        new_entries: Sequence[ConversationEntry] = (),
        expected_revision: str | None,
    ) -> None:
        await sync_to_async(self._db_write_record)(record, list(new_entries), expected_revision)

    async def delete_record(self, conversation_id: str, *, expected_revision: str) -> None:
        await sync_to_async(self._db_delete_record)(conversation_id, expected_revision)

    async def read_entry(self, entry_id: str) -> ConversationEntry:
        return await sync_to_async(self._db_read_entry)(entry_id)

    async def read_history(self, head_id: str | None, *, limit: int | None = None) -> list[ConversationEntry]:
        """The history up to ``head_id`` in one recursive query, rather than one query per entry."""
        return await sync_to_async(self._db_read_history)(head_id, limit)

    def _record(self, row: Conversation) -> ConversationRecord:
        deferred = row.deferred_tool_requests
        return ConversationRecord(
            conversation_id=row.key,
            head_id=None if row.head_id is None else str(row.head_id),
            usage=USAGE.validate_json(json.dumps(row.usage or {})),
            deferred_tool_requests=None if deferred is None else DEFERRED_REQUESTS.validate_json(json.dumps(deferred)),
            scope=self.scope_of(row.owner_id),  # type: ignore[attr-defined]
            forked_from=row.forked_from,
            forked_at=None if row.forked_at is None else str(row.forked_at),
            branches=[str(branch) for branch in row.branches or []],
            revision=row.revision,
            updated_at=row.updated_at,
        )

    def read_record_sync(self, conversation_id: str) -> ConversationRecord | None:
        row = Conversation.objects.using(self.using).filter(key=conversation_id).first()
        return None if row is None else self._record(row)

    def _db_read_records(self, scope: str | None, limit: int | None) -> list[ConversationRecord]:
        rows = Conversation.objects.using(self.using).order_by("-updated_at", "-created_at")
        if scope is not None:
            try:
                rows = rows.filter(owner_id=self.owner_of(scope))
            except ValueError:
                return []
        return [self._record(row) for row in (rows if limit is None else rows[:limit])]

    def _db_read_entry(self, entry_id: str) -> ConversationEntry:
        pk = _uuid(entry_id)
        row = None if pk is None else Entry.objects.using(self.using).filter(pk=pk).first()
        if row is None:
            raise KeyError(entry_id)
        message = load_messages([row.message])[0]
        return ConversationEntry(
            id=entry_id, parent_id=None if row.parent_id is None else str(row.parent_id), message=message
        )

    def _db_read_history(self, head_id: str | None, limit: int | None) -> list[ConversationEntry]:
        if head_id is not None and _uuid(head_id) is None:
            raise KeyError(head_id)
        rows = entry_chain(head_id, limit=limit, using=self.using)
        return [
            ConversationEntry(
                id=str(row.id),
                parent_id=None if row.parent_id is None else str(row.parent_id),
                message=message,
                kind=cast(Any, row.kind),
            )
            for row, message in zip(rows, decode_messages(rows), strict=True)
        ]

    def _row_values(self, record: ConversationRecord) -> dict[str, Any]:
        """The ``Conversation`` columns of ``record`` (owner included), checked before anything is written."""
        owner = None
        if record.scope is not None:
            try:
                owner = self.owner_of(record.scope)
            except ValueError as exc:
                raise UserError(str(exc)) from None
            if not get_user_model()._default_manager.using(self.using).filter(pk=owner).exists():
                raise UserError(f"Scope {record.scope!r} names no user: a conversation's scope is its owner's id.")
        deferred = record.deferred_tool_requests
        requests = None if deferred is None else DEFERRED_REQUESTS.dump_python(deferred, mode="json")
        return {
            "owner_id": owner,
            "head_id": _uuid(record.head_id),
            "usage": USAGE.dump_python(record.usage, mode="json"),
            "deferred_tool_requests": requests,
            "forked_from": record.forked_from,
            "forked_at": _uuid(record.forked_at),
            "branches": list(record.branches),
            "revision": record.revision,
            "updated_at": record.updated_at,
        }

    def _entry_rows(self, record: ConversationRecord, entries: list[ConversationEntry]) -> list[Entry]:
        messages = ModelMessagesTypeAdapter.dump_python([entry.message for entry in entries], mode="json")
        rows = []
        for index, (entry, message) in enumerate(zip(entries, messages, strict=True)):
            problem = find_problem(message)
            if problem is not None:
                raise ValueError(
                    f"Message {index} of this save of conversation {record.conversation_id!r} cannot be stored: "
                    f"{problem}. {problem.hint}"
                )
            pk = _uuid(entry.id)
            if pk is None or str(pk) != entry.id:
                raise ValueError(f"Entry ids are UUIDs in a DjangoConversationStore, not {entry.id!r}.")
            rows.append(Entry(id=pk, parent_id=_uuid(entry.parent_id), kind=entry.kind, message=message))
        return rows

    def _db_write_record(
        self, record: ConversationRecord, new_entries: list[ConversationEntry], expected_revision: str | None
    ) -> None:
        values = self._row_values(record)
        rows = self._entry_rows(record, new_entries)
        using = self.using
        try:
            with transaction.atomic(using=using):
                if expected_revision is None:
                    pk = self._insert(record.conversation_id, values)
                else:
                    pk = self._update(record.conversation_id, values, expected_revision)
                Entry.objects.using(using).bulk_create(rows)
                head = values["head_id"]
                new_ids = {row.pk for row in rows}
                if head is not None and head not in new_ids and not Entry.objects.using(using).filter(pk=head).exists():
                    raise ConversationConflict(record.conversation_id)
                self._stored(pk, record, rows)
                # Check the links now, inside this block, rather than at the caller's commit: an entry a
                # concurrent delete released makes this save a conflict, not the caller's IntegrityError.
                connections[using].check_constraints()
        except IntegrityError as exc:
            raise ConversationConflict(record.conversation_id) from exc

    def _insert(self, conversation_id: str, values: dict[str, Any]) -> uuid.UUID:
        """A new conversation row; its pk is the id itself when that is a UUID, so URLs and ids agree."""
        candidate = _uuid(conversation_id)
        pk = candidate if candidate is not None and str(candidate) == conversation_id else uuid.uuid4()
        using = self.using
        if Conversation.objects.using(using).filter(key=conversation_id).exists():
            raise ConversationConflict(conversation_id)
        Conversation.objects.using(using).create(id=pk, key=conversation_id, agent=self.agent, **values)
        return pk

    def _update(self, conversation_id: str, values: dict[str, Any], expected_revision: str) -> uuid.UUID:
        """Move the row to the new revision, if it still has ``expected_revision`` (one statement, so a
        concurrent writer waits on the row lock, then finds the revision changed)."""
        conversations = Conversation.objects.using(self.using)
        if not conversations.filter(key=conversation_id, revision=expected_revision).update(**values):
            raise ConversationConflict(conversation_id)
        return cast(uuid.UUID, conversations.values_list("pk", flat=True).get(key=conversation_id))

    def _stored(self, conversation_pk: uuid.UUID, record: ConversationRecord, entries: list[Entry]) -> None:
        """Called inside the write's transaction, after the record and its entries were written.

        A subclass writes its own rows here so that they commit, or roll back, with the conversation:
        the turn task marks its turn completed in the same transaction as the messages it stores.
        """

    def _db_delete_record(self, conversation_id: str, expected_revision: str) -> None:
        using = self.using
        try:
            with transaction.atomic(using=using):
                row = (
                    Conversation.objects.using(using)
                    .select_for_update()
                    .filter(key=conversation_id, revision=expected_revision)
                    .first()
                )
                if row is None:
                    raise ConversationConflict(conversation_id)
                row.delete(using=using)  # cancels unfinished turns' tasks; sweeps the unreachable entries
                connections[using].check_constraints()
        except IntegrityError as exc:  # a fork of it committed meanwhile: delete again, sparing its entries
            raise ConversationConflict(conversation_id) from exc
