"""Fixtures and helpers for the Redis-tier tests (test_redis_tier.py, test_seed.py, test_faults.py).

Builds on conftest.py's servers and per-test databases. Fixtures (a plugin listed in conftest.py's
`pytest_plugins`, so every test requests them by name without importing them):

    rdb                 the session's Redis, emptied (FLUSHDB) before the test: .url, .client, .server
    make_redis_server   factory for a private redis-server (extra args), killed after the test
    make_redis_manager  factory for ChatHistoryManager in redis mode on pg_url and rdb (background flusher
                        off unless asked for), closed after the test
    failpoints          the test build's failpoints (pause, wait, release, hits), all released after the test

The Redis named by CHR_TEST_REDIS_URL, if any, must be disposable: these tests empty it.
Helpers read Redis with redis-py and PostgreSQL with psycopg2, in the seed's key layout; with
CHR_TEST_REDIS_CLUSTER=1 `rdb` is a throwaway Redis Cluster (3 primaries, a replica each) and the
helpers read the cluster layout (docs/design.md, "Redis Cluster"), so a suite runs on both.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Optional

import psycopg2
import psycopg2.errors
import pytest
import redis

from chat_history_rs import _core
from support.servers import RedisServer, ServerError

# The suite on a Redis Cluster instead of one node (make test runs the Redis-tier suites both ways).
CLUSTER = os.environ.get("CHR_TEST_REDIS_CLUSTER") == "1"
DIRTY_SET = "dirty:convs"
SEED_FIELDS = ("title", "model", "messages", "created_at", "last_modified", "dirty")
DEFAULT_TTL = 1800


# --------------------------------------------------------------------------------------------------
# Keys (docs/design.md, "Keys and rows": the seed's layout)
# --------------------------------------------------------------------------------------------------


def _user(user_id: str) -> str:
    """The user part of a key: a hash tag on a cluster."""
    return f"{{{user_id}}}" if CLUSTER else user_id


def conv_key(user_id: str, conversation_id: str) -> str:
    return f"conv:{_user(user_id)}:{conversation_id}"


def list_key(user_id: str) -> str:
    return f"user:{_user(user_id)}:convlist"


def list_epoch_key(user_id: str) -> str:
    """Moved each time the change feed drops the user's cached list (docs/design.md, "Every cache follows
    PostgreSQL")."""
    return f"user:{_user(user_id)}:listepoch"


def user_dirty_key(user_id: str) -> str:
    return f"user:{_user(user_id)}:dirty"


def owner_key(conversation_id: str) -> str:
    return f"owner:{{{conversation_id}}}" if CLUSTER else f"owner:{conversation_id}"


def needs_single_node(what: str) -> None:
    """Skips a test that cannot mean anything on a cluster (a seed-design writer, a proxy in front of
    the one server), saying why."""
    if CLUSTER:
        pytest.skip(f"on a Redis Cluster: {what}")


def dirty_member(user_id: str, conversation_id: str) -> str:
    return f"{user_id}:{conversation_id}"


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=10)


# --------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------


@dataclass
class RedisHandle:
    url: str
    client: redis.Redis
    server: Any  # servers.RedisServer or ExternalRedis


class _ClusterAsServer:
    """The cluster in `rdb.server`'s place: a test that needs one server's port (to put a proxy in
    front of it, to stop it) is skipped, since that cannot cut a whole cluster off."""

    controllable = False

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.url = cluster.url

    @property
    def port(self) -> int:
        needs_single_node("a proxy or a restart in front of one node cannot cut the cluster off")
        raise AssertionError("unreachable")


@pytest.fixture
def rdb(request):
    """The session's Redis, emptied before the test so the dirty sets hold only this test's members."""
    if CLUSTER:
        cluster = request.getfixturevalue("redis_cluster_servers")
        cluster.wait_healthy()
        cluster.flushall()
        client = cluster.client()
        yield RedisHandle(cluster.url, client, _ClusterAsServer(cluster))
        client.close()
        return
    redis_server = request.getfixturevalue("redis_server")
    client = redis_client(redis_server.url)
    client.flushdb()
    yield RedisHandle(redis_server.url, client, redis_server)
    client.close()


@pytest.fixture
def make_redis_server():
    """Factory: `make_redis_server(*extra_args)` starts a private redis-server; all are removed after the test."""
    servers: list[RedisServer] = []

    def make(*extra_args: str) -> RedisServer:
        needs_single_node("the test runs its own single-node Redis (the single-node run covers it)")
        try:
            server = RedisServer(extra_args=list(extra_args))
        except ServerError as exc:
            pytest.skip(str(exc))
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.remove()


@pytest.fixture
def make_redis_manager(pg_url, rdb, make_manager):
    """Factory for a redis-mode ChatHistoryManager on this test's database and `rdb`.

    `make_redis_manager(redis_url=None, connection_string=None, **kwargs)`; the background flusher is off
    unless `background_flush=True` is passed (`background_flush=None`: the product's default), so a test
    decides when flushes happen. Requested after pg_url and rdb, so the managers are closed (and flushed)
    before the database and Redis go away.
    """

    def make(redis_url: Optional[str] = None, connection_string: Optional[str] = None, **kwargs):
        kwargs.setdefault("background_flush", False)
        if kwargs["background_flush"] is None:
            del kwargs["background_flush"]
        return make_manager(
            mode="postgres",
            connection_string=connection_string or pg_url,
            redis_enabled=True,
            redis_connection_string=redis_url or rdb.url,
            **kwargs,
        )

    return make


