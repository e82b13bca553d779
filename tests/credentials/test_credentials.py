"""Credentials that expire (docs/credentials.md): redis_credential_provider,
postgres_credential_provider, and chat_history_rs.azure, against a private Redis with ACL users and the
password-protected PostgreSQL.

A rotation (new password in, old one out, every session of the user killed) must cost no failed call
and no fallback; credentials reported to expire are renewed before they do (Redis: AUTH on the same
connection; PostgreSQL: a new connection); a provider that raises is named in the error; what a
provider returns never shows in errors, logs, repr() or stats().
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import sys
import threading
import time
from collections import namedtuple

import psycopg2
import pytest
import redis

from chat_history_rs import AsyncChatHistoryManager, ConfigurationError, UnavailableError, azure
from support.redis_support import conv_key, wait_until

ADMIN_PASSWORD = "admin-" + secrets.token_hex(8)


class Provider:
    """A credential provider whose answer a test changes; records when it was called."""

    def __init__(self, username, password, lifetime=None):
        self.username = username
        self.password = password
        self.lifetime = lifetime
        self.error = None
        self.calls = []
        self._lock = threading.Lock()

    def __call__(self):
        with self._lock:
            self.calls.append(time.time())
            if self.error is not None:
                raise self.error
            if self.lifetime is None:
                return (self.username, self.password)
            return (self.username, self.password, time.time() + self.lifetime)


def log_texts(caplog) -> str:
    return "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)


def fallbacks(manager) -> int:
    return manager.stats()["postgres_fallbacks"]


# --------------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def acl_redis(make_redis_server):
    """A private redis-server whose default user needs ADMIN_PASSWORD; returns (server, admin client)."""
    server = make_redis_server("--requirepass", ADMIN_PASSWORD)
    admin = redis.Redis(host="127.0.0.1", port=server.port, password=ADMIN_PASSWORD, decode_responses=True)
    yield server, admin
    admin.close()


def add_user(admin, name, password):
    admin.execute_command("ACL", "SETUSER", name, "on", f">{password}", "~*", "&*", "+@all")


def product_clients(admin, user):
    return [c for c in admin.client_list() if c.get("user") == user]


def is_tracking(client) -> bool:
    """The near cache's connections: the one subscribed to Redis's invalidations and the one that
    publishes its heartbeats, both named in CLIENT LIST."""
    return client.get("name", "").startswith("chat-history-near-")


def data_clients(admin, user):
    """The product's pooled connections, without the near cache's two (which log in again by
    reconnecting, since a subscribed RESP2 connection cannot send AUTH)."""
    return [c for c in product_clients(admin, user) if not is_tracking(c)]


def test_redis_rotation_costs_no_failed_call_and_no_fallback(
    acl_redis, pg_url, make_manager, sample_conversation, user_id, caplog
):
    caplog.set_level(logging.DEBUG, logger="chat_history_rs")
    server, admin = acl_redis
    user = "app-" + secrets.token_hex(4)
    old, new = "pw1-" + secrets.token_hex(8), "pw2-" + secrets.token_hex(8)
    add_user(admin, user, old)
    provider = Provider(user, old)
    manager = make_manager(
        mode="postgres",
        connection_string=pg_url,
        redis_enabled=True,
        redis_connection_string=server.url,
        redis_credential_provider=provider,
        background_flush=False,
    )
    first = sample_conversation(2)
    manager.save_conversation("aaaa0001", first, user_id)
    assert manager.get_conversation("aaaa0001", user_id) == first
    assert product_clients(admin, user), "the product's connections log in as the provider's user"
    before = fallbacks(manager)
    calls = len(provider.calls)

    # Rotate: the new password in, the old one out, every connection of the user dropped.
    admin.execute_command("ACL", "SETUSER", user, f">{new}", f"<{old}")
    provider.password = new
    killed = admin.execute_command("CLIENT", "KILL", "USER", user)
    assert killed >= 1
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=server.port, username=user, password=old).ping()

    second = sample_conversation(3)
    manager.save_conversation("aaaa0002", second, user_id)
    assert manager.get_conversation("aaaa0001", user_id) == first
    assert manager.get_conversation("aaaa0002", user_id) == second
    assert fallbacks(manager) == before, "a rotation must not send calls to PostgreSQL"
    assert manager.stats()["redis_available"] is True
    assert admin.hget(conv_key(user_id, "aaaa0002"), "title") == second["title"], "the save went to Redis"
    assert len(provider.calls) > calls, "the new connection asked the provider again"
    assert product_clients(admin, user)
    for secret in (old, new, user):
        assert secret not in log_texts(caplog)


def test_redis_connections_authenticate_again_before_expiry(
    acl_redis, pg_url, make_manager, sample_conversation, user_id
):
    server, admin = acl_redis
    first_user, second_user = "first-" + secrets.token_hex(4), "second-" + secrets.token_hex(4)
    add_user(admin, first_user, "pw-a")
    add_user(admin, second_user, "pw-b")
    # Credentials that live 4 s, renewed 1.5 s ahead: the renewal hands out another user, so the
    # connection's user in CLIENT LIST shows that AUTH was sent on the same connection.
    provider = Provider(first_user, "pw-a", lifetime=4.0)
    manager = make_manager(
        mode="postgres",
        connection_string=pg_url,
        redis_enabled=True,
        redis_connection_string=server.url,
        redis_pool_size=1,
        redis_credential_provider=provider,
        credential_refresh_margin=1.5,
        background_flush=False,
    )
    conv = sample_conversation(2)
    manager.save_conversation("bbbb0001", conv, user_id)
    (client,) = data_clients(admin, first_user)
    first_expiry = provider.calls[0] + 4.0
    provider.username, provider.password = second_user, "pw-b"
    before = fallbacks(manager)

    def renewed():
        assert manager.get_conversation("bbbb0001", user_id) == conv
        return data_clients(admin, second_user)

    wait_until(renewed, timeout=10, interval=0.2, what="the connection to authenticate as the second user")
    (after,) = data_clients(admin, second_user)
    assert after["id"] == client["id"], "the same connection authenticated again (no reconnect)"
    wait_until(
        lambda: not product_clients(admin, first_user) and any(map(is_tracking, product_clients(admin, second_user))),
        timeout=5,
        interval=0.1,
        what="the near cache's tracking connection to log in again as the second user",
    )
    assert len(provider.calls) >= 2
    assert provider.calls[1] < first_expiry, "renewed before the credentials expired"
    assert fallbacks(manager) == before


def test_redis_provider_that_raises_is_named_and_redis_is_not_used(
    acl_redis, pg_url, pg_conn, make_manager, sample_conversation, user_id, caplog
):
    caplog.set_level(logging.WARNING, logger="chat_history_rs")
    server, admin = acl_redis
    provider = Provider("nobody", "nothing")
    provider.error = ValueError("the vault is sealed")
    manager = make_manager(
        mode="postgres",
        connection_string=pg_url,
        redis_enabled=True,
        redis_connection_string=server.url,
        redis_credential_provider=provider,
        background_flush=False,
    )
    with pytest.raises(UnavailableError, match="redis_credential_provider raised ValueError: the vault is sealed"):
        manager.redis_backend.get_conversation(user_id, "cccc0001")
    # As with Redis down: the save goes to PostgreSQL, and the log says why Redis is not used.
    manager.save_conversation("cccc0001", sample_conversation(1), user_id)
    assert "redis_credential_provider raised ValueError" in log_texts(caplog)
    assert admin.dbsize() == 0, "nothing stored in Redis"
    assert provider.calls


@pytest.mark.parametrize(
    "returned, why",
    [
        ("the-password-itself", "returned a str"),
        (("user",), "returned 1 items"),
        (("user", 42), "password that is a int"),
        (("user", "pw", "soon"), "expires_at that is a str"),
    ],
)
def test_redis_provider_with_a_bad_result_is_named_without_its_value(
    acl_redis, pg_url, make_manager, user_id, returned, why
):
    server, _ = acl_redis
    manager = make_manager(
        mode="postgres",
        connection_string=pg_url,
        redis_enabled=True,
        redis_connection_string=server.url,
        redis_credential_provider=lambda: returned,
        background_flush=False,
    )
    with pytest.raises(UnavailableError) as info:
        manager.redis_backend.get_conversation(user_id, "dddd0001")
    text = str(info.value)
    assert "redis_credential_provider" in text and why in text, text
    assert "the-password-itself" not in text and "soon" not in text


def test_a_provider_must_be_callable(pg_url, make_manager):
    with pytest.raises(ConfigurationError, match="postgres_credential_provider must be a callable"):
        make_manager(mode="postgres", connection_string=pg_url, postgres_credential_provider=("u", "p"))


# --------------------------------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def pg_role(pg_scram_server, pg_scram_params):
    """A login role that owns the test's database on the password-protected cluster; returns
    (role, password, admin connection)."""
    role = "role_" + secrets.token_hex(4)
    password = "pw1-" + secrets.token_hex(8)
    admin = pg_scram_server.params.connect()
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"CREATE ROLE {role} LOGIN PASSWORD %s", (password,))
        cur.execute(f'ALTER DATABASE "{pg_scram_params.dbname}" OWNER TO {role}')
    yield role, password, admin
    # The database goes with pg_scram_params; the role (a random name) stays in the throwaway cluster.
    admin.close()


def backends(admin, role, dbname):
    with admin.cursor() as cur:
        cur.execute(
            "SELECT pid FROM pg_stat_activity WHERE usename = %s AND datname = %s AND pid <> pg_backend_pid()",
            (role, dbname),
        )
        return {row[0] for row in cur.fetchall()}


def test_postgres_rotation_costs_no_failed_call(
    pg_role, pg_scram_params, make_manager, sample_conversation, user_id, caplog
):
    caplog.set_level(logging.DEBUG, logger="chat_history_rs")
    role, old, admin = pg_role
    new = "pw2-" + secrets.token_hex(8)
    provider = Provider(role, old)
    # The connection string names no user or password: both come from the provider.
    dsn = f"host={pg_scram_params.host} port={pg_scram_params.port} dbname={pg_scram_params.dbname}"
    manager = make_manager(mode="postgres", connection_string=dsn, postgres_credential_provider=provider)
    first = sample_conversation(2)
    manager.save_conversation("eeee0001", first, user_id)
    assert backends(admin, role, pg_scram_params.dbname), "the product logs in as the provider's role"
    calls = len(provider.calls)

    with admin.cursor() as cur:
        cur.execute(f"ALTER ROLE {role} PASSWORD %s", (new,))
    provider.password = new
    with admin.cursor() as cur:
        cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = %s", (role,))
        assert cur.fetchone()[0] >= 1
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        pg_scram_params.with_login(role, old).connect()

    second = sample_conversation(3)
    manager.save_conversation("eeee0002", second, user_id)
    assert manager.get_conversation("eeee0001", user_id) == first
    assert manager.get_conversation("eeee0002", user_id) == second
    assert manager.stats()["errors"] == 0
    assert len(provider.calls) > calls
    for secret in (old, new, role):
        assert secret not in log_texts(caplog)
        assert secret not in repr(manager)


def test_postgres_connections_are_recycled_before_expiry(
    pg_role, pg_scram_params, make_manager, sample_conversation, user_id
):
    role, password, admin = pg_role
    provider = Provider(role, password, lifetime=3.0)
    dsn = f"host={pg_scram_params.host} port={pg_scram_params.port} dbname={pg_scram_params.dbname}"
    manager = make_manager(
        mode="postgres",
        connection_string=dsn,
        postgres_pool_size=1,
        postgres_credential_provider=provider,
        credential_refresh_margin=1.0,
    )
    conv = sample_conversation(2)
    manager.save_conversation("ffff0001", conv, user_id)
    (first_pid,) = backends(admin, role, pg_scram_params.dbname)
    first_expiry = provider.calls[-1] + 3.0
    # Renewal is due 1 s before the expiry; a call then gets a new connection.
    time.sleep(max(0.0, first_expiry - 1.0 - time.time()) + 0.2)
    assert manager.get_conversation("ffff0001", user_id) == conv
    assert time.time() < first_expiry, "the machine was too slow to check before the expiry"
    wait_until(
        lambda: first_pid not in backends(admin, role, pg_scram_params.dbname),
        timeout=5,
        what="the old session to end",
    )
    (second_pid,) = backends(admin, role, pg_scram_params.dbname)
    assert second_pid != first_pid, "a new connection, opened with fresh credentials"
    assert provider.calls[-1] < first_expiry


def test_postgres_provider_that_raises_fails_the_call_and_stores_nothing(
    pg_role, pg_scram_params, make_manager, sample_conversation, user_id
):
    role, password, admin = pg_role
    provider = Provider(role, password)
    dsn = f"host={pg_scram_params.host} port={pg_scram_params.port} dbname={pg_scram_params.dbname}"
    manager = make_manager(
        mode="postgres", connection_string=dsn, postgres_connect_timeout=2.0, postgres_credential_provider=provider
    )
    manager.save_conversation("abab0001", sample_conversation(1), user_id)
    provider.error = KeyError("no secret named app-db")
    with admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
    with pytest.raises(
        UnavailableError, match="postgres_credential_provider raised KeyError: 'no secret named app-db'"
    ):
        manager.save_conversation("abab0002", sample_conversation(1), user_id)
    check = pg_scram_params.connect()
    try:
        with check.cursor() as cur:
            cur.execute("SELECT conversation_id FROM conversations ORDER BY 1")
            assert [row[0] for row in cur.fetchall()] == ["abab0001"], "the failed save stored nothing"
    finally:
        check.close()


def test_postgres_provider_that_raises_at_start(pg_scram_params, make_manager):
    def provider():
        raise RuntimeError("no token yet")

    with pytest.raises(UnavailableError, match="postgres_credential_provider raised RuntimeError: no token yet"):
        make_manager(
            mode="postgres",
            connection_string=pg_scram_params.dsn,
            postgres_connect_timeout=2.0,
            postgres_credential_provider=provider,
        )


def test_async_manager_takes_the_providers(pg_role, pg_scram_params, sample_conversation, user_id):
    role, password, _ = pg_role
    provider = Provider(role, password)
    dsn = f"host={pg_scram_params.host} port={pg_scram_params.port} dbname={pg_scram_params.dbname}"
    conv = sample_conversation(2)

    async def main():
        async with AsyncChatHistoryManager(
            mode="postgres", connection_string=dsn, postgres_credential_provider=provider
        ) as m:
            await m.save_conversation("acac0001", conv, user_id)
            return await m.get_conversation("acac0001", user_id)

    assert asyncio.run(main()) == conv
    assert provider.calls


def test_nothing_the_provider_returns_in_repr_stats_or_logs(
    acl_redis, pg_role, pg_scram_params, make_manager, sample_conversation, user_id, caplog
):
    caplog.set_level(logging.DEBUG, logger="chat_history_rs")
    server, admin = acl_redis
    role, pg_password, _ = pg_role
    redis_user, redis_password = "ruser-" + secrets.token_hex(6), "rpw-" + secrets.token_hex(12)
    add_user(admin, redis_user, redis_password)
    dsn = f"host={pg_scram_params.host} port={pg_scram_params.port} dbname={pg_scram_params.dbname} user=postgres"
    manager = make_manager(
        mode="postgres",
        connection_string=dsn,
        redis_enabled=True,
        redis_connection_string=server.url,
        redis_credential_provider=Provider(redis_user, redis_password, lifetime=3.0),
        postgres_credential_provider=Provider(role, pg_password, lifetime=3.0),
        credential_refresh_margin=1.0,
        background_flush=False,
    )
    conv = sample_conversation(2)
    manager.save_conversation("aded0001", conv, user_id)
    time.sleep(2.2)  # past the renewal point of both
    assert manager.get_conversation("aded0001", user_id) == conv
    manager.flush_dirty_conversations()
    shown = "\n".join(
        [
            repr(manager),
            str(manager.stats()),
            repr(manager.redis_backend),
            repr(manager.postgres_backend),
            log_texts(caplog),
        ]
    )
    for secret in (redis_user, redis_password, role, pg_password):
        assert secret not in shown


# --------------------------------------------------------------------------------------------------
# chat_history_rs.azure, with a credential of azure-identity's shape
# --------------------------------------------------------------------------------------------------

AccessToken = namedtuple("AccessToken", "token expires_on")


def fake_jwt(oid):
    def part(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part({'oid': oid, 'aud': 'https://redis.azure.com'})}.{secrets.token_hex(16)}"


class FakeCredential:
    """azure-identity's TokenCredential shape: get_token(*scopes) -> AccessToken(token, expires_on)."""

    def __init__(self, oid, lifetime=3600):
        self.oid = oid
        self.lifetime = lifetime
        self.scopes = []
        self.tokens = []

    def get_token(self, *scopes, **kwargs):
        self.scopes.append(scopes)
        token = fake_jwt(self.oid)
        self.tokens.append(token)
        return AccessToken(token, int(time.time() + self.lifetime))


