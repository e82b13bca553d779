"""The Phase 2 plan (seed/000_d674d536e23fe1f7.txt) written in plain Python: the baseline of the benchmarks.

This is what a team would have shipped from the plan, written from its code blocks with redis-py and
psycopg2, so `benches/run.py` can time it side by side with `chat_history_rs` against the same servers:

- `RedisBackend`: the plan's class as written. `set_conversation` sends HSET, EXPIRE and (when dirty)
  SADD as three separate calls; `get_conversation` is HGETALL + `json.loads`; `get_dirty_conversations`
  is SMEMBERS; `clear_dirty_flag` is HSET + SREM. `list_conversations` is not in the plan's code; it
  is built as the plan's key design implies: ZREVRANGE of `user:<id>:convlist`, then one HGETALL per
  conversation, sent in one pipeline (the plan's "Performance Optimization" section).
- `PostgreSQLBackend`: the Phase 1 PostgreSQL code the plan builds on, on a
  `psycopg2.pool.ThreadedConnectionPool`. A save is one transaction: upsert the conversation row
  (keeping `created_at`), DELETE the messages, one INSERT per message. A get reads the row and the
  messages in sequence order; a list reads metadata only, for the last `history_days` days. Reads run
  in autocommit, so they cost their SELECTs only (psycopg2's default would add BEGIN and COMMIT).
- `ChatHistoryManager`: the plan's cache-aside reads, write-to-Redis saves and
  `flush_dirty_conversations` (one conversation at a time), plus its postgres-only mode
  (`redis_enabled=False`, Phase 1).

It keeps the plan's limits on purpose (no versions, no compare-and-clear, `print` on a failed
write-back): it is a fair baseline for speed, not a second product. Nothing here is imported by the
product or its tests.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import psycopg2
import psycopg2.pool
import redis

CONVERSATION_TTL_SECONDS = 1800  # the plan's 30 minutes
LIST_TTL_SECONDS = 300  # the plan's 5 minutes for user:<id>:convlist

# Phase 1's production schema (the README, "Schema"), created when missing: the product's schema file, the one copy
# of its DDL, up to its "Phase 1 ends here" line.
_SCHEMA_SQL = Path(__file__).resolve().parent.parent / "src" / "store" / "postgres" / "schema.sql"
SCHEMA = _SCHEMA_SQL.read_text().partition("\n-- Phase 1 ends here")[0]


def _iso(ts: datetime) -> str:
    """PostgreSQL's TIMESTAMPTZ as the app writes it: `datetime.isoformat()` of the UTC instant."""
    return ts.astimezone(timezone.utc).isoformat()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class RedisBackend:
    """Redis caching layer for chat conversations (the plan's class)."""

    def __init__(self, redis_connection_string: str):
        """Initialize Redis client and connection pool."""
        self.client = redis.from_url(redis_connection_string, decode_responses=True)

    def get_conversation(self, user_id: str, conversation_id: str) -> Optional[Dict]:
        """Fetch conversation from Redis cache."""
        key = f"conv:{user_id}:{conversation_id}"
        data = self.client.hgetall(key)
        if not data:
            return None
        messages = json.loads(data.get("messages", "[]"))
        return {
            "title": data["title"],
            "model": data["model"],
            "messages": messages,
            "created_at": data["created_at"],
            "last_modified": data["last_modified"],
        }

    def set_conversation(self, user_id: str, conversation_id: str, conversation: Dict, dirty: bool = True):
        """Store conversation in Redis and mark as dirty if modified."""
        key = f"conv:{user_id}:{conversation_id}"
        data = {
            "title": conversation["title"],
            "model": conversation["model"],
            "messages": json.dumps(conversation["messages"]),
            "created_at": conversation["created_at"],
            "last_modified": conversation["last_modified"],
            "dirty": "1" if dirty else "0",
        }
        # The plan's three separate calls: HSET, EXPIRE, SADD.
        self.client.hset(key, mapping=data)
        self.client.expire(key, CONVERSATION_TTL_SECONDS)
        if dirty:
            self.client.sadd("dirty:convs", f"{user_id}:{conversation_id}")

    def get_dirty_conversations(self) -> List[Tuple[str, str]]:
        """Retrieve all conversations pending write-back."""
        dirty_keys = self.client.smembers("dirty:convs")
        return [tuple(key.split(":", 1)) for key in dirty_keys]

    def clear_dirty_flag(self, user_id: str, conversation_id: str):
        """Remove dirty flag after successful write-back."""
        key = f"conv:{user_id}:{conversation_id}"
        self.client.hset(key, "dirty", "0")
        self.client.srem("dirty:convs", f"{user_id}:{conversation_id}")

    def list_conversations(self, user_id: str) -> Optional[List[Tuple[str, Dict]]]:
        """The user's cached list, newest first, metadata only; None when it is not cached.

        ZREVRANGE of `user:<id>:convlist`, then the conversation hashes in one pipeline. A hash that
        has expired makes the cached list unusable (None), as a missing list does.
        """
        ids = self.client.zrevrange(f"user:{user_id}:convlist", 0, -1)
        if not ids:
            return None
        pipe = self.client.pipeline(transaction=False)
        for conversation_id in ids:
            pipe.hgetall(f"conv:{user_id}:{conversation_id}")
        out = []
        for conversation_id, data in zip(ids, pipe.execute()):
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

    def set_conversation_list(self, user_id: str, conversations: List[Tuple[str, Dict]]) -> None:
        """Caches the user's list: score = last_modified as Unix time, TTL 5 minutes (one pipeline)."""
        key = f"user:{user_id}:convlist"
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(key)
        if conversations:
            pipe.zadd(key, {cid: datetime.fromisoformat(c["last_modified"]).timestamp() for cid, c in conversations})
            pipe.expire(key, LIST_TTL_SECONDS)
        pipe.execute()


