"""Fixtures: throwaway servers, a fresh database per test, unique ids, app-shaped conversations.

Servers (session-scoped, started on first use, deleted at the end):
    pg_server          the main PostgreSQL (trust auth), or CHR_TEST_POSTGRES_URL's server
    pg_scram_server    a second PostgreSQL cluster that demands a password (scram-sha-256)
    redis_server       redis-server, or CHR_TEST_REDIS_URL's server
Per test:
    pg_params / pg_url / pg_dsn   a fresh, empty database on pg_server (PgParams, URL form, key=value form)
    pg_conn            psycopg2 connection (autocommit) to that database, to inspect or plant rows
    pg_params_new_york a fresh database whose sessions default to TimeZone America/New_York
    pg_scram_params    a fresh database on pg_scram_server, with the correct password in it
    own_pg_server      a private PostgreSQL cluster a test may stop, kill and restart at will
    redis_url          URL of redis_server
    user_id / other_user_id   fresh uuid4 strings
    conv_id            8 random hex characters, like the app's ids
    sample_conversation   factory for app-shaped conversation dicts
    make_manager       factory for ChatHistoryManager; every manager is closed after the test
    pg_manager         ChatHistoryManager(mode="postgres", connection_string=pg_url)
    local_manager      ChatHistoryManager(mode="local", base_dir=tmp_path)

More fixtures come from the plugin modules in `pytest_plugins` below (support/redis_support.py: rdb,
make_redis_server, make_redis_manager; support/tls_support.py: the TLS servers), so every test module in
every folder can request them by name without importing them. The test files live in area folders
(tests/README.md); the helper modules in the `support` package here, tests/support/. pytest puts tests/ on
sys.path when it imports this conftest.py (the default "prepend" import mode), so
`from support.servers import ...` works from every folder.
"""

from __future__ import annotations

import os
import secrets
import uuid
from datetime import datetime, timezone

import pytest

# The helper modules hold checks with plain asserts: rewrite them so failures show the values. This must
# run before anything imports them (the plugin modules below are rewritten anyway, as plugins).
pytest.register_assert_rewrite(
    "support.servers", "support.redis_support", "support.chaos_support", "support.chaos_workload", "support.leaks"
)

from support.servers import (  # noqa: E402 - after register_assert_rewrite, as pytest requires
    ExternalPostgres,
    ExternalRedis,
    PgParams,
    PostgresServer,
    RedisServer,
    ServerError,
    create_database,
    drop_database,
    find_pg_bindir,
)

# Modules whose fixtures every test can use by name.
pytest_plugins = ["support.redis_support", "support.tls_support"]

# The password of pg_scram_server's superuser. Tests check it never leaks either.
SCRAM_PASSWORD = "correct-Horse:battery@staple/42"


# --------------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server():
    """The main PostgreSQL server: throwaway (trust auth) unless CHR_TEST_POSTGRES_URL names one.

    Offers .url (maintenance database), .port, .params (PgParams), and, when throwaway,
    .stop() / .kill() / .start() / .restart() (shared by the whole session: fault tests should
    prefer `own_pg_server`).
    """
    external = os.environ.get("CHR_TEST_POSTGRES_URL")
    if external:
        yield ExternalPostgres(external)
        return
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def pg_scram_server():
    """A throwaway cluster that requires a password (initdb -A scram-sha-256 --pwfile).

    Always throwaway, even with CHR_TEST_POSTGRES_URL: the tests need a server that rejects a
    wrong password. Skips when the PostgreSQL binaries are missing.
    """
    if find_pg_bindir() is None:
        pytest.skip("PostgreSQL binaries not found: cannot start a password-protected cluster")
    server = PostgresServer(auth="scram-sha-256", superuser_password=SCRAM_PASSWORD)
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture
def own_pg_server():
    """A private throwaway PostgreSQL for one test, free to stop, kill and restart.

    Request it before `make_manager` in the test's arguments, so it is torn down after the managers.
    """
    if find_pg_bindir() is None:
        pytest.skip("PostgreSQL binaries not found: cannot start a private cluster")
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def redis_server():
    """The Redis server: throwaway unless CHR_TEST_REDIS_URL names one. Offers .url, .port, stop/start."""
    external = os.environ.get("CHR_TEST_REDIS_URL")
    if external:
        yield ExternalRedis(external)
        return
    try:
        server = RedisServer()
    except ServerError as exc:
        pytest.skip(str(exc))
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def redis_cluster_servers():
    """A throwaway Redis Cluster for the session (the Redis-tier suites run on it with CHR_TEST_REDIS_CLUSTER=1)."""
    from support.cluster_support import RedisClusterServers

    servers = RedisClusterServers()
    try:
        servers.start()
        yield servers
    finally:
        servers.remove()


