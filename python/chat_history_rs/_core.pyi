"""Type stubs for the compiled module ``chat_history_rs._core``."""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any, Callable, Dict, List, Literal, Mapping, Optional, Tuple, Type, TypedDict, Union, final

__version__: str

class Message(TypedDict):
    role: Literal["user", "assistant"]
    content: str
    time: str

class Conversation(TypedDict):
    title: str
    model: str
    messages: List[Message]
    created_at: str
    last_modified: str

class Conflict(TypedDict):
    conflict_id: int
    conversation_id: str
    user_id: str
    conversation: Conversation
    version: Optional[int]
    reason: str
    kept_at: str
    restored_at: Optional[str]

class RedisNode(TypedDict):
    """One primary of a Redis Cluster in ``stats()["redis_nodes"]``; the memory fields are None when
    the node did not answer."""

    address: str
    slots: int
    replicas: int
    used_memory: Optional[int]
    maxmemory: Optional[int]
    maxmemory_policy: Optional[str]

class _CallStats(TypedDict):
    # The keys every manager's stats() holds; Stats adds those of the Redis tier.
    mode: Literal["local", "postgres"]
    reads: int
    lists: int
    saves: int
    deletes: int
    errors: int
    closed: bool
    redis_enabled: bool

class Stats(_CallStats, total=False):
    """What ``stats()`` returns (docs/monitoring.md, "What `stats()` returns"). The call counters are
    always there; the rest only when ``redis_enabled`` is True (the Redis tier is in use)."""

    cache_hits: int
    cache_misses: int
    hit_rate: Optional[float]
    dirty_count: Optional[int]
    oldest_dirty_age_seconds: Optional[float]
    flushes: int
    conversations_flushed: int
    flush_failures: int
    stuck_conversations: List[str]
    conflicts_kept: int
    postgres_fallbacks: int
    redis_available: bool
    redis_error: Optional[str]
    redis_read_round_trips: int
    redis_reads_shared: int
    redis_used_memory: Optional[int]
    redis_maxmemory: Optional[int]
    redis_maxmemory_policy: Optional[str]
    redis_url: str
    redis_layout: Optional[Literal["single", "cluster"]]
    near_cache_enabled: bool
    near_cache_tracking: bool
    near_cache_hits: int
    near_cache_misses: int
    near_cache_invalidations: int
    near_cache_evictions: int
    near_cache_resets: int
    near_cache_entries: int
    near_cache_bytes: int
    near_cache_limit_bytes: int
    feed_following: bool
    feed_changes_applied: int
    feed_copies_dropped: int
    feed_divergences: int
    feed_resyncs: int
    feed_lag_seconds: Optional[float]
    redis_nodes: List[RedisNode]

CredentialProvider = Callable[[], Union[Tuple[str, str], Tuple[str, str, Optional[float]]]]
"""``redis_credential_provider`` / ``postgres_credential_provider``: called with no arguments whenever
a connection opens or must authenticate again (from any thread; the GIL is taken only for the call);
returns ``(username, password)`` or ``(username, password, expires_at)``, ``expires_at`` in Unix
seconds. Credentials are renewed ``credential_refresh_margin`` seconds before ``expires_at`` (halfway
through their life when that is shorter): Redis connections send ``AUTH`` again, PostgreSQL
connections are replaced. A provider that raises makes the connection attempt fail: the call raises
``UnavailableError`` naming the provider (in Redis mode, reads and saves fall back to PostgreSQL as when
Redis is down). ``chat_history_rs.azure`` builds them for Microsoft Entra ID."""

Mode = Literal["local", "postgres", "redis", "local_psql", "local_redis"]
"""``mode`` / ``CHAT_HISTORY_MODE``: ``"redis"`` is postgres with ``redis_enabled=True``; the example
app's ``"local_psql"`` and ``"local_redis"`` are postgres and redis."""

SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
"""libpq's sslmodes, as ``ResolvedSettings.postgres_sslmode`` names them."""

ConversationInput = Dict[str, Any]
"""A conversation to save: the keys of ``Conversation``; timestamps may also be ``datetime``
objects (naive means UTC) or missing (now)."""

