"""Type stubs for ``chat_history_rs._asyncio``: ``AsyncChatHistoryManager``, a Python class over the compiled module."""

from __future__ import annotations

import inspect
import os
from types import TracebackType
from typing import ClassVar, List, Optional, Tuple, Type, Union

from chat_history_rs._core import (
    Conflict,
    Conversation,
    ConversationInput,
    CredentialProvider,
    Mode,
    PostgresBackend,
    RedisBackend,
    Stats,
)

class AsyncChatHistoryManager:
    """The asyncio twin of ``ChatHistoryManager``: the same constructor arguments and environment
    variables, the same methods, each a coroutine (``await m.get_conversation(cid, user_id=u)``),
    the same return values and exceptions.

    Calls run the synchronous core on a bounded pool of threads shared by every manager in the
    process, so a thousand calls in flight neither block the event loop nor take a thread each.
    A manager is not tied to an event loop: successive ``asyncio.run()`` calls and loops in other
    threads may share it. A cancelled call leaves every conversation whole: the call either never
    started or ran to its end. The constructor connects (and creates the schema when missing)
    before it returns, as ``ChatHistoryManager`` does. ``async with`` flushes and closes.
    """

    __signature__: ClassVar[inspect.Signature]
    """``ChatHistoryManager``'s, so ``inspect.signature()`` shows the arguments ``*args, **kwargs`` pass on."""

    def __init__(
        self,
        mode: Optional[Mode] = None,
        base_dir: Optional[Union[str, os.PathLike[str]]] = None,
        connection_string: Optional[str] = None,
        history_days: Optional[int] = None,
        redis_enabled: Optional[bool] = None,
        *,
        postgres_pool_size: Optional[int] = None,
        postgres_connect_timeout: Optional[float] = None,
        postgres_ca_file: Optional[Union[str, os.PathLike[str]]] = None,
        postgres_statement_timeout: Optional[float] = None,
        postgres_lock_timeout: Optional[float] = None,
        redis_connection_string: Optional[str] = None,
        redis_host: Optional[str] = None,
        redis_port: Optional[int] = None,
        redis_password: Optional[str] = None,
        redis_ssl: Optional[bool] = None,
        redis_ttl: Optional[int] = None,
        redis_pool_size: Optional[int] = None,
        redis_timeout: Optional[float] = None,
        redis_ca_file: Optional[Union[str, os.PathLike[str]]] = None,
        redis_cluster: Optional[bool] = None,
        near_cache_bytes: Optional[int] = None,
        redis_compression: Optional[Union[bool, str]] = None,
        credential_refresh_margin: Optional[float] = None,
        flush_interval: Optional[float] = None,
        background_flush: Optional[bool] = None,
        flush_batch_size: Optional[int] = None,
        close_timeout: Optional[float] = None,
        redis_credential_provider: Optional[CredentialProvider] = None,
        postgres_credential_provider: Optional[CredentialProvider] = None,
    ) -> None: ...
    @property
    def mode(self) -> str:
        """``"local"`` or ``"postgres"`` (Redis is a tier of postgres mode)."""
    @property
    def redis_enabled(self) -> bool:
        """Whether the Redis tier is in use."""
    @property
    def postgres_backend(self) -> Optional[PostgresBackend]:
        """PostgreSQL with the seed's (synchronous, blocking) method names; None in local mode."""
    @property
    def redis_backend(self) -> Optional[RedisBackend]:
        """The Redis cache with the seed's (synchronous, blocking) method names; None without Redis."""
    async def list_conversations(self, user_id: Optional[str] = None) -> List[Tuple[str, Conversation]]:
        """As ``ChatHistoryManager.list_conversations``."""
    async def get_conversation(self, conversation_id: str, user_id: Optional[str] = None) -> Optional[Conversation]:
        """As ``ChatHistoryManager.get_conversation``."""
    async def save_conversation(
        self, conversation_id: str, conversation: ConversationInput, user_id: Optional[str] = None
    ) -> None:
        """As ``ChatHistoryManager.save_conversation``."""
    async def delete_conversation(self, conversation_id: str, user_id: Optional[str] = None) -> None:
        """As ``ChatHistoryManager.delete_conversation``."""
    async def flush_dirty_conversations(self) -> int:
        """Writes conversations still dirty in Redis back to PostgreSQL; returns how many."""
    async def close(self) -> None:
        """Flushes what is dirty, then releases the pools. Idempotent."""
    async def list_conflicts(
        self, user_id: Optional[str] = None, *, conflict_id: Optional[int] = None, limit: int = 100
    ) -> List[Conflict]:
        """As ``ChatHistoryManager.list_conflicts``."""
    async def restore_conflict(self, conflict_id: int) -> Tuple[str, str]:
        """As ``ChatHistoryManager.restore_conflict``."""
    def stats(self) -> Stats:
        """Counters and gauges (docs/monitoring.md, "What `stats()` returns"), synchronously. Never holds a password."""
    async def __aenter__(self) -> AsyncChatHistoryManager: ...
    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None: ...
