"""AsyncChatHistoryManager: ChatHistoryManager's API as coroutines (docs/asyncio.md).

Python so that each method is a true `async def` (`inspect.iscoroutinefunction` holds, as frameworks that dispatch
on it expect); the work is in Rust (src/bindings/asyncio/): `_AsyncCore` converts the arguments and returns a
pending call, whose `start()` queues the core call on a bounded pool of threads and returns the asyncio future of
its result. The types are in `_asyncio.pyi`.
"""

import asyncio
import inspect
from asyncio import CancelledError

from chat_history_rs._core import ChatHistoryManager, _AsyncCore


async def _completed(call):
    """The result of a pending core call. A cancelled caller flags its call, so a call still queued never starts;
    one that started runs to its end (each core call is whole or nothing)."""
    try:
        return await call.start()
    except CancelledError:
        call.cancel()
        raise


class AsyncChatHistoryManager:
    """The asyncio twin of ChatHistoryManager: the same constructor arguments and environment
    variables, the same methods, each a coroutine, the same results and exceptions. `async with`
    flushes and closes; `stats()` stays synchronous. See docs/asyncio.md."""

    __slots__ = ("_core",)
    # Where users import it from (and its repr says it is).
    __module__ = "chat_history_rs"

    def __init__(self, *args, **kwargs):
        self._core = _AsyncCore(*args, **kwargs)

    @property
    def mode(self):
        """`"local"` or `"postgres"` (Redis is a tier of postgres mode)."""
        return self._core.mode

    @property
    def redis_enabled(self):
        """Whether the Redis tier is in use."""
        return self._core.redis_enabled

    @property
    def postgres_backend(self):
        """PostgreSQL with the seed's (synchronous, blocking) method names; None in local mode."""
        return self._core.postgres_backend

    @property
    def redis_backend(self):
        """The Redis cache with the seed's (synchronous, blocking) method names; None without Redis."""
        return self._core.redis_backend

    async def list_conversations(self, user_id=None):
        """As ChatHistoryManager.list_conversations."""
        return await _completed(self._core.list_conversations(user_id))

    async def get_conversation(self, conversation_id, user_id=None):
        """As ChatHistoryManager.get_conversation."""
        return await _completed(self._core.get_conversation(conversation_id, user_id))

    async def save_conversation(self, conversation_id, conversation, user_id=None):
        """As ChatHistoryManager.save_conversation."""
        return await _completed(self._core.save_conversation(conversation_id, conversation, user_id))

    async def delete_conversation(self, conversation_id, user_id=None):
        """As ChatHistoryManager.delete_conversation."""
        return await _completed(self._core.delete_conversation(conversation_id, user_id))

    async def flush_dirty_conversations(self):
        """Writes conversations still dirty in Redis back to PostgreSQL; returns how many."""
        return await _completed(self._core.flush_dirty_conversations())

    async def close(self):
        """Flushes what is dirty, then releases the pools. Idempotent."""
        return await _completed(self._core.close())

    async def list_conflicts(self, user_id=None, *, conflict_id=None, limit=100):
        """As ChatHistoryManager.list_conflicts (an operator's call: it runs on the loop's default executor)."""
        return await asyncio.to_thread(self._core._sync.list_conflicts, user_id, conflict_id=conflict_id, limit=limit)

    async def restore_conflict(self, conflict_id):
        """As ChatHistoryManager.restore_conflict (an operator's call: it runs on the loop's default executor)."""
        return await asyncio.to_thread(self._core._sync.restore_conflict, conflict_id)

    def stats(self):
        """Counters and gauges (docs/monitoring.md, "What `stats()` returns"), synchronously. Never holds a password."""
        return self._core.stats()

    async def __aenter__(self):
        return self

    async def __aexit__(self, exc_type, exc, tb):
        await self.close()

    def __repr__(self):
        return repr(self._core)


# ChatHistoryManager's signature, for introspection (the constructor takes exactly its arguments).
try:
    AsyncChatHistoryManager.__signature__ = inspect.signature(ChatHistoryManager)
except (TypeError, ValueError):  # no text signature on this build: (*args, **kwargs) it is
    pass