# --------------------------------------------------------------------------------------------------
# Conversations
# --------------------------------------------------------------------------------------------------

UTC = timezone.utc


def iso(dt: datetime) -> str:
    """The canonical form (`Timestamp` in src/model.rs): isoformat() of the UTC instant."""
    return dt.astimezone(UTC).isoformat()


def now_iso(delta: timedelta = timedelta(0)) -> str:
    return iso(datetime.now(UTC) + delta)


def make_conversation(
    n_messages: int = 2,
    *,
    title: str = "Chat",
    model: str = "gpt-4o",
    prefix: str = "",
    created_at: Optional[str] = None,
    last_modified: Optional[str] = None,
    content_size: int = 0,
) -> dict:
    """An app-shaped conversation with canonical timestamps; message i's content is unique per `prefix`."""
    base = datetime.now(UTC)
    messages = [
        {
            "role": "user" if i % 2 == 0 else "assistant",
            "content": f"{prefix}message {i}" + ("x" * content_size),
            "time": iso(base + timedelta(microseconds=i)),
        }
        for i in range(n_messages)
    ]
    return {
        "title": title,
        "model": model,
        "messages": messages,
        "created_at": created_at or iso(base),
        "last_modified": last_modified or iso(base + timedelta(microseconds=n_messages)),
    }


def grown(conversation: dict, n: int, text: str = "more") -> dict:
    """A copy with n more messages appended and last_modified moved to now."""
    out = json.loads(json.dumps(conversation))
    start = len(out["messages"])
    for i in range(start, start + n):
        out["messages"].append(
            {"role": "user" if i % 2 == 0 else "assistant", "content": f"{text} {i}", "time": now_iso()}
        )
    out["last_modified"] = now_iso()
    return out


def metadata(conversation: dict) -> dict:
    """What list_conversations returns for a conversation: metadata only."""
    return {**conversation, "messages": []}


# --------------------------------------------------------------------------------------------------
# Redis inspection
# --------------------------------------------------------------------------------------------------


def seed_fields(client: redis.Redis, user_id: str, conversation_id: str) -> Optional[dict]:
    """The hash's seed fields, messages decoded from JSON; None when the key does not exist."""
    data = client.hgetall(conv_key(user_id, conversation_id))
    if not data:
        return None
    out = {name: data.get(name) for name in SEED_FIELDS}
    if out["messages"] is not None:
        out["messages"] = json.loads(out["messages"])
    return out


def assert_cached(
    client: redis.Redis, user_id: str, conversation_id: str, conversation: dict, *, dirty: bool, ttl: int = DEFAULT_TTL
) -> None:
    """The hash holds `conversation` with the dirty flag; dirty: no TTL and in dirty:convs; clean: 0 < TTL <= ttl."""
    key = conv_key(user_id, conversation_id)
    assert seed_fields(client, user_id, conversation_id) == {**conversation, "dirty": "1" if dirty else "0"}, key
    remaining = client.ttl(key)
    in_dirty_set = dirty_member(user_id, conversation_id) in dirty_set(client)
    if dirty:
        assert remaining == -1, f"dirty {key} must not expire, TTL is {remaining}"
        assert in_dirty_set, f"dirty {key} is not in {DIRTY_SET}"
    else:
        assert 0 < remaining <= ttl, f"clean {key} must expire within {ttl}s, TTL is {remaining}"
        assert not in_dirty_set, f"clean {key} is still in {DIRTY_SET}"


def dirty_set(client: redis.Redis) -> set[str]:
    """Every dirty `<user>:<id>` member: the seed's one set, or every user's on a cluster."""
    if not CLUSTER:
        return client.smembers(DIRTY_SET)
    members: set[str] = set()
    for key in client.scan_iter(match="user:{*}:dirtyconvs", count=1000):
        members |= client.smembers(key)
    return members


def seed_view(client: redis.Redis) -> dict:
    """Everything in the seed's key layout (conv hashes' seed fields, convlists with scores, dirty:convs).

    Extra fields and keys a product adds for its own guarantees are left out, so a comparison of two
    views says whether the data a user (or a seed-design instance) sees changed.
    """
    view: dict[str, Any] = {}
    for key in client.scan_iter(match="conv:*", count=1000):
        data = client.hgetall(key)
        if data:
            view[key] = {name: data.get(name) for name in SEED_FIELDS}
    for key in client.scan_iter(match="user:*:convlist", count=1000):
        view[key] = client.zrange(key, 0, -1, withscores=True)
    view[DIRTY_SET] = dirty_set(client)
    return view