@final
class ChatHistoryManager:
    """Stores chat conversations as local JSON files (``mode="local"``), in PostgreSQL
    (``mode="postgres"``), or in Redis over PostgreSQL with write-back (``redis_enabled=True``).

    Every setting is the keyword argument when given (``None`` counts as not given), else its
    environment variable, else the default: ``mode`` over ``CHAT_HISTORY_MODE`` over ``"local"``,
    ``connection_string`` over ``DATABASE_URL``, ``redis_enabled`` over ``REDIS_ENABLED``,
    ``redis_connection_string`` over ``REDIS_CONNECTION_STRING``; the README's configuration table
    lists them all with their defaults. One manager may be shared between threads; every network or
    disk call releases the GIL.

    Raises ``InvalidTypeError`` (a ``TypeError``) for an argument of the wrong type and
    ``ConfigurationError`` (a ``ValueError``) for a bad value (a negative size, a timeout of 0, NaN,
    an unknown mode), each naming the argument; ``ConfigurationError`` too when Redis's settings do
    not fit the server (a refused login, TLS on one side only or a certificate that does not verify,
    a database number on a cluster, a server that is not Redis), naming the cause and never the
    secret. A Redis that is down is not an error: the manager starts on PostgreSQL and uses Redis
    once it answers. ``UnavailableError`` (a ``ConnectionError``) when PostgreSQL cannot be reached
    in postgres mode.
    """

    def __new__(
        cls,
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
    ) -> ChatHistoryManager: ...
    @property
    def mode(self) -> str:
        """``"local"`` or ``"postgres"`` (Redis is a tier of postgres mode)."""
    @property
    def redis_enabled(self) -> bool:
        """Whether the Redis tier is in use."""
    @property
    def postgres_backend(self) -> Optional[PostgresBackend]:
        """PostgreSQL with the seed's method names; None in local mode."""
    @property
    def redis_backend(self) -> Optional[RedisBackend]:
        """The Redis cache with the seed's method names; None without Redis."""
    def list_conversations(self, user_id: Optional[str] = None) -> List[Tuple[str, Conversation]]:
        """Local mode: every readable conversation, sorted by file name, with messages.
        Otherwise: the user's conversations created within ``history_days``, newest
        ``last_modified`` first, with ``"messages": []``. ``user_id`` is required outside local mode."""
    def get_conversation(self, conversation_id: str, user_id: Optional[str] = None) -> Optional[Conversation]:
        """The conversation with its messages, or None when there is none of that id for that user."""
    def save_conversation(
        self, conversation_id: str, conversation: ConversationInput, user_id: Optional[str] = None
    ) -> None:
        """Stores the whole conversation. Raises ``ValidationError``/``InvalidTypeError`` for input
        PostgreSQL would refuse and ``OwnershipError`` for another user's id; nothing is stored then."""
    def delete_conversation(self, conversation_id: str, user_id: Optional[str] = None) -> None:
        """Deletes the conversation when it is the user's; another user's id is left untouched."""
    def flush_dirty_conversations(self) -> int:
        """Writes conversations still dirty in Redis back to PostgreSQL; returns how many."""
    def close(self) -> None:
        """Flushes what is dirty (for at most ``close_timeout`` seconds), then releases the pools.
        Idempotent."""
    def stats(self) -> Stats:
        """Counters and gauges of this manager (docs/monitoring.md). Never holds a password.

        ``redis_error`` says why Redis is not in use while it is not (the last failure: a refused
        connection, a login the server refused after a password rotation...), else None.
        ``redis_layout`` is ``"single"`` (one node, the seed design's key names) or ``"cluster"``.
        On a Redis Cluster the memory numbers are summed over the primaries and ``redis_nodes`` lists
        each one (``address``, ``slots``, ``replicas``, ``used_memory``, ``maxmemory``,
        ``maxmemory_policy``); on one node it is empty."""
    def list_conflicts(
        self, user_id: Optional[str] = None, *, conflict_id: Optional[int] = None, limit: int = 100
    ) -> List[Conflict]:
        """Copies kept aside in ``conversation_conflicts`` after Redis and PostgreSQL diverged,
        newest first (docs/design.md, "Divergence")."""
    def restore_conflict(self, conflict_id: int) -> Tuple[str, str]:
        """Makes a kept copy the conversation again (the copy it replaces is kept aside in turn
        unless the restored one holds all its messages); returns ``(conversation_id, user_id)``."""
    def __enter__(self) -> ChatHistoryManager: ...
    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> bool: ...