class PostgreSQLBackend:
    """Phase 1's PostgreSQL storage, on a thread-safe psycopg2 connection pool."""

    def __init__(self, connection_string: str, minconn: int = 1, maxconn: int = 10):
        self.pool = psycopg2.pool.ThreadedConnectionPool(minconn, maxconn, connection_string)
        with self._connection() as conn, conn.cursor() as cur:
            cur.execute(SCHEMA)

    @contextmanager
    def _connection(self, transaction: bool = True) -> Iterator["psycopg2.extensions.connection"]:
        """A pooled connection. With `transaction`, one transaction, committed on success and rolled
        back on error; without, autocommit, so a read costs no BEGIN and COMMIT round trips."""
        conn = self.pool.getconn()
        try:
            conn.autocommit = not transaction  # local to psycopg2: sends nothing to the server
            if transaction:
                with conn:
                    yield conn
            else:
                yield conn
        finally:
            self.pool.putconn(conn)

    def save_conversation(self, conversation_id: str, user_id: str, conversation: Dict) -> None:
        """The whole conversation in one transaction: upsert the row, replace the messages."""
        now = _now()
        with self._connection() as conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO conversations (conversation_id, user_client_id, title, model, created_at, last_modified)"
                " VALUES (%s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (conversation_id) DO UPDATE SET title = EXCLUDED.title, model = EXCLUDED.model,"
                " last_modified = EXCLUDED.last_modified"
                " WHERE conversations.user_client_id = EXCLUDED.user_client_id",
                (
                    conversation_id,
                    user_id,
                    conversation["title"],
                    conversation["model"],
                    conversation.get("created_at") or now,
                    conversation.get("last_modified") or now,
                ),
            )
            cur.execute("DELETE FROM messages WHERE conversation_id = %s", (conversation_id,))
            for seq, message in enumerate(conversation["messages"]):
                cur.execute(
                    "INSERT INTO messages (conversation_id, sequence_number, role, content, timestamp)"
                    " VALUES (%s, %s, %s, %s, %s)",
                    (conversation_id, seq, message["role"], message["content"], message.get("time") or now),
                )

    def get_conversation(self, conversation_id: str, user_id: str) -> Optional[Dict]:
        """The conversation with its messages in sequence order, or None."""
        with self._connection(transaction=False) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT title, model, created_at, last_modified FROM conversations"
                " WHERE conversation_id = %s AND user_client_id = %s",
                (conversation_id, user_id),
            )
            row = cur.fetchone()
            if row is None:
                return None
            cur.execute(
                "SELECT role, content, timestamp FROM messages WHERE conversation_id = %s ORDER BY sequence_number",
                (conversation_id,),
            )
            messages = [{"role": r, "content": c, "time": _iso(t)} for r, c, t in cur.fetchall()]
        title, model, created_at, last_modified = row
        return {
            "title": title,
            "model": model,
            "messages": messages,
            "created_at": _iso(created_at),
            "last_modified": _iso(last_modified),
        }

    def list_conversations(self, user_id: str, days: int = 7) -> List[Tuple[str, Dict]]:
        """The user's conversations created in the last `days` days, newest first, metadata only."""
        with self._connection(transaction=False) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT conversation_id, title, model, created_at, last_modified FROM conversations"
                " WHERE user_client_id = %s AND created_at >= NOW() - make_interval(days => %s)"
                " ORDER BY last_modified DESC",
                (user_id, days),
            )
            rows = cur.fetchall()
        return [
            (cid, {"title": t, "model": m, "messages": [], "created_at": _iso(c), "last_modified": _iso(lm)})
            for cid, t, m, c, lm in rows
        ]

    def delete_conversation(self, conversation_id: str, user_id: str) -> None:
        with self._connection() as conn, conn.cursor() as cur:
            cur.execute(
                "DELETE FROM conversations WHERE conversation_id = %s AND user_client_id = %s",
                (conversation_id, user_id),
            )

    def close(self) -> None:
        self.pool.closeall()


