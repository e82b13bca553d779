"""The seed plan's Phase 2 design on asyncio: the baseline of `async_run.py`.

`reference.py` written for an async app, with the clients an async team would pick: `redis.asyncio`
(redis-py's asyncio client) and `asyncpg`. Same key layout, same calls, same SQL as `reference.py`:

- `get_conversation`: HGETALL + `json.loads`; on a miss, the row and the messages from PostgreSQL
  (autocommit reads) and the plan's `set_conversation(dirty=False)` to cache them.
- `save_conversation`: the plan's three separate calls HSET, EXPIRE, SADD.
- `list_conversations`: ZREVRANGE of `user:<id>:convlist`, then the hashes in one pipeline; on a
  miss, PostgreSQL's list, which then primes the cached list.
- `flush_dirty_conversations`: SMEMBERS, then per conversation HGETALL, one transaction (upsert, DELETE
  the messages, INSERT them), HSET + SREM.

It keeps the plan's limits (no versions, no compare-and-clear): a fair baseline for speed, not a
second product. Nothing here is imported by the product or its tests.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Dict, List, Optional, Tuple

import asyncpg
import redis.asyncio as aredis

from reference import CONVERSATION_TTL_SECONDS, LIST_TTL_SECONDS, SCHEMA


def _iso(ts: datetime) -> str:
    return ts.astimezone(timezone.utc).isoformat()


def _ts(text: Optional[str]) -> datetime:
    """asyncpg binds TIMESTAMPTZ from datetime objects, not strings (psycopg2 sent the text)."""
    return datetime.fromisoformat(text) if text else datetime.now(timezone.utc)


class RedisBackend:
    """The plan's RedisBackend on redis.asyncio."""

    def __init__(self, redis_connection_string: str):
        self.client = aredis.from_url(redis_connection_string, decode_responses=True)

    async def get_conversation(self, user_id: str, conversation_id: str) -> Optional[Dict]:
        data = await self.client.hgetall(f"conv:{user_id}:{conversation_id}")
        if not data:
            return None
        return {
            "title": data["title"],
            "model": data["model"],
            "messages": json.loads(data.get("messages", "[]")),
            "created_at": data["created_at"],
            "last_modified": data["last_modified"],
        }

    async def set_conversation(self, user_id: str, conversation_id: str, conversation: Dict, dirty: bool = True):
        key = f"conv:{user_id}:{conversation_id}"
        data = {
            "title": conversation["title"],
            "model": conversation["model"],
            "messages": json.dumps(conversation["messages"]),
            "created_at": conversation["created_at"],
            "last_modified": conversation["last_modified"],
            "dirty": "1" if dirty else "0",
        }
        await self.client.hset(key, mapping=data)
        await self.client.expire(key, CONVERSATION_TTL_SECONDS)
        if dirty:
            await self.client.sadd("dirty:convs", f"{user_id}:{conversation_id}")

    async def get_dirty_conversations(self) -> List[Tuple[str, str]]:
        return [tuple(key.split(":", 1)) for key in await self.client.smembers("dirty:convs")]  # type: ignore[misc]

    async def clear_dirty_flag(self, user_id: str, conversation_id: str) -> None:
        await self.client.hset(f"conv:{user_id}:{conversation_id}", "dirty", "0")
        await self.client.srem("dirty:convs", f"{user_id}:{conversation_id}")

    async def list_conversations(self, user_id: str) -> Optional[List[Tuple[str, Dict]]]:
        ids = await self.client.zrevrange(f"user:{user_id}:convlist", 0, -1)
        if not ids:
            return None
        pipe = self.client.pipeline(transaction=False)
        for conversation_id in ids:
            pipe.hgetall(f"conv:{user_id}:{conversation_id}")
        out = []
        for conversation_id, data in zip(ids, await pipe.execute()):
            if not data:
                return None
            out.append(
                (
                    conversation_id,
                    {
                        "title": data["title"],
                        "model": data["model"],
                        "messages": [],
                        "created_at": data["created_at"],
                        "last_modified": data["last_modified"],
                    },
                )
            )
        return out

    async def set_conversation_list(self, user_id: str, conversations: List[Tuple[str, Dict]]) -> None:
        key = f"user:{user_id}:convlist"
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(key)
        if conversations:
            pipe.zadd(key, {cid: datetime.fromisoformat(c["last_modified"]).timestamp() for cid, c in conversations})
            pipe.expire(key, LIST_TTL_SECONDS)
        await pipe.execute()


