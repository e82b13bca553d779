"""The seed's "Testing Strategy" (seed/000_d674d536e23fe1f7.txt), run as written with only the import changed.

The two unit tests below are the seed's, verbatim: they build `ChatHistoryManager(mode="postgres",
redis_enabled=True)` with no other argument, so the servers come from the environment (DATABASE_URL and
REDIS_CONNECTION_STRING, set per test), and they use the module global `test_convo`, which the seed
leaves undefined (here: an app-shaped conversation with canonical UTC isoformat timestamps). Their ids
("conv1", "user1") are unique per test because every test gets a fresh database and an emptied Redis.
The seed's four "Integration Tests" bullets follow as tests.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

import chat_history_rs
from chat_history_rs import ChatHistoryManager
from support.redis_support import (
    DIRTY_SET,
    assert_cached,
    conv_key,
    dirty_member,
    dirty_set,
    make_conversation,
    pg_conversation_ids,
)
from support.servers import assert_row_matches

_now = datetime.now(timezone.utc)
test_convo = {
    "title": "What is Redis?",
    "model": "gpt-4o",
    "messages": [
        {"role": "user", "content": "What is Redis?", "time": _now.isoformat()},
        {
            "role": "assistant",
            "content": "Redis is an in-memory data store, used here as a cache in front of PostgreSQL.",
            "time": (_now + timedelta(seconds=2, microseconds=345)).isoformat(),
        },
    ],
    "created_at": _now.isoformat(),
    "last_modified": (_now + timedelta(seconds=2, microseconds=345)).isoformat(),
}


@pytest.fixture(autouse=True)
def seed_environment(monkeypatch, pg_url, rdb):
    """What the seed's app has: DATABASE_URL and REDIS_CONNECTION_STRING in the environment."""
    for name in ("REDIS_HOST", "REDIS_PASSWORD", "REDIS_PORT", "REDIS_SSL", "REDIS_TTL_SECONDS", "REDIS_CACHE_TTL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", pg_url)
    monkeypatch.setenv("REDIS_CONNECTION_STRING", rdb.url)
    yield
    # The seed's tests never close their managers; close them (the package's exit hook, run early) so
    # their flushers and pools do not outlive this test's database.
    chat_history_rs._core._close_all()


# --------------------------------------------------------------------------------------------------
# The seed's unit tests, verbatim
# --------------------------------------------------------------------------------------------------


def test_redis_cache_hit():
    """Test that cached conversations are returned from Redis."""
    manager = ChatHistoryManager(mode="postgres", redis_enabled=True)

    # Prime cache
    manager.save_conversation("conv1", test_convo, user_id="user1")

    # Should hit cache
    result = manager.get_conversation("conv1", user_id="user1")
    assert result == test_convo


def test_redis_write_back():
    """Test that dirty conversations are flushed to PostgreSQL."""
    manager = ChatHistoryManager(mode="postgres", redis_enabled=True)

    manager.save_conversation("conv1", test_convo, user_id="user1")
    count = manager.flush_dirty_conversations()

    assert count == 1
    # Verify in PostgreSQL
    pg_result = manager.postgres_backend.get_conversation("conv1", "user1")
    assert pg_result == test_convo


# --------------------------------------------------------------------------------------------------
# The seed's integration tests
# --------------------------------------------------------------------------------------------------


def test_integration_1_create_conversation_then_verify_in_redis(rdb, pg_conn):
    """1. Create conversation -> verify in Redis."""
    manager = ChatHistoryManager(mode="postgres", redis_enabled=True)
    manager.save_conversation("a1b2c3d4", test_convo, user_id="user1")

    assert_cached(rdb.client, "user1", "a1b2c3d4", test_convo, dirty=True)
    assert rdb.client.smembers(DIRTY_SET) == {"user1:a1b2c3d4"}
    # The seed's RedisBackend view of the same data.
    assert manager.redis_backend.get_conversation("user1", "a1b2c3d4") == test_convo
    assert manager.redis_backend.get_dirty_conversations() == [("user1", "a1b2c3d4")]
    assert "a1b2c3d4" not in pg_conversation_ids(pg_conn)


def test_integration_2_flush_then_verify_in_postgres(rdb, pg_conn):
    """2. Flush -> verify in PostgreSQL."""
    manager = ChatHistoryManager(mode="postgres", redis_enabled=True)
    manager.save_conversation("a1b2c3d4", test_convo, user_id="user1")
    manager.save_conversation("e5f6a7b8", test_convo, user_id="user2")

    assert manager.flush_dirty_conversations() == 2

    assert_row_matches(pg_conn, "a1b2c3d4", "user1", test_convo)
    assert_row_matches(pg_conn, "e5f6a7b8", "user2", test_convo)
    assert manager.postgres_backend.get_conversation("a1b2c3d4", "user1") == test_convo
    assert manager.redis_backend.get_dirty_conversations() == []
    assert rdb.client.hget(conv_key("user1", "a1b2c3d4"), "dirty") == "0"
    assert dirty_set(rdb.client) == set()


