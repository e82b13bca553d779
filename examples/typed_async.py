"""A typed use of AsyncChatHistoryManager: `make lint` runs mypy on it against the package's stubs
(`python/chat_history_rs/_asyncio.pyi` and `_core.pyi`), so a stub that drifts from how the API is used fails lint.

    DATABASE_URL=postgresql://... REDIS_CONNECTION_STRING=redis://... python examples/typed_async.py
"""

from __future__ import annotations

import asyncio
import os
import secrets
from datetime import datetime, timezone
from typing import TYPE_CHECKING, List, Optional, Tuple

from chat_history_rs import AsyncChatHistoryManager, ChatHistoryError, OwnershipError

if TYPE_CHECKING:  # a TypedDict of the stubs, not a runtime name
    from chat_history_rs._core import Conversation


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


async def append_turn(history: AsyncChatHistoryManager, user_id: str, conversation_id: str, text: str) -> int:
    """Appends a user turn and a reply; returns the conversation's message count."""
    conversation: Optional[Conversation] = await history.get_conversation(conversation_id, user_id=user_id)
    if conversation is None:
        conversation = {
            "title": text[:40],
            "model": "gpt-4o",
            "messages": [],
            "created_at": now(),
            "last_modified": now(),
        }
    conversation["messages"].append({"role": "user", "content": text, "time": now()})
    conversation["messages"].append({"role": "assistant", "content": f"echo: {text}", "time": now()})
    conversation["last_modified"] = now()
    await history.save_conversation(conversation_id, dict(conversation), user_id=user_id)
    return len(conversation["messages"])


async def main() -> None:
    user_id = "typed-sample-user"
    async with AsyncChatHistoryManager(mode="postgres", redis_enabled=True) as history:
        conversation_id = secrets.token_hex(4)
        count: int = await append_turn(history, user_id, conversation_id, "hello")
        sidebar: List[Tuple[str, Conversation]] = await history.list_conversations(user_id=user_id)
        titles = [c["title"] for _, c in sidebar]
        flushed: int = await history.flush_dirty_conversations()
        hit_rate = history.stats().get("hit_rate")
        print(f"{count} messages; sidebar {titles}; {flushed} written back; hit rate {hit_rate}")
        try:
            await history.delete_conversation(conversation_id, user_id=user_id)
        except OwnershipError:
            raise
        except ChatHistoryError as exc:
            print(f"delete failed: {exc}")


if __name__ == "__main__":
    if not os.environ.get("DATABASE_URL"):
        raise SystemExit("set DATABASE_URL (and REDIS_CONNECTION_STRING) first")
    asyncio.run(main())