class PostgreSQLBackend:
    """Phase 1's PostgreSQL storage on an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    @classmethod
    async def connect(cls, connection_string: str, min_size: int = 1, max_size: int = 10) -> "PostgreSQLBackend":
        pool = await asyncpg.create_pool(connection_string, min_size=min_size, max_size=max_size)
        async with pool.acquire() as conn:
            await conn.execute(SCHEMA)
        return cls(pool)

    async def save_conversation(self, conversation_id: str, user_id: str, conversation: Dict) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO conversations (conversation_id, user_client_id, title, model, created_at, last_modified)"
                " VALUES ($1, $2, $3, $4, $5, $6)"
                " ON CONFLICT (conversation_id) DO UPDATE SET title = EXCLUDED.title, model = EXCLUDED.model,"
                " last_modified = EXCLUDED.last_modified"
                " WHERE conversations.user_client_id = EXCLUDED.user_client_id",
                conversation_id,
                user_id,
                conversation["title"],
                conversation["model"],
                _ts(conversation.get("created_at")),
                _ts(conversation.get("last_modified")),
            )
            await conn.execute("DELETE FROM messages WHERE conversation_id = $1", conversation_id)
            for seq, message in enumerate(conversation["messages"]):
                await conn.execute(
                    "INSERT INTO messages (conversation_id, sequence_number, role, content, timestamp)"
                    " VALUES ($1, $2, $3, $4, $5)",
                    conversation_id,
                    seq,
                    message["role"],
                    message["content"],
                    _ts(message.get("time")),
                )

    async def get_conversation(self, conversation_id: str, user_id: str) -> Optional[Dict]:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT title, model, created_at, last_modified FROM conversations"
                " WHERE conversation_id = $1 AND user_client_id = $2",
                conversation_id,
                user_id,
            )
            if row is None:
                return None
            rows = await conn.fetch(
                "SELECT role, content, timestamp FROM messages WHERE conversation_id = $1 ORDER BY sequence_number",
                conversation_id,
            )
        return {
            "title": row["title"],
            "model": row["model"],
            "messages": [{"role": r["role"], "content": r["content"], "time": _iso(r["timestamp"])} for r in rows],
            "created_at": _iso(row["created_at"]),
            "last_modified": _iso(row["last_modified"]),
        }

    async def list_conversations(self, user_id: str, days: int = 7) -> List[Tuple[str, Dict]]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                "SELECT conversation_id, title, model, created_at, last_modified FROM conversations"
                " WHERE user_client_id = $1 AND created_at >= NOW() - make_interval(days => $2)"
                " ORDER BY last_modified DESC",
                user_id,
                days,
            )
        return [
            (
                r["conversation_id"],
                {
                    "title": r["title"],
                    "model": r["model"],
                    "messages": [],
                    "created_at": _iso(r["created_at"]),
                    "last_modified": _iso(r["last_modified"]),
                },
            )
            for r in rows
        ]

    async def delete_conversation(self, conversation_id: str, user_id: str) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(
                "DELETE FROM conversations WHERE conversation_id = $1 AND user_client_id = $2", conversation_id, user_id
            )

    async def close(self) -> None:
        await self.pool.close()


class AsyncChatHistoryManager:
    """The plan's manager on asyncio: cache-aside reads, saves to Redis, write-back on flush."""

    def __init__(self, postgres: PostgreSQLBackend, redis_backend: Optional[RedisBackend], history_days: int = 7):
        self.postgres_backend = postgres
        self.redis_backend = redis_backend
        self.redis_enabled = redis_backend is not None
        self.history_days = history_days

    @classmethod
    async def open(
        cls, connection_string: str, redis_connection_string: Optional[str] = None, history_days: int = 7
    ) -> "AsyncChatHistoryManager":
        postgres = await PostgreSQLBackend.connect(connection_string)
        redis_backend = RedisBackend(redis_connection_string) if redis_connection_string else None
        return cls(postgres, redis_backend, history_days)

    async def get_conversation(self, conversation_id: str, user_id: str) -> Optional[Dict]:
        if self.redis_backend is not None:
            cached = await self.redis_backend.get_conversation(user_id, conversation_id)
            if cached:
                return cached
        convo = await self.postgres_backend.get_conversation(conversation_id, user_id)
        if convo and self.redis_backend is not None:
            await self.redis_backend.set_conversation(user_id, conversation_id, convo, dirty=False)
        return convo

    async def save_conversation(self, conversation_id: str, conversation: Dict, user_id: str) -> None:
        if self.redis_backend is not None:
            await self.redis_backend.set_conversation(user_id, conversation_id, conversation, dirty=True)
        else:
            await self.postgres_backend.save_conversation(conversation_id, user_id, conversation)

    async def list_conversations(self, user_id: str) -> List[Tuple[str, Dict]]:
        if self.redis_backend is not None:
            cached = await self.redis_backend.list_conversations(user_id)
            if cached is not None:
                horizon = datetime.now(timezone.utc) - timedelta(days=self.history_days)
                return [(cid, c) for cid, c in cached if datetime.fromisoformat(c["created_at"]) >= horizon]
        convs = await self.postgres_backend.list_conversations(user_id, self.history_days)
        if self.redis_backend is not None:
            await self.redis_backend.set_conversation_list(user_id, convs)
        return convs

    async def flush_dirty_conversations(self) -> int:
        if self.redis_backend is None:
            return 0
        count = 0
        for user_id, conversation_id in await self.redis_backend.get_dirty_conversations():
            convo = await self.redis_backend.get_conversation(user_id, conversation_id)
            if convo:
                try:
                    await self.postgres_backend.save_conversation(conversation_id, user_id, convo)
                    await self.redis_backend.clear_dirty_flag(user_id, conversation_id)
                    count += 1
                except Exception as e:  # noqa: BLE001 - the plan's catch-all
                    print(f"Failed to write back {conversation_id}: {e}")
        return count

    async def close(self) -> None:
        await self.postgres_backend.close()
        if self.redis_backend is not None:
            await self.redis_backend.client.aclose()