def test_azure_redis_provider_reads_the_object_id_and_reuses_the_token():
    oid = "9f1c1d2e-0000-4000-8000-" + secrets.token_hex(6)
    credential = FakeCredential(oid)
    provider = azure.redis_credential_provider(credential)
    username, token, expires_on = provider()
    assert (username, token) == (oid, credential.tokens[0])
    assert credential.scopes == [("https://redis.azure.com/.default",)]
    assert expires_on > time.time() + 3000
    assert provider() == (username, token, expires_on), "a token with long to live is reused"
    assert len(credential.scopes) == 1
    assert token not in repr(provider) and oid not in repr(provider)


def test_azure_provider_fetches_again_near_expiry():
    credential = FakeCredential("oid-1", lifetime=azure.TOKEN_REUSE_MARGIN - 1)
    provider = azure.postgres_credential_provider("chat_app", credential)
    first = provider()
    second = provider()
    assert first[0] == second[0] == "chat_app"
    assert credential.scopes == [("https://ossrdbms-aad.database.windows.net/.default",)] * 2
    assert first[1] != second[1]


def test_azure_token_without_oid_is_refused_without_the_token():
    class NoOid(FakeCredential):
        def get_token(self, *scopes, **kwargs):
            return AccessToken("not-a-jwt-" + secrets.token_hex(8), int(time.time() + 3600))

    with pytest.raises(ValueError, match="no 'oid' claim") as info:
        azure.redis_credential_provider(NoOid("x"))()
    assert "not-a-jwt" not in str(info.value)


