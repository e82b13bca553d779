"""Microsoft Entra ID credentials for Azure Managed Redis (or Azure Cache for Redis) and Azure Database
for PostgreSQL: an azure-identity credential turned into a ``redis_credential_provider`` or a
``postgres_credential_provider`` (docs/credentials.md)::

    pip install "chat-history-rs[azure]"

    from chat_history_rs import ChatHistoryManager, azure

    manager = ChatHistoryManager(
        mode="postgres",
        connection_string="host=db.postgres.database.azure.com dbname=chat sslmode=verify-full",
        redis_enabled=True,
        redis_connection_string="rediss://cache.westeurope.redis.azure.net:10000",
        redis_credential_provider=azure.redis_credential_provider(),
        postgres_credential_provider=azure.postgres_credential_provider("chat-app-identity"),
    )

Importing this module needs nothing beyond chat_history_rs: azure-identity is imported when a provider
first asks for a token and no credential was given.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
from typing import Any, Callable, Mapping, Optional

__all__ = [
    "POSTGRES_SCOPE",
    "REDIS_SCOPE",
    "EntraCredentialProvider",
    "postgres_credential_provider",
    "providers_from_env",
    "redis_credential_provider",
]

REDIS_SCOPE = "https://redis.azure.com/.default"
POSTGRES_SCOPE = "https://ossrdbms-aad.database.windows.net/.default"

# A cached token is handed out again while it has longer than this to live. Longer than the manager's
# credential_refresh_margin (3 minutes by default), so a connection renewing its credentials gets a
# token that lives on, not the one about to expire; Entra ID tokens live an hour or more.
TOKEN_REUSE_MARGIN = 600.0

_INSTALL_HINT = 'chat_history_rs.azure needs azure-identity: pip install "chat-history-rs[azure]"'


class _SharedCredential:
    """An azure-identity credential, made on first use (DefaultAzureCredential unless one was given)
    and shared by the providers built from it."""

    def __init__(self, credential: Any = None, client_id: Optional[str] = None) -> None:
        self._credential = credential
        self._client_id = client_id
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            if self._credential is None:
                try:
                    from azure.identity import DefaultAzureCredential  # type: ignore[import-not-found,unused-ignore]
                except ImportError as exc:
                    raise ImportError(_INSTALL_HINT) from exc
                # A user-assigned managed identity is picked by its client id; workload identity and
                # service principals read AZURE_CLIENT_ID themselves.
                if self._client_id:
                    self._credential = DefaultAzureCredential(managed_identity_client_id=self._client_id)
                else:
                    self._credential = DefaultAzureCredential()
            return self._credential


class EntraCredentialProvider:
    """A credential provider for one service: called with no arguments, returns
    ``(username, access_token, expires_on)``. Thread-safe; reuses a token while it has more than
    TOKEN_REUSE_MARGIN seconds to live. Neither the token nor the username is shown by ``repr()``."""

    def __init__(self, scope: str, shared: _SharedCredential, username: Optional[str] = None) -> None:
        self.scope = scope
        self._shared = shared
        self._username = username
        self._lock = threading.Lock()
        self._cached: Optional[tuple[str, str, int]] = None

    def __call__(self) -> tuple[str, str, int]:
        with self._lock:
            cached = self._cached
            if cached is not None and cached[2] - time.time() > TOKEN_REUSE_MARGIN:
                return cached
            token = self._shared.get().get_token(self.scope)
            username = self._username or token_object_id(token.token)
            self._cached = (username, token.token, int(token.expires_on))
            return self._cached

    def __repr__(self) -> str:
        return f"EntraCredentialProvider(scope={self.scope!r})"


def redis_credential_provider(
    credential: Any = None, *, client_id: Optional[str] = None, username: Optional[str] = None
) -> EntraCredentialProvider:
    """A ``redis_credential_provider`` for Microsoft Entra ID (scope ``https://redis.azure.com/.default``).

    ``credential``: any azure-identity credential (an object with ``get_token(*scopes)``); by default
    DefaultAzureCredential, for the user-assigned managed identity ``client_id`` when given. The Redis
    user is the identity's object id, read from the token's ``oid`` claim unless ``username`` is given.
    """
    return EntraCredentialProvider(REDIS_SCOPE, _SharedCredential(credential, client_id), username)


def postgres_credential_provider(
    username: str, credential: Any = None, *, client_id: Optional[str] = None
) -> EntraCredentialProvider:
    """A ``postgres_credential_provider`` for Microsoft Entra ID (scope
    ``https://ossrdbms-aad.database.windows.net/.default``). ``username`` is the PostgreSQL role an
    Entra administrator created for the identity (``pgaadauth_create_principal``); ``credential`` and
    ``client_id`` as for redis_credential_provider."""
    if not username:
        raise ValueError("postgres_credential_provider needs the PostgreSQL role name the identity logs in as")
    return EntraCredentialProvider(POSTGRES_SCOPE, _SharedCredential(credential, client_id), username)


def token_object_id(token: str) -> str:
    """The ``oid`` claim of an Entra ID access token (a JWT): the identity's object id. The token's
    signature is not checked: Redis checks it; this only reads who the token is for."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        oid = claims["oid"]
    except (IndexError, ValueError, KeyError, TypeError):
        # Never the token itself in the message.
        raise ValueError("the Entra ID access token holds no 'oid' claim: pass username=... (the object id)") from None
    if not isinstance(oid, str) or not oid:
        raise ValueError("the Entra ID access token's 'oid' claim is not a string: pass username=...")
    return oid


def providers_from_env(
    environ: Mapping[str, str] = os.environ, credential: Any = None
) -> dict[str, Callable[[], tuple[str, str, int]]]:
    """ChatHistoryManager keywords for the services the environment puts on Entra ID:
    ``REDIS_AUTH=entra`` gives ``redis_credential_provider``, ``POSTGRES_AUTH=entra`` gives
    ``postgres_credential_provider`` for the role ``POSTGRES_ENTRA_USER``; ``AZURE_CLIENT_ID`` picks
    a user-assigned managed identity. Empty when neither variable says ``entra`` (``password``, the
    default, keeps the connection strings' passwords). Raises ValueError naming a bad variable;
    azure-identity is not imported here."""
    modes = {}
    for name in ("REDIS_AUTH", "POSTGRES_AUTH"):
        value = environ.get(name, "").strip().lower() or "password"
        if value not in ("password", "entra"):
            raise ValueError(f"{name} must be 'password' or 'entra'; got {environ[name]!r}")
        modes[name] = value
    shared = _SharedCredential(credential, environ.get("AZURE_CLIENT_ID", "").strip() or None)
    providers: dict[str, Callable[[], tuple[str, str, int]]] = {}
    if modes["REDIS_AUTH"] == "entra":
        providers["redis_credential_provider"] = EntraCredentialProvider(REDIS_SCOPE, shared)
    if modes["POSTGRES_AUTH"] == "entra":
        user = environ.get("POSTGRES_ENTRA_USER", "").strip()
        if not user:
            raise ValueError("POSTGRES_AUTH=entra needs POSTGRES_ENTRA_USER: the PostgreSQL role of the identity")
        providers["postgres_credential_provider"] = EntraCredentialProvider(POSTGRES_SCOPE, shared, user)
    return providers
