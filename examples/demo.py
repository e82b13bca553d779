"""A small tour of chat_history_rs: a chat saved, read, listed and written back.

Uses DATABASE_URL and REDIS_CONNECTION_STRING when set; otherwise starts a throwaway PostgreSQL and
Redis under ./.demo, or, when those servers are not installed, falls back to local JSON files.
Run it with `make demo`.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from chat_history_rs import ChatHistoryManager  # noqa: E402
from local_stack import LocalStack, StackUnavailable  # noqa: E402


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    stack = None
    pg_url, redis_url = os.environ.get("DATABASE_URL"), os.environ.get("REDIS_CONNECTION_STRING")
    if not (pg_url and redis_url):
        try:
            stack = LocalStack(Path(".demo"))
            pg_url, redis_url = stack.start()
            print(f"started a throwaway PostgreSQL and Redis under {stack.root}")
        except StackUnavailable as why:
            print(f"{why}: using local JSON files in ./.chat_history instead")
            stack = None
    try:
        if stack is None and not (pg_url and redis_url):
            history = ChatHistoryManager(mode="local")
        else:
            history = ChatHistoryManager(
                mode="postgres", connection_string=pg_url, redis_enabled=True, redis_connection_string=redis_url
            )
        with history:
            user = str(uuid.uuid4())
            conversation_id = uuid.uuid4().hex[:8]
            chat = {"title": "Trip to Lisbon", "model": "gpt-4o", "messages": [], "created_at": now(), "last_modified": now()}
            for role, text in [("user", "Plan two days in Lisbon."), ("assistant", "Day 1: Alfama and Belém. Day 2: Sintra.")]:
                chat["messages"].append({"role": role, "content": text, "time": now()})
                chat["last_modified"] = now()
                history.save_conversation(conversation_id, chat, user_id=user)
            print(f"saved {conversation_id} for user {user}")
            print("read back equal:", history.get_conversation(conversation_id, user_id=user) == chat)
            print("listed:", [(cid, c["title"]) for cid, c in history.list_conversations(user_id=user)])
            print("written back to PostgreSQL:", history.flush_dirty_conversations())
            stats = history.stats()
            print("stats:", {k: stats.get(k) for k in ("mode", "cache_hits", "cache_misses", "hit_rate", "dirty_count")})
    finally:
        if stack is not None:
            stack.stop()


if __name__ == "__main__":
    main()