def write_seed_hash(
    client: redis.Redis,
    user_id: str,
    conversation_id: str,
    conversation: dict,
    *,
    dirty: bool = True,
    ttl=1800,
    compressed: bool = False,
) -> None:
    """Writes a conversation exactly as the seed's Python RedisBackend.set_conversation does; with
    `compressed`, as a seed instance with the seed plan's "Compression (Optional)" does (`messages` from
    `_compress_messages`: base64 of zlib of the JSON)."""
    needs_single_node("seed-design writers use the seed layout, which a cluster cannot hold")
    key = conv_key(user_id, conversation_id)
    messages = json.dumps(conversation["messages"])
    if compressed:
        messages = base64.b64encode(zlib.compress(messages.encode())).decode()
    client.hset(
        key,
        mapping={
            "title": conversation["title"],
            "model": conversation["model"],
            "messages": messages,
            "created_at": conversation["created_at"],
            "last_modified": conversation["last_modified"],
            "dirty": "1" if dirty else "0",
        },
    )
    if ttl is not None:
        client.expire(key, ttl)
    if dirty:
        client.sadd(DIRTY_SET, dirty_member(user_id, conversation_id))


# --------------------------------------------------------------------------------------------------
# PostgreSQL inspection
# --------------------------------------------------------------------------------------------------


def pg_conversation_ids(conn) -> set[str]:
    """Every conversation_id in the conversations table (empty when the table does not exist yet)."""
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT conversation_id FROM conversations")
            return {row[0] for row in cur.fetchall()}
    except psycopg2.errors.UndefinedTable:
        if not conn.autocommit:
            conn.rollback()
        return set()


def pg_message_count(conn, conversation_id: Optional[str] = None) -> int:
    try:
        with conn.cursor() as cur:
            if conversation_id is None:
                cur.execute("SELECT count(*) FROM messages")
            else:
                cur.execute("SELECT count(*) FROM messages WHERE conversation_id = %s", (conversation_id,))
            return cur.fetchone()[0]
    except psycopg2.errors.UndefinedTable:
        if not conn.autocommit:
            conn.rollback()
        return 0


def pg_message_identities(conn, conversation_id: str) -> list[tuple]:
    """[(sequence_number, message_id, xmin), ...]: a row rewritten (deleted and inserted, or updated) changes."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT sequence_number, message_id, xmin::text FROM messages WHERE conversation_id = %s"
            " ORDER BY sequence_number",
            (conversation_id,),
        )
        return cur.fetchall()


def pg_snapshot(conn) -> dict:
    """Every row of both tables, with message_id and the row version (xmin): any write shows up."""
    out = {}
    for table, order in (("conversations", "conversation_id"), ("messages", "conversation_id, sequence_number")):
        try:
            with conn.cursor() as cur:
                cur.execute(f"SELECT xmin::text, * FROM {table} ORDER BY {order}")
                out[table] = cur.fetchall()
        except psycopg2.errors.UndefinedTable:
            if not conn.autocommit:
                conn.rollback()
            out[table] = None
    return out


# --------------------------------------------------------------------------------------------------
# Waiting and subprocesses
# --------------------------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition"):
    """Polls predicate until it returns a truthy value (returned) or timeout seconds pass (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(interval)


# tests/, the directory that holds the helper package, for subprocess scripts that import `support.<module>`:
# put it on their sys.path.
TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_script(body: str) -> list[str]:
    """argv that runs `body` (dedented) in this interpreter."""
    return [sys.executable, "-c", textwrap.dedent(body)]


def script_env(**extra: str) -> dict:
    env = dict(os.environ)
    for name in ("REDIS_HOST", "REDIS_PASSWORD", "REDIS_PORT", "REDIS_SSL", "REDIS_ENABLED"):
        env.pop(name, None)
    env.update(extra)
    return env


def run_script(body: str, *, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(python_script(body), env=env, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------------------------------
# Forced interleavings: failpoints and calls in a thread
# --------------------------------------------------------------------------------------------------

WAIT = 20.0  # seconds a test waits for a thread to reach a failpoint


class Failpoints:
    """The test build's failpoints; every point is released when the test ends."""

    def pause(self, name: str, count: int | None = None) -> None:
        if count is None:
            _core._failpoint_pause(name)
        else:
            _core._failpoint_pause(name, count)

    def wait(self, name: str, hits: int = 1) -> None:
        assert _core._failpoint_wait(name, hits, WAIT), f"nothing reached failpoint {name!r} within {WAIT}s"

    def release(self, name: str) -> None:
        _core._failpoint_release(name)

    def hits(self, name: str) -> int:
        return _core._failpoint_hits(name)


@pytest.fixture
def failpoints():
    if not _core._failpoints_enabled():
        pytest.fail("this build has no failpoints: build with `make dev-test` (make test does)")
    _core._failpoints_reset()
    yield Failpoints()
    _core._failpoints_reset()


class Background:
    """Runs a call in a thread; `result()` joins it and re-raises what it raised."""

    def __init__(self, fn, *args, **kwargs) -> None:
        self.value = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.value = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - re-raised by result()
                self.error = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def result(self, timeout: float = 60):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the call did not return"
        if self.error is not None:
            raise self.error
        return self.value