def test_azure_providers_from_env():
    assert azure.providers_from_env({}) == {}
    assert azure.providers_from_env({"REDIS_AUTH": "password"}) == {}
    both = azure.providers_from_env(
        {"REDIS_AUTH": "entra", "POSTGRES_AUTH": "Entra", "POSTGRES_ENTRA_USER": "chat_app"},
        credential=FakeCredential("oid-2"),
    )
    assert set(both) == {"redis_credential_provider", "postgres_credential_provider"}
    assert both["redis_credential_provider"]()[0] == "oid-2"
    assert both["postgres_credential_provider"]()[0] == "chat_app"
    with pytest.raises(ValueError, match="REDIS_AUTH must be"):
        azure.providers_from_env({"REDIS_AUTH": "token"})
    with pytest.raises(ValueError, match="POSTGRES_ENTRA_USER"):
        azure.providers_from_env({"POSTGRES_AUTH": "entra"})


def test_importing_needs_no_azure_identity():
    import subprocess

    code = (
        "import sys, chat_history_rs, chat_history_rs.azure as a\n"
        "a.providers_from_env({'REDIS_AUTH': 'entra', 'AZURE_CLIENT_ID': 'x'})\n"
        "assert not any(m.startswith('azure.identity') for m in sys.modules), sorted(sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_azure_provider_without_azure_identity_says_how_to_install(pg_scram_params, make_manager):
    import importlib.util

    if importlib.util.find_spec("azure") is not None and importlib.util.find_spec("azure.identity") is not None:
        pytest.skip("azure-identity is installed")
    with pytest.raises(
        UnavailableError, match=r"postgres_credential_provider raised ImportError: .*chat-history-rs\[azure\]"
    ):
        make_manager(
            mode="postgres",
            connection_string=pg_scram_params.dsn,
            postgres_connect_timeout=2.0,
            postgres_credential_provider=azure.postgres_credential_provider("chat_app"),
        )


def test_azure_redis_provider_logs_in_to_redis(acl_redis, pg_url, make_manager, sample_conversation, user_id):
    # End to end with the fake Entra ID: the token is the password of the ACL user named by its oid.
    server, admin = acl_redis
    oid = "0c5e-" + secrets.token_hex(8)
    credential = FakeCredential(oid)
    provider = azure.redis_credential_provider(credential)
    _, token, _ = provider()
    add_user(admin, oid, token)
    manager = make_manager(
        mode="postgres",
        connection_string=pg_url,
        redis_enabled=True,
        redis_connection_string=server.url,
        redis_credential_provider=provider,
        background_flush=False,
    )
    conv = sample_conversation(2)
    manager.save_conversation("a2a20001", conv, user_id)
    assert manager.get_conversation("a2a20001", user_id) == conv
    assert product_clients(admin, oid)
    assert admin.exists(conv_key(user_id, "a2a20001"))


# --------------------------------------------------------------------------------------------------
# Redis Cluster: a cluster connection is replaced (not re-authenticated) before its credentials expire
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster():
    from support.cluster_support import RedisClusterServers
    from support.servers import ServerError

    try:
        servers = RedisClusterServers()
    except ServerError as exc:
        pytest.skip(str(exc))
    try:
        servers.start()
        yield servers
    finally:
        servers.remove()


def cluster_clients(cluster, user):
    return [c for port in cluster.ports for c in cluster.node(port).client_list() if c.get("user") == user]


@pytest.mark.slow
def test_cluster_connections_get_fresh_credentials(cluster, pg_url, make_manager, sample_conversation, user_id):
    cluster.wait_healthy()
    first_user, second_user = "cfirst-" + secrets.token_hex(4), "csecond-" + secrets.token_hex(4)
    for port in cluster.ports:
        add_user(cluster.node(port), first_user, "pw-a")
        add_user(cluster.node(port), second_user, "pw-b")
    provider = Provider(first_user, "pw-a", lifetime=4.0)
    manager = make_manager(
        mode="postgres",
        connection_string=pg_url,
        redis_enabled=True,
        redis_connection_string=cluster.url,
        redis_pool_size=1,
        redis_credential_provider=provider,
        credential_refresh_margin=1.5,
        background_flush=False,
        # The provider's calls are counted for the pool's one connection; the near cache's
        # tracking connections log in through it too (tests/near covers them).
        near_cache_bytes=0,
    )
    conv = sample_conversation(2)
    manager.save_conversation("c1c10001", conv, user_id)
    # (stats() is left until the end: on a cluster it does not leave its connection in the pool.)
    assert cluster_clients(cluster, first_user)
    first_expiry = provider.calls[0] + 4.0
    provider.username, provider.password = second_user, "pw-b"

    def renewed():
        assert manager.get_conversation("c1c10001", user_id) == conv
        return cluster_clients(cluster, second_user)

    wait_until(renewed, timeout=10, interval=0.2, what="a cluster connection logged in as the second user")
    assert first_expiry - 1.5 <= provider.calls[1] < first_expiry, "replaced when due, before the expiry"
    wait_until(lambda: not cluster_clients(cluster, first_user), timeout=5, what="the old connection to close")

    # A rotation with every connection of the user killed on every node: no failed call, no fallback.
    provider.lifetime = None
    for port in cluster.ports:
        node = cluster.node(port)
        node.execute_command("ACL", "SETUSER", second_user, ">pw-c", "<pw-b")
    provider.password = "pw-c"
    for port in cluster.ports:
        cluster.node(port).execute_command("CLIENT", "KILL", "USER", second_user)
    other = sample_conversation(3)
    manager.save_conversation("c1c10002", other, user_id)
    assert manager.get_conversation("c1c10002", user_id) == other
    assert manager.get_conversation("c1c10001", user_id) == conv
    stats = manager.stats()
    assert stats["redis_layout"] == "cluster"
    assert stats["postgres_fallbacks"] == 0 and stats["errors"] == 0
    assert stats["redis_available"] is True


# --------------------------------------------------------------------------------------------------
# The CLI and the example app select Entra ID from the environment (a stand-in azure.identity module)
# --------------------------------------------------------------------------------------------------

FAKE_AZURE_IDENTITY = """
import os, time
from collections import namedtuple

AccessToken = namedtuple("AccessToken", "token expires_on")


class DefaultAzureCredential:
    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def get_token(self, *scopes, **kwargs):
        assert scopes == ("https://ossrdbms-aad.database.windows.net/.default",), scopes
        assert self.kwargs == {"managed_identity_client_id": os.environ["EXPECTED_CLIENT_ID"]}, self.kwargs
        return AccessToken(os.environ["FAKE_ENTRA_TOKEN"], int(time.time()) + 3600)
"""


@pytest.fixture
def fake_azure_identity(tmp_path, monkeypatch):
    """A directory holding a stand-in `azure.identity` (DefaultAzureCredential handing out
    FAKE_ENTRA_TOKEN), first on sys.path; returns the directory."""
    package = tmp_path / "fake_site" / "azure" / "identity"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text(FAKE_AZURE_IDENTITY)
    monkeypatch.syspath_prepend(str(tmp_path / "fake_site"))
    for name in [m for m in sys.modules if m == "azure" or m.startswith("azure.")]:
        monkeypatch.delitem(sys.modules, name)
    return tmp_path / "fake_site"


@pytest.mark.parametrize("token_is_right", [True, False])
def test_cli_logs_in_with_entra_id_from_the_environment(pg_role, pg_scram_params, fake_azure_identity, token_is_right):
    import os
    import subprocess

    role, password, _ = pg_role
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "POSTGRES_", "DATABASE_URL"))}
    env.update(
        DATABASE_URL=f"host={pg_scram_params.host} port={pg_scram_params.port} dbname={pg_scram_params.dbname}",
        POSTGRES_AUTH="entra",
        POSTGRES_ENTRA_USER=role,
        AZURE_CLIENT_ID="client-id-1",
        EXPECTED_CLIENT_ID="client-id-1",
        FAKE_ENTRA_TOKEN=password if token_is_right else "wrong-token",
        PYTHONPATH=f"{fake_azure_identity}{os.pathsep}{env.get('PYTHONPATH', '')}",
    )
    result = subprocess.run(
        [sys.executable, "-m", "chat_history_rs", "init-db"], env=env, capture_output=True, text=True, timeout=60
    )
    if token_is_right:
        assert result.returncode == 0, result.stdout + result.stderr
    else:
        assert result.returncode != 0
        assert "wrong-token" not in result.stdout + result.stderr
        assert password not in result.stdout + result.stderr


