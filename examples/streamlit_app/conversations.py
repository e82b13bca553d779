"""Conversation dicts as the app writes them, and the stand-in for the LLM.

A conversation is what ChatHistoryManager stores: {"title", "model", "messages": [{"role",
"content", "time"}], "created_at", "last_modified"}, timestamps as `datetime.isoformat()` of UTC.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "o3-mini")
NEW_CHAT_TITLE = "New chat"
TITLE_LENGTH = 40

Conversation = dict[str, Any]


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def new_conversation(model: str) -> Conversation:
    stamp = now()
    return {"title": NEW_CHAT_TITLE, "model": model, "messages": [], "created_at": stamp, "last_modified": stamp}


def add_message(conversation: Conversation, role: str, content: str) -> None:
    """Appends a message; the first user message also names an untitled chat."""
    if role == "user" and conversation["title"] == NEW_CHAT_TITLE and not conversation["messages"]:
        conversation["title"] = title_from(content)
    stamp = now()
    conversation["messages"].append({"role": role, "content": content, "time": stamp})
    conversation["last_modified"] = stamp


def title_from(text: str) -> str:
    words = " ".join(text.split())
    if len(words) <= TITLE_LENGTH:
        return words or NEW_CHAT_TITLE
    return words[: TITLE_LENGTH - 1].rstrip() + "…"


def stub_reply(conversation: Conversation) -> str:
    """The assistant's answer. A stand-in for the Azure OpenAI call, deterministic and offline: it
    echoes the last user message, so a test (or a person) can tell which message it answers."""
    last = next((m["content"] for m in reversed(conversation["messages"]) if m["role"] == "user"), "")
    turn = sum(1 for m in conversation["messages"] if m["role"] == "user")
    return f"[{conversation['model']} stub, turn {turn}] You said: {last}"


def by_recency(chats: list[tuple[str, Conversation]]) -> list[tuple[str, Conversation]]:
    """Newest `last_modified` first. PostgreSQL and Redis already list in that order; local mode
    lists by file name, that is by random id."""
    return sorted(chats, key=lambda item: _instant(item[1].get("last_modified")), reverse=True)


def _instant(stamp: Any) -> datetime:
    try:
        moment = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