@final
class PostgresBackend:
    """PostgreSQL with the seed's ``PostgreSQLBackend`` method names and argument orders."""

    def get_conversation(self, conversation_id: str, user_id: str) -> Optional[Conversation]: ...
    def save_conversation(self, conversation_id: str, user_id: str, conversation: ConversationInput) -> None: ...
    def list_conversations(self, user_id: str, days: Optional[int] = None) -> List[Tuple[str, Conversation]]: ...
    def delete_conversation(self, conversation_id: str, user_id: str) -> None: ...

@final
class RedisBackend:
    """Redis with the seed's ``RedisBackend`` method names and argument orders."""

    def get_conversation(self, user_id: str, conversation_id: str) -> Optional[Conversation]: ...
    def set_conversation(
        self, user_id: str, conversation_id: str, conversation: ConversationInput, dirty: bool = True
    ) -> None:
        """``dirty=True`` saves as ``ChatHistoryManager.save_conversation`` does; ``dirty=False``
        caches a clean copy with the TTL."""
    def get_dirty_conversations(self) -> List[Tuple[str, str]]:
        """``(user_id, conversation_id)`` of every conversation awaiting write-back."""
    def clear_dirty_flag(self, user_id: str, conversation_id: str) -> None:
        """Marks the conversation clean, but only when PostgreSQL holds exactly what Redis holds and
        nothing changed it since it was read."""

class ChatHistoryError(Exception):
    """Base class of every error chat_history_rs raises."""

class ConfigurationError(ChatHistoryError, ValueError):
    """Bad settings: unknown mode, missing or malformed connection string, unreadable CA file."""

class ValidationError(ChatHistoryError, ValueError):
    """A value that PostgreSQL would refuse; nothing was stored."""

class InvalidTypeError(ChatHistoryError, TypeError):
    """A value of the wrong type; nothing was stored."""

class OwnershipError(ChatHistoryError, PermissionError):
    """The conversation id belongs to another user; nothing was changed."""

class UnavailableError(ChatHistoryError, ConnectionError):
    """PostgreSQL or Redis could not be reached; the message names which."""

class DatabaseError(ChatHistoryError):
    """The database was reached and refused the operation."""

class LocalStorageError(ChatHistoryError, OSError):
    """A local-mode file could not be read or written."""

class ClosedError(ChatHistoryError, RuntimeError):
    """The ChatHistoryManager was used after close()."""

class SettingEntry(TypedDict):
    name: str
    value: Union[str, int, float, bool, None]
    """Redacted: connection strings without passwords, ``"<redacted>"`` for a password that is set."""
    source: str
    """``"keyword"``, ``"env NAME"`` or ``"default"``."""

@final
class ResolvedSettings:
    """A manager's settings resolved as ``ChatHistoryManager`` resolves them: keyword argument, else
    environment variable, else default. Holds passwords; ``repr()`` and ``entries()`` never show them."""

    @property
    def mode(self) -> Literal["local", "postgres", "redis"]:
        """The mode a manager would open in: ``mode`` (else ``CHAT_HISTORY_MODE``, else local) with
        ``redis_enabled`` applied when it is set (true adds Redis to postgres, false removes it from
        redis). ``value("mode")`` is the name as given (``"local_redis"``, say)."""
    @property
    def postgres_url(self) -> Optional[str]:
        """The PostgreSQL connection string without its password; None when unset or not valid."""
    @property
    def redis_url(self) -> Optional[str]:
        """The Redis URL without its password; None when Redis is not configured or not valid."""
    @property
    def redis_configured(self) -> bool:
        """Whether a Redis location (URL or host) is set, whatever ``redis_enabled`` says."""
    @property
    def postgres_sslmode(self) -> Optional[SslMode]:
        """The sslmode PostgreSQL is reached with (``"prefer"`` when the string names none); None when
        no valid connection string is set."""
    @property
    def postgres_host_names(self) -> List[str]:
        """PostgreSQL's host names (or socket folders), without ports; empty when none is set."""
    @property
    def redis_tls(self) -> Optional[bool]:
        """Whether Redis is reached over TLS; None when Redis is not configured or not valid."""
    @property
    def redis_certificate_verified(self) -> Optional[bool]:
        """Whether Redis's certificate and host name are checked (TLS without ``#insecure`` or
        ``?ssl_cert_reqs=none``); None when Redis is not configured."""
    @property
    def redis_host_name(self) -> Optional[str]:
        """The Redis host name (or address), without its port; None when Redis is not configured."""
    def entries(self) -> List[SettingEntry]:
        """Every setting in the README table's order, redacted, with where it came from."""
    def source(self, name: str) -> str:
        """Where the setting ``name`` came from: ``"keyword"``, ``"env NAME"`` or ``"default"``."""
    def value(self, name: str) -> Any:
        """The setting ``name`` as the keyword argument takes it; secrets whole: never print them."""
    def check(self) -> None:
        """Raises ConfigurationError for what a manager would refuse before connecting."""

