"""The example chat app's settings, read from its environment variables, and who the user is.

CHAT_HISTORY_MODE picks where conversations live and where the user's identity comes from:

    local        JSON files in ./.chat_history          a single local user
    local_psql   PostgreSQL                             LOCAL_TEST_CLIENT_ID / LOCAL_TEST_USERNAME
    local_redis  Redis over PostgreSQL, write-back      LOCAL_TEST_CLIENT_ID / LOCAL_TEST_USERNAME
    postgres     PostgreSQL                             App Service's X-MS-CLIENT-PRINCIPAL-* headers
    redis        Redis over PostgreSQL, write-back      App Service's X-MS-CLIENT-PRINCIPAL-* headers

README.md beside this file has the full table of variables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from chat_history_rs import ConfigurationError, resolve_settings
from chat_history_rs.azure import providers_from_env

# What CHAT_HISTORY_MODE takes (the library resolves it: chat_history_rs.resolve_settings).
MODES = ("local", "local_psql", "postgres", "local_redis", "redis")
# The seed's example user id: what local_psql / local_redis use when LOCAL_TEST_CLIENT_ID is unset.
DEFAULT_TEST_CLIENT_ID = "00000000-0000-0000-0000-000000000001"
PRINCIPAL_ID_HEADER = "X-MS-CLIENT-PRINCIPAL-ID"
PRINCIPAL_NAME_HEADER = "X-MS-CLIENT-PRINCIPAL-NAME"
ENTRA_VARIABLES = ("REDIS_AUTH", "POSTGRES_AUTH", "POSTGRES_ENTRA_USER", "AZURE_CLIENT_ID")


class SettingsError(ValueError):
    """An environment variable of the app holds something it cannot use; the message names it."""


@dataclass(frozen=True)
class User:
    """Who is chatting. `id` is None in local mode, which is single-user by design."""

    id: Optional[str]
    name: str


@dataclass(frozen=True)
class AppSettings:
    """Everything the app needs to open its ChatHistoryManager (hashable: it keys Streamlit's cache)."""

    mode: str
    # Both may hold a password: kept out of repr(), so no log line or error message can show it.
    connection_string: Optional[str] = field(default=None, repr=False)
    redis_enabled: bool = False
    redis_connection_string: Optional[str] = field(default=None, repr=False)
    redis_ttl: Optional[int] = None
    history_days: int = 7
    flush_interval: float = 10.0
    # REDIS_AUTH, POSTGRES_AUTH, POSTGRES_ENTRA_USER, AZURE_CLIENT_ID as set: Microsoft Entra ID
    # tokens instead of passwords (chat_history_rs.azure.providers_from_env).
    entra_env: tuple[tuple[str, str], ...] = ()

    @property
    def description(self) -> str:
        """`mode: where conversations live`, for the sidebar."""
        store = "PostgreSQL"
        if self.mode == "local":
            store = "JSON files in ./.chat_history"
        elif self.redis_enabled:
            store = "Redis over PostgreSQL, write-back"
        return f"{self.mode}: {store}"

    @property
    def users_from_headers(self) -> bool:
        """Production modes: App Service's authentication (Easy Auth) names the user in request headers."""
        return self.mode in ("postgres", "redis")

    def manager_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ChatHistoryManager. Every switch is passed explicitly, so the app's
        variables decide, not whatever else the library would read from the environment."""
        if self.mode == "local":
            return {"mode": "local", "history_days": self.history_days}
        kwargs: dict[str, Any] = {
            "mode": "postgres",
            "connection_string": self.connection_string,
            "history_days": self.history_days,
            "redis_enabled": self.redis_enabled,
        }
        if self.redis_enabled:
            kwargs["flush_interval"] = self.flush_interval
            if self.redis_connection_string:
                kwargs["redis_connection_string"] = self.redis_connection_string
            if self.redis_ttl is not None:
                kwargs["redis_ttl"] = self.redis_ttl
        if self.entra_env:
            kwargs.update(providers_from_env(dict(self.entra_env)))
        return kwargs


def load_settings(environ: Mapping[str, str] = os.environ) -> AppSettings:
    """Reads the app's variables. Raises SettingsError naming the variable that is wrong or missing.

    The library's own variables (CHAT_HISTORY_MODE, DATABASE_URL or the POSTGRES_* parts, REDIS_ENABLED,
    REDIS_CONNECTION_STRING, REDIS_TTL_SECONDS / REDIS_CACHE_TTL...) are resolved by the library itself
    (chat_history_rs.resolve_settings), exactly as ChatHistoryManager() resolves them, so the app, the
    library and `chat-history` agree on the mode; only the app's own (CONVERSATION_HISTORY_DAYS,
    CHAT_HISTORY_FLUSH_INTERVAL) are read here."""
    try:
        resolved = resolve_settings(environ)
        # The name as set (local_psql and local_redis take the user from LOCAL_TEST_*), and the mode it
        # opens in: REDIS_ENABLED=false turns a redis mode back into plain PostgreSQL (the seed's
        # rollback switch), REDIS_ENABLED=true adds Redis to a postgres mode; unset, the mode decides.
        mode, effective = resolved.value("mode"), resolved.mode
    except ConfigurationError as exc:
        raise SettingsError(str(exc)) from None
    history_days = _int(environ, "CONVERSATION_HISTORY_DAYS", 7)
    if effective == "local":
        return AppSettings(mode=mode, history_days=history_days)
    connection_string = resolved.value("connection_string")
    if connection_string is None:
        raise SettingsError(
            f"CHAT_HISTORY_MODE={mode} needs PostgreSQL: set POSTGRES_HOST (with POSTGRES_ADMIN_LOGIN, "
            "POSTGRES_ADMIN_PASSWORD, POSTGRES_DATABASE...) or DATABASE_URL"
        )
    redis_enabled = effective == "redis"
    entra_env = tuple((name, environ[name]) for name in ENTRA_VARIABLES if environ.get(name, "").strip())
    try:
        providers_from_env(dict(entra_env))  # checks the values; azure-identity is needed only later
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    return AppSettings(
        mode=mode,
        connection_string=connection_string,
        redis_enabled=redis_enabled,
        redis_connection_string=resolved.value("redis_connection_string"),
        redis_ttl=resolved.value("redis_ttl") if resolved.source("redis_ttl") != "default" else None,
        history_days=history_days,
        flush_interval=_float(environ, "CHAT_HISTORY_FLUSH_INTERVAL", 10.0),
        entra_env=entra_env,
    )


def current_user(
    settings: AppSettings, headers: Mapping[str, str], environ: Mapping[str, str] = os.environ
) -> Optional[User]:
    """The user of this session, or None when a production mode got no identity headers (the app is
    not behind App Service authentication, which sets them and strips any a client sends)."""
    if settings.mode == "local":
        return User(id=None, name=environ.get("LOCAL_TEST_USERNAME") or "Local user")
    if not settings.users_from_headers:
        client_id = environ.get("LOCAL_TEST_CLIENT_ID") or DEFAULT_TEST_CLIENT_ID
        return User(id=client_id, name=environ.get("LOCAL_TEST_USERNAME") or "Local test user")
    lowered = {key.lower(): value for key, value in headers.items()}
    client_id = lowered.get(PRINCIPAL_ID_HEADER.lower(), "").strip()
    if not client_id:
        return None
    return User(id=client_id, name=lowered.get(PRINCIPAL_NAME_HEADER.lower(), "").strip() or client_id)


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a whole number; got {raw!r}") from None
    if value <= 0:
        raise SettingsError(f"{name} must be positive; got {raw!r}")
    return value


def _float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number of seconds; got {raw!r}") from None
    if not value > 0:
        raise SettingsError(f"{name} must be positive; got {raw!r}")
    return value