def test_integration_3_clear_redis_then_reload_from_postgres(rdb, pg_conn):
    """3. Clear Redis -> reload from PostgreSQL."""
    manager = ChatHistoryManager(mode="postgres", redis_enabled=True)
    manager.save_conversation("a1b2c3d4", test_convo, user_id="user1")
    manager.flush_dirty_conversations()

    rdb.client.flushdb()
    misses = manager.stats()["cache_misses"]

    assert manager.get_conversation("a1b2c3d4", user_id="user1") == test_convo
    assert manager.stats()["cache_misses"] == misses + 1
    assert_cached(rdb.client, "user1", "a1b2c3d4", test_convo, dirty=False)  # backfilled, clean
    assert manager.list_conversations("user1") == [("a1b2c3d4", {**test_convo, "messages": []})]


def test_integration_4_cache_hit_rate_under_load(rdb):
    """4. Measure cache hit rate under load (the seed's target: > 80 %)."""
    manager = ChatHistoryManager(mode="postgres", redis_enabled=True)
    conversations = {f"10ad{i:04d}": make_conversation(4, prefix=f"load {i} ") for i in range(50)}
    for cid, conv in conversations.items():
        manager.save_conversation(cid, conv, user_id="user1")
    assert manager.flush_dirty_conversations() == 50
    evicted = list(conversations)[:5]
    rdb.client.delete(*(conv_key("user1", cid) for cid in evicted))
    base = manager.stats()

    for _ in range(10):
        for cid, conv in conversations.items():
            assert manager.get_conversation(cid, user_id="user1") == conv

    stats = manager.stats()
    hits = stats["cache_hits"] - base["cache_hits"]
    misses = stats["cache_misses"] - base["cache_misses"]
    # 500 reads: the 5 cleared ones miss once, then are backfilled.
    assert (hits, misses) == (495, 5)
    assert hits / (hits + misses) > 0.8
    ratio = stats["cache_hits"] / (stats["cache_hits"] + stats["cache_misses"])
    assert stats["hit_rate"] == pytest.approx(ratio) or stats["hit_rate"] == pytest.approx(100 * ratio)
    json.dumps(stats)


# --------------------------------------------------------------------------------------------------
# The seed's RedisBackend methods (the seed's tests reach into manager.redis_backend)
# --------------------------------------------------------------------------------------------------


def test_seed_redis_backend_methods(rdb, pg_conn):
    manager = ChatHistoryManager(mode="postgres", redis_enabled=True)
    backend = manager.redis_backend
    conversation = make_conversation(3, title="through the backend")

    backend.set_conversation("user1", "0a0b0c0d", conversation)  # dirty=True by default
    assert_cached(rdb.client, "user1", "0a0b0c0d", conversation, dirty=True)
    assert backend.get_conversation("user1", "0a0b0c0d") == conversation
    assert backend.get_dirty_conversations() == [("user1", "0a0b0c0d")]

    backend.set_conversation("user1", "1a1b1c1d", conversation, dirty=False)
    assert_cached(rdb.client, "user1", "1a1b1c1d", conversation, dirty=False)
    assert backend.get_conversation("user1", "ffffffff") is None

    assert manager.flush_dirty_conversations() == 1
    assert_row_matches(pg_conn, "0a0b0c0d", "user1", conversation)
    assert pg_conversation_ids(pg_conn) == {"0a0b0c0d"}

    again = {**conversation, "title": "again"}
    backend.set_conversation("user1", "0a0b0c0d", again)
    # Clearing what PostgreSQL does not hold would lose it: the flag stays until it is written.
    backend.clear_dirty_flag("user1", "0a0b0c0d")
    assert rdb.client.hget(conv_key("user1", "0a0b0c0d"), "dirty") == "1"
    assert backend.get_dirty_conversations() == [("user1", "0a0b0c0d")]
    # The seed's flush: PostgreSQL first, then clear_dirty_flag.
    manager.postgres_backend.save_conversation("0a0b0c0d", "user1", again)
    backend.clear_dirty_flag("user1", "0a0b0c0d")
    assert rdb.client.hget(conv_key("user1", "0a0b0c0d"), "dirty") == "0"
    assert dirty_member("user1", "0a0b0c0d") not in dirty_set(rdb.client)
    assert backend.get_dirty_conversations() == []