def resolve_settings(
    environ: Optional[Mapping[str, str]] = None,
    *,
    mode: Optional[Mode] = None,
    base_dir: Optional[Union[str, os.PathLike[str]]] = None,
    connection_string: Optional[str] = None,
    history_days: Optional[int] = None,
    redis_enabled: Optional[bool] = None,
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
) -> ResolvedSettings:
    """The settings ``ChatHistoryManager(**kwargs)`` would open with, read from ``environ`` (default:
    the process's environment). Raises ConfigurationError naming a bad argument or variable."""

_KEYWORDS: Tuple[Tuple[str, str, Union[str, int, float, bool, None], Tuple[str, ...], str], ...]
"""The keyword table (src/config/resolve/keywords.rs): (name, annotation, default, variables, doc) per
keyword argument, in the signature's order; tests hold the signatures, stubs and README to it."""
_POSITIONAL_KEYWORDS: int
"""How many of ``_KEYWORDS`` may be given by position."""
_MANAGER_KEYWORDS: Tuple[str, ...]
"""The names of ``_KEYWORDS``."""
_ENVIRONMENT_VARIABLES: Tuple[str, ...]
"""Every environment variable the library reads."""

@final
class _AsyncCore:
    """The Rust half of ``AsyncChatHistoryManager`` (python/chat_history_rs/_asyncio.py, typed by
    _asyncio.pyi): each method converts its arguments and returns a pending call to await."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _AsyncCore: ...
    @property
    def mode(self) -> str: ...
    @property
    def _sync(self) -> ChatHistoryManager: ...
    @property
    def redis_enabled(self) -> bool: ...
    @property
    def postgres_backend(self) -> Optional[PostgresBackend]: ...
    @property
    def redis_backend(self) -> Optional[RedisBackend]: ...
    def list_conversations(self, user_id: Optional[str] = None) -> Any: ...
    def get_conversation(self, conversation_id: str, user_id: Optional[str] = None) -> Any: ...
    def save_conversation(
        self, conversation_id: str, conversation: ConversationInput, user_id: Optional[str] = None
    ) -> Any: ...
    def delete_conversation(self, conversation_id: str, user_id: Optional[str] = None) -> Any: ...
    def flush_dirty_conversations(self) -> Any: ...
    def close(self) -> Any: ...
    def stats(self) -> Stats: ...

def _set_asyncio_fast_path(enabled: bool) -> None:
    """Turns the asyncio fast path for selector event loops on or off (the tests exercise both)."""

def _close_all() -> None:
    """Closes every live manager, flushing what is dirty (the package's atexit hook)."""

def _before_fork() -> None:
    """Registered with ``os.register_at_fork``: calls in flight end before the fork, new ones wait."""

def _after_fork_in_parent() -> None:
    """Registered with ``os.register_at_fork``: the calls that waited for the fork go on."""

def _after_fork_in_child() -> None:
    """Registered with ``os.register_at_fork``: managers open their own connections in the child."""

def _failpoints_enabled() -> bool:
    """Whether this build has the test-only failpoints (``make dev-test``)."""