@pytest.fixture
def redis_url(redis_server) -> str:
    return redis_server.url


# --------------------------------------------------------------------------------------------------
# Databases
# --------------------------------------------------------------------------------------------------


def _fresh_database(server_params: PgParams, setup_sql: tuple[str, ...] = ()):
    params = create_database(server_params)
    if setup_sql:
        conn = server_params.connect()
        try:
            with conn.cursor() as cur:
                for sql in setup_sql:
                    cur.execute(sql.format(db=f'"{params.dbname}"'))
        finally:
            conn.close()
    return params


@pytest.fixture
def pg_params(pg_server):
    """A fresh, empty database (no schema) on pg_server, dropped after the test."""
    params = _fresh_database(pg_server.params)
    yield params
    drop_database(pg_server.params, params.dbname)


@pytest.fixture
def pg_url(pg_params) -> str:
    """`postgresql://postgres@127.0.0.1:<port>/test_<random>`."""
    return pg_params.url


@pytest.fixture
def pg_dsn(pg_params) -> str:
    """`host=127.0.0.1 port=<port> user=postgres dbname=test_<random>`."""
    return pg_params.dsn


@pytest.fixture
def pg_conn(pg_params):
    """A psycopg2 connection (autocommit) to the test's database, to inspect and plant rows."""
    conn = pg_params.connect()
    yield conn
    conn.close()


@pytest.fixture
def pg_params_new_york(pg_server):
    """A fresh database whose sessions default to TimeZone 'America/New_York' (not UTC)."""
    params = _fresh_database(pg_server.params, ("ALTER DATABASE {db} SET timezone TO 'America/New_York'",))
    yield params
    drop_database(pg_server.params, params.dbname)


@pytest.fixture
def pg_scram_params(pg_scram_server):
    """A fresh database on the password-protected cluster; .password is the correct one."""
    params = _fresh_database(pg_scram_server.params)
    yield params
    drop_database(pg_scram_server.params, params.dbname)


# --------------------------------------------------------------------------------------------------
# Ids and data
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def user_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def other_user_id() -> str:
    return str(uuid.uuid4())


@pytest.fixture
def conv_id() -> str:
    return secrets.token_hex(4)


def now_iso() -> str:
    """What the app writes: `datetime.now(timezone.utc).isoformat()`."""
    return datetime.now(timezone.utc).isoformat()


@pytest.fixture
def sample_conversation():
    """Factory: `sample_conversation(n_messages=2, *, title=..., model=..., contents=None, **overrides)`.

    Returns a new app-shaped dict {"title", "model", "messages": [{"role", "content", "time"}, ...],
    "created_at", "last_modified"}; roles alternate user/assistant, timestamps are
    `datetime.now(timezone.utc).isoformat()` (the canonical form). `contents` gives the message
    texts (its length wins over n_messages); `overrides` replace top-level keys.
    """

    def make(n_messages: int = 2, *, title: str = "Test chat", model: str = "gpt-4o", contents=None, **overrides):
        if contents is None:
            contents = [
                f"Question {i}: what is {i} + {i}?" if i % 2 == 0 else f"Answer {i}: {i - 1 + i - 1}."
                for i in range(n_messages)
            ]
        created_at = now_iso()
        conversation = {
            "title": title,
            "model": model,
            "messages": [
                {"role": "user" if i % 2 == 0 else "assistant", "content": text, "time": now_iso()}
                for i, text in enumerate(contents)
            ],
            "created_at": created_at,
            "last_modified": now_iso(),
        }
        conversation.update(overrides)
        return conversation

    return make


# --------------------------------------------------------------------------------------------------
# Managers
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def make_manager():
    """Factory for ChatHistoryManager(**kwargs); each one is closed after the test."""
    from chat_history_rs import ChatHistoryManager

    managers = []

    def make(*args, **kwargs):
        manager = ChatHistoryManager(*args, **kwargs)
        managers.append(manager)
        return manager

    yield make
    errors = []
    for manager in reversed(managers):
        try:
            manager.close()
        except Exception as exc:  # noqa: BLE001 - close them all, then report the first failure
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def pg_manager(make_manager, pg_url):
    return make_manager(mode="postgres", connection_string=pg_url)


@pytest.fixture
def local_manager(make_manager, tmp_path):
    return make_manager(mode="local", base_dir=str(tmp_path))