class ChatHistoryManager:
    """The plan's manager: Redis cache-aside reads, saves to Redis, write-back on flush.

    `redis_enabled=False` is Phase 1's postgres mode (every call goes to PostgreSQL).
    """

    def __init__(
        self,
        mode: str = "postgres",
        connection_string: Optional[str] = None,
        history_days: int = 7,
        redis_enabled: bool = False,
        redis_connection_string: Optional[str] = None,
    ):
        if mode != "postgres":
            raise ValueError("the reference implements mode='postgres' only")
        self.mode = mode
        self.history_days = history_days
        self.redis_enabled = redis_enabled
        if redis_enabled:
            self.redis_backend = RedisBackend(redis_connection_string or os.environ["REDIS_CONNECTION_STRING"])
        else:
            self.redis_backend = None
        self.postgres_backend = PostgreSQLBackend(connection_string or os.environ["DATABASE_URL"])

    def get_conversation(self, conversation_id: str, user_id: str) -> Optional[Dict]:
        """Get conversation with Redis cache-aside pattern."""
        if self.redis_enabled:
            cached = self.redis_backend.get_conversation(user_id, conversation_id)
            if cached:
                return cached
        convo = self.postgres_backend.get_conversation(conversation_id, user_id)
        if convo and self.redis_enabled:
            self.redis_backend.set_conversation(user_id, conversation_id, convo, dirty=False)
        return convo

    def save_conversation(self, conversation_id: str, conversation: Dict, user_id: str) -> None:
        """Save conversation to Redis (immediate) and mark for write-back."""
        if self.redis_enabled:
            self.redis_backend.set_conversation(user_id, conversation_id, conversation, dirty=True)
        else:
            self.postgres_backend.save_conversation(conversation_id, user_id, conversation)

    def list_conversations(self, user_id: str) -> List[Tuple[str, Dict]]:
        """The cached list when Redis has it; otherwise PostgreSQL's, which then primes the cache."""
        if self.redis_enabled:
            cached = self.redis_backend.list_conversations(user_id)
            if cached is not None:
                horizon = datetime.now(timezone.utc) - timedelta(days=self.history_days)
                return [(cid, c) for cid, c in cached if datetime.fromisoformat(c["created_at"]) >= horizon]
        convs = self.postgres_backend.list_conversations(user_id, self.history_days)
        if self.redis_enabled:
            self.redis_backend.set_conversation_list(user_id, convs)
        return convs

    def flush_dirty_conversations(self) -> int:
        """Write all dirty conversations from Redis to PostgreSQL."""
        if not self.redis_enabled:
            return 0
        dirty_list = self.redis_backend.get_dirty_conversations()
        count = 0
        for user_id, conversation_id in dirty_list:
            convo = self.redis_backend.get_conversation(user_id, conversation_id)
            if convo:
                try:
                    self.postgres_backend.save_conversation(conversation_id, user_id, convo)
                    self.redis_backend.clear_dirty_flag(user_id, conversation_id)
                    count += 1
                except Exception as e:  # noqa: BLE001 - the plan's catch-all
                    print(f"Failed to write back {conversation_id}: {e}")
        return count

    def close(self) -> None:
        self.postgres_backend.close()
        if self.redis_backend is not None:
            self.redis_backend.client.close()
