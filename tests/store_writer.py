"""One writer of the store's concurrency test: ``python -m tests.store_writer CONVERSATION_ID NAME``.

Loads the conversation, adds a turn's worth of messages named NAME, saves, and prints ``saved`` or
``conflict``. The test holds the conversation's row locked so that two of these block in their save.
"""

from __future__ import annotations

import asyncio
import os
import sys

import django


async def main(conversation_id: str, name: str) -> str:
    from pydantic_ai.conversation_store import ConversationConflict

    from django_absurd_agents import DjangoConversationStore
    from tests.test_conversation_store import ask, say

    store = DjangoConversationStore()
    conversation = await store.load(conversation_id)
    assert conversation is not None
    conversation.messages.extend([ask(name), say(name)])
    try:
        await store.save(conversation)
    except ConversationConflict:
        return "conflict"
    return "saved"


if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    django.setup()
    print(asyncio.run(main(sys.argv[1], sys.argv[2])), flush=True)