def test_example_app_logs_in_with_entra_id_from_the_environment(
    pg_role, pg_scram_params, fake_azure_identity, monkeypatch, make_manager, sample_conversation, user_id
):
    from pathlib import Path

    role, password, _ = pg_role
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "examples" / "streamlit_app"))
    import chat_config

    monkeypatch.setenv("FAKE_ENTRA_TOKEN", password)
    monkeypatch.setenv("EXPECTED_CLIENT_ID", "client-id-2")
    environ = {
        "CHAT_HISTORY_MODE": "local_psql",
        "DATABASE_URL": f"host={pg_scram_params.host} port={pg_scram_params.port} dbname={pg_scram_params.dbname}",
        "POSTGRES_AUTH": "entra",
        "POSTGRES_ENTRA_USER": role,
        "AZURE_CLIENT_ID": "client-id-2",
    }
    settings = chat_config.load_settings(environ)
    assert password not in repr(settings)
    kwargs = settings.manager_kwargs()
    assert set(kwargs) >= {"postgres_credential_provider"} and "redis_credential_provider" not in kwargs
    manager = make_manager(**kwargs)
    conv = sample_conversation(2)
    manager.save_conversation("e1e10001", conv, user_id)
    assert manager.get_conversation("e1e10001", user_id) == conv
    with pytest.raises(chat_config.SettingsError, match="POSTGRES_ENTRA_USER"):
        chat_config.load_settings({**environ, "POSTGRES_ENTRA_USER": ""})
    with pytest.raises(chat_config.SettingsError, match="REDIS_AUTH"):
        chat_config.load_settings({**environ, "REDIS_AUTH": "key"})


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_forked_child_opens_its_connections_with_the_provider(pg_role, pg_scram_params, make_manager, user_id):
    # The child's first call goes through postgres_backend, whose pools open with the GIL held by
    # the caller: the provider runs on the pool's thread and must get the GIL without a stall.
    import os

    role, password, _ = pg_role
    provider = Provider(role, password)
    dsn = f"host={pg_scram_params.host} port={pg_scram_params.port} dbname={pg_scram_params.dbname}"
    manager = make_manager(
        mode="postgres", connection_string=dsn, postgres_connect_timeout=5.0, postgres_credential_provider=provider
    )
    manager.save_conversation("f0f00001", {"title": "t", "model": "m", "messages": []}, user_id)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            started = time.monotonic()
            shown = repr(manager.postgres_backend)
            assert manager.postgres_backend.get_conversation("f0f00001", user_id)["title"] == "t"
            code = 0 if time.monotonic() - started < 3.0 and password not in shown else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the child's first calls failed or stalled"
