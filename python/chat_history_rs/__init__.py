"""chat_history_rs: LLM chat conversations in local JSON files, PostgreSQL, or Redis over PostgreSQL.

A drop-in replacement for the Phase 1 ``ChatHistoryManager``::

    from chat_history_rs import ChatHistoryManager

and its asyncio twin, every method a coroutine::

    from chat_history_rs import AsyncChatHistoryManager
"""

from __future__ import annotations

import atexit

from chat_history_rs._core import (
    AsyncChatHistoryManager,
    ChatHistoryError,
    ChatHistoryManager,
    ClosedError,
    ConfigurationError,
    DatabaseError,
    InvalidTypeError,
    LocalStorageError,
    OwnershipError,
    PostgresBackend,
    RedisBackend,
    UnavailableError,
    ValidationError,
    __version__,
    _close_all,
)

__all__ = [
    "AsyncChatHistoryManager",
    "ChatHistoryError",
    "ChatHistoryManager",
    "ClosedError",
    "ConfigurationError",
    "DatabaseError",
    "InvalidTypeError",
    "LocalStorageError",
    "OwnershipError",
    "PostgresBackend",
    "RedisBackend",
    "UnavailableError",
    "ValidationError",
    "__version__",
]

# Every manager still open at interpreter exit is closed, which flushes what is dirty
# (SPEC section 4.5). Failures are logged by the hook, never raised.
atexit.register(_close_all)
