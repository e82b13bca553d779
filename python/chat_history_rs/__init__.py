"""chat_history_rs: LLM chat conversations in local JSON files, PostgreSQL, or Redis over PostgreSQL.

A drop-in replacement for the Phase 1 ``ChatHistoryManager``::

    from chat_history_rs import ChatHistoryManager

and its asyncio twin, every method a coroutine::

    from chat_history_rs import AsyncChatHistoryManager

``resolve_settings()`` shows the settings a manager would open with and where each came from.
"""

from __future__ import annotations

import atexit
import os

from chat_history_rs._asyncio import AsyncChatHistoryManager
from chat_history_rs._core import (
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
    ResolvedSettings,
    UnavailableError,
    ValidationError,
    __version__,
    _after_fork_in_child,
    _after_fork_in_parent,
    _before_fork,
    _close_all,
    resolve_settings,
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
    "ResolvedSettings",
    "UnavailableError",
    "ValidationError",
    "__version__",
    "resolve_settings",
]

# Every manager still open at interpreter exit is closed, which flushes what is dirty
# (docs/design.md, "When data is written back"). Failures are logged by the hook, never raised.
atexit.register(_close_all)

# A process forked after a manager opened its pools (gunicorn --preload, multiprocessing's fork,
# Celery prefork) must not share the parent's sockets: managers in the child open their own before
# their next call, and leave the parent's untouched (docs/design.md, "Processes").
if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
